"""kvcore: keep the KV cache of LLM inference inside a fixed memory budget.

The public API is re-exported here; the Rust core lives in :mod:`kvcore._kvcore`.
"""

from kvcore import policies
from kvcore._kvcore import (
    BlockAllocator,
    InvalidPositionsError,
    InvariantError,
    KVCoreError,
    OutOfBlocksError,
    ScoreState,
    TableFreedError,
    UnknownTableError,
    __version__,
    build_profile,
)

__all__ = [
    "BlockAllocator",
    "InvalidPositionsError",
    "InvariantError",
    "KVCoreError",
    "OutOfBlocksError",
    "ScoreState",
    "TableFreedError",
    "UnknownTableError",
    "__version__",
    "build_profile",
    "policies",
]
