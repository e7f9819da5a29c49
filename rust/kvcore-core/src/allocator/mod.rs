//! The fixed-budget paged block allocator.
//!
//! A pool of `num_blocks` physical blocks of `block_size` token slots backs any number of
//! *tables*. A table is the ordered list of blocks that holds one stream of tokens: a whole
//! sequence, or one (sequence, layer, kv-head) stream when budgets differ per head.
//!
//! ```text
//!   table 7: blocks [4, 9, 2]   block_size 4   num_tokens 10
//!
//!   position   0  1  2  3 | 4  5  6  7 | 8  9  .  .
//!   block      4  4  4  4 | 9  9  9  9 | 2  2  (free slots)
//!   slot      16 17 18 19 |36 37 38 39 | 8  9
//!             slot = block_id * block_size + offset
//! ```
//!
//! Outcomes, following vLLM's convention: running out of blocks is an expected outcome
//! ([`KvError::OutOfBlocks`], nothing changed); a bad table id or bad positions is a caller
//! error; [`KvError::InvariantViolation`] is an allocator bug. Every method that can fail
//! validates and checks capacity *before* it mutates anything, so a failed call leaves the
//! allocator exactly as it was.

mod admit;
mod compact;
mod export;
mod invariants;
mod pool;
mod prefix;

use crate::error::{try_reserve, KvError, Result};
use pool::{BlockHash, BlockPool};

pub use compact::{CompactionPlan, Keep};
pub use export::{FlashInferLayout, VllmLayout};
pub use pool::BYTES_PER_BLOCK;
pub use prefix::BlockKeys;

/// A physical block id; `0` is the null block.
pub type BlockId = u32;
/// An opaque table handle: `(generation << 32) | slot index`, never negative.
pub type TableId = i64;
/// The null block: never handed out, used as padding in exported block tables.
pub const NULL_BLOCK: BlockId = 0;

/// Largest pool: block ids are exported as int32.
const MAX_NUM_BLOCKS: usize = i32::MAX as usize;
/// Table slots are retired instead of reused once their generation reaches this value, so
/// ids stay positive and a stale id can never alias a newer table.
const MAX_GENERATION: u32 = i32::MAX as u32;
/// Table ids keep the slot index in their low 32 bits.
const MAX_TABLE_SLOTS: usize = u32::MAX as usize;

#[derive(Debug)]
pub(crate) struct Table {
    pub(crate) blocks: Vec<BlockId>,
    pub(crate) num_tokens: usize,
    /// Chain hashes of the leading full blocks whose contents are known (registered or
    /// adopted); `hashes.len() <= num_tokens / block_size`.
    pub(crate) hashes: Vec<BlockHash>,
    /// When `tracked`: the token ids of the positions past the hashed blocks, so the block
    /// they fill can be hashed and registered the moment its last token is appended.
    pub(crate) tail: Vec<i64>,
    /// The chain covers every token: `hashes.len() == num_tokens / block_size` and `tail`
    /// holds the remaining `num_tokens % block_size` ids. An append without token ids, or a
    /// compaction that changes the table, loses this until the next `register_prefix`.
    pub(crate) tracked: bool,
    /// Salt of the table's chain: the one its last adopt or register call used.
    pub(crate) salt: Option<Box<[u8]>>,
    /// The partial last block may still carry a hash: only a compaction leaves one (a shared
    /// full block it shortened keeps its hash for the other owners). Lets an append into a
    /// partial block skip the pool's hash state in every other case.
    pub(crate) partial_hashed: bool,
    /// The partial last block may be referenced by another table: set by `fork` on both
    /// tables, cleared by an append (which copies a shared block on write or finds it
    /// private). With `partial_hashed` (the only other way a partial block can gain a
    /// reference: adoption of its hash) it says when an append must look at the last
    /// block's ref count, so a decode step touches neither the block list nor the pool
    /// for the rows that cannot need a copy.
    pub(crate) may_share_last: bool,
    /// `blocks.last()`, or the null block when there is none: a copy beside the table's
    /// other hot fields, so the decode step's row finds its slot without reading the block
    /// list (another cache line per row). Every change of `blocks` updates it (`sync_last`);
    /// `check_invariants` verifies it.
    pub(crate) last_block: BlockId,
}

impl Default for Table {
    /// An empty table: its (empty) chain is known, so appends with token ids register.
    fn default() -> Self {
        Table {
            blocks: Vec::new(),
            num_tokens: 0,
            hashes: Vec::new(),
            tail: Vec::new(),
            tracked: true,
            salt: None,
            partial_hashed: false,
            may_share_last: false,
            last_block: NULL_BLOCK,
        }
    }
}

impl Clone for Table {
    fn clone(&self) -> Self {
        let mut t = Table::default();
        t.clone_from(self);
        t
    }

    /// Field by field, so the vectors keep their buffers (a derived `Clone` would allocate
    /// new ones and drop the old): `fork` builds its child in a freed slot's spare table.
    fn clone_from(&mut self, source: &Self) {
        // Destructured, so a new field cannot be forgotten here.
        let Table {
            blocks,
            num_tokens,
            hashes,
            tail,
            tracked,
            salt,
            partial_hashed,
            may_share_last,
            last_block,
        } = source;
        self.blocks.clone_from(blocks);
        self.num_tokens = *num_tokens;
        self.hashes.clone_from(hashes);
        self.tail.clone_from(tail);
        self.tracked = *tracked;
        self.salt.clone_from(salt);
        self.partial_hashed = *partial_hashed;
        self.may_share_last = *may_share_last;
        self.last_block = *last_block;
    }
}

impl Table {
    /// Empties the table, keeping its buffers' capacity.
    fn reset(&mut self) {
        self.blocks.clear();
        self.hashes.clear();
        self.tail.clear();
        self.num_tokens = 0;
        self.tracked = true;
        self.salt = None;
        self.partial_hashed = false;
        self.may_share_last = false;
        self.last_block = NULL_BLOCK;
    }

    /// Refreshes `last_block` after `blocks` changed.
    #[inline]
    pub(crate) fn sync_last(&mut self) {
        self.last_block = self.blocks.last().copied().unwrap_or(NULL_BLOCK);
    }

    pub(crate) fn untrack(&mut self) {
        self.tracked = false;
        self.tail.clear();
    }

