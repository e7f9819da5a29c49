"""The high tier's pages, through its :class:`~kvcore.cache.formats.PageFormat`: reads, writes,
the slots of streams and the dense gather. How a slot is stored (native, per-token quantized,
KIVI) is the format's business (:mod:`kvcore.cache.formats`); nothing here branches on it.
"""

from __future__ import annotations

import numpy as np
import torch

from kvcore._kvcore import BlockAllocator
from kvcore.cache.formats import Side
from kvcore.cache.state import CacheState


class Pages(CacheState):
    """Slot storage of the high tier (delegated to ``self.format``) and the gathers."""

    @property
    def k_pool(self) -> torch.Tensor:
        """The high tier's K pool: ``(num_blocks, block_size, head_dim)`` of ``dtype``, or
        ``(num_blocks, k_layout.nbytes)`` uint8 quantized pages (docs/cache.md)."""
        return self.store.k

    @property
    def v_pool(self) -> torch.Tensor:
        """The high tier's V pool (as :attr:`k_pool`)."""
        return self.store.v

    @property
    def page_bytes(self) -> int:
        """Bytes of one block in the K pool plus the V pool: ``2 * block_size * head_dim``
        values of ``dtype``, or the page layouts' exact ``nbytes`` (docs/layouts.md)."""
        return self.format.page_bytes

    @property
    def residual_page_bytes(self) -> int:
        """KIVI: bytes of one stream's full-precision residual page, K and V (0 otherwise)."""
        return self.format.stream_bytes

    def _read(self, side: Side, slots: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` vectors in ``dtype`` of the given slots (dequantized when quantized)."""
        return self.format._read(self.store, side, slots)  # cache-owned slots: unchecked

    def _write(self, side: Side, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Stores ``(N, D)`` vectors at ``slots`` (encoded as the format says)."""
        self.format._write(self.store, side, slots, x)

    def _stream_rows(self, layer: int) -> torch.Tensor:
        """``(B * H,)`` int64: the layer's streams' rows among all ``B * L * H`` streams."""
        b, h = self.batch_size, self.num_kv_heads
        rows = torch.arange(b * self.num_layers * h, device=self.device)
        return rows.reshape(b, self.num_layers, h)[:, layer].reshape(-1)

    def _slots(
        self,
        tables: np.ndarray,
        lengths: np.ndarray,
        allocator: BlockAllocator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots ``(n, T)`` (-1 past the end) and mask ``(n, T)`` of streams, read from the
        block tables (of ``allocator``, default the high tier's)."""
        alloc = self.allocator if allocator is None else allocator
        assert alloc is not None
        t = int(lengths.max()) if lengths.size else 0
        n = len(tables)
        if t == 0:
            e = torch.zeros((n, 0), dtype=torch.int64, device=self.device)
            return e, e.bool()
        bt, _, _ = alloc.vllm_layout(tables)
        bt_t = torch.from_numpy(bt.astype(np.int64)).to(self.device)
        p = torch.arange(t, device=self.device)
        slots = bt_t[:, p // self.block_size] * self.block_size + p % self.block_size
        mask = p[None, :] < torch.from_numpy(lengths).to(self.device)[:, None]
        return torch.where(mask, slots, torch.full_like(slots, -1)), mask

    def _gather_dense(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self.tables[:, layer_idx].reshape(-1)
        slots, mask = self._slots(tables, self.lengths[:, layer_idx].reshape(-1))
        idx = slots.clamp(min=0).reshape(-1)
        b, h, d = self.batch_size, self.num_kv_heads, self.head_dim
        k = self._read("k", idx).reshape(b, h, -1, d)
        v = self._read("v", idx).reshape(b, h, -1, d)
        m = mask.reshape(b, h, -1, 1)
        return k * m, v * m

    def _held_slots(
        self, allocator: BlockAllocator, tables: np.ndarray, lengths: np.ndarray
    ) -> torch.Tensor:
        """``(N,)`` slots of every token the tier's streams hold."""
        slots, mask = self._slots(
            np.ascontiguousarray(tables.reshape(-1)), lengths.reshape(-1), allocator
        )
        return slots[mask]
