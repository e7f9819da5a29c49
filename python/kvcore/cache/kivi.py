"""KIVI pages (``kv_format="kivi2" | "kivi4"``): sealed pages per channel / per token, open
pages in ``dtype``.

A stream's full pages are sealed: keys one ``QuantLayout(bits, bs, bs, D, "token")`` block (per
channel, one group of ``bs`` tokens), values one ``QuantLayout(bits, G, bs, D, "channel")``
block (per token). Its last page, while not full, is open: its K and V live in ``dtype`` in the
stream's residual row (``block_row[block] = row``). A page is sealed when it fills up. After a
compaction or a restore, a stream's last page may be sealed with fewer tokens (its tail slots
hold stale tokens, never read); the next update reads its tokens back (dequantized) and
reopens it.
"""

from __future__ import annotations

import numpy as np
import torch

from kvcore._kvcore import QuantLayout
from kvcore.cache.state import CacheState


class KiviPages(CacheState):
    """Reads, writes and the two-phase append (stage, then commit) of KIVI pages."""

    def _kivi_side(self, pool: torch.Tensor) -> tuple[QuantLayout, torch.Tensor]:
        if pool is self.k_pool:
            assert self.k_layout is not None
            return self.k_layout, self.res_k
        assert self.v_layout is not None
        return self.v_layout, self.res_v

    def _kivi_read(self, pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        from kvcore import kernels

        layout, res = self._kivi_side(pool)
        bs = self.block_size
        blocks, off = slots // bs, slots % bs
        row = self.block_row[blocks]
        out = torch.empty(len(slots), self.head_dim, dtype=self.dtype, device=self.device)
        is_open = row >= 0
        out[is_open] = res[row[is_open], off[is_open]]
        sealed = ~is_open
        if bool(sealed.any()):
            # a key group spans the whole page: dequantize each page read once
            pages, inv = torch.unique(blocks[sealed], return_inverse=True)
            dense = kernels.dequantize(pool[pages].contiguous(), layout, torch.float32)
            out[sealed] = dense[inv, off[sealed]].to(self.dtype)
        return out

    def _kivi_write(self, pool: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Writes tokens into their pages: an open page's residual row directly; a sealed
        page is re-sealed from its dequantized tokens with the new ones in place (one more
        rounding of the page's other tokens: their groups change)."""
        from kvcore import kernels

        layout, res = self._kivi_side(pool)
        bs = self.block_size
        blocks, off = slots // bs, slots % bs
        row = self.block_row[blocks]
        is_open = row >= 0
        res[row[is_open], off[is_open]] = x[is_open].to(self.dtype)
        sealed = ~is_open
        if bool(sealed.any()):
            pages, inv = torch.unique(blocks[sealed], return_inverse=True)
            dense = kernels.dequantize(pool[pages].contiguous(), layout, torch.float32)
            dense[inv, off[sealed]] = x[sealed].float()
            pool[pages] = kernels.quantize(dense, layout)

    def _check_kivi_values(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Refuses a step KIVI pages could not seal later (NaN, inf, beyond float16)."""
        if not bool(torch.isfinite(k).all()) or not bool(torch.isfinite(v).all()):
            raise ValueError("input contains a non-finite value (NaN or inf)")
        # A page is sealed with float16 scales and zero points, maybe steps later: a value
        # within float16's range always gives metadata that fits (|min| <= max, range / 3 too).
        f16 = torch.finfo(torch.float16).max
        if bool((k.abs() > f16).any()) or bool((v.abs() > f16).any()):
            raise ValueError(
                f"{self.kv_format} pages keep float16 scales and zero points: every value must "
                f"lie within float16's range (|x| <= {f16:g})"
            )

    def _kivi_stage(
        self, tables: np.ndarray, prev: np.ndarray, k: torch.Tensor, v: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Everything an update writes, computed before the allocator appends anything (so a
        rejected step changes nothing): the pages the step fills, sealed, and the new open
        pages.

        Per stream ``s`` with ``r = prev % bs`` tokens in its last page::

            work[s] = | the r tokens of the last page | the q new tokens | ...
                      |<-- page 0 -->|<-- page 1 -->| ...   pages k < (r + q) // bs are full
        """
        from kvcore import kernels

        assert self.k_layout is not None and self.v_layout is not None
        bs, d, dev = self.block_size, self.head_dim, self.device
        n_s, q = k.shape[0], k.shape[1]
        r = torch.from_numpy(prev % bs).to(dev)
        num_pages = int((r + q).max()) // bs + 1
        works = []
        tail_slots = None
        if int(r.max()) > 0:
            bt = torch.from_numpy(self._block_table(tables)).to(dev)
            j = torch.arange(bs, device=dev)
            has = j[None, :] < r[:, None]
            col = torch.from_numpy(prev // bs).to(dev).clamp(max=bt.shape[1] - 1)
            last = bt.gather(1, col[:, None])
            tail_slots = (last * bs + j[None, :])[has]
        for pool, x in ((self.k_pool, k), (self.v_pool, v)):
            w = torch.zeros(n_s, num_pages * bs, d, dtype=self.dtype, device=dev)
            if tail_slots is not None:
                j = torch.arange(bs, device=dev)
                has = j[None, :] < r[:, None]
                w[:, :bs][has] = self._kivi_read(pool, tail_slots)
            cols = r[:, None] + torch.arange(q, device=dev)[None, :]
            w[torch.arange(n_s, device=dev)[:, None], cols] = x.to(self.dtype)
            works.append(w.view(n_s, num_pages, bs, d))
        full = (r + q) // bs
        page_mask = torch.arange(num_pages, device=dev)[None, :] < full[:, None]
        rows = torch.arange(n_s, device=dev)
        sealed_k = sealed_v = torch.empty(0, dtype=torch.uint8, device=dev)
        if bool(page_mask.any()):
            sealed_k = kernels.quantize(works[0][page_mask].contiguous(), self.k_layout)
            sealed_v = kernels.quantize(works[1][page_mask].contiguous(), self.v_layout)
        return {
            "full": full,
            "page_mask": page_mask,
            "k_sealed": sealed_k,
            "v_sealed": sealed_v,
            "k_open": works[0][rows, full],
            "v_open": works[1][rows, full],
            "has_open": (r + q) % bs > 0,
        }

    def _block_table(self, tables: np.ndarray) -> np.ndarray:
        """``(len(tables), W)`` int64 block ids of the streams (vLLM block table)."""
        assert self.allocator is not None
        bt, _, _ = self.allocator.vllm_layout(np.ascontiguousarray(tables))
        return np.asarray(bt, dtype=np.int64)

    def _kivi_commit(
        self,
        layer: int,
        tables: np.ndarray,
        prev: np.ndarray,
        st: dict[str, torch.Tensor],
    ) -> None:
        """After the append: sealed pages into the pools, open pages into residual rows."""
        bs, dev = self.block_size, self.device
        bt = torch.from_numpy(self._block_table(tables)).to(dev)
        base = torch.from_numpy(prev // bs).to(dev)
        s_idx, k_idx = torch.nonzero(st["page_mask"], as_tuple=True)
        if len(s_idx):
            blocks = bt[s_idx, base[s_idx] + k_idx]
            self.k_pool[blocks] = st["k_sealed"]
            self.v_pool[blocks] = st["v_sealed"]
            self.block_row[blocks] = -1
        b, h = self.batch_size, self.num_kv_heads
        rows = torch.arange(b * self.num_layers * h, device=dev).reshape(b, self.num_layers, h)
        rows = rows[:, layer].reshape(-1)
        o = torch.nonzero(st["has_open"], as_tuple=True)[0]
        if len(o):
            blocks = bt[o, base[o] + st["full"][o]]
            self.res_k[rows[o]] = st["k_open"][o]
            self.res_v[rows[o]] = st["v_open"][o]
            self.block_row[blocks] = rows[o]
