"""The state every part of the cache shares, declared once (the parts are mixins over it).

``KVCache`` is assembled from one class per part, each a file of this package, stacked in
the order they call each other::

    CacheState -> Pages -> LowTier -> Merges -> Controller -> Pools -> Snapshots
               -> AttentionDispatch -> KVCache (the facade)

How a slot is stored is not a part of this chain: each tier has a page format
(:mod:`kvcore.cache.formats`, picked once from the configuration) and the tensors it allocated
(a :class:`~kvcore.cache.formats.PageStore`), and the parts call the format.

Streams and slots::

    stream     = tables[b, l, h]                      one allocator table per (b, l, h)
    slot       = block_id * block_size + offset       block 0 is the null block
    per slot   : slot_pos, slot_valid, slot_score, slot_count (moved with K/V)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvcore._kvcore import BlockAllocator
from kvcore.cache.config import CacheConfig, Schedule
from kvcore.cache.formats import PageFormat, PageStore, QuantizedFormat
from kvcore.scoring import TorchPolicy


class CacheState:
    """Attributes of a cache; set by ``KVCache.__init__`` and the first update."""

    config: CacheConfig
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    device: torch.device
    policy: TorchPolicy | None
    schedule: Schedule
    positions: str
    scaling: float
    # the high tier's page format and its tensors (the K / V pools and the format's own)
    format: PageFormat
    store: PageStore
    # merges
    merge: str | None
    merge_threshold: float
    merge_sigma: float | None
    merge_window: int
    _merge_rng: np.random.Generator
    logcount_bias: bool
    # the high tier (allocated at the first update)
    allocator: BlockAllocator | None
    tables: np.ndarray
    lengths: np.ndarray
    batch_size: int
    capacity: int | None  # tokens per stream; None: pools sized on demand
    slot_pos: torch.Tensor
    slot_valid: torch.Tensor
    slot_score: torch.Tensor
    slot_count: torch.Tensor
    # MiKV's low tier
    evicted_format: str | None
    lo_format: QuantizedFormat | None
    lo_store: PageStore
    lo_allocator: BlockAllocator | None
    lo_capacity: int
    lo_tables: np.ndarray
    lo_lengths: np.ndarray
    lo_slot_pos: torch.Tensor
    lo_slot_valid: torch.Tensor
    lo_key_scale: torch.Tensor
    _lo_capacity_req: int | None
    # sizing
    _capacity_req: int | None
    _capacity_bytes: int | None
    _auto_size: bool
    _peak_bytes: int
    # the controller's record of steps
    _rope: list[torch.Tensor] | None
    _seen: list[int]
    _next_pos: list[int]
    _pending: set[int]
    _compressed_once: list[bool]
    _decode_steps: list[int]
    _step: list[dict[str, Any] | None]
    _next_queries: list[torch.Tensor | None]
    num_compressions: int

    def _reset_steps(self) -> None:
        """No step seen yet."""
        n = self.num_layers
        self._seen = [0] * n  # logical tokens seen per layer (padding included)
        self._next_pos = [0] * n  # position of the next token
        self._pending = set()  # layers whose step's compression has not run yet
        self._compressed_once = [False] * n
        self._decode_steps = [0] * n
        self._step = [None] * n
        self._next_queries = [None] * n

    def memory_bytes(self) -> int:
        """Bytes held by the K and V pool tensors (what the budget is measured against), and
        for KIVI the full-precision residual pages, and MiKV's low-tier pools. (Here, not in
        ``pools.py``: both tiers' resizes record their peak with it.)"""
        n = self.store.nbytes
        if self.lo_allocator is not None and self.allocator is not None:
            n += self.lo_store.nbytes
        return int(n)

    def _slack(self) -> int:
        """Tokens per stream an on-demand pool keeps free beyond its contents."""
        return max(self.schedule.headroom(), 256)

    def _check_layer(self, layer_idx: int) -> None:
        if (
            not isinstance(layer_idx, int)
            or isinstance(layer_idx, bool)
            or not 0 <= layer_idx < self.num_layers
        ):
            raise IndexError(
                f"layer_idx must be an int in [0, {self.num_layers}), got {layer_idx!r}"
            )

    def _check_kv(self, name: str, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4 or t.shape[1] != self.num_kv_heads or t.shape[3] != self.head_dim:
            raise ValueError(
                f"{name} must have shape (batch, {self.num_kv_heads}, seq_len, {self.head_dim}), "
                f"got {tuple(t.shape)}"
            )
        if t.dtype != self.dtype:
            raise TypeError(f"{name} must have dtype {self.dtype}, got {t.dtype}")
        if t.device.type != self.device.type or (
            self.device.index is not None and t.device.index != self.device.index
        ):
            raise ValueError(f"{name} must be on {self.device}, got {t.device}")


def rope_list(
    rope: torch.Tensor | Sequence[torch.Tensor], num_layers: int, head_dim: int
) -> list[torch.Tensor]:
    """The RoPE ``inv_freq`` of every layer, checked (one tensor for all, or one per layer)."""
    rl = [rope] * num_layers if isinstance(rope, torch.Tensor) else list(rope)
    if len(rl) != num_layers:
        raise ValueError(f"rope has {len(rl)} entries for {num_layers} layers")
    for i, r in enumerate(rl):
        if not isinstance(r, torch.Tensor) or r.ndim != 1 or 2 * r.numel() > head_dim:
            raise ValueError(
                f"rope[{i}] must be a 1-d inv_freq tensor of at most head_dim / 2 = "
                f"{head_dim // 2} frequencies, got "
                f"{tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__}"
            )
    return [r.detach().float().cpu() for r in rl]
