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
//!
//! The hash index drops entries lazily. Each registration gets a fresh, nonzero epoch that
//! both the index entry and the block's link carry; the entry is live while the two agree.
//! Evicting a cached block (the pool is usually full of them, so nearly every new block
//! evicts one) or unregistering a block only zeroes its link's epoch: no read of its hash,
//! no probe of a long-untouched index bucket. A lookup checks the epoch of the block it
//! finds (the link a prefix hit touches next anyway), a registration reuses a stale entry
//! for its key, and once stale entries outnumber the pool's blocks one pass drops them all,
//! so the index never holds more than `num_hashed + capacity + 1` entries.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

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
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

/// An index key: a block hash as two 8-byte halves. A `u128` is 16-byte aligned, which pads
/// an entry (key and [`IndexEntry`]) to 32 bytes; two `u64`s make it 24, so the index, whose
/// probes miss the cache, is a quarter smaller.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexKey([u64; 2]);

impl From<BlockHash> for IndexKey {
    #[inline]
    fn from(h: BlockHash) -> Self {
        IndexKey([h as u64, (h >> 64) as u64])
    }
}

impl Hash for IndexKey {
    /// The low half, as the `u128` key gave (an xxh3 digest needs no further mixing).
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0[0]);
    }
}

/// Fixed bookkeeping bytes per block: a ref count and its free-list link (with its
/// registration epoch). Blocks registered in the prefix cache also take an entry of the hash
/// index (a 24-byte entry and a control byte in a table at most 7/8 full: about 30 to 55
/// bytes), and an evicted block's stale entry stays until the next sweep. A block's hash
/// lives only in its index entry: no lookup needs the hash of a given block.
pub const BYTES_PER_BLOCK: usize = std::mem::size_of::<u32>() + std::mem::size_of::<Link>();

/// A block's place in the free queue, and the epoch of its registration (0: it holds no
/// hash), so the queue's operations (which pick the queue's end by it) and the index's
/// liveness check read this one small entry.
#[derive(Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
    epoch: u32,
}

const UNLINKED: Link = Link {
    prev: NIL,
    next: NIL,
    epoch: 0,
};

/// An index entry: the block registered under the key, and the epoch of that registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    block: BlockId,
    epoch: u32,
}

pub(crate) type HashIndex = HashMap<IndexKey, IndexEntry, BuildHasherDefault<PassThroughHasher>>;

