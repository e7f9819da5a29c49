"""KIVI pages (``kv_format="kivi2" | "kivi4"``, and ``"int8" | "int4" | "int2"`` with per-channel
keys): sealed pages per channel (K) / per token (V), each stream's open page in ``dtype``.

A stream's full pages are sealed: keys one ``QuantLayout(bits, bs, bs, D, "token")`` block (per
channel, one group of ``bs`` tokens), values one ``QuantLayout(bits, G, bs, D, "channel")``
block (per token). Its last page, while not full, is open: its K and V live in ``dtype`` in the
stream's residual row (``block_row[block] = row``). A page is sealed when it fills up. After a
compaction or a restore, a stream's last page may be sealed with fewer tokens (its tail slots
hold stale tokens, never read); the next update reads its tokens back (dequantized) and
reopens it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvcore._kvcore import QuantLayout
from kvcore.cache.formats.base import (
    PageFormat,
    PageStore,
    Side,
    Streams,
    compact,
)


@dataclass(frozen=True)
class KiviStore(PageStore):
    """KIVI's tensors: the sealed pools, ``block_row`` ``(num_blocks,)`` int64 (the residual
    row of an open page, -1 for a sealed one), and ``res_k`` / ``res_v`` ``(num_streams,
    block_size, head_dim)`` in ``dtype``: each stream's open page."""

    block_row: torch.Tensor
    res_k: torch.Tensor
    res_v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes + self.res_k.nbytes + self.res_v.nbytes)

    def per_block(self) -> list[tuple[torch.Tensor, float]]:
        return [(self.k, 0.0), (self.v, 0.0), (self.block_row, -1.0)]

    def residual(self, side: Side) -> torch.Tensor:
        return self.res_k if side == "k" else self.res_v


@dataclass(frozen=True)
class KiviStep:
    """One update staged (:meth:`KiviFormat.stage`): per stream, ``full`` pages the step
    fills (``page_mask`` ``(S, P)``), sealed; its new open page in ``dtype``."""

    full: torch.Tensor
    page_mask: torch.Tensor
    k_sealed: torch.Tensor
    v_sealed: torch.Tensor
    k_open: torch.Tensor
    v_open: torch.Tensor
    has_open: torch.Tensor


