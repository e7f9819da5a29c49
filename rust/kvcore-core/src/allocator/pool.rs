//! The physical block pool: ref counts, the free queue and the prefix-cache hash map.
//!
//! The free queue is an intrusive doubly linked list stored in one `Vec` of links (`prev`,
//! `next`, and whether the block holds a hash), so popping, pushing and unlinking a block in
//! the middle are O(1), allocate nothing, and touch one small entry per block: freeing a
//! table's blocks reads its ref count and its link, not its 32-byte hash slot. Its order
//! encodes the reuse policy:
//!
//! ```text
//!   front                                                              back
//!   [ uncached free blocks ...     | cached blocks, least recently freed ... most recent ]
//!     ^ handed out first                 ^ evicted (hash dropped) only when the front runs dry
//! ```
//!
//! A block is in the queue exactly when its `ref_cnt` is 0 (the null block never is).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::BlockId;
use crate::error::{check_alloc, try_reserve, Result};

/// Marks "no neighbour" in the intrusive list.
const NIL: u32 = u32::MAX;

/// A 128-bit chained block hash (see `prefix.rs`).
pub(crate) type BlockHash = u128;

/// Keys are already xxh3 digests, so hashing them again would only cost time.
#[derive(Default)]
pub(crate) struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for keys other than u128; fold bytes so it stays a valid hasher.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

/// Fixed bookkeeping bytes per block: a ref count, an optional hash and its free-list link.
/// Blocks registered in the prefix cache also take an entry of the hash index (about 40 bytes).
pub const BYTES_PER_BLOCK: usize = std::mem::size_of::<u32>()
    + std::mem::size_of::<Link>()
    + std::mem::size_of::<Option<BlockHash>>();

/// A block's place in the free queue, and a copy of `hash[b].is_some()` so the queue's
/// operations (which pick the queue's end by it) need not read the hash slot.
#[derive(Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
    hashed: bool,
}

const UNLINKED: Link = Link {
    prev: NIL,
    next: NIL,
    hashed: false,
};

pub(crate) type HashIndex = HashMap<BlockHash, BlockId, BuildHasherDefault<PassThroughHasher>>;

#[derive(Clone)]
pub(crate) struct BlockPool {
    pub(crate) ref_cnt: Vec<u32>,
    /// `Some(h)` exactly when the block is registered in `index` under `h`.
    pub(crate) hash: Vec<Option<BlockHash>>,
    /// Free-list links and the hashed flag, one per block.
    links: Vec<Link>,
    head: u32,
    tail: u32,
    /// Blocks with ref_cnt 0 and no hash.
    pub(crate) num_free: usize,
    /// Blocks with ref_cnt 0 that still hold a registered hash (reusable prefix).
    pub(crate) num_cached: usize,
    /// Blocks with ref_cnt > 1.
    pub(crate) num_shared: usize,
    pub(crate) index: HashIndex,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks; block 0 is the null block and never enters the queue.
    ///
    /// Errors: `InvalidArgument` when the per-block metadata ([`BYTES_PER_BLOCK`] a block)
    /// exceeds the machine's memory or cannot be allocated, instead of the stall or process
    /// abort an unchecked allocation would give.
    pub(crate) fn new(num_blocks: usize) -> Result<Self> {
        let n = num_blocks;
        let what = "num_blocks";
        check_alloc(what, n, BYTES_PER_BLOCK)?;
        let mut ref_cnt = Vec::new();
        try_reserve(&mut ref_cnt, n, what)?;
        ref_cnt.resize(n, 0);
        let mut hash = Vec::new();
        try_reserve(&mut hash, n, what)?;
        hash.resize(n, None);
        let mut links = Vec::new();
        try_reserve(&mut links, n, what)?;
        links.resize(n, UNLINKED);
        let mut pool = BlockPool {
            ref_cnt,
            hash,
            links,
            head: NIL,
            tail: NIL,
            num_free: 0,
            num_cached: 0,
            num_shared: 0,
            index: HashIndex::default(),
        };
        for b in 1..n as u32 {
            pool.push_back(b);
        }
        pool.num_free = n - 1;
        Ok(pool)
    }

    #[inline]
    pub(crate) fn capacity(&self) -> usize {
        self.ref_cnt.len() - 1
    }

