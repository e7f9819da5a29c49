"""Page storage: what one slot holds and how it is written, read and moved.

``kv_format="native"``: one ``dtype`` vector per slot (pools ``(num_blocks, block_size,
head_dim)``). ``"int8" | "int4" | "int2"``: one quantized layout block per page (pools
``(num_blocks, layout.nbytes)`` uint8); a token is encoded alone and its codes, scales and zero
points are scattered into its page (docs/cache.md). KIVI pages: :mod:`kvcore.cache.kivi`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvcore._kvcore import BlockAllocator, QuantLayout
from kvcore.cache.config import StorageConfig
from kvcore.cache.kivi import KiviPages


def page_layouts(
    storage: StorageConfig, head_dim: int
) -> tuple[QuantLayout | None, QuantLayout | None, QuantLayout | None, QuantLayout | None]:
    """``(layout, token_layout, k_layout, v_layout)`` of a page format: int pages' layout and
    one token of it, and the layouts attention reads (None: pages of ``dtype`` values).

    Raises:
        ValueError: from ``QuantLayout``, naming the broken rule (the group divides the head
            size, whole bytes).
    """
    bits, bs, g = storage.bits, storage.block_size, storage.group(head_dim)
    if storage.kivi:
        # Keys: per channel, one group of block_size tokens per channel and page (KIVI's
        # R = G = block_size); values: per token, groups of quant_group channels.
        k = QuantLayout(bits, bs, bs, head_dim, "token", "float16")
        return None, None, k, QuantLayout(bits, g, bs, head_dim, "channel", "float16")
    if storage.kv_format == "native":
        return None, None, None, None
    page = QuantLayout(bits, g, bs, head_dim, "channel", "float16")
    return page, QuantLayout(bits, g, 1, head_dim, "channel", "float16"), page, page


class Pages(KiviPages):
    """Slot storage of the high tier (native and per-token quantized pages) and the gathers."""

    @property
    def page_bytes(self) -> int:
        """Bytes of one block in the K pool plus the V pool: ``2 * block_size * head_dim``
        values of ``dtype``, or the page layouts' exact ``nbytes`` (docs/layouts.md)."""
        if self.k_layout is not None and self.v_layout is not None:
            return int(self.k_layout.nbytes) + int(self.v_layout.nbytes)
        return 2 * self.block_size * self.head_dim * self._elt()

    @property
    def residual_page_bytes(self) -> int:
        """KIVI: bytes of one stream's full-precision residual page, K and V (0 otherwise)."""
        return 2 * self.block_size * self.head_dim * self._elt() if self.kivi else 0

    def _regions(
        self, page: QuantLayout | None = None, tok: QuantLayout | None = None
    ) -> list[tuple[int, int, int]]:
        """Where one token's bytes lie in a quantized page, as ``(page offset, offset in the
        token's own one-token block, width)`` for its codes, its scales and its zero points.

        With axis ``"channel"`` every group lies inside one token, so token ``o`` of a page
        owns three contiguous byte ranges, each ``o * width`` past the start of its region::

            page:  | codes: tok 0 | tok 1 | ... | pad | scales: tok 0 | tok 1 | ... | zeros: ...
                     <-- cb -->                         <-- sb -->
            token: | codes (cb) | pad | scales (sb) | zeros (sb) |   (QuantLayout(.., 1, D, ..))
        """
        if page is None:
            page, tok = self.layout, self.token_layout
        assert page is not None and tok is not None
        cb = int(tok.codes_bytes)
        sb = int(tok.zeros_offset) - int(tok.scales_offset)
        return [
            (0, 0, cb),
            (int(page.scales_offset), int(tok.scales_offset), sb),
            (int(page.zeros_offset), int(tok.zeros_offset), sb),
        ]

    def _slot_views(
        self,
        pool: torch.Tensor,
        page: QuantLayout | None = None,
        tok: QuantLayout | None = None,
    ) -> list[tuple[torch.Tensor, int, int]]:
        """Per-slot byte views of a pool: ``(view, token offset, width)``, each view
        ``(num_blocks, block_size, width)`` over the pool's storage (strided for quantized
        pages), so ``view[block, offset]`` is one slot's piece. ``page`` / ``tok``: other
        layouts than the cache's pages (the MiKV low tier)."""
        if page is None and self.layout is None:
            return [(pool, 0, pool.shape[-1])]
        bs = self.block_size
        return [
            (pool[:, po : po + bs * w].view(pool.shape[0], bs, w), to, w)
            for po, to, w in self._regions(page, tok)
        ]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` vectors -> what one slot stores: ``dtype`` values, or one one-token
        block of ``token_layout`` (bytes identical to the token's piece of its page)."""
        if self.token_layout is None:
            return x.to(self.dtype)
        from kvcore import kernels

        return kernels.quantize(x.reshape(-1, 1, self.head_dim).contiguous(), self.token_layout)

    def _put(
        self,
        pool: torch.Tensor,
        slots: torch.Tensor,
        enc: torch.Tensor,
        page: QuantLayout | None = None,
        tok: QuantLayout | None = None,
    ) -> None:
        """Stores :meth:`_encode`'s ``(N, ...)`` rows at ``slots`` (``page`` / ``tok``: as
        :meth:`_slot_views`)."""
        bs = self.block_size
        b, o = slots // bs, slots % bs
        for view, to, w in self._slot_views(pool, page, tok):
            view[b, o] = enc[:, to : to + w]

    def _get(
        self,
        pool: torch.Tensor,
        slots: torch.Tensor,
        page: QuantLayout | None = None,
        tok: QuantLayout | None = None,
    ) -> torch.Tensor:
        """What ``slots`` store, as :meth:`_encode` wrote it (one-token blocks when quantized;
        the padding between codes and scales is zero, as the encoder writes it). ``page`` /
        ``tok``: as :meth:`_slot_views`."""
        if page is None:
            if self.layout is None:
                return pool.view(-1, pool.shape[-1])[slots]
            tok = self.token_layout
        assert tok is not None
        bs = self.block_size
        b, o = slots // bs, slots % bs
        out = torch.zeros(len(slots), tok.nbytes, dtype=torch.uint8, device=pool.device)
        for view, to, w in self._slot_views(pool, page, tok):
            out[:, to : to + w] = view[b, o]
        return out

    def _move_pieces(
        self,
        pools: Sequence[torch.Tensor],
        src: torch.Tensor,
        dst: torch.Tensor,
        page: QuantLayout | None = None,
        tok: QuantLayout | None = None,
    ) -> None:
        """A compaction plan over quantized pages: each token moves as its three pieces
        (codes, scales, zeros), never as a raw row of its page, in one
        :func:`kvcore.kernels.compact_pools` call over the pieces' strided views."""
        from kvcore import kernels

        views = [v for pool in pools for v, _, _ in self._slot_views(pool, page, tok)]
        indptr = torch.tensor([0, len(src)], dtype=torch.int64, device=src.device)
        num_slots = views[0].shape[0] * views[0].shape[1]
        kernels.compact_pools(views, [0] * len(views), src, dst, indptr, num_slots)

    def _read(self, pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` vectors in ``dtype`` of the given slots (dequantized when quantized)."""
        if self.kivi:
            return self._kivi_read(pool, slots)
        raw = self._get(pool, slots)
        if self.token_layout is None:
            return raw
        from kvcore import kernels

        out = kernels.dequantize(raw.contiguous(), self.token_layout, torch.float32)
        return out.reshape(-1, self.head_dim).to(self.dtype)

    def _write(self, pool: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Stores ``(N, D)`` vectors at ``slots`` (encoded as the format says)."""
        if self.kivi:
            self._kivi_write(pool, slots, x)
            return
        self._put(pool, slots, self._encode(x))

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
        k = self._read(self.k_pool, idx).reshape(b, h, -1, d)
        v = self._read(self.v_pool, idx).reshape(b, h, -1, d)
        m = mask.reshape(b, h, -1, 1)
        return k * m, v * m
