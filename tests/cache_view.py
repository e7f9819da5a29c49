"""The slots of a cache's stored tokens, read through public parts: the cache's allocator,
tables and lengths, and the allocator's vLLM block table (not the cache's own helpers)."""

from __future__ import annotations

import numpy as np
import torch

from kvcore import BlockAllocator


def table_slots(
    allocator: BlockAllocator, tables: np.ndarray, lengths: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slots, mask)``, each ``(n, T)`` for ``n`` tables of ``lengths`` tokens (``T`` the
    longest): ``slot = block_id * block_size + offset`` of each stored token, -1 past the
    table's end, and whether the token exists."""
    tables = np.ascontiguousarray(tables.reshape(-1))
    lengths = lengths.reshape(-1).astype(np.int64)
    t = int(lengths.max()) if lengths.size else 0
    block_table = allocator.vllm_layout(tables)[0].astype(np.int64)
    pos = np.arange(t)
    bs = allocator.block_size
    slots = block_table[:, pos // bs] * bs + pos % bs if t else np.zeros((len(tables), 0))
    mask = pos[None, :] < lengths[:, None]
    return torch.from_numpy(np.where(mask, slots, -1).astype(np.int64)), torch.from_numpy(mask)


def stream_slots(cache, layer: int) -> torch.Tensor:
    """``(B * H, T)`` slots of the layer's stored tokens in the high tier (-1 past the end)."""
    return table_slots(cache.allocator, cache.tables[:, layer], cache.lengths[:, layer])[0]


def low_tier_slots(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slots, mask)`` of the layer's tokens in MiKV's low tier."""
    return table_slots(cache.lo_allocator, cache.lo_tables[:, layer], cache.lo_lengths[:, layer])


def block_table(cache, layer: int) -> np.ndarray:
    """``(B * H, W)`` int64 block ids of the layer's streams (the allocator's vLLM table)."""
    tables = np.ascontiguousarray(cache.tables[:, layer].reshape(-1))
    return cache.allocator.vllm_layout(tables)[0].astype(np.int64)


def _read_kv(cache, fmt, store, slots: torch.Tensor, mask: torch.Tensor):
    """``(B, H, T, D)`` K and V at ``slots`` read through a page format's public ``read``,
    zeros where ``mask`` is False."""
    idx = slots.clamp(min=0).reshape(-1).to(cache.device)
    b, h, d = cache.batch_size, cache.num_kv_heads, cache.head_dim
    m = mask.to(cache.device).reshape(b, h, -1, 1)
    k = fmt.read(store, "k", idx).reshape(b, h, -1, d)
    v = fmt.read(store, "v", idx).reshape(b, h, -1, d)
    return k * m, v * m


def stored_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, H, T, D)`` K and V of the layer's stored tokens in the high tier, read through the
    cache's page format (its public protocol: ``cache.format.read(cache.store, side, slots)``),
    zeros past each stream's end: what :meth:`KVCache.update` returns."""
    slots, mask = table_slots(cache.allocator, cache.tables[:, layer], cache.lengths[:, layer])
    return _read_kv(cache, cache.format, cache.store, slots, mask)


def low_tier_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, H, T, D)`` K and V (dequantized) of the layer's evicted tokens in MiKV's low tier,
    read through the tier's page format (``cache.lo_format.read(cache.lo_store, ...)``), zeros
    past each stream's end."""
    slots, mask = low_tier_slots(cache, layer)
    return _read_kv(cache, cache.lo_format, cache.lo_store, slots, mask)
