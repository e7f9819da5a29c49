"""Attention dispatch: decode, prefill chunks over quantized pages, KIVI and the MiKV tier, all
through :func:`kvcore.kernels.decode_attention` (the CUDA kernel with CuPy on CUDA, the torch
reference :func:`kvcore.attention.paged_attention` otherwise). Partial attentions over disjoint
key sets are combined by :func:`merge_state`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvcore.cache.formats import KiviStore
from kvcore.cache.snapshots import Snapshots


def merge_state(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges two partial attentions of the same queries over disjoint key sets into the
    attention over their union, by their log-sum-exps (FlashInfer's ``merge_state``)::

        lse = log(exp(lse_a) + exp(lse_b))
        out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

    A side that saw no key has ``lse = -inf`` and weight 0 (both: the output is 0).

    Args:
        out_a, out_b: ``(..., D)`` outputs, e.g. ``(B, q, Hq, D)`` from
            ``kvcore.kernels.decode_attention(..., return_lse=True)``.
        lse_a, lse_b: ``(...)`` their log-sum-exps of the scaled logits, e.g. ``(B, q, Hq)``.

    Returns:
        ``(out, lse)``: float32 ``(..., D)`` and ``(...)``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.nan_to_num((lse_a - lse).exp(), nan=0.0)[..., None]
    w_b = torch.nan_to_num((lse_b - lse).exp(), nan=0.0)[..., None]
    return w_a * out_a.float() + w_b * out_b.float(), lse


class AttentionDispatch(Snapshots):
    """:meth:`attend` and the partial attentions it merges."""

    def has_pending_step(self, layer_idx: int) -> bool:
        """Whether :meth:`attend` can read layer ``layer_idx`` now: an :meth:`update` or
        :meth:`append` of the layer recorded a step that :meth:`attend` has not consumed."""
        self._check_layer(layer_idx)
        return self._step[layer_idx] is not None

    def attend(
        self, layer_idx: int, query: torch.Tensor, slot_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Paged attention of the last step's queries of a layer (ragged heads, padding).

        Runs :func:`kvcore.kernels.decode_attention` over the layer's pages (the CUDA kernel
        on CUDA tensors with CuPy, else the torch reference
        :func:`kvcore.attention.paged_attention`). The step's own tokens are read from the
        pages like the prefix, causally; with quantized pages a prefill chunk (``q > 1``)
        attends its own tokens in full precision and the stored prefix dequantized, while a
        decode step reads everything as stored (the fused-dequantization path).

        Args:
            query: ``(B, Hq, q, D)`` the step's (rotated) queries, ``q`` as in the last
                :meth:`update` of the layer.
            slot_bias: optional ``(num_slots,)`` float logit bias per slot (log-count of merged
                slots).

        Returns:
            ``(B, q, Hq, D)``.

        Raises:
            ValueError: no :meth:`update` of this layer since its last attention or
                compression, or a query of another batch or length than that step.
        """
        self._check_layer(layer_idx)
        st = self._step[layer_idx]
        if st is None or layer_idx not in self._pending:
            raise ValueError(f"attend({layer_idx}) must follow update({layer_idx}) of the step")
        if (
            not isinstance(query, torch.Tensor)
            or query.ndim != 4
            or query.shape[0] != self.batch_size
            or query.shape[2] != st["q"]
        ):
            raise ValueError(
                f"query must have shape ({self.batch_size}, num_q_heads, {st['q']}, "
                f"{self.head_dim}) (the step of update({layer_idx})), got "
                f"{tuple(getattr(query, 'shape', ()))}"
            )
        assert self.allocator is not None
        from kvcore import kernels

        tables = self.tables[:, layer_idx].reshape(-1)
        lens = self.lengths[:, layer_idx].reshape(-1)
        # The step's tokens are already stored at the end of every stream: the kernel's
        # contract (token t of a chunk of q sees stored tokens [0, len - q + t + 1)).
        width = -(-int(lens.max()) // self.block_size) if lens.size else 0
        bt, _, _ = self.allocator.vllm_layout(tables)
        block_table = torch.from_numpy(bt[:, :width].astype(np.int64)).to(self.device)
        if slot_bias is None and self.logcount_bias:
            slot_bias = self.slot_count.log()
        lengths = torch.from_numpy(lens.astype(np.int64)).to(self.device)
        # MiKV: the high tier (the step's tokens included, causal) and the low tier (all
        # visible: every demoted token precedes the step), merged by their log-sum-exps.
        mikv = self.lo_allocator is not None and bool(self.lo_lengths[:, layer_idx].any())
        fmt, store = self.format, self.store
        if fmt.k_layout is not None and int(st["q"]) > 1:
            hi = self._chunk_attend(query, block_table, lengths, slot_bias, st, return_lse=mikv)
        elif isinstance(store, KiviStore):
            return self._kivi_attend(query, store, block_table, lengths, layer_idx, slot_bias)
        else:
            args = (query, self.k_pool, self.v_pool, block_table, lengths)
            kw: dict[str, Any] = {
                "slot_bias": slot_bias,
                "slot_valid": self.slot_valid,
                "scaling": self.scaling,
                "k_layout": fmt.k_layout,
                "v_layout": fmt.v_layout,
            }
            if not mikv:
                out: torch.Tensor = kernels.decode_attention(*args, **kw)
                return out
            hi = kernels.decode_attention(*args, **kw, return_lse=True)
        if not mikv:
            assert isinstance(hi, torch.Tensor)
            return hi
        o1, l1 = hi
        o2, l2 = self._lo_attend(query, layer_idx, int(st["q"]))
        return merge_state(o1, l1, o2, l2)[0].to(query.dtype)

    def _chunk_attend(
        self,
        query: torch.Tensor,
        block_table: torch.Tensor,
        lengths: torch.Tensor,
        slot_bias: torch.Tensor | None,
        st: dict[str, Any],
        return_lse: bool = False,
    ) -> Any:
        """Attention of a prefill chunk over quantized pages: the stored prefix dequantized,
        the chunk's own tokens in full precision (as given to :meth:`update`), so quantization
        changes what later steps read, not the prefill's own attention (as in KIVI and HF's
        quantized caches; KIVI pages are read through :meth:`_read`, sealed pages dequantized
        and open ones from the residual). The pages the table names are dequantized into a
        small dtype pool, one copy per stream, and the chunk's tokens are written over their
        slots there."""
        from kvcore import kernels

        bs, d = self.block_size, self.head_dim
        n, width = block_table.shape
        q = int(st["q"])
        page_slots = block_table.reshape(-1)[:, None] * bs + torch.arange(bs, device=self.device)
        page_slots = page_slots.reshape(-1)
        k_tmp = self._read("k", page_slots).reshape(n * width, bs, d)
        v_tmp = self._read("v", page_slots).reshape(n * width, bs, d)
        # the chunk is the last q tokens of every stream: positions [len - q, len)
        pos = lengths[:, None] - q + torch.arange(q, device=self.device)[None, :]
        own = (torch.arange(n, device=self.device)[:, None] * (width * bs) + pos).reshape(-1)
        k_tmp.view(-1, d)[own] = st["keys"].reshape(-1, d).to(self.dtype)
        v_tmp.view(-1, d)[own] = st["values"].reshape(-1, d).to(self.dtype)
        tmp_table = torch.arange(n * width, device=self.device).reshape(n, width)
        args = (query, k_tmp, v_tmp, tmp_table, lengths)
        kw: dict[str, Any] = {
            "slot_bias": None if slot_bias is None else slot_bias[page_slots].contiguous(),
            "slot_valid": self.slot_valid[page_slots].contiguous(),
            "scaling": self.scaling,
        }
        if return_lse:
            return kernels.decode_attention(*args, **kw, return_lse=True)
        return kernels.decode_attention(*args, **kw)

    def _kivi_attend(
        self,
        query: torch.Tensor,
        store: KiviStore,
        block_table: torch.Tensor,
        lengths: torch.Tensor,
        layer: int,
        slot_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """KIVI attention: the sealed pages through the fused-dequantization path, the open
        pages (residual rows) as a small dtype pool, merged by their log-sum-exps::

            part 1: pools, k_layout (axis token) / v_layout; open pages' slots masked
            part 2: pool = [zeros page, residual rows of the layer's streams]; stream s reads
                    row s + 1 at its open page's column, the null page (masked) elsewhere
        """
        from kvcore import kernels

        bs, dev = self.block_size, self.device
        n_s = block_table.shape[0]
        sealed_slot = (store.block_row < 0).repeat_interleave(bs)
        o1, l1 = kernels.decode_attention(
            query,
            self.k_pool,
            self.v_pool,
            block_table,
            lengths,
            slot_bias=slot_bias,
            slot_valid=self.slot_valid & sealed_slot,
            scaling=self.scaling,
            k_layout=self.format.k_layout,
            v_layout=self.format.v_layout,
            return_lse=True,
        )
        rows = self._stream_rows(layer)
        row_of = store.block_row[block_table]  # (S, W)
        mine = (row_of == rows[:, None]) & (block_table > 0)
        small_table = torch.where(mine, torch.arange(1, n_s + 1, device=dev)[:, None], 0)
        zero = torch.zeros(1, bs, self.head_dim, dtype=self.dtype, device=dev)
        k_small = torch.cat([zero, store.res_k[rows]]).to(query.dtype)
        v_small = torch.cat([zero, store.res_v[rows]]).to(query.dtype)
        # the per-slot state of the open pages' slots, in the small pool's slot numbering
        open_block = torch.where(mine, block_table, 0).amax(1)  # (S,) 0: no open page
        src_slots = (open_block[:, None] * bs + torch.arange(bs, device=dev)).reshape(-1)
        valid = torch.cat(
            [torch.zeros(bs, dtype=torch.bool, device=dev), self.slot_valid[src_slots]]
        )
        valid[bs:] &= (open_block > 0).repeat_interleave(bs)
        bias = None
        if slot_bias is not None:
            bias = torch.cat([torch.zeros(bs, device=dev), slot_bias[src_slots].float()])
        o2, l2 = kernels.decode_attention(
            query,
            k_small,
            v_small,
            small_table,
            lengths,
            slot_bias=bias,
            slot_valid=valid,
            scaling=self.scaling,
            return_lse=True,
        )
        return merge_state(o1, l1, o2, l2)[0].to(query.dtype)

    def _lo_attend(
        self, query: torch.Tensor, layer: int, q: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention (output, lse) of the step's queries over the layer's low tier: every query
        sees every low-tier token (they all precede the step). Pages of ``lo_format`` through
        the fused-dequantization path; the kernel's causal window is opened by ``q - 1``
        extra slots, masked (null block, or dead slots of the last page)."""
        from kvcore import kernels

        assert self.lo_allocator is not None and self.lo_format is not None
        bs, dev = self.block_size, self.device
        tables = np.ascontiguousarray(self.lo_tables[:, layer].reshape(-1))
        lens = self.lo_lengths[:, layer].reshape(-1)
        eff = lens + (q - 1) * (lens > 0)
        width = max(1, -(-int(eff.max()) // bs))
        bt, _, _ = self.lo_allocator.vllm_layout(tables)
        table = np.zeros((len(tables), width), dtype=np.int64)
        cols = min(width, bt.shape[1])
        table[:, :cols] = bt[:, :cols]
        slots, mask = self._slots(tables, lens, self.lo_allocator)
        live = torch.zeros_like(self.lo_slot_valid)
        live[slots[mask]] = True
        group = query.shape[1] // self.num_kv_heads
        scale = self.lo_key_scale[:, layer].repeat_interleave(group, dim=1)  # (B, Hq, D)
        return kernels.decode_attention(
            (query.float() * scale[:, :, None, :]).to(query.dtype),
            self.lo_k_pool,
            self.lo_v_pool,
            torch.from_numpy(table).to(dev),
            torch.from_numpy(eff.astype(np.int64)).to(dev),
            slot_valid=self.lo_slot_valid & live,
            scaling=self.scaling,
            k_layout=self.lo_format.layout,
            v_layout=self.lo_format.layout,
            return_lse=True,
        )