    fn set_salt(&mut self, salt: Option<&[u8]>) {
        if self.salt.as_deref() != salt {
            self.salt = salt.map(Box::from);
        }
    }
}

/// Output buffers of [`BlockAllocator::append_batch_with`]; reusable, calls append to them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchAppend {
    /// Slot ids, table after table.
    pub slots: Vec<i64>,
    /// `len(ids) + 1` offsets into `slots` per call.
    pub indptr: Vec<i64>,
    /// Copy-on-write pairs: copy block `cow_src[i]` into `cow_dst[i]` before writing slots.
    pub cow_src: Vec<BlockId>,
    pub cow_dst: Vec<BlockId>,
    /// Blocks the call newly registered in the prefix cache (filled with known token ids).
    pub num_registered: usize,
}

impl BatchAppend {
    pub fn clear(&mut self) {
        self.slots.clear();
        self.indptr.clear();
        self.cow_src.clear();
        self.cow_dst.clear();
        self.num_registered = 0;
    }
}

#[derive(Clone)]
struct TableSlot {
    generation: u32,
    table: Option<Table>,
    /// Last batch call that touched this slot; rejects a table listed twice in one batch.
    stamp: u64,
}

/// What `append` did besides handing out slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    /// `Some((src, dst))` when the table's last block was shared: the table now points at
    /// the private block `dst`, and the caller must copy block `src` into block `dst` in
    /// every K/V pool before writing the new slots.
    pub cow: Option<(BlockId, BlockId)>,
}

/// Counts for monitoring; `num_free + num_cached + num_used == capacity` always holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AllocatorStats {
    pub num_blocks: usize,
    pub block_size: usize,
    /// `num_blocks - 1`: the null block is not usable.
    pub capacity: usize,
    /// Unreferenced blocks that hold no cached prefix; handed out first.
    pub num_free_blocks: usize,
    /// Unreferenced blocks that still hold a cached prefix; reclaimed in LRU order.
    pub num_cached_blocks: usize,
    /// Blocks referenced by at least one table.
    pub num_used_blocks: usize,
    /// Blocks referenced by two or more tables.
    pub num_shared_blocks: usize,
    pub num_tables: usize,
    /// `num_used_blocks / capacity`.
    pub usage: f64,
}

/// The allocator. Not internally synchronised: the bindings wrap it in a `Mutex`.
#[derive(Clone)]
pub struct BlockAllocator {
    block_size: usize,
    pool: BlockPool,
    slots: Vec<TableSlot>,
    /// Per slot, the emptied buffers of its last freed table: a table created in the slot
    /// reuses them, so the per-table vectors are not grown from nothing again and again.
    /// Kept apart from `slots` so a batch call's walk over live tables stays compact.
    spares: Vec<Table>,
    free_slots: Vec<u32>,
    num_tables: usize,
    batch_stamp: u64,
    /// Scratch buffer for keep positions, reused across compactions.
    scratch_keep: Vec<i64>,
    /// Scratch buffer for a compacted table's old block list, reused across compactions.
    scratch_blocks: Vec<BlockId>,
    /// Scratch buffer for the slot indices of a batch, reused across batch calls.
    scratch_idxs: Vec<usize>,
    /// Scratch buffers of `admit_batch`'s lookups, reused across waves.
    scratch_admit: admit::AdmitScratch,
}

impl BlockAllocator {
    /// A pool of `num_blocks` blocks (block 0 is the null block, so `num_blocks - 1` are
    /// usable) of `block_size` token slots each.
    ///
    /// Errors: `InvalidArgument` when `num_blocks < 2`, `block_size == 0`, or slot ids would
    /// not fit int64 / block ids int32.
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self> {
        if num_blocks < 2 {
            return Err(KvError::InvalidArgument(format!(
                "num_blocks must be at least 2 (block 0 is the reserved null block), got {num_blocks}"
            )));
        }
        if num_blocks > MAX_NUM_BLOCKS {
            return Err(KvError::InvalidArgument(format!(
                "num_blocks must be at most {MAX_NUM_BLOCKS} (block ids are int32), got {num_blocks}"
            )));
        }
        if block_size == 0 {
            return Err(KvError::InvalidArgument(
                "block_size must be positive, got 0".into(),
            ));
        }
        if num_blocks
            .checked_mul(block_size)
            .is_none_or(|s| s > i64::MAX as usize)
        {
            return Err(KvError::InvalidArgument(format!(
                "num_blocks * block_size must fit in int64 slot ids, got {num_blocks} * {block_size}"
            )));
        }
        Ok(BlockAllocator {
            block_size,
            pool: BlockPool::new(num_blocks)?,
            slots: Vec::new(),
            spares: Vec::new(),
            free_slots: Vec::new(),
            num_tables: 0,
            batch_stamp: 0,
            scratch_keep: Vec::new(),
            scratch_blocks: Vec::new(),
            scratch_idxs: Vec::new(),
            scratch_admit: admit::AdmitScratch::default(),
        })
    }

    #[inline]
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    #[inline]
    pub fn num_blocks(&self) -> usize {
        self.pool.ref_cnt.len()
    }

    /// Blocks an allocation can take now (free plus reclaimable cached).
    #[inline]
    pub fn num_available_blocks(&self) -> usize {
        self.pool.num_available()
    }

    /// Reference count of every block, indexed by block id (entry 0 is the null block).
    pub fn ref_counts(&self) -> &[u32] {
        &self.pool.ref_cnt
    }

    /// The free queue from front (next handed out) to back, for tests and debugging.
    pub fn free_queue(&self) -> Vec<BlockId> {
        self.pool.queue()
    }

    pub fn stats(&self) -> AllocatorStats {
        let capacity = self.pool.capacity();
        let used = capacity - self.pool.num_free - self.pool.num_cached;
        AllocatorStats {
            num_blocks: self.num_blocks(),
            block_size: self.block_size,
            capacity,
            num_free_blocks: self.pool.num_free,
            num_cached_blocks: self.pool.num_cached,
            num_used_blocks: used,
            num_shared_blocks: self.pool.num_shared,
            num_tables: self.num_tables,
            usage: used as f64 / capacity as f64,
        }
    }

    // ----------------------------------------------------------------------------------
    // Table handles
    // ----------------------------------------------------------------------------------

