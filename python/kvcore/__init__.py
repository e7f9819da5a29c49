"""kvcore: keep the KV cache of LLM inference inside a fixed memory budget.

The public API is re-exported here; the Rust core lives in :mod:`kvcore._kvcore`.
"""

from kvcore._kvcore import (
    BlockAllocator,
    InvalidPositionsError,
    InvariantError,
    KiviCache,
    KVCoreError,
    MixedPrecisionStore,
    OutOfBlocksError,
    QuantLayout,
    TableFreedError,
    UnknownTableError,
    __version__,
    build_profile,
    dequantize,
    kivi_nbytes,
    quantize,
)

__all__ = [
    "BlockAllocator",
    "InvalidPositionsError",
    "InvariantError",
    "KVCoreError",
    "KiviCache",
    "MixedPrecisionStore",
    "OutOfBlocksError",
    "QuantLayout",
    "TableFreedError",
    "UnknownTableError",
    "__version__",
    "build_profile",
    "dequantize",
    "kivi_nbytes",
    "quantize",
]
