"""kvcore: keep the KV cache of LLM inference inside a fixed memory budget.

The public API is re-exported here; the Rust core lives in :mod:`kvcore._kvcore`.
The torch cache (``kvcore.KVCache``, ``kvcore.Schedule``, ``kvcore.CacheConfig``) is imported
on first use, so ``import kvcore`` works without torch; ``kvcore.hf`` needs transformers.
"""

from typing import Any

from kvcore import policies
from kvcore._kvcore import (
    BlockAllocator,
    InvalidPositionsError,
    InvariantError,
    KiviCache,
    KVCoreError,
    MergeBook,
    MergePlan,
    MiniCachePair,
    MixedPrecisionStore,
    OutOfBlocksError,
    QuantLayout,
    ScoreState,
    TableFreedError,
    UnknownTableError,
    __version__,
    build_profile,
    cam_plan,
    dequantize,
    ems_plan,
    kivi_nbytes,
    kvmerger_plan,
    minicache_layer_pairs,
    minicache_merge,
    quantize,
    razor_plan,
)

__all__ = [
    "BlockAllocator",
    "KVCache",
    "Schedule",
    "InvalidPositionsError",
    "InvariantError",
    "KVCoreError",
    "KiviCache",
    "MergeBook",
    "MergePlan",
    "MiniCachePair",
    "MixedPrecisionStore",
    "OutOfBlocksError",
    "ScoreState",
    "QuantLayout",
    "TableFreedError",
    "UnknownTableError",
    "__version__",
    "build_profile",
    "policies",
    "cam_plan",
    "dequantize",
    "ems_plan",
    "kivi_nbytes",
    "kvmerger_plan",
    "minicache_layer_pairs",
    "minicache_merge",
    "quantize",
    "razor_plan",
]


def __getattr__(name: str) -> Any:
    if name in ("CacheConfig", "KVCache", "Schedule"):
        from kvcore import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'kvcore' has no attribute {name!r}")