    #[inline]
    fn slot_index(&self, id: TableId) -> Result<usize> {
        if id < 0 {
            return Err(KvError::UnknownTable(id));
        }
        let idx = (id as u64 & 0xffff_ffff) as usize;
        let generation = (id as u64 >> 32) as u32;
        match self.slots.get(idx) {
            Some(s) if s.generation == generation && s.table.is_some() => Ok(idx),
            Some(s) if generation < s.generation => Err(KvError::TableFreed(id)),
            _ => Err(KvError::UnknownTable(id)),
        }
    }

    #[inline]
    pub(crate) fn table(&self, id: TableId) -> Result<&Table> {
        let idx = self.slot_index(id)?;
        Ok(self.slots[idx]
            .table
            .as_ref()
            .expect("checked by slot_index"))
    }

    #[inline]
    fn table_at(&self, idx: usize) -> &Table {
        self.slots[idx].table.as_ref().expect("live slot")
    }

    /// Resolves a batch of ids to slot indices, rejecting duplicates; mutates nothing but
    /// the batch stamps (which carry no state between calls).
    fn batch_indices(&mut self, ids: &[TableId], out: &mut Vec<usize>) -> Result<()> {
        self.batch_stamp += 1;
        let stamp = self.batch_stamp;
        out.clear();
        out.reserve(ids.len());
        for &id in ids {
            let idx = self.slot_index(id)?;
            if self.slots[idx].stamp == stamp {
                return Err(KvError::InvalidArgument(format!(
                    "table {id} appears more than once in the batch"
                )));
            }
            self.slots[idx].stamp = stamp;
            out.push(idx);
        }
        Ok(())
    }

    /// Table slots that `create_table` can still hand out: reused slots plus never-used ones,
    /// up to 2^32 - 1 slots in all.
    fn table_capacity_left(&self) -> usize {
        self.free_slots.len() + (MAX_TABLE_SLOTS - self.slots.len())
    }

    /// Inserts `table`, or an empty table (reusing a freed slot's buffers) for `None`.
    fn insert_table(&mut self, table: Option<Table>) -> TableId {
        self.num_tables += 1;
        if let Some(idx) = self.free_slots.pop() {
            let spare = &mut self.spares[idx as usize];
            let slot = &mut self.slots[idx as usize];
            slot.table = Some(table.unwrap_or_else(|| std::mem::take(spare)));
            ((slot.generation as i64) << 32) | idx as i64
        } else {
            let idx = self.slots.len();
            debug_assert!(idx < MAX_TABLE_SLOTS, "checked by the caller");
            self.slots.push(TableSlot {
                generation: 0,
                table: Some(table.unwrap_or_default()),
                stamp: 0,
            });
            self.spares.push(Table::default());
            idx as i64
        }
    }

    /// Creates an empty table (it holds no blocks, so the block budget is not involved).
    ///
    /// Errors: `InvalidArgument` when 2^32 - 1 tables are live at once.
    pub fn create_table(&mut self) -> Result<TableId> {
        self.room_for_one_table()?;
        Ok(self.insert_table(None))
    }

    fn room_for_one_table(&mut self) -> Result<()> {
        if self.table_capacity_left() == 0 {
            return Err(KvError::InvalidArgument(format!(
                "cannot create a table: {MAX_TABLE_SLOTS} tables are live"
            )));
        }
        if self.free_slots.is_empty() {
            try_reserve(&mut self.slots, 1, "the table list")?;
            try_reserve(&mut self.spares, 1, "the table list")?;
        }
        Ok(())
    }

    /// Creates `n` empty tables and pushes their ids to `out`: all of them or none.
    ///
    /// Errors: `InvalidArgument` when `n` tables would exceed 2^32 - 1 live tables, or their
    /// bookkeeping cannot be allocated.
    pub fn create_tables(&mut self, n: usize, out: &mut Vec<TableId>) -> Result<()> {
        let left = self.table_capacity_left();
        if n > left {
            return Err(KvError::InvalidArgument(format!(
                "cannot create {n} tables: at most {left} more can be live at once"
            )));
        }
        try_reserve(out, n, "n")?;
        let fresh = n.saturating_sub(self.free_slots.len());
        try_reserve(&mut self.slots, fresh, "n")?;
        try_reserve(&mut self.spares, fresh, "n")?;
        for _ in 0..n {
            out.push(self.insert_table(None));
        }
        Ok(())
    }

    /// Number of tokens in the table.
    pub fn num_tokens(&self, id: TableId) -> Result<usize> {
        Ok(self.table(id)?.num_tokens)
    }

    /// The table's block ids in order.
    pub fn block_table(&self, id: TableId) -> Result<&[BlockId]> {
        Ok(&self.table(id)?.blocks)
    }

    /// Appends the slot id of every token of the table, in order, to `out`.
    pub fn slots(&self, id: TableId, out: &mut Vec<i64>) -> Result<()> {
        let t = self.table(id)?;
        self.push_slots(t, 0, t.num_tokens, out);
        Ok(())
    }

    #[inline]
    fn push_slots(&self, t: &Table, start: usize, end: usize, out: &mut Vec<i64>) {
        push_slots(self.block_size, t, start, end, out);
    }

    // ----------------------------------------------------------------------------------
    // Append, fork, free
    // ----------------------------------------------------------------------------------

    /// Blocks `append(id, n)` would take from the pool right now (0 for `n == 0`).
    pub fn blocks_needed(&self, id: TableId, n: usize) -> Result<usize> {
        let t = self.table(id)?;
        Ok(blocks_for_append(self.block_size, &self.pool, t, n).unwrap_or(usize::MAX))
    }

    fn out_of_blocks(&self, needed: usize) -> KvError {
        KvError::OutOfBlocks {
            needed,
            available: self.pool.num_available(),
            capacity: self.pool.capacity(),
        }
    }

