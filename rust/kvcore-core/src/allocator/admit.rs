//! Admission of a wave of new requests in one call: create a table per prompt, adopt each
//! prompt's longest cached prefix, append the rest of the prompt and register the blocks
//! it fills. The same as `create_tables` + `adopt_prefix_batch` + `append_batch` with the
//! prompt ids, but all or nothing: the whole wave is looked up and checked against the pool
//! before anything changes.
//!
//! ```text
//!   prompt i:  [ t0 ........................................ t(L-1) ]
//!   lookup:    [ block 0 | block 1 | ... full blocks of t0..t(L-2) ]     (never the last token)
//!   hit:       [ block 0 | block 1 ]                                     hits[i] = 2 * block_size
//!   appended:                      [ t(2*bs) ................ t(L-1) ]   slots[indptr[i]..indptr[i+1]]
//! ```

use super::{prefix, push_slots, BatchAppend, BlockAllocator, BlockHash, BlockId, TableId};
use crate::error::{try_reserve, KvError, Result};

/// The hits of one wave, found before anything changes.
#[derive(Clone, Default)]
pub(crate) struct AdmitScratch {
    /// Per prompt, the end of its hit blocks in `blocks`.
    ends: Vec<usize>,
    /// The hit blocks of every prompt, prompt after prompt.
    blocks: Vec<BlockId>,
    /// The chain hashes of every full block of every prompt, prompt after prompt (prompt
    /// `i`'s start at `chain_starts[i]`): hashed once, for the lookups and the registration.
    chain: Vec<BlockHash>,
    chain_starts: Vec<usize>,
    /// Hit blocks that sit unreferenced in the free queue: adopting them takes them out of
    /// what the appends can use (each counted once, however many prompts hit it).
    taken: Vec<BlockId>,
}

