//! `check_invariants`: a full consistency check, O(blocks + table entries), for tests.

use super::{BlockAllocator, NULL_BLOCK};
use crate::error::{KvError, Result};

impl BlockAllocator {
    /// Verifies every structural invariant and returns the first violation found:
    /// * the free queue holds exactly the unreferenced blocks, uncached ones first, and
    ///   its counters match;
    /// * each block's ref count equals the number of live tables that list it;
    /// * no table lists a block twice or lists the null block;
    /// * each table holds exactly `ceil(num_tokens / block_size)` blocks and at most
    ///   `num_tokens / block_size` chain hashes, exactly that many (plus the ids of the
    ///   partial block) when it tracks its chain for decode-time registration;
    /// * every registered block is named by exactly one live hash index entry, under an
    ///   epoch no other block holds, and stale entries stay within the sweep's bound
    ///   (`BlockPool::check`);
    /// * a hashed block is full in each table that lists it (or is the partial last block a
    ///   compaction left).
    pub fn check_invariants(&self) -> Result<()> {
        let fail = |m: String| Err(KvError::InvariantViolation(m));
        if let Err(m) = self.pool.check() {
            return fail(m);
        }
        let bs = self.block_size;
        let n = self.num_blocks();
        let mut refs = vec![0u32; n];
        let mut seen_in_table = vec![u32::MAX; n];
        let mut live = 0usize;
        for (idx, slot) in self.slots.iter().enumerate() {
            let Some(t) = &slot.table else { continue };
            live += 1;
            if t.blocks.len() != t.num_tokens.div_ceil(bs) {
                return fail(format!(
                    "table slot {idx} holds {} blocks for {} tokens",
                    t.blocks.len(),
                    t.num_tokens
                ));
            }
            if t.hashes.len() > t.num_tokens / bs {
                return fail(format!(
                    "table slot {idx} has {} chain hashes but only {} full blocks",
                    t.hashes.len(),
                    t.num_tokens / bs
                ));
            }
            if t.tracked
                && (t.hashes.len() != t.num_tokens / bs || t.tail.len() != t.num_tokens % bs)
            {
                return fail(format!(
                    "table slot {idx} tracks its chain with {} hashes and {} tail ids for {} tokens",
                    t.hashes.len(),
                    t.tail.len(),
                    t.num_tokens
                ));
            }
            if t.last_block != t.blocks.last().copied().unwrap_or(NULL_BLOCK) {
                return fail(format!(
                    "table slot {idx} caches last block {} but its list ends with {:?}",
                    t.last_block,
                    t.blocks.last()
                ));
            }
            if let Some(&last) = t.blocks.last() {
                if t.num_tokens % bs != 0
                    && self.pool.ref_cnt[last as usize] > 1
                    && !(t.may_share_last || t.partial_hashed)
                {
                    return fail(format!(
                        "table slot {idx} shares its partial last block {last} but is not marked as possibly sharing it"
                    ));
                }
            }
            for (i, &b) in t.blocks.iter().enumerate() {
                let bi = b as usize;
                if b == 0 || bi >= n {
                    return fail(format!("table slot {idx} lists invalid block {b}"));
                }
                if seen_in_table[bi] == idx as u32 {
                    return fail(format!("table slot {idx} lists block {b} twice"));
                }
                seen_in_table[bi] = idx as u32;
                refs[bi] += 1;
                // A hashed block is full in every table that lists it, except as the partial
                // last block left by compacting a shared block; append unregisters that
                // block before writing into it.
                let full = (i + 1) * bs <= t.num_tokens;
                if self.pool.is_hashed(b) && !full && (i + 1 != t.blocks.len() || !t.partial_hashed)
                {
                    return fail(format!("hashed block {b} is not full in table slot {idx}"));
                }
            }
        }
        if live != self.num_tables {
            return fail(format!(
                "{live} live tables but the counter says {}",
                self.num_tables
            ));
        }
        for (b, (&counted, &stored)) in refs.iter().zip(&self.pool.ref_cnt).enumerate() {
            if counted != stored {
                return fail(format!(
                    "block {b} has ref_cnt {stored} but {counted} table(s) reference it"
                ));
            }
        }
        Ok(())
    }
}