    /// Applies an append whose capacity was already checked. With `tokens` (one id per new
    /// token) a tracked table extends its chain and registers every block the append fills;
    /// without, the table's chain stops being known. Returns the blocks newly registered.
    fn append_at(
        &mut self,
        idx: usize,
        n: usize,
        tokens: Option<&[i64]>,
        out: &mut Vec<i64>,
    ) -> (AppendOutcome, usize) {
        let bs = self.block_size;
        // Disjoint field borrows: the table stays in place while the pool hands out blocks.
        let table = self.slots[idx].table.as_mut().expect("live slot");
        let pool = &mut self.pool;
        let mut cow = None;
        if n > 0 && used_in_last(bs, table) != 0 && last_may_be_shared(table) {
            let last_i = table.blocks.len() - 1;
            let last = table.last_block;
            if pool.ref_cnt[last as usize] > 1 {
                let fresh = pool.pop();
                pool.decref(last);
                table.blocks[last_i] = fresh;
                cow = Some((last, fresh));
            } else if table.partial_hashed {
                // A partial block can still carry a hash when compaction shortened a shared
                // full block and its other owners have since let go: its contents are about
                // to change, so it leaves the prefix cache.
                pool.unregister(last);
            }
        }
        if n > 0 {
            table.partial_hashed = false;
            table.may_share_last = false;
        }
        let start = table.num_tokens;
        let end = start + n;
        while table.blocks.len() * bs < end {
            table.blocks.push(pool.pop());
        }
        table.sync_last();
        table.num_tokens = end;
        push_slots(bs, table, start, end, out);
        let registered = match tokens {
            Some(t) if table.tracked => extend_chain(bs, table, pool, t),
            Some(_) => 0,
            None => {
                if n > 0 {
                    table.untrack();
                }
                0
            }
        };
        (AppendOutcome { cow }, registered)
    }

    /// Appends `n` token slots to a table and pushes their slot ids to `out`.
    ///
    /// Expected outcome: `OutOfBlocks` when the pool cannot supply the blocks (nothing
    /// changed). Errors: unknown or freed table.
    pub fn append(&mut self, id: TableId, n: usize, out: &mut Vec<i64>) -> Result<AppendOutcome> {
        let idx = self.slot_index(id)?;
        let needed = blocks_for_append(self.block_size, &self.pool, self.table_at(idx), n)
            .unwrap_or(usize::MAX);
        if needed > self.pool.num_available() {
            return Err(self.out_of_blocks(needed));
        }
        Ok(self.append_at(idx, n, None, out).0)
    }

    /// Appends `counts[i]` slots to `ids[i]` for every i, all or nothing.
    ///
    /// Slot ids go to `slots` table after table; `indptr` gets `ids.len() + 1` offsets into
    /// it. Copy-on-write instructions go to `cow_src` / `cow_dst`.
    ///
    /// Errors: mismatched lengths, a table listed twice, unknown or freed tables, and the
    /// expected `OutOfBlocks` when the whole batch does not fit (nothing changed).
    pub fn append_batch(
        &mut self,
        ids: &[TableId],
        counts: &[usize],
        slots: &mut Vec<i64>,
        indptr: &mut Vec<i64>,
        cow_src: &mut Vec<BlockId>,
        cow_dst: &mut Vec<BlockId>,
    ) -> Result<()> {
        let mut out = BatchAppend {
            slots: std::mem::take(slots),
            indptr: std::mem::take(indptr),
            cow_src: std::mem::take(cow_src),
            cow_dst: std::mem::take(cow_dst),
            num_registered: 0,
        };
        let r = self.append_batch_with(ids, counts, None, &mut out);
        *slots = out.slots;
        *indptr = out.indptr;
        *cow_src = out.cow_src;
        *cow_dst = out.cow_dst;
        r
    }

    /// The engine's decode (or prefill) step: appends `counts[i]` slots to `ids[i]` for
    /// every i, all or nothing, and with `tokens` (the id of every appended token, table
    /// after table: `sum(counts)` of them) registers every block that fills in the prefix
    /// cache, continuing each table's hash chain under its salt. Tables whose chain is not
    /// known (after an append without token ids or a compaction, until `register_prefix`)
    /// take their slots but register nothing.
    ///
    /// Errors: as [`append_batch`](Self::append_batch), plus a `tokens` length that is not
    /// `sum(counts)`; nothing changes on any error.
    pub fn append_batch_with(
        &mut self,
        ids: &[TableId],
        counts: &[usize],
        tokens: Option<&[i64]>,
        out: &mut BatchAppend,
    ) -> Result<()> {
        if ids.len() != counts.len() {
            return Err(KvError::InvalidArgument(format!(
                "tables and counts must have the same length, got {} and {}",
                ids.len(),
                counts.len()
            )));
        }
        self.append_batch_counts(ids, Counts::Each(counts), tokens, out)
    }

    /// [`append_batch_with`](Self::append_batch_with) with the same count `n` for every
    /// table: a decode step is `append_batch_same(running, 1, Some(sampled), out)`.
    pub fn append_batch_same(
        &mut self,
        ids: &[TableId],
        n: usize,
        tokens: Option<&[i64]>,
        out: &mut BatchAppend,
    ) -> Result<()> {
        self.append_batch_counts(ids, Counts::Same(n), tokens, out)
    }

    fn append_batch_counts(
        &mut self,
        ids: &[TableId],
        counts: Counts<'_>,
        tokens: Option<&[i64]>,
        out: &mut BatchAppend,
    ) -> Result<()> {
        let mut idxs = std::mem::take(&mut self.scratch_idxs);
        let r = self.check_batch_append(ids, counts, tokens, &mut idxs);
        if r.is_ok() {
            self.apply_batch_append(&idxs, counts, tokens, out);
        }
        self.scratch_idxs = idxs;
        r
    }

