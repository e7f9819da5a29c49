//! Compaction plans: the bookkeeping half of eviction.
//!
//! Given the positions to keep, a table is rewritten so that the kept tokens occupy its
//! leading positions, in order, and every block that became empty goes back to the pool.
//! The allocator only moves ids around; the returned plan tells the caller which slots to
//! copy in its K/V pools (and in any other per-slot state such as scores or merge counts).
//!
//! ```text
//!   keep = [0, 1, 5, 6, 9]                block_size 4, blocks [A, B, C] -> [A, B]
//!
//!   before   A: t0 t1 t2 t3 | B: t4 t5 t6 t7 | C: t8 t9
//!   after    A: t0 t1 t5 t6 | B: t9  .  .  . |  (C freed)
//!   plan     src = [B1, B2, C1]  dst = [A2, A3, B0]   (t0, t1 already in place: no move)
//! ```
//!
//! Contract of a plan, written once here and repeated in the Python docs:
//! * Apply it sequentially, move after move, **or** all at once as one gather of every
//!   source followed by one scatter to every destination (`pool[dst] = pool[src]` in numpy
//!   or torch). Both give the same result because no move reads a slot that an earlier move
//!   of the same plan (or of an earlier table in a batch plan) wrote.
//! * Apply it before the next call that allocates, from any thread: blocks freed by the
//!   compaction still hold source data, and the next allocation may hand them out again.
//! * Sources may lie in shared blocks; destinations never do. A shared block in the
//!   rewritten range is replaced by a private block taken from the pool, so compaction can
//!   run out of blocks, in which case nothing changes.
//! * Moves are minimal for these rules: a kept token already at its destination does not
//!   move, except in a replaced shared block, where every kept token must move.

use super::{check_indptr, BlockAllocator, Table, TableId};
use crate::error::{KvError, Result};

/// The positions to keep, for [`BlockAllocator::compact`].
#[derive(Clone, Copy, Debug)]
pub enum Keep<'a> {
    /// Strictly ascending positions in `[0, num_tokens)`.
    Positions(&'a [i64]),
    /// One flag per token of the table; `true` keeps the token.
    Mask(&'a [bool]),
}

/// Slot moves: copy slot `src[i]` to slot `dst[i]`; see the module docs for the contract.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactionPlan {
    pub src: Vec<i64>,
    pub dst: Vec<i64>,
}

impl CompactionPlan {
    pub fn len(&self) -> usize {
        self.src.len()
    }
    pub fn is_empty(&self) -> bool {
        self.src.is_empty()
    }
    pub fn clear(&mut self) {
        self.src.clear();
        self.dst.clear();
    }
}

/// Where a compaction writes and what it keeps, derived from the keep positions.
struct Geometry {
    /// Number of kept tokens.
    num_kept: usize,
    /// Blocks the table holds afterwards.
    new_num_blocks: usize,
    /// First block that receives a move (== new_num_blocks when nothing moves).
    write_start: usize,
    /// Leading blocks that stay full and untouched, so their chain hashes stay valid.
    hash_valid: usize,
}

/// Checks that `keep` is strictly ascending and inside `[0, num_tokens)`.
fn validate_positions(keep: &[i64], num_tokens: usize, id: TableId) -> Result<()> {
    let mut prev: i64 = -1;
    for (i, &p) in keep.iter().enumerate() {
        if p < 0 || p as u64 >= num_tokens as u64 {
            return Err(KvError::InvalidPositions(format!(
                "keep position {p} (index {i}) is out of range for table {id} with {num_tokens} tokens"
            )));
        }
        if p <= prev {
            let what = if p == prev { "duplicated" } else { "unsorted" };
            return Err(KvError::InvalidPositions(format!(
                "keep positions must be strictly ascending, but they are {what}: keep[{i}] = {p} follows keep[{}] = {prev}",
                i - 1
            )));
        }
        prev = p;
    }
    Ok(())
}

impl BlockAllocator {
    fn geometry(&self, keep: &[i64]) -> Geometry {
        let bs = self.block_size;
        let m = keep.len();
        let first_moved = keep
            .iter()
            .enumerate()
            .position(|(j, &p)| p as usize != j)
            .unwrap_or(m);
        let new_num_blocks = m.div_ceil(bs);
        let write_start = if first_moved < m {
            first_moved / bs
        } else {
            new_num_blocks
        };
        Geometry {
            num_kept: m,
            new_num_blocks,
            write_start,
            hash_valid: write_start.min(m / bs),
        }
    }

    /// New blocks the compaction takes from the pool: one per shared block it writes into.
    fn compaction_need(&self, t: &Table, g: &Geometry) -> usize {
        t.blocks[g.write_start..g.new_num_blocks]
            .iter()
            .filter(|&&b| self.pool.ref_cnt[b as usize] > 1)
            .count()
    }