    /// Blocks an allocation may take right now: uncached ones plus evictable cached ones.
    #[inline]
    pub(crate) fn num_available(&self) -> usize {
        self.num_free + self.num_cached
    }

    #[inline]
    fn push_back(&mut self, b: u32) {
        let i = b as usize;
        self.links[i].prev = self.tail;
        self.links[i].next = NIL;
        if self.tail == NIL {
            self.head = b;
        } else {
            self.links[self.tail as usize].next = b;
        }
        self.tail = b;
    }

    #[inline]
    fn push_front(&mut self, b: u32) {
        let i = b as usize;
        self.links[i].next = self.head;
        self.links[i].prev = NIL;
        if self.head == NIL {
            self.tail = b;
        } else {
            self.links[self.head as usize].prev = b;
        }
        self.head = b;
    }

    #[inline]
    fn unlink(&mut self, b: u32) {
        let i = b as usize;
        let Link {
            prev: p, next: n, ..
        } = self.links[i];
        if p == NIL {
            self.head = n;
        } else {
            self.links[p as usize].next = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.links[n as usize].prev = p;
        }
        self.links[i].prev = NIL;
        self.links[i].next = NIL;
    }

    /// Takes one block from the front of the queue with ref_cnt 1. A cached block taken this
    /// way loses its hash: its contents are about to be overwritten.
    ///
    /// The caller must have checked `num_available() >= 1`.
    #[inline]
    pub(crate) fn pop(&mut self) -> BlockId {
        let b = self.head;
        debug_assert!(b != NIL, "pop on an empty free queue");
        self.unlink(b);
        let i = b as usize;
        if self.links[i].hashed {
            self.links[i].hashed = false;
            let h = self.hash[i].take().expect("a hashed block holds its hash");
            self.num_cached -= 1;
            self.index_remove(h, b);
        } else {
            self.num_free -= 1;
        }
        self.ref_cnt[i] = 1;
        b
    }

    /// Adds a reference; a cached block with no references leaves the queue (prefix hit).
    #[inline]
    pub(crate) fn incref(&mut self, b: BlockId) {
        let i = b as usize;
        if self.ref_cnt[i] == 0 {
            self.unlink(b);
            if self.links[i].hashed {
                self.num_cached -= 1;
            } else {
                self.num_free -= 1;
            }
        }
        self.ref_cnt[i] += 1;
        if self.ref_cnt[i] == 2 {
            self.num_shared += 1;
        }
    }

    /// Drops a reference. At zero the block joins the queue: cached blocks at the back (kept
    /// longest for prefix hits), uncached blocks at the front (reused first).
    #[inline]
    pub(crate) fn decref(&mut self, b: BlockId) {
        let i = b as usize;
        debug_assert!(self.ref_cnt[i] > 0, "decref of a free block");
        self.ref_cnt[i] -= 1;
        if self.ref_cnt[i] == 1 {
            self.num_shared -= 1;
        }
        if self.ref_cnt[i] == 0 {
            if self.links[i].hashed {
                self.push_back(b);
                self.num_cached += 1;
            } else {
                self.push_front(b);
                self.num_free += 1;
            }
        }
    }

    /// Registers a full, referenced block under `h`. Returns false (and changes nothing) when
    /// `h` already names another block or this block already has a hash: like vLLM we never
    /// de-duplicate, so block tables stay append-only.
    pub(crate) fn register(&mut self, b: BlockId, h: BlockHash) -> bool {
        let i = b as usize;
        if self.links[i].hashed {
            return false;
        }
        // One probe of the index for the check and the insertion.
        match self.index.entry(h) {
            Entry::Occupied(_) => false,
            Entry::Vacant(v) => {
                v.insert(b);
                self.hash[i] = Some(h);
                self.links[i].hashed = true;
                true
            }
        }
    }

    /// Drops `h` from the index if it names block `b` (one probe).
    #[inline]
    fn index_remove(&mut self, h: BlockHash, b: BlockId) {
        if let Entry::Occupied(e) = self.index.entry(h) {
            if *e.get() == b {
                e.remove();
            }
        }
    }

    /// Removes a referenced block's registration because its contents are about to change.
    pub(crate) fn unregister(&mut self, b: BlockId) {
        let i = b as usize;
        debug_assert!(self.ref_cnt[i] > 0, "unregister of an unreferenced block");
        if let Some(h) = self.hash[i].take() {
            self.links[i].hashed = false;
            self.index_remove(h, b);
        }
    }

