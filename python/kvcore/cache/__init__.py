"""`KVCache`: paged K/V pools in torch, allocated through `BlockAllocator`, kept within budget.

One file per part (docs/architecture.md, "The cache's data flow"; docs/cache.md):

* :mod:`~kvcore.cache.config`: :class:`CacheConfig` (storage, merge and tier parts) and
  :class:`Schedule`, frozen values validated once;
* :mod:`~kvcore.cache.state`: the attributes every part shares;
* :mod:`~kvcore.cache.formats`: page formats behind one protocol (native, per-token
  quantized, KIVI), one file each, picked once from the configuration;
* :mod:`~kvcore.cache.pages`: the high tier's reads, writes and gathers, through its format;
* :mod:`~kvcore.cache.tier`: MiKV's low-precision tier of evicted tokens;
* :mod:`~kvcore.cache.merges`: merging evicted tokens into kept ones;
* :mod:`~kvcore.cache.selection`: the one call into the policy;
* :mod:`~kvcore.cache.controller`: the schedule's pending steps, flush, compression,
  compaction and re-rotation (:func:`rotate_keys`);
* :mod:`~kvcore.cache.pools`: sizing, lengths, byte accounting, shrinking and growing;
* :mod:`~kvcore.cache.resize`: pool sizes by the blocks all streams hold, and the copy that
  moves a tier's pages into pools of another size;
* :mod:`~kvcore.cache.snapshots`: :class:`CacheSnapshot`, snapshot and restore;
* :mod:`~kvcore.cache.dispatch`: attention over the pages and :func:`merge_state`;
* :mod:`~kvcore.cache.kvcache`: :class:`KVCache`, the facade users call.
"""

from kvcore.cache.config import (
    CacheConfig,
    MergeConfig,
    Schedule,
    StorageConfig,
    TierConfig,
)
from kvcore.cache.controller import rotate_keys
from kvcore.cache.dispatch import merge_state
from kvcore.cache.kvcache import KVCache
from kvcore.cache.snapshots import CacheSnapshot

__all__ = [
    "CacheConfig",
    "CacheSnapshot",
    "KVCache",
    "MergeConfig",
    "Schedule",
    "StorageConfig",
    "TierConfig",
    "merge_state",
    "rotate_keys",
]