    /// Validates a whole batch append (ids, duplicates, token count, capacity) in one pass
    /// over the tables and resolves the ids to slot indices in `idxs`. Changes nothing but
    /// the batch stamps.
    fn check_batch_append(
        &mut self,
        ids: &[TableId],
        counts: Counts<'_>,
        tokens: Option<&[i64]>,
        idxs: &mut Vec<usize>,
    ) -> Result<()> {
        let bs = self.block_size;
        self.batch_stamp += 1;
        let stamp = self.batch_stamp;
        // Written by index (one slot per id), not pushed: no capacity check per row. On an
        // error it is left partly written; the caller then applies nothing.
        idxs.clear();
        idxs.resize(ids.len(), 0);
        // A decode step usually fits whatever its rows need: when the bound on the batch
        // (`per_row_bound`) fits the pool, the rows' exact needs are not added up.
        let count_each = per_row_bound(bs, counts)
            .and_then(|b| b.checked_mul(ids.len()))
            .is_none_or(|b| b > self.pool.num_available());
        let mut needed = 0usize;
        for (i, (&id, out)) in ids.iter().zip(idxs.iter_mut()).enumerate() {
            let idx = self.slot_index(id)?;
            let slot = &mut self.slots[idx];
            if slot.stamp == stamp {
                return Err(KvError::InvalidArgument(format!(
                    "table {id} appears more than once in the batch"
                )));
            }
            slot.stamp = stamp;
            *out = idx;
            if count_each {
                let t = slot.table.as_ref().expect("checked by slot_index");
                needed = match counts {
                    // At most one block a row: the sum cannot overflow.
                    Counts::Same(1) => needed + blocks_for_one(bs, &self.pool, t),
                    _ => blocks_for_append(bs, &self.pool, t, counts.get(i))
                        .and_then(|b| needed.checked_add(b))
                        .unwrap_or(usize::MAX),
                };
            }
        }
        let total = counts.total(ids.len());
        if let Some(t) = tokens {
            if total != Some(t.len()) {
                return Err(KvError::InvalidArgument(format!(
                    "token_ids must hold one id per appended token ({}), got {}",
                    total.map_or_else(|| "more than 2**64".to_string(), |n| n.to_string()),
                    t.len()
                )));
            }
        }
        if needed > self.pool.num_available() {
            return Err(self.out_of_blocks(needed));
        }
        Ok(())
    }

    /// Applies a batch append that `check_batch_append` accepted.
    fn apply_batch_append(
        &mut self,
        idxs: &[usize],
        counts: Counts<'_>,
        tokens: Option<&[i64]>,
        out: &mut BatchAppend,
    ) {
        if let Counts::Same(1) = counts {
            self.apply_decode_step(idxs, tokens, out);
            return;
        }
        let bs = self.block_size;
        // Every table's length was checked to fit, so the total fits too.
        out.slots.reserve(counts.total(idxs.len()).unwrap_or(0));
        out.indptr.reserve(idxs.len() + 1);
        out.indptr.push(out.slots.len() as i64);
        let mut at = 0usize;
        for (i, &idx) in idxs.iter().enumerate() {
            let n = counts.get(i);
            let (cow, registered) = if n == 1 {
                // The decode step: one token, no division, no chain bookkeeping beyond a push.
                let table = self.slots[idx].table.as_mut().expect("live slot");
                let tok = tokens.map(|t| t[at]);
                let (slot, cow, registered) = append_one(bs, table, &mut self.pool, tok);
                out.slots.push(slot);
                (cow, registered)
            } else {
                let toks = tokens.map(|t| &t[at..at + n]);
                let (outcome, registered) = self.append_at(idx, n, toks, &mut out.slots);
                (outcome.cow, registered)
            };
            at += n;
            if let Some((s, d)) = cow {
                out.cow_src.push(s);
                out.cow_dst.push(d);
            }
            out.num_registered += registered;
            out.indptr.push(out.slots.len() as i64);
        }
    }

    /// `apply_batch_append` for one token per table (the decode step): every row pushes one
    /// slot, so the offsets are `0, 1, .., len` past the slots already there, written at once.
    fn apply_decode_step(&mut self, idxs: &[usize], tokens: Option<&[i64]>, out: &mut BatchAppend) {
        let base = out.slots.len();
        out.indptr
            .extend((base..=base + idxs.len()).map(|at| at as i64));
        // One loop per case, so a row tests neither the option nor a token index.
        match tokens {
            Some(t) => self.decode_rows(idxs, t.iter().map(|&x| Some(x)), out),
            None => self.decode_rows(idxs, std::iter::repeat(None), out),
        }
    }

    /// The rows of a decode step: `toks` yields each row's token id (or `None`). The slots
    /// go out through one `extend` of an exactly sized iterator: no capacity check per row.
    #[inline(always)]
    fn decode_rows(
        &mut self,
        idxs: &[usize],
        toks: impl Iterator<Item = Option<i64>>,
        out: &mut BatchAppend,
    ) {
        let bs = self.block_size;
        let (tables, pool) = (&mut self.slots, &mut self.pool);
        let (cow_src, cow_dst) = (&mut out.cow_src, &mut out.cow_dst);
        let mut registered = 0;
        out.slots.extend(idxs.iter().zip(toks).map(|(&idx, tok)| {
            let table = tables[idx].table.as_mut().expect("live slot");
            let (slot, cow, reg) = append_one(bs, table, pool, tok);
            if let Some((s, d)) = cow {
                cow_src.push(s);
                cow_dst.push(d);
            }
            registered += reg;
            slot
        }));
        out.num_registered += registered;
    }

    /// A new table sharing every block of `id` (ref counts go up; no block is taken).
    /// Appending to either table later copies a shared partial last block on write.
    pub fn fork(&mut self, id: TableId) -> Result<TableId> {
        self.table(id)?;
        self.room_for_one_table()?;
        let idx = self.slot_index(id)?;
        // The child is built in the buffers of the slot it will take (when a freed one is
        // reused), as `create_table` does: no allocation per fork, and its token tail keeps
        // room for a block, so the next decode step does not grow it.
        let mut child = match self.free_slots.last() {
            Some(&i) => std::mem::take(&mut self.spares[i as usize]),
            None => Table::default(),
        };
        let parent = self.slots[idx].table.as_mut().expect("live slot");
        // Both tables now share the partial last block (if any).
        parent.may_share_last = true;
        child.clone_from(parent);
        for &b in &child.blocks {
            self.pool.incref(b);
        }
        Ok(self.insert_table(Some(child)))
    }

    fn free_at(&mut self, idx: usize) {
        let mut table = self.slots[idx].table.take().expect("live slot");
        // Tail first: a cached tail block then sits ahead of its prefix in the LRU order and
        // is evicted before it, as the prefix is the part most likely to be hit again.
        for &b in table.blocks.iter().rev() {
            self.pool.decref(b);
        }
        table.reset();
        self.spares[idx] = table;
        let slot = &mut self.slots[idx];
        slot.generation += 1;
        if slot.generation < MAX_GENERATION {
            self.free_slots.push(idx as u32);
        }
        self.num_tables -= 1;
    }

    /// Frees a table: its blocks lose one reference each, tail first. Errors: unknown table,
    /// or `TableFreed` on a double free.
    pub fn free(&mut self, id: TableId) -> Result<()> {
        let idx = self.slot_index(id)?;
        self.free_at(idx);
        Ok(())
    }

