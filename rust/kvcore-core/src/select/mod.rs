//! Which tokens stay: score providers, budget splits and selection.
//!
//! * [`topk`]: force-keep ranges and per-row O(n) top-k with a deterministic tie-break; the
//!   result is CSR `(indptr, positions)`, exactly what `BlockAllocator::compact_batch` takes.
//! * [`budget`]: exact splits of a total budget (uniform, PyramidKV, Ada-KV, head weights).
//! * [`score`]: score providers (SnapKV window pooling, GQA reduction, TOVA, key norm,
//!   RazorAttention head classification) and [`score::ScoreState`], the per-token scores that
//!   live with the cache (H2O accumulators, Locret CIS) and are compacted by the same plan.
//! * [`pattern`]: rule-based plans (StreamingLLM, LongGen, RazorAttention, InfiniPot).
//!
//! Rows are `(layer, kv-head)` pairs in layer-major order: `row = layer * num_heads + head`.
//! Exact rules and defaults come from `shared/research/seed_algorithms.md`.

pub mod budget;
pub mod pattern;
pub mod score;
pub mod topk;

pub use score::{Reduce, ScoreState};
pub use topk::{select_per_layer, select_topk, select_topk_parallel, Csr, ForceKeep};