    /// Rewrites the table at `idx` (capacity already checked) and appends its moves.
    fn compact_at(&mut self, idx: usize, keep: &[i64], plan: &mut CompactionPlan) {
        let bs = self.block_size;
        let g = self.geometry(keep);
        let mut table = self.slots[idx].table.take().expect("live slot");
        // The old block list, in a buffer kept across compactions.
        let mut old = std::mem::take(&mut self.scratch_blocks);
        old.clone_from(&table.blocks);
        // Every kept position past the first rewritten block may move: one reservation
        // instead of a doubling of the plan's buffers per compaction.
        let moves = keep.len().saturating_sub(g.write_start * bs);
        plan.src.reserve(moves);
        plan.dst.reserve(moves);

        // 1. Private destinations: replace every shared block that will be written.
        //    New blocks are taken before any old block is released, so a destination is
        //    never a block that still holds this plan's sources.
        table.blocks.truncate(g.new_num_blocks);
        let range = g.write_start..g.new_num_blocks;
        for (dst, &src) in table.blocks[range.clone()].iter_mut().zip(&old[range]) {
            if self.pool.ref_cnt[src as usize] > 1 {
                *dst = self.pool.pop();
            }
        }
        table.sync_last();

        // 2. Moves, in destination order (this is what makes the plan safe to apply).
        for (j, &p) in keep.iter().enumerate().skip(g.write_start * bs) {
            let p = p as usize;
            let src = (old[p / bs] as usize * bs + p % bs) as i64;
            let dst = (table.blocks[j / bs] as usize * bs + j % bs) as i64;
            if src != dst {
                plan.src.push(src);
                plan.dst.push(dst);
            }
        }

        // 3. Private blocks whose contents change (or that stop being full) leave the prefix
        //    cache; shared ones keep their hash because other tables still read them as is.
        for &b in &table.blocks[g.hash_valid..] {
            if self.pool.ref_cnt[b as usize] == 1 {
                self.pool.unregister(b);
            }
        }
        table.hashes.truncate(g.hash_valid);

        // 4. Release replaced and emptied blocks, tail first.
        for b in (g.write_start.min(g.new_num_blocks)..old.len()).rev() {
            if b >= g.new_num_blocks || table.blocks[b] != old[b] {
                self.pool.decref(old[b]);
            }
        }
        // A compaction that changes the table leaves token ids that no longer name its K/V
        // one to one: decode-time registration stops until `register_prefix` says otherwise.
        if g.num_kept != table.num_tokens {
            table.untrack();
        }
        table.num_tokens = g.num_kept;
        table.partial_hashed = g.num_kept % bs != 0;
        self.slots[idx].table = Some(table);
        self.scratch_blocks = old;
    }

    /// Copies `keep` into the scratch buffer as validated positions.
    fn load_keep(&mut self, id: TableId, num_tokens: usize, keep: Keep<'_>) -> Result<Vec<i64>> {
        let mut buf = std::mem::take(&mut self.scratch_keep);
        buf.clear();
        match keep {
            Keep::Positions(p) => {
                if let Err(e) = validate_positions(p, num_tokens, id) {
                    self.scratch_keep = buf;
                    return Err(e);
                }
                buf.extend_from_slice(p);
            }
            Keep::Mask(mask) => {
                if mask.len() != num_tokens {
                    self.scratch_keep = buf;
                    return Err(KvError::InvalidPositions(format!(
                        "keep mask must have one entry per token of table {id} ({num_tokens}), got {}",
                        mask.len()
                    )));
                }
                buf.extend(
                    mask.iter()
                        .enumerate()
                        .filter(|(_, &k)| k)
                        .map(|(i, _)| i as i64),
                );
            }
        }
        Ok(buf)
    }

    /// Keeps only `keep` of a table's tokens, packed in order into its leading slots, and
    /// appends the slot moves to `plan`. See the module docs for the plan's contract.
    ///
    /// Expected outcome: `OutOfBlocks` when shared blocks must be replaced and the pool is
    /// short (nothing changed). Errors: unknown or freed table, `InvalidPositions`.
    pub fn compact(
        &mut self,
        id: TableId,
        keep: Keep<'_>,
        plan: &mut CompactionPlan,
    ) -> Result<()> {
        let idx = self.slot_index(id)?;
        let n = self.table_at(idx).num_tokens;
        let buf = self.load_keep(id, n, keep)?;
        let g = self.geometry(&buf);
        let needed = self.compaction_need(self.table_at(idx), &g);
        let result = if needed > self.pool.num_available() {
            Err(self.out_of_blocks(needed))
        } else {
            self.compact_at(idx, &buf, plan);
            Ok(())
        };
        self.scratch_keep = buf;
        result
    }

    /// Compacts many tables in one call, all or nothing. Table `ids[i]` keeps
    /// `positions[indptr[i]..indptr[i+1]]` (CSR layout, as the selection step produces).
    /// Moves of all tables go to one plan, table after table; `plan_indptr` gets
    /// `ids.len() + 1` offsets into it.
    ///
    /// The capacity check is conservative: it needs, before anything changes, as many
    /// available blocks as all tables would need on their own. (Compacting one table can
    /// only lower what a later one needs, by un-sharing a block they share.)
    pub fn compact_batch(
        &mut self,
        ids: &[TableId],
        indptr: &[i64],
        positions: &[i64],
        plan: &mut CompactionPlan,
        plan_indptr: &mut Vec<i64>,
    ) -> Result<()> {
        check_indptr(
            indptr,
            ids.len(),
            positions.len(),
            "keep_indptr",
            "keep_positions",
        )?;
        let mut idxs = Vec::new();
        self.batch_indices(ids, &mut idxs)?;
        let mut needed = 0usize;
        for (i, &idx) in idxs.iter().enumerate() {
            let keep = &positions[indptr[i] as usize..indptr[i + 1] as usize];
            validate_positions(keep, self.table_at(idx).num_tokens, ids[i])?;
            needed += self.compaction_need(self.table_at(idx), &self.geometry(keep));
        }
        if needed > self.pool.num_available() {
            return Err(self.out_of_blocks(needed));
        }
        plan_indptr.reserve(ids.len() + 1);
        plan_indptr.push(plan.len() as i64);
        for (i, &idx) in idxs.iter().enumerate() {
            let keep = &positions[indptr[i] as usize..indptr[i + 1] as usize];
            self.compact_at(idx, keep, plan);
            plan_indptr.push(plan.len() as i64);
        }
        Ok(())
    }
}