    /// Frees many tables, all or nothing (every id is validated first).
    pub fn free_batch(&mut self, ids: &[TableId]) -> Result<()> {
        let mut idxs = Vec::new();
        self.batch_indices(ids, &mut idxs)?;
        for idx in idxs {
            self.free_at(idx);
        }
        Ok(())
    }

    // ----------------------------------------------------------------------------------
    // Prefix caching
    // ----------------------------------------------------------------------------------

    /// Registers the table's full blocks that are not registered yet under their chained
    /// hashes, so later tables can adopt them. `tokens` holds the token id of every position
    /// of the table (`tokens.len() == num_tokens`). Returns how many blocks were newly
    /// registered; a block whose hash already names another block is not registered again
    /// (no de-duplication, as in vLLM), but the chain goes on through it. Afterwards the
    /// table's chain is known, so appends with token ids register the blocks they fill.
    ///
    /// Pass the same `salt` for the whole life of a table.
    pub fn register_prefix(
        &mut self,
        id: TableId,
        tokens: &[i64],
        salt: Option<&[u8]>,
    ) -> Result<usize> {
        self.register_prefix_keys(id, BlockKeys::Tokens(tokens), salt)
    }

    /// [`register_prefix`](Self::register_prefix) with the blocks named by token ids or by
    /// the engine's own block hashes (one per full block of the table).
    pub fn register_prefix_keys(
        &mut self,
        id: TableId,
        keys: BlockKeys<'_>,
        salt: Option<&[u8]>,
    ) -> Result<usize> {
        check_keys(&keys)?;
        let idx = self.slot_index(id)?;
        self.check_register_len(idx, &keys, None)?;
        Ok(self.register_at(idx, keys, salt))
    }

    /// Registers many tables in one call, all or nothing: table `ids[i]` gets
    /// `keys[indptr[i]..indptr[i+1]]` (positions, or rows of block hashes), with the
    /// lengths `register_prefix` wants. Pushes the number of blocks newly registered per
    /// table to `registered`.
    pub fn register_prefix_batch(
        &mut self,
        ids: &[TableId],
        indptr: &[i64],
        keys: BlockKeys<'_>,
        salt: Option<&[u8]>,
        registered: &mut Vec<i64>,
    ) -> Result<()> {
        self.prefix_batch(
            ids,
            indptr,
            keys,
            registered,
            |a, i, idx, part| a.check_register_len(idx, part, Some(i)),
            |a, idx, part| a.register_at(idx, part, salt),
        )
    }