    /// Looks up a cached block by hash (referenced or not).
    #[inline]
    pub(crate) fn lookup(&self, h: BlockHash) -> Option<BlockId> {
        self.index.get(&h).copied()
    }

    /// Drops every hash held by an unreferenced block, turning cached blocks into plain free
    /// ones. Referenced blocks keep their registration. Returns how many were dropped.
    pub(crate) fn reset_prefix_cache(&mut self) -> usize {
        let mut dropped = 0;
        let mut b = self.head;
        while b != NIL {
            let next = self.links[b as usize].next;
            if let Some(h) = self.hash[b as usize].take() {
                self.links[b as usize].hashed = false;
                self.index.remove(&h);
                self.num_cached -= 1;
                self.num_free += 1;
                // Uncached blocks belong at the front.
                self.unlink(b);
                self.push_front(b);
                dropped += 1;
            }
            b = next;
        }
        dropped
    }

    /// The queue from front to back, for invariant checks and tests.
    pub(crate) fn queue(&self) -> Vec<BlockId> {
        let mut out = Vec::new();
        let mut b = self.head;
        let mut steps = 0usize;
        while b != NIL && steps <= self.ref_cnt.len() {
            out.push(b);
            b = self.links[b as usize].next;
            steps += 1;
        }
        out
    }

    /// Checks the list links and counters; table-level checks live in `invariants.rs`.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        let n = self.ref_cnt.len();
        if self.ref_cnt[0] != 0 || self.hash[0].is_some() {
            return Err("the null block is referenced or hashed".into());
        }
        let queue = self.queue();
        if queue.len() > n - 1 {
            return Err("the free queue has a cycle".into());
        }
        let mut seen = vec![false; n];
        let mut prev = NIL;
        let mut in_cached_part = false;
        let (mut free, mut cached) = (0usize, 0usize);
        for &b in &queue {
            let i = b as usize;
            if b == 0 || i >= n {
                return Err(format!("block {b} in the free queue is not a pool block"));
            }
            if seen[i] {
                return Err(format!("block {b} appears twice in the free queue"));
            }
            seen[i] = true;
            if self.links[i].prev != prev {
                return Err(format!("block {b} has a broken prev link"));
            }
            prev = b;
            if self.ref_cnt[i] != 0 {
                return Err(format!(
                    "block {b} is in the free queue with ref_cnt {}",
                    self.ref_cnt[i]
                ));
            }
            match self.hash[i] {
                Some(_) => {
                    in_cached_part = true;
                    cached += 1;
                }
                None => {
                    if in_cached_part {
                        return Err(format!(
                            "uncached block {b} sits behind cached blocks in the free queue"
                        ));
                    }
                    free += 1;
                }
            }
        }
        if self.tail != prev {
            return Err("the free queue's tail pointer is stale".into());
        }
        for (b, (&queued, &r)) in seen.iter().zip(&self.ref_cnt).enumerate().skip(1) {
            if r == 0 && !queued {
                return Err(format!(
                    "unreferenced block {b} is missing from the free queue"
                ));
            }
        }
        if free != self.num_free || cached != self.num_cached {
            return Err(format!(
                "counters say {} free / {} cached, the queue holds {free} / {cached}",
                self.num_free, self.num_cached
            ));
        }
        for (h, &b) in &self.index {
            if self.hash[b as usize] != Some(*h) {
                return Err(format!(
                    "hash index points at block {b}, which holds another hash"
                ));
            }
        }
        let shared = self.ref_cnt.iter().filter(|&&r| r > 1).count();
        if shared != self.num_shared {
            return Err(format!(
                "{shared} blocks have ref_cnt > 1 but the counter says {}",
                self.num_shared
            ));
        }
        if let Some(b) = (0..n).find(|&b| self.links[b].hashed != self.hash[b].is_some()) {
            return Err(format!(
                "block {b}'s hashed flag disagrees with its hash slot"
            ));
        }
        let hashed = self.hash.iter().filter(|h| h.is_some()).count();
        if hashed != self.index.len() {
            return Err(format!(
                "{hashed} blocks carry a hash but the index has {} entries",
                self.index.len()
            ));
        }
        Ok(())
    }
}
