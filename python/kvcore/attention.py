"""Paged attention in plain torch: the CPU path of the cache and the reference of the CUDA kernel.

:func:`paged_attention` is the one torch reference of ``kvcore.kernels.decode_attention``
(``cuda/decode_attention.cu``): the dispatcher runs it whenever the kernel does not (CPU
tensors, no CuPy, unsupported shapes), ``KVCache.attend`` reaches it through the dispatcher,
and the kernel tests compare against it.

It reads K and V straight from the paged pools through one block table per
(sequence, kv-head) stream, so every head of every sequence may hold a different number of
tokens (ragged per-head budgets). The step's own tokens are already stored, at the end of
each stream, and are attended causally::

    stream b*H + h:  block_table[b*H + h, j // block_size] -> block; slot = block*bs + j % bs
    query token t of a chunk of q sees stored tokens [0, lengths[b*H + h] - q + t + 1)

Only the pages of the block table are gathered (and dequantized, for quantized pages); no
contiguous cache is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, overload

import torch
from torch.nn.attention.bias import causal_lower_right

from kvcore import _args

if TYPE_CHECKING:
    from kvcore._kvcore import QuantLayout

__all__ = ["paged_attention"]


def _pages(pool: torch.Tensor, table: torch.Tensor, layout: QuantLayout | None) -> torch.Tensor:
    """The pages of ``table`` ``(S, W)`` -> ``(S, W, block_size, D)`` float32."""
    pages = pool[table]
    if layout is None:
        return pages.float()
    from kvcore import quant

    return quant.dequantize(pages, layout)


@overload
def paged_attention(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    slot_bias: torch.Tensor | None = ...,
    slot_valid: torch.Tensor | None = ...,
    scaling: float | None = ...,
    k_layout: QuantLayout | None = ...,
    v_layout: QuantLayout | None = ...,
    return_lse: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def paged_attention(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    slot_bias: torch.Tensor | None = ...,
    slot_valid: torch.Tensor | None = ...,
    scaling: float | None = ...,
    k_layout: QuantLayout | None = ...,
    v_layout: QuantLayout | None = ...,
    return_lse: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


def paged_attention(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    slot_bias: torch.Tensor | None = None,
    slot_valid: torch.Tensor | None = None,
    scaling: float | None = None,
    k_layout: QuantLayout | None = None,
    v_layout: QuantLayout | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of a chunk of ``q`` query tokens over paged streams (float32 softmax).

    Args:
        query: ``(B, Hq, q, D)`` float16, bfloat16 or float32; ``Hq`` a multiple of ``H``
            (GQA: query head ``j`` reads kv head ``j // (Hq / H)``).
        k_pool, v_pool: ``(num_blocks, block_size, D)`` float pools, or
            ``(num_blocks, layout.nbytes)`` uint8 quantized pages (one block of
            ``layout.num_tokens = block_size`` tokens per page) with ``k_layout`` /
            ``v_layout`` (docs/layouts.md).
        block_table: ``(B * H, W)`` int64 block ids per stream ``b * H + h``; padded with
            block 0.
        lengths: ``(B * H,)`` int64 stored tokens per stream, the chunk's own included.
        slot_bias: optional ``(num_slots,)`` float32 added to each slot's logit (the
            log-count of merged slots); ``-inf`` masks a slot.
        slot_valid: optional ``(num_slots,)`` bool, False masks a slot (padding tokens).
        scaling: softmax scale, default ``D ** -0.5``.
        k_layout, v_layout: the page layouts of quantized pools (None: float pools).
        return_lse: also return the log-sum-exp of each row's scaled, biased logits.

    Returns:
        ``(B, q, Hq, D)`` in ``query``'s dtype (the layout HF attention functions return);
        a row with no visible key gets zeros. With ``return_lse``, also ``(B, q, Hq)``
        float32 (``-inf`` for a row with no visible key), to merge with another part of the
        keys (``out = sum_i exp(lse_i - lse) * out_i`` with ``lse = logaddexp(lse_i)``).

    Raises:
        TypeError: a non-tensor argument, or a block table or lengths that are not int64.
        ValueError: shapes that do not match: block table rows and query heads that do not
            match the batch, a float pool whose head_dim differs from the query's, lengths
            that are not one per stream.
    """
    _check_shapes(query, k_pool, v_pool, block_table, lengths, k_layout, v_layout)
    b_sz, hq, q_len, d = query.shape
    n_streams, width = block_table.shape
    if n_streams % b_sz or hq % max(n_streams // b_sz, 1):
        raise ValueError(
            f"block_table rows ({n_streams}) and query heads ({hq}) do not match batch {b_sz}"
        )
    h = n_streams // b_sz
    group = hq // h
    scale = d**-0.5 if scaling is None else scaling
    if not return_lse and slot_bias is None and k_layout is None and v_layout is None:
        fast = _causal(query, k_pool, v_pool, block_table, lengths, slot_valid, scale)
        if fast is not None:
            return fast
    kp = _pages(k_pool, block_table, k_layout)
    vp = _pages(v_pool, block_table, v_layout)
    bs = kp.shape[2]
    dev = query.device
    keys = kp.reshape(b_sz, h, width * bs, d)
    values = vp.reshape(b_sz, h, width * bs, d)
    idx = torch.arange(width * bs, device=dev)
    t = torch.arange(q_len, device=dev)
    limit = lengths.reshape(b_sz, h, 1, 1) - q_len + t.reshape(1, 1, q_len, 1) + 1
    mask = idx.reshape(1, 1, 1, -1) < limit
    slots = (block_table[:, :, None] * bs + torch.arange(bs, device=dev)).reshape(b_sz, h, 1, -1)
    bias = torch.zeros(b_sz, h, 1, width * bs, device=dev)
    if slot_valid is not None:
        mask = mask & slot_valid.bool()[slots]
    if slot_bias is not None:
        bias = slot_bias.float()[slots]
        mask = mask & (bias > float("-inf"))
    if not return_lse:
        return _sdpa(query, keys, values, mask, bias if slot_bias is not None else None, scale)
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    mask = mask.repeat_interleave(group, dim=1)
    bias = bias.repeat_interleave(group, dim=1)
    logits = (query.float() * scale) @ keys.transpose(-1, -2) + bias
    logits = logits.masked_fill(~mask, float("-inf"))
    p = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    out = (p @ values).to(query.dtype).transpose(1, 2).contiguous()
    lse = torch.logsumexp(logits, dim=-1).transpose(1, 2).contiguous()
    return out, lse


def _check_shapes(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    k_layout: QuantLayout | None,
    v_layout: QuantLayout | None,
) -> None:
    """The shape rules of :func:`paged_attention`, checked before any torch op can fail."""
    if query.dim() != 4:
        raise ValueError(f"query must be (B, Hq, q, D), got shape {tuple(query.shape)}")
    d = query.shape[-1]
    for name, pool, layout in (("k_pool", k_pool, k_layout), ("v_pool", v_pool, v_layout)):
        if layout is None and (pool.dim() != 3 or pool.shape[-1] != d):
            raise ValueError(
                f"{name} must be (num_blocks, block_size, D={d}) to match the query, "
                f"got shape {tuple(pool.shape)}"
            )
        if layout is not None and (pool.dim() != 2 or layout.head_dim != d):
            raise ValueError(
                f"{name} must be (num_blocks, nbytes) pages of a layout with head_dim={d}, "
                f"got shape {tuple(pool.shape)} and head_dim={layout.head_dim}"
            )
    for name, t, ndim in (("block_table", block_table, 2), ("lengths", lengths, 1)):
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {t.dtype}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimension(s), got {tuple(t.shape)}")
    if lengths.shape[0] != block_table.shape[0]:
        raise ValueError(
            f"lengths must have one entry per block table row ({block_table.shape[0]}), "
            f"got {lengths.shape[0]}"
        )
    if query.shape[0] == 0:
        raise ValueError("query must hold at least one sequence (B >= 1)")


def _sdpa(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The same attention through ``torch.nn.functional.scaled_dot_product_attention`` in
    float32 (its fused CPU / CUDA kernels, no ``(q, T)`` softmax materialized by hand), with
    the visibility mask (and slot bias) passed explicitly and the GQA group folded into the
    query axis.

    ``keys`` / ``values`` ``(B, H, T, D)`` float32, ``mask`` ``(B, H, q, T)`` bool (True:
    visible), ``bias`` ``(B, H, 1, T)`` float32 or None. A row with no visible key gets zeros.
    """
    b_sz, hq, q_len, d = query.shape
    h, t = keys.shape[1], keys.shape[2]
    group = hq // h
    # the visible keys of every stream end at its length: drop the columns no row sees
    last = int(mask.any(2).any(0).any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
    keys, values, mask = keys[:, :, :last], values[:, :, :last], mask[..., :last]
    t = last
    sdpa = torch.nn.functional.scaled_dot_product_attention
    # The GQA group folded into the query axis: K and V are not repeated per query head.
    qf = query.float().reshape(b_sz, h, group * q_len, d)
    full = mask[:, :, None].expand(b_sz, h, group, q_len, t).reshape(b_sz, h, group * q_len, t)
    attn: torch.Tensor = full
    if bias is not None:
        attn = bias[:, :, :, :t].masked_fill(~full, float("-inf"))
    out = sdpa(qf, keys, values, attn_mask=attn, scale=scale)
    out = out.masked_fill(~full.any(-1, keepdim=True), 0.0)  # rows with no visible key
    out = out.reshape(b_sz, hq, q_len, d)
    return out.to(query.dtype).transpose(1, 2).contiguous()


def _causal(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    slot_valid: torch.Tensor | None,
    scale: float,
) -> torch.Tensor | None:
    """The common case without building a mask: native pages, no bias, every stream holding
    the same ``t >= q`` tokens, all of them valid. That is the kernel's causal window (query
    ``i`` sees keys ``[0, t - q + i]``), run by SDPA's causal kernels in the pools' dtype when
    the query has it (as transformers' sdpa attention does), else in float32. None when the
    case does not apply."""
    b_sz, hq, q_len, d = query.shape
    n_streams, width = block_table.shape
    bs = k_pool.shape[1]
    t = int(lengths[0]) if lengths.numel() else 0
    if t < q_len or t > width * bs or not bool((lengths == t).all()):
        return None
    h = n_streams // b_sz
    group = hq // h
    if slot_valid is not None:
        p = torch.arange(t, device=block_table.device)
        slots = block_table[:, p // bs] * bs + p % bs
        if not bool(slot_valid[slots].all()):
            return None
    dtype = query.dtype if query.dtype == k_pool.dtype else torch.float32
    keys = k_pool[block_table].reshape(b_sz, h, width * bs, d)[:, :, :t].to(dtype)
    values = v_pool[block_table].reshape(b_sz, h, width * bs, d)[:, :, :t].to(dtype)
    qx = query.to(dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if q_len == t:
        out = sdpa(qx, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    elif q_len == 1:
        # a decode step: every query sees every key, so a kv head's group of query heads
        # (consecutive, as transformers' repeat_kv) becomes that head's query rows: one
        # SDPA call per kv head, with no repeated K/V (bench/results/quality_speed.json).
        out = sdpa(qx.reshape(b_sz, h, group, d), keys, values, scale=scale)
        out = out.reshape(b_sz, hq, 1, d)
    else:
        out = sdpa(
            qx,
            keys.repeat_interleave(group, dim=1),
            values.repeat_interleave(group, dim=1),
            attn_mask=causal_lower_right(q_len, t),
            scale=scale,
        )
    return out.to(query.dtype).transpose(1, 2).contiguous()


# Every public function checks its tensor arguments first (TypeError, not AttributeError).
_args.check_module(globals(), __name__)