    /// The shared body of the batched prefix calls: validates the CSR layout and the ids,
    /// runs `check` on every table before `apply` changes anything (all or nothing), then
    /// pushes what `apply` returns for each table to `out`.
    fn prefix_batch<'k>(
        &mut self,
        ids: &[TableId],
        indptr: &[i64],
        keys: BlockKeys<'k>,
        out: &mut Vec<i64>,
        check: impl Fn(&Self, usize, usize, &BlockKeys<'k>) -> Result<()>,
        mut apply: impl FnMut(&mut Self, usize, BlockKeys<'k>) -> usize,
    ) -> Result<()> {
        check_keys(&keys)?;
        check_indptr(indptr, ids.len(), keys.len(), "indptr", keys.what())?;
        let mut idxs = Vec::new();
        self.batch_indices(ids, &mut idxs)?;
        let part = |i: usize| keys.slice(indptr[i] as usize, indptr[i + 1] as usize);
        for (i, &idx) in idxs.iter().enumerate() {
            check(self, i, idx, &part(i))?;
        }
        out.reserve(ids.len());
        for (i, &idx) in idxs.iter().enumerate() {
            out.push(apply(self, idx, part(i)) as i64);
        }
        Ok(())
    }

    /// `batch`: the table's index in a batch call, for the message.
    fn check_register_len(
        &self,
        idx: usize,
        keys: &BlockKeys<'_>,
        batch: Option<usize>,
    ) -> Result<()> {
        let n = self.table_at(idx).num_tokens;
        let want = keys.units_for(n, self.block_size);
        if keys.len() == want {
            return Ok(());
        }
        let ctx = batch.map_or(String::new(), |i| format!(" (table {i} of the batch)"));
        Err(KvError::InvalidArgument(match keys {
            BlockKeys::Tokens(_) => format!(
                "token_ids must hold one id per token of the table ({n}){ctx}, got {}",
                keys.len()
            ),
            BlockKeys::Hashes { .. } => format!(
                "block_hashes must hold one row per full block of the table ({want}){ctx}, got {}",
                keys.len()
            ),
        }))
    }

    /// Registers the table's unregistered full blocks (lengths already checked) and records
    /// what its chain now knows.
    fn register_at(&mut self, idx: usize, keys: BlockKeys<'_>, salt: Option<&[u8]>) -> usize {
        let bs = self.block_size;
        let table = self.slots[idx].table.as_mut().expect("live slot");
        let num_full = table.num_tokens / bs;
        let mut registered = 0;
        let mut parent = table.hashes.last().copied().unwrap_or(prefix::ROOT_HASH);
        for i in table.hashes.len()..num_full {
            let h = keys.hash(i, bs, parent, salt);
            registered += usize::from(self.pool.register(table.blocks[i], h));
            table.hashes.push(h);
            parent = h;
        }
        table.set_salt(salt);
        table.tail.clear();
        match keys {
            BlockKeys::Tokens(t) => {
                table.tail.extend_from_slice(&t[num_full * bs..]);
                table.tracked = true;
            }
            // The engine's keys name full blocks only: the ids of a partial block are unknown.
            BlockKeys::Hashes { .. } => table.tracked = table.num_tokens % bs == 0,
        }
        registered
    }

    /// Makes an empty table adopt the longest cached prefix of `tokens`: every leading full
    /// block whose chained hash is cached joins the table (ref count up; an unreferenced
    /// cached block leaves the free queue). Returns the number of tokens hit, a multiple of
    /// `block_size`. Takes no block from the pool, so it never runs out. Afterwards the
    /// table's chain (under `salt`) is known, hit or miss.
    ///
    /// A serving engine that needs logits for the last prompt token passes `tokens[..n-1]`,
    /// as vLLM caps its hits at `num_tokens - 1`.
    ///
    /// Errors: unknown or freed table, or a table that already holds tokens.
    pub fn adopt_prefix(
        &mut self,
        id: TableId,
        tokens: &[i64],
        salt: Option<&[u8]>,
    ) -> Result<usize> {
        self.adopt_prefix_keys(id, BlockKeys::Tokens(tokens), salt)
    }

    /// [`adopt_prefix`](Self::adopt_prefix) with the blocks named by token ids or by the
    /// engine's own block hashes.
    pub fn adopt_prefix_keys(
        &mut self,
        id: TableId,
        keys: BlockKeys<'_>,
        salt: Option<&[u8]>,
    ) -> Result<usize> {
        check_keys(&keys)?;
        let idx = self.slot_index(id)?;
        self.check_empty(id, idx)?;
        Ok(self.adopt_at(idx, keys, salt))
    }

    /// Adopts for many empty tables in one call, all or nothing: table `ids[i]` looks up
    /// `keys[indptr[i]..indptr[i+1]]`. Pushes the tokens hit per table to `hits`. Tables
    /// are served in order, but none of them registers anything, so no table of the batch
    /// hits another's blocks.
    pub fn adopt_prefix_batch(
        &mut self,
        ids: &[TableId],
        indptr: &[i64],
        keys: BlockKeys<'_>,
        salt: Option<&[u8]>,
        hits: &mut Vec<i64>,
    ) -> Result<()> {
        self.prefix_batch(
            ids,
            indptr,
            keys,
            hits,
            |a, i, idx, _| a.check_empty(ids[i], idx),
            |a, idx, part| a.adopt_at(idx, part, salt),
        )
    }

    fn check_empty(&self, id: TableId, idx: usize) -> Result<()> {
        let n = self.table_at(idx).num_tokens;
        if n != 0 {
            return Err(KvError::InvalidArgument(format!(
                "adopt_prefix needs an empty table, table {id} holds {n} tokens"
            )));
        }
        Ok(())
    }

    fn adopt_at(&mut self, idx: usize, keys: BlockKeys<'_>, salt: Option<&[u8]>) -> usize {
        let bs = self.block_size;
        let table = self.slots[idx].table.as_mut().expect("live slot");
        let mut parent = prefix::ROOT_HASH;
        for i in 0..keys.num_blocks(bs) {
            let h = keys.hash(i, bs, parent, salt);
            let Some(b) = self.pool.lookup(h) else { break };
            self.pool.incref(b);
            table.blocks.push(b);
            table.hashes.push(h);
            parent = h;
        }
        table.num_tokens = table.blocks.len() * bs;
        table.sync_last();
        table.tail.clear();
        table.tracked = true;
        table.set_salt(salt);
        table.num_tokens
    }

    /// Drops every cached prefix held by unreferenced blocks (they become plain free blocks).
    /// Blocks still referenced keep their registration. Returns how many were dropped.
    pub fn reset_prefix_cache(&mut self) -> usize {
        self.pool.reset_prefix_cache()
    }
}

#[cfg(test)]
mod tests;

/// Feeds the ids of tokens just appended to a tracked table into its chain: every block they
/// complete is hashed under its parent and the table's salt, and registered. Returns how
/// many blocks were newly registered (a hash that already names a block is not, as in
/// `register_prefix`).
fn extend_chain(bs: usize, table: &mut Table, pool: &mut BlockPool, mut tokens: &[i64]) -> usize {
    let mut registered = 0;
    while !tokens.is_empty() {
        let take = (bs - table.tail.len()).min(tokens.len());
        let (now, rest) = tokens.split_at(take);
        tokens = rest;
        let full: &[i64] = if table.tail.is_empty() && take == bs {
            now
        } else {
            table.tail.extend_from_slice(now);
            if table.tail.len() < bs {
                break;
            }
            &table.tail
        };
        let parent = table.hashes.last().copied().unwrap_or(prefix::ROOT_HASH);
        let h = prefix::hash_block(parent, full, table.salt.as_deref());
        registered += usize::from(pool.register(table.blocks[table.hashes.len()], h));
        table.hashes.push(h);
        table.tail.clear();
    }
    registered
}

/// The per-table counts of a batch append: one count for every table, or one each.
#[derive(Clone, Copy)]
enum Counts<'a> {
    Same(usize),
    Each(&'a [usize]),
}

impl Counts<'_> {
    #[inline]
    fn get(&self, i: usize) -> usize {
        match *self {
            Counts::Same(n) => n,
            Counts::Each(c) => c[i],
        }
    }

    /// The total over `len` tables; `None` when it overflows.
    fn total(&self, len: usize) -> Option<usize> {
        match *self {
            Counts::Same(n) => n.checked_mul(len),
            Counts::Each(c) => c.iter().try_fold(0usize, |acc, &x| acc.checked_add(x)),
        }
    }
}

/// The most blocks one row of a batch append can take from the pool, when that is small
/// (`None`: count each row): a row of at most `block_size` tokens takes at most one fresh
/// block and one copy-on-write block, and a single token only one of the two (a fresh block
/// when the last one is full, a copy when it is partial and shared).
#[inline]
fn per_row_bound(bs: usize, counts: Counts<'_>) -> Option<usize> {
    match counts {
        Counts::Same(0) => Some(0),
        Counts::Same(1) => Some(1),
        // A table's length is at most `num_blocks * block_size`, which fits i64 (checked by
        // `new`), so adding at most `block_size` cannot overflow usize: no per-row check.
        Counts::Same(n) if n <= bs => Some(2),
        _ => None,
    }
}

/// `blocks_for_append(bs, pool, t, 1)` without its general arithmetic: a fresh block when
/// the last one is full (or there is none), a copy when it is partial and shared.
#[inline]
fn blocks_for_one(bs: usize, pool: &BlockPool, t: &Table) -> usize {
    if t.num_tokens == t.blocks.len() * bs {
        1
    } else {
        usize::from(last_may_be_shared(t) && pool.ref_cnt[t.last_block as usize] > 1)
    }
}

