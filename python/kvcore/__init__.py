"""kvcore: keep the KV cache of LLM inference inside a fixed memory budget.

The public API is re-exported here; the Rust core lives in :mod:`kvcore._kvcore`.
The torch cache (``kvcore.KVCache``, ``kvcore.Schedule``) is imported on first use, so
``import kvcore`` works without torch; ``kvcore.hf`` needs transformers.
"""

from typing import Any

from kvcore._kvcore import (
    BlockAllocator,
    InvalidPositionsError,
    InvariantError,
    KVCoreError,
    OutOfBlocksError,
    TableFreedError,
    UnknownTableError,
    __version__,
    build_profile,
)

__all__ = [
    "BlockAllocator",
    "KVCache",
    "Schedule",
    "InvalidPositionsError",
    "InvariantError",
    "KVCoreError",
    "OutOfBlocksError",
    "TableFreedError",
    "UnknownTableError",
    "__version__",
    "build_profile",
]


def __getattr__(name: str) -> Any:
    if name in ("KVCache", "Schedule"):
        from kvcore import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'kvcore' has no attribute {name!r}")
