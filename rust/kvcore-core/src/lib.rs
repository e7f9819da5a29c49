//! kvcore-core: the logic of kvcore, with no Python in it.
//!
//! * [`allocator`]: the fixed-budget paged block allocator (ref counts, fork / copy-on-write,
//!   prefix caching, compaction plans, page-table export).
//! * [`select`]: scoring, budgets and top-k selection (which tokens stay).
//! * [`merge`]: merge plans and per-slot mass (KVMerger, EMS, RazorAttention, CaM, MiniCache).
//! * [`quant`]: quantized storage layouts (asymmetric int8/int4/int2 groups, KIVI, MiKV tiers).
//! * [`error`]: the single error enum that the bindings map to Python exceptions.
//!
//! Vocabulary follows vLLM: `block_id`, `block_size`, `ref_cnt`, the null block (block 0,
//! never handed out) and `slot = block_id * block_size + offset`.

pub mod allocator;
pub mod error;
pub mod merge;
pub mod quant;
pub mod select;

pub use allocator::{
    AllocatorStats, AppendOutcome, BatchAppend, BlockAllocator, BlockId, BlockKeys, CompactionPlan,
    FlashInferLayout, Keep, TableId, VllmLayout, NULL_BLOCK,
};
pub use error::{KvError, Result};