/// Blocks that appending `n` tokens to `t` takes from the pool, counting the copy-on-write
/// block when the partial last block is shared; `None` when the table's length would
/// overflow.
#[inline]
fn blocks_for_append(bs: usize, pool: &BlockPool, t: &Table, n: usize) -> Option<usize> {
    if n == 0 {
        return Some(0);
    }
    let used_in_last = used_in_last(bs, t);
    let (room, cow) = if used_in_last == 0 {
        (0, 0)
    } else if !last_may_be_shared(t) {
        (bs - used_in_last, 0)
    } else {
        let last = t.last_block;
        (
            bs - used_in_last,
            usize::from(pool.ref_cnt[last as usize] > 1),
        )
    };
    // The decode step's rows (n within the room left, or one token into a fresh block)
    // need no division.
    let fresh = if n <= room {
        0
    } else if n - room <= bs {
        1
    } else {
        (n - room).div_ceil(bs)
    };
    // Reject lengths whose slot ids could not be represented at all.
    t.num_tokens.checked_add(n)?;
    fresh.checked_add(cow)
}

/// Appends one token to `t` (capacity already checked) and returns its slot id: the decode
/// step's row. Does what `append_at` does for `n == 1`, without its divisions and slices:
/// a fresh block when the last one is full (or there is none), else a copy-on-write of a
/// shared partial block, or the unregistering of a partial block that still carries a hash.
/// With `tok` a tracked table pushes the id to its tail and registers the block it fills.
/// Returns the slot, the copy-on-write pair and the blocks newly registered (0 or 1).
#[inline(always)]
fn append_one(
    bs: usize,
    t: &mut Table,
    pool: &mut BlockPool,
    tok: Option<i64>,
) -> (i64, Option<(BlockId, BlockId)>, usize) {
    let nb = t.blocks.len();
    // Tokens in the last block; `bs` when it is full or there is none.
    let used = if nb == 0 {
        bs
    } else {
        t.num_tokens - (nb - 1) * bs
    };
    let mut cow = None;
    let (block, off) = if used == bs {
        let b = pool.pop();
        t.blocks.push(b);
        t.last_block = b;
        (b, 0)
    } else {
        let last = t.last_block;
        if last_may_be_shared(t) && pool.ref_cnt[last as usize] > 1 {
            let fresh = pool.pop();
            pool.decref(last);
            t.blocks[nb - 1] = fresh;
            t.last_block = fresh;
            cow = Some((last, fresh));
            (fresh, used)
        } else {
            if t.partial_hashed {
                // See `append_at`: a compaction can leave a hash on a partial block.
                pool.unregister(last);
            }
            (last, used)
        }
    };
    t.partial_hashed = false;
    t.may_share_last = false;
    t.num_tokens += 1;
    let slot = (block as usize * bs + off) as i64;
    let registered = match tok {
        Some(id) if t.tracked => {
            t.tail.push(id);
            if t.tail.len() == bs {
                let parent = t.hashes.last().copied().unwrap_or(prefix::ROOT_HASH);
                let h = prefix::hash_block(parent, &t.tail, t.salt.as_deref());
                // The block this token filled is the last one (`blocks[hashes.len()]` of a
                // tracked table): its copy beside the table saves a read of the block list.
                debug_assert_eq!(t.last_block, t.blocks[t.hashes.len()]);
                let fresh = pool.register(t.last_block, h);
                t.hashes.push(h);
                t.tail.clear();
                usize::from(fresh)
            } else {
                0
            }
        }
        Some(_) => 0,
        None => {
            t.untrack();
            0
        }
    };
    (slot, cow, registered)
}

/// Rejects engine keys of width 0 (they would name every block alike).
fn check_keys(keys: &BlockKeys<'_>) -> Result<()> {
    match *keys {
        BlockKeys::Hashes { bytes, width } if width == 0 || bytes.len() % width != 0 => {
            Err(KvError::InvalidArgument(format!(
                "block_hashes rows must be at least one byte wide and fill the buffer, got width {width} for {} bytes",
                bytes.len()
            )))
        }
        _ => Ok(()),
    }
}

/// Checks CSR offsets for `n` rows over `total` entries of `values`: `n + 1` offsets that
/// start at 0, never decrease and end at `total`.
fn check_indptr(indptr: &[i64], n: usize, total: usize, name: &str, values: &str) -> Result<()> {
    if indptr.len() != n + 1 {
        return Err(KvError::InvalidArgument(format!(
            "{name} must have len(tables) + 1 = {} entries, got {}",
            n + 1,
            indptr.len()
        )));
    }
    if indptr[0] != 0 || indptr[n] as u64 != total as u64 {
        return Err(KvError::InvalidArgument(format!(
            "{name} must start at 0 and end at len({values}) = {total}, got {} and {}",
            indptr[0], indptr[n]
        )));
    }
    if let Some(i) = indptr.windows(2).position(|w| w[1] < w[0]) {
        return Err(KvError::InvalidArgument(format!(
            "{name} must be non-decreasing, but {name}[{}] = {} < {name}[{i}] = {}",
            i + 1,
            indptr[i + 1],
            indptr[i]
        )));
    }
    Ok(())
}

/// Whether another table may reference `t`'s partial last block (see `Table::may_share_last`);
/// when false, its ref count is known to be 1.
#[inline]
fn last_may_be_shared(t: &Table) -> bool {
    t.may_share_last || t.partial_hashed
}

/// Tokens in the table's last block, or 0 when that block is full or there is none.
/// Uses `blocks.len() == ceil(num_tokens / block_size)` to avoid a division.
#[inline]
fn used_in_last(bs: usize, t: &Table) -> usize {
    match t.blocks.len() {
        0 => 0,
        nb => {
            let r = t.num_tokens - (nb - 1) * bs;
            if r == bs {
                0
            } else {
                r
            }
        }
    }
}

/// Pushes the slot ids of positions `start..end` of `t`: one division per call, not per token.
#[inline]
fn push_slots(bs: usize, t: &Table, start: usize, end: usize, out: &mut Vec<i64>) {
    if start >= end {
        return;
    }
    out.reserve(end - start);
    // Block by block: each block's slots are consecutive ids, a loop the compiler vectorises.
    let (mut bi, mut off) = (start / bs, start % bs);
    let mut pos = start;
    while pos < end {
        let take = (bs - off).min(end - pos);
        let base = (t.blocks[bi] as usize * bs + off) as i64;
        out.extend((0..take as i64).map(|k| base + k));
        pos += take;
        off = 0;
        bi += 1;
    }
}