class KiviFormat(PageFormat):
    """KIVI's pages at ``bits`` (2, 4, or 8 for int pages with per-channel keys)."""

    prefix = "kivi"

    def _setup(self) -> None:
        self._set_layouts(self.bits, self.bits)

    def _set_layouts(self, key_bits: int, value_bits: int) -> None:
        g, bs, d = self.group, self.block_size, self.head_dim
        # Keys: per channel, one group of block_size tokens per channel and page (KIVI's
        # R = G = block_size); values: per token, groups of `group` channels.
        self.k_layout = QuantLayout(key_bits, bs, bs, d, "token", "float16")
        self.v_layout = QuantLayout(value_bits, g, bs, d, "channel", "float16")
        self.page_bytes = int(self.k_layout.nbytes) + int(self.v_layout.nbytes)
        self._token_bytes = 2 * d * self.elt
        self.stream_bytes = bs * self._token_bytes

    def _layout(self, side: Side) -> QuantLayout:
        lay = self.k_layout if side == "k" else self.v_layout
        assert lay is not None
        return lay

    def alloc(self, num_blocks: int, num_streams: int, device: torch.device) -> KiviStore:
        k_lay, v_lay = self._layout("k"), self._layout("v")
        res = (num_streams, self.block_size, self.head_dim)
        with torch.inference_mode(False):
            return KiviStore(
                k=torch.zeros(num_blocks, k_lay.nbytes, dtype=torch.uint8, device=device),
                v=torch.zeros(num_blocks, v_lay.nbytes, dtype=torch.uint8, device=device),
                block_row=torch.full((num_blocks,), -1, dtype=torch.int64, device=device),
                res_k=torch.zeros(res, dtype=self.dtype, device=device),
                res_v=torch.zeros(res, dtype=self.dtype, device=device),
            )

    def prepare(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Refuses a step the pages could not seal later (NaN, inf, beyond float16)."""
        self.check_values(k, v)
        return k, v

    def check_values(self, *xs: torch.Tensor) -> None:
        if not all(bool(torch.isfinite(x).all()) for x in xs):
            raise ValueError("input contains a non-finite value (NaN or inf)")
        # A page is sealed with float16 scales and zero points, maybe steps later: a value
        # within float16's range always gives metadata that fits (|min| <= max, range / 3 too).
        f16 = torch.finfo(torch.float16).max
        if any(bool((x.abs() > f16).any()) for x in xs):
            raise ValueError(
                f"{self.name} pages keep float16 scales and zero points: every value must "
                f"lie within float16's range (|x| <= {f16:g})"
            )

    def stage(
        self, store: PageStore, prepared: tuple[torch.Tensor, torch.Tensor], streams: Streams
    ) -> KiviStep:
        """Everything the update writes, before the allocator appends anything: the pages the
        step fills, sealed, and the new open pages.

        Per stream ``s`` with ``r = prev % bs`` tokens in its last page::

            work[s] = | the r tokens of the last page | the q new tokens | ...
                      |<-- page 0 -->|<-- page 1 -->| ...   pages k < (r + q) // bs are full
        """
        from kvcore import kernels

        k, v = prepared
        bs, d, dev = self.block_size, self.head_dim, store.k.device
        n_s, q = k.shape[0], k.shape[1]
        prev = streams.lengths
        r = torch.from_numpy(prev % bs).to(dev)
        num_pages = int((r + q).max()) // bs + 1
        tail_slots = None
        j = torch.arange(bs, device=dev)
        has = j[None, :] < r[:, None]
        if int(r.max()) > 0:
            bt = streams.block_table(dev)
            col = torch.from_numpy(prev // bs).to(dev).clamp(max=bt.shape[1] - 1)
            last = bt.gather(1, col[:, None])
            tail_slots = (last * bs + j[None, :])[has]
        works = []
        sides: tuple[tuple[Side, torch.Tensor], ...] = (("k", k), ("v", v))
        for side, x in sides:
            w = torch.zeros(n_s, num_pages * bs, d, dtype=self.dtype, device=dev)
            if tail_slots is not None:
                w[:, :bs][has] = self._read(store, side, tail_slots)
            cols = r[:, None] + torch.arange(q, device=dev)[None, :]
            w[torch.arange(n_s, device=dev)[:, None], cols] = x.to(self.dtype)
            works.append(w.view(n_s, num_pages, bs, d))
        full = (r + q) // bs
        page_mask = torch.arange(num_pages, device=dev)[None, :] < full[:, None]
        rows = torch.arange(n_s, device=dev)
        sealed_k = sealed_v = torch.empty(0, dtype=torch.uint8, device=dev)
        if bool(page_mask.any()):
            sealed_k = kernels.quantize(works[0][page_mask].contiguous(), self._layout("k"))
            sealed_v = kernels.quantize(works[1][page_mask].contiguous(), self._layout("v"))
        return KiviStep(
            full=full,
            page_mask=page_mask,
            k_sealed=sealed_k,
            v_sealed=sealed_v,
            k_open=works[0][rows, full],
            v_open=works[1][rows, full],
            has_open=(r + q) % bs > 0,
        )

    def commit(
        self, store: PageStore, staged: KiviStep, slots: torch.Tensor, streams: Streams
    ) -> None:
        """After the append: sealed pages into the pools, open pages into residual rows."""
        assert isinstance(store, KiviStore)
        bs, dev = self.block_size, store.k.device
        bt = streams.block_table(dev)
        base = torch.from_numpy(streams.lengths // bs).to(dev)
        s_idx, k_idx = torch.nonzero(staged.page_mask, as_tuple=True)
        if len(s_idx):
            blocks = bt[s_idx, base[s_idx] + k_idx]
            store.k[blocks] = staged.k_sealed
            store.v[blocks] = staged.v_sealed
            store.block_row[blocks] = -1
        rows = streams.rows
        o = torch.nonzero(staged.has_open, as_tuple=True)[0]
        if len(o):
            blocks = bt[o, base[o] + staged.full[o]]
            store.res_k[rows[o]] = staged.k_open[o]
            store.res_v[rows[o]] = staged.v_open[o]
            store.block_row[blocks] = rows[o]

    def _read(self, store: PageStore, side: Side, slots: torch.Tensor) -> torch.Tensor:
        from kvcore import kernels

        assert isinstance(store, KiviStore)
        pool, res, bs = store.side(side), store.residual(side), self.block_size
        blocks, off = slots // bs, slots % bs
        row = store.block_row[blocks]
        out = torch.empty(len(slots), self.head_dim, dtype=self.dtype, device=pool.device)
        is_open = row >= 0
        out[is_open] = res[row[is_open], off[is_open]]
        sealed = ~is_open
        if bool(sealed.any()):
            # a key group spans the whole page: dequantize each page read once
            pages, inv = torch.unique(blocks[sealed], return_inverse=True)
            dense = kernels.dequantize(pool[pages].contiguous(), self._layout(side), torch.float32)
            out[sealed] = dense[inv, off[sealed]].to(self.dtype)
        return out

    def _write(self, store: PageStore, side: Side, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Writes tokens into their pages: an open page's residual row directly; a sealed
        page is re-sealed from its dequantized tokens with the new ones in place (one more
        rounding of the page's other tokens: their groups change)."""
        from kvcore import kernels

        assert isinstance(store, KiviStore)
        pool, res, bs = store.side(side), store.residual(side), self.block_size
        blocks, off = slots // bs, slots % bs
        row = store.block_row[blocks]
        is_open = row >= 0
        res[row[is_open], off[is_open]] = x[is_open].to(self.dtype)
        sealed = ~is_open
        if bool(sealed.any()):
            layout = self._layout(side)
            pages, inv = torch.unique(blocks[sealed], return_inverse=True)
            dense = kernels.dequantize(pool[pages].contiguous(), layout, torch.float32)
            dense[inv, off[sealed]] = x[sealed].float()
            pool[pages] = kernels.quantize(dense, layout)

    def _move(
        self, store: PageStore, src: torch.Tensor, dst: torch.Tensor, state: Sequence[torch.Tensor]
    ) -> None:
        """Reads every source (dequantized), then patches and re-seals each destination page
        (or writes its residual row); ``state`` moves in one ``compact_pools`` call."""
        k_src, v_src = self._read(store, "k", src), self._read(store, "v", src)
        self._write(store, "k", dst, k_src)
        self._write(store, "v", dst, v_src)
        compact(state, src, dst, store.num_blocks * self.block_size)

    def _nbytes(self, store: PageStore, slots: torch.Tensor) -> int:
        """Sealed pages at their layouts' bytes, tokens of open pages at their full-precision
        bytes (KIVI's ``kivi_nbytes`` with ``R = G = block_size``, values paged like keys)."""
        assert isinstance(store, KiviStore)
        blocks = slots // self.block_size
        is_open = store.block_row[blocks] >= 0
        sealed = len(torch.unique(blocks[~is_open]))
        return sealed * self.page_bytes + int(is_open.sum()) * self._token_bytes
