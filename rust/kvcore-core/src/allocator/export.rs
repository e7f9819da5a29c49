//! Page tables in the layouts attention kernels read.

use super::{BlockAllocator, TableId, NULL_BLOCK};
use crate::error::{try_reserve, KvError, Result};

/// FlashInfer's CSR page table (`docs/tutorials/kv_layout` in FlashInfer).
///
/// Request `i` owns pages `indices[indptr[i]..indptr[i+1]]`; its length is
/// `block_size * (num_pages - 1) + last_page_len[i]`. An empty table has no pages and
/// `last_page_len` 0 (FlashInfer itself requires at least one token per request).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlashInferLayout {
    pub indptr: Vec<i32>,
    pub indices: Vec<i32>,
    pub last_page_len: Vec<i32>,
}

/// vLLM's padded block table and slot mapping.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VllmLayout {
    /// Row-major `[num_tables, width]`, padded with the null block (0).
    pub block_table: Vec<i32>,
    pub width: usize,
    /// Token count of every table.
    pub seq_lens: Vec<i32>,
    /// Slot ids of the last `num_new_tokens[i]` tokens of every table, concatenated (all
    /// tokens when `num_new_tokens` is not given): where this step's K/V get written.
    pub slot_mapping: Vec<i64>,
}

fn as_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        KvError::InvalidArgument(format!(
            "{what} = {v} does not fit the int32 page-table layout"
        ))
    })
}

impl BlockAllocator {
    /// Exports `ids` in FlashInfer's layout.
    pub fn flashinfer_layout(&self, ids: &[TableId]) -> Result<FlashInferLayout> {
        let bs = self.block_size;
        let mut total = 0usize;
        for &id in ids {
            total = total.saturating_add(self.table(id)?.blocks.len());
        }
        let mut out = FlashInferLayout::default();
        try_reserve(&mut out.indices, total, "the page-table export")?;
        out.indptr.reserve(ids.len() + 1);
        out.last_page_len.reserve(ids.len());
        out.indptr.push(0);
        for &id in ids {
            let t = self.table(id)?;
            out.indices.extend(t.blocks.iter().map(|&b| b as i32));
            out.indptr.push(as_i32(out.indices.len(), "total pages")?);
            let last = if t.num_tokens == 0 {
                0
            } else {
                (t.num_tokens - 1) % bs + 1
            };
            out.last_page_len.push(last as i32);
        }
        Ok(out)
    }

    /// Exports `ids` in vLLM's layout. `width` pads the block table to a fixed number of
    /// columns (for CUDA graphs); by default it is the longest table's block count.
    pub fn vllm_layout(
        &self,
        ids: &[TableId],
        num_new_tokens: Option<&[i64]>,
        width: Option<usize>,
    ) -> Result<VllmLayout> {
        if let Some(nn) = num_new_tokens {
            if nn.len() != ids.len() {
                return Err(KvError::InvalidArgument(format!(
                    "num_new_tokens must have one entry per table ({}), got {}",
                    ids.len(),
                    nn.len()
                )));
            }
        }
        let mut max_blocks = 0;
        let mut total_tokens = 0usize;
        for &id in ids {
            let t = self.table(id)?;
            max_blocks = max_blocks.max(t.blocks.len());
            total_tokens = total_tokens.saturating_add(t.num_tokens);
        }
        let width = match width {
            Some(w) if w < max_blocks => {
                return Err(KvError::InvalidArgument(format!(
                    "width {w} is smaller than the longest block table ({max_blocks} blocks)"
                )))
            }
            Some(w) => w,
            None => max_blocks,
        };
        let cells = ids
            .len()
            .checked_mul(width)
            .ok_or_else(|| KvError::InvalidArgument(format!("width {width} is too large")))?;
        let mut out = VllmLayout {
            width,
            ..VllmLayout::default()
        };
        try_reserve(&mut out.block_table, cells, "the padded block table")?;
        out.block_table.resize(cells, NULL_BLOCK as i32);
        out.seq_lens.reserve(ids.len());
        try_reserve(&mut out.slot_mapping, total_tokens, "the slot mapping")?;
        for (i, &id) in ids.iter().enumerate() {
            let t = self.table(id)?;
            for (cell, &b) in out.block_table[i * width..].iter_mut().zip(&t.blocks) {
                *cell = b as i32;
            }
            out.seq_lens.push(as_i32(t.num_tokens, "sequence length")?);
            let start = match num_new_tokens {
                None => 0,
                Some(nn) => {
                    let k = nn[i];
                    if k < 0 || k as u64 > t.num_tokens as u64 {
                        return Err(KvError::InvalidArgument(format!(
                            "num_new_tokens[{i}] = {k} must be in [0, {}] (the table's length)",
                            t.num_tokens
                        )));
                    }
                    t.num_tokens - k as usize
                }
            };
            self.push_slots(t, start, t.num_tokens, &mut out.slot_mapping);
        }
        Ok(out)
    }
}