impl BlockAllocator {
    /// Admits a wave of new requests: prompt `i` is `tokens[indptr[i]..indptr[i+1]]`. For
    /// every prompt, in order, a new table adopts the longest cached prefix of the prompt
    /// without its last token (the engine needs that token's logits, as vLLM caps hits at
    /// `num_tokens - 1`), then takes slots for the rest of the prompt, registering every
    /// block that fills under the table's chain and `salt`. Adoption happens for the whole
    /// wave before any append, so no prompt hits blocks another prompt of the wave
    /// registers, exactly as `create_tables` + `adopt_prefix_batch` + `append_batch` with
    /// the prompt ids.
    ///
    /// Pushes the new table ids to `tables`, the tokens hit per prompt (a multiple of
    /// `block_size`) to `hits`, and the slots of the appended tokens to `out` (`out.indptr`
    /// gets `n + 1` offsets into `out.slots`). A new table adopts full blocks only, so the
    /// appends never copy on write.
    ///
    /// Expected outcome: `OutOfBlocks` when the wave does not fit (the blocks its appends
    /// take plus the cached blocks its hits take out of the free queue). Errors: an `indptr`
    /// that is not CSR offsets over `tokens`, too many live tables. Nothing changes on any
    /// error.
    pub fn admit_batch(
        &mut self,
        indptr: &[i64],
        tokens: &[i64],
        salt: Option<&[u8]>,
        tables: &mut Vec<TableId>,
        hits: &mut Vec<i64>,
        out: &mut BatchAppend,
    ) -> Result<()> {
        let Some(n) = indptr.len().checked_sub(1) else {
            return Err(KvError::InvalidArgument(
                "indptr must hold len(prompts) + 1 offsets, got an empty array".into(),
            ));
        };
        super::check_indptr(indptr, n, tokens.len(), "indptr", "token_ids")?;
        let left = self.table_capacity_left();
        if n > left {
            return Err(KvError::InvalidArgument(format!(
                "cannot admit {n} prompts: at most {left} more tables can be live at once"
            )));
        }
        let mut s = std::mem::take(&mut self.scratch_admit);
        let r = self.admit_checked(indptr, tokens, salt, &mut s, tables, hits, out);
        self.scratch_admit = s;
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn admit_checked(
        &mut self,
        indptr: &[i64],
        tokens: &[i64],
        salt: Option<&[u8]>,
        s: &mut AdmitScratch,
        tables: &mut Vec<TableId>,
        hits: &mut Vec<i64>,
        out: &mut BatchAppend,
    ) -> Result<()> {
        let bs = self.block_size;
        let n = indptr.len() - 1;
        let prompt = |i: usize| &tokens[indptr[i] as usize..indptr[i + 1] as usize];
        // 1. Hash every full block of every prompt once (the lookups take the blocks before
        // the last token, the appends register them all), then look up each prompt's cached
        // prefix. Hashing first keeps the index probes back to back, so their cache misses
        // overlap. Nothing changes yet.
        s.ends.clear();
        s.blocks.clear();
        s.chain.clear();
        s.chain_starts.clear();
        s.taken.clear();
        try_reserve(&mut s.chain, tokens.len() / bs, "token_ids")?;
        let mut needed = 0usize;
        for i in 0..n {
            let p = prompt(i);
            let c0 = s.chain.len();
            s.chain_starts.push(c0);
            let mut parent = prefix::ROOT_HASH;
            for block in p.chunks_exact(bs) {
                parent = prefix::hash_block(parent, block, salt);
                s.chain.push(parent);
            }
            let start = s.blocks.len();
            // Never the last token: the blocks of `p[..len - 1]`.
            let lookups = p.len().saturating_sub(1) / bs;
            for &h in &s.chain[c0..c0 + lookups] {
                let Some(b) = self.pool.lookup(h) else { break };
                if self.pool.ref_cnt[b as usize] == 0 {
                    s.taken.push(b);
                }
                s.blocks.push(b);
            }
            s.ends.push(s.blocks.len());
            // The prompt's blocks less the hit ones (at least one is left for the last token).
            needed += p.len().div_ceil(bs) - (s.blocks.len() - start);
        }
        s.chain_starts.push(s.chain.len());
        s.taken.sort_unstable();
        s.taken.dedup();
        needed += s.taken.len();
        if needed > self.pool.num_available() {
            return Err(self.out_of_blocks(needed));
        }
        // 2. Create the tables (the only step that can still fail: its bookkeeping), then
        // adopt every hit before any append pops a block, so no planned hit is evicted.
        let first = tables.len();
        try_reserve(hits, n, "indptr")?;
        self.create_tables(n, tables)?;
        out.slots.reserve(tokens.len() - s.blocks.len() * bs);
        out.indptr.reserve(n + 1);
        let mut start = 0;
        for (i, &end) in s.ends.iter().enumerate() {
            let idx = (tables[first + i] as u64 & 0xffff_ffff) as usize;
            let table = self.slots[idx].table.as_mut().expect("a new table");
            for &b in &s.blocks[start..end] {
                self.pool.incref(b);
            }
            table.blocks.extend_from_slice(&s.blocks[start..end]);
            let c0 = s.chain_starts[i];
            table
                .hashes
                .extend_from_slice(&s.chain[c0..c0 + (end - start)]);
            table.num_tokens = (end - start) * bs;
            table.sync_last();
            table.set_salt(salt);
            hits.push(table.num_tokens as i64);
            start = end;
        }
        // 3. Append the rest of every prompt, registering the blocks it fills under the
        // hashes of step 1.
        out.indptr.push(out.slots.len() as i64);
        for i in 0..n {
            let idx = (tables[first + i] as u64 & 0xffff_ffff) as usize;
            let hit = hits[hits.len() - n + i] as usize;
            let rest = &prompt(i)[hit..];
            let chain = &s.chain[s.chain_starts[i] + hit / bs..s.chain_starts[i + 1]];
            out.num_registered += self.append_prompt_rest(idx, rest, chain, &mut out.slots);
            out.indptr.push(out.slots.len() as i64);
        }
        Ok(())
    }

    /// `append_at(idx, rest.len(), Some(rest))` for a new table that holds only adopted full
    /// blocks, with the chain hashes of the blocks `rest` fills already computed (`hashes`,
    /// one per full block of `rest`). Returns the blocks newly registered.
    fn append_prompt_rest(
        &mut self,
        idx: usize,
        rest: &[i64],
        hashes: &[BlockHash],
        out: &mut Vec<i64>,
    ) -> usize {
        let bs = self.block_size;
        let table = self.slots[idx].table.as_mut().expect("a new table");
        let pool = &mut self.pool;
        debug_assert!(table.tracked && table.tail.is_empty());
        debug_assert_eq!(table.num_tokens, table.blocks.len() * bs);
        debug_assert_eq!(table.hashes.len(), table.blocks.len());
        debug_assert_eq!(hashes.len(), rest.len() / bs);
        // No copy on write: the last block is full (or there is none).
        if !rest.is_empty() {
            table.partial_hashed = false;
            table.may_share_last = false;
        }
        let start = table.num_tokens;
        let end = start + rest.len();
        while table.blocks.len() * bs < end {
            table.blocks.push(pool.pop());
        }
        table.sync_last();
        table.num_tokens = end;
        push_slots(bs, table, start, end, out);
        let mut registered = 0;
        for &h in hashes {
            registered += usize::from(pool.register(table.blocks[table.hashes.len()], h));
            table.hashes.push(h);
        }
        table.tail.extend_from_slice(&rest[hashes.len() * bs..]);
        registered
    }
}