#[derive(Clone)]
pub(crate) struct BlockPool {
    pub(crate) ref_cnt: Vec<u32>,
    /// Free-list links and registration epochs, one per block.
    links: Vec<Link>,
    head: u32,
    tail: u32,
    /// Blocks with ref_cnt 0 and no hash.
    pub(crate) num_free: usize,
    /// Blocks with ref_cnt 0 that still hold a registered hash (reusable prefix).
    pub(crate) num_cached: usize,
    /// Blocks with ref_cnt > 1.
    pub(crate) num_shared: usize,
    /// Blocks with a nonzero epoch (registered in the index); `index.len() - num_hashed`
    /// entries are stale.
    num_hashed: usize,
    /// The epoch the next registration takes; never 0.
    next_epoch: u32,
    index: HashIndex,
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
        let mut links = Vec::new();
        try_reserve(&mut links, n, what)?;
        links.resize(n, UNLINKED);
        let mut pool = BlockPool {
            ref_cnt,
            links,
            head: NIL,
            tail: NIL,
            num_free: 0,
            num_cached: 0,
            num_shared: 0,
            num_hashed: 0,
            next_epoch: 1,
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
        if self.links[i].epoch != 0 {
            // Its index entry goes stale: no read of the hash, no probe of the index.
            self.links[i].epoch = 0;
            self.num_hashed -= 1;
            self.num_cached -= 1;
            self.note_stale();
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
            if self.links[i].epoch != 0 {
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
            if self.links[i].epoch != 0 {
                self.push_back(b);
                self.num_cached += 1;
            } else {
                self.push_front(b);
                self.num_free += 1;
            }
        }
    }

    /// Whether block `b` is registered in the index.
    #[inline]
    pub(crate) fn is_hashed(&self, b: BlockId) -> bool {
        self.links[b as usize].epoch != 0
    }

    /// Whether index entry `e` names a registration that still holds.
    #[inline]
    fn live(&self, e: IndexEntry) -> bool {
        self.links[e.block as usize].epoch == e.epoch
    }

    /// Registers a full, referenced block under `h`. Returns false (and changes nothing) when
    /// `h` already names another block or this block already has a hash: like vLLM we never
    /// de-duplicate, so block tables stay append-only.
    pub(crate) fn register(&mut self, b: BlockId, h: BlockHash) -> bool {
        let i = b as usize;
        if self.links[i].epoch != 0 {
            return false;
        }
        if self.next_epoch == u32::MAX {
            self.renumber();
        }
        let fresh = IndexEntry {
            block: b,
            epoch: self.next_epoch,
        };
        // One probe of the index for the check and the insertion; a stale entry for `h`
        // is taken over.
        match self.index.entry(IndexKey::from(h)) {
            Entry::Occupied(mut e) => {
                let old = *e.get();
                if self.links[old.block as usize].epoch == old.epoch {
                    return false;
                }
                e.insert(fresh);
            }
            Entry::Vacant(v) => {
                v.insert(fresh);
            }
        }
        self.next_epoch += 1;
        self.links[i].epoch = fresh.epoch;
        self.num_hashed += 1;
        true
    }

    /// Removes a referenced block's registration because its contents are about to change.
    /// Its index entry goes stale.
    pub(crate) fn unregister(&mut self, b: BlockId) {
        let i = b as usize;
        debug_assert!(self.ref_cnt[i] > 0, "unregister of an unreferenced block");
        if self.links[i].epoch != 0 {
            self.links[i].epoch = 0;
            self.num_hashed -= 1;
            self.note_stale();
        }
    }

    /// Called after an entry went stale: sweeps once stale entries outnumber the blocks.
    #[inline]
    fn note_stale(&mut self) {
        if self.index.len() - self.num_hashed > self.ref_cnt.len() {
            self.sweep();
        }
    }

    /// Drops every stale index entry.
    fn sweep(&mut self) {
        let links = &self.links;
        self.index
            .retain(|_, e| links[e.block as usize].epoch == e.epoch);
    }

    /// Sweeps and gives the live registrations epochs `1..=num_hashed`, so the epoch
    /// counter can go on without ever reusing a live or stale epoch (run once per 2**32
    /// registrations).
    #[cold]
    fn renumber(&mut self) {
        self.sweep();
        // At most `num_blocks - 1 < u32::MAX` live entries remain.
        for (e, epoch) in self.index.values_mut().zip(1u32..) {
            self.links[e.block as usize].epoch = epoch;
            e.epoch = epoch;
        }
        self.next_epoch = self.num_hashed as u32 + 1;
    }

    /// Looks up a block registered under `h` (referenced or not).
    #[inline]
    pub(crate) fn lookup(&self, h: BlockHash) -> Option<BlockId> {
        let e = *self.index.get(&IndexKey::from(h))?;
        self.live(e).then_some(e.block)
    }

    /// Drops every hash held by an unreferenced block, turning cached blocks into plain free
    /// ones. Referenced blocks keep their registration. Returns how many were dropped.
    pub(crate) fn reset_prefix_cache(&mut self) -> usize {
        let mut dropped = 0;
        let mut b = self.head;
        while b != NIL {
            let next = self.links[b as usize].next;
            if self.links[b as usize].epoch != 0 {
                self.links[b as usize].epoch = 0;
                self.num_hashed -= 1;
                self.num_cached -= 1;
                self.num_free += 1;
                // Uncached blocks belong at the front.
                self.unlink(b);
                self.push_front(b);
                dropped += 1;
            }
            b = next;
        }
        self.sweep();
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
        if self.ref_cnt[0] != 0 || self.links[0].epoch != 0 {
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
            if self.links[i].epoch != 0 {
                in_cached_part = true;
                cached += 1;
            } else if in_cached_part {
                return Err(format!(
                    "uncached block {b} sits behind cached blocks in the free queue"
                ));
            } else {
                free += 1;
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
        // Every registered block is named by exactly one live index entry (the entry of the
        // hash it was registered under, carrying its epoch); no two blocks share an epoch;
        // stale entries stay within the sweep's bound.
        let mut named = vec![0u32; n];
        for e in self.index.values() {
            let b = e.block as usize;
            if b == 0 || b >= n || e.epoch == 0 {
                return Err(format!(
                    "the hash index holds an entry for block {b} under epoch {}",
                    e.epoch
                ));
            }
            if self.live(*e) {
                named[b] += 1;
            }
        }
        let mut epochs = std::collections::HashSet::new();
        for (b, (link, &count)) in self.links.iter().zip(&named).enumerate() {
            if link.epoch == 0 {
                continue;
            }
            if count != 1 {
                return Err(format!(
                    "block {b} is registered but {count} live hash index entries name it"
                ));
            }
            if link.epoch >= self.next_epoch || !epochs.insert(link.epoch) {
                return Err(format!(
                    "block {b}'s registration epoch is reused or unissued"
                ));
            }
        }
        if epochs.len() != self.num_hashed {
            return Err(format!(
                "{} blocks are registered but the counter says {}",
                epochs.len(),
                self.num_hashed
            ));
        }
        if self.index.len() > self.num_hashed + n {
            return Err(format!(
                "the hash index holds {} entries, more than the {} registered blocks + {n}",
                self.index.len(),
                self.num_hashed
            ));
        }
        let shared = self.ref_cnt.iter().filter(|&&r| r > 1).count();
        if shared != self.num_shared {
            return Err(format!(
                "{shared} blocks have ref_cnt > 1 but the counter says {}",
                self.num_shared
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An index entry takes 24 bytes, and keys that share the low half the index hashes by
    /// stay apart: the high half decides equality.
    #[test]
    fn index_keys_are_compact_and_compare_both_halves() {
        assert_eq!(std::mem::size_of::<(IndexKey, IndexEntry)>(), 24);
        let mut p = BlockPool::new(4).unwrap();
        let low = 0x1234_5678_9abc_def0u128;
        let a = cache(&mut p, low);
        let b = cache(&mut p, low | (7u128 << 64));
        assert_ne!(a, b);
        assert_eq!(p.lookup(low), Some(a));
        assert_eq!(p.lookup(low | (7u128 << 64)), Some(b));
        assert_eq!(p.lookup(low | (8u128 << 64)), None);
        p.check().unwrap();
    }

    /// Registers `b` (referenced) under `h`, then frees it so it sits cached in the queue.
    fn cache(p: &mut BlockPool, h: BlockHash) -> BlockId {
        let b = p.pop();
        assert!(p.register(b, h));
        p.decref(b);
        b
    }

    #[test]
    fn evicted_entries_go_stale_and_sweeps_bound_the_index() {
        let mut p = BlockPool::new(9).unwrap();
        for next in 1..=50u128 {
            // Every pop of a full queue evicts the least recently cached block.
            let b = cache(&mut p, next);
            assert_eq!(p.lookup(next), Some(b));
            if next > 8 {
                // The block cached 8 registrations ago was evicted by one of the pops since.
                assert_eq!(p.lookup(next - 8), None);
            }
            p.check().unwrap();
            assert!(p.index.len() <= p.num_hashed + p.ref_cnt.len());
        }
        // A stale key can be registered again, on another block.
        let stale = 3u128;
        assert_eq!(p.lookup(stale), None);
        let b = p.pop();
        assert!(p.register(b, stale));
        assert_eq!(p.lookup(stale), Some(b));
        // A live key cannot.
        let c = p.pop();
        assert!(!p.register(c, stale));
        p.unregister(b);
        assert_eq!(p.lookup(stale), None);
        p.check().unwrap();
    }

    #[test]
    fn the_epoch_counter_renumbers_before_it_wraps() {
        let mut p = BlockPool::new(6).unwrap();
        let kept: Vec<_> = (1..=3u128).map(|h| cache(&mut p, h)).collect();
        p.next_epoch = u32::MAX - 1;
        let last = cache(&mut p, 4);
        // This registration runs at u32::MAX and renumbers the live ones first.
        let b = p.pop();
        assert!(p.register(b, 5));
        assert!(p.next_epoch <= 6);
        for (h, &b) in (1..=3u128).zip(&kept).chain([(4, &last)]) {
            assert_eq!(p.lookup(h), Some(b));
        }
        assert_eq!(p.lookup(5), Some(b));
        p.check().unwrap();
        assert_eq!(p.reset_prefix_cache(), 4);
        assert_eq!(p.index.len(), 1);
        p.check().unwrap();
    }
}
