"""Split-K decode attention over pages (``decode_attention.cu``).

Part of :mod:`kvcore.kernels`, which re-exports its public functions; the kernel path is
taken when ``kvcore.kernels.uses_kernel`` says so and launches through ``kvcore.kernels._launch``
(looked up at call time, so the CPU emulation can replace both).
"""

from __future__ import annotations

import math
from typing import Any, Literal, overload

import numpy as np
import torch

from kvcore import _args
from kvcore import kernels as _k
from kvcore.attention import paged_attention
from kvcore.kernels import _DT, Layout, _check, _ptr


def attention_defines(
    dtype: torch.dtype,
    head_dim: int,
    block_size: int,
    group: int,
    q_len: int,
    k_layout: Layout | None,
    v_layout: Layout | None,
    has_bias: bool,
    has_valid: bool,
) -> dict[str, int]:
    """The preamble of ``decode_attention.cu`` (quantized pages: one layout block per page)."""
    lay = k_layout if k_layout is not None else v_layout
    meta = lay.meta_dtype if lay is not None else "float16"
    out = {
        "KV_DT": _DT[dtype],
        "KV_D": head_dim,
        "KV_BS": block_size,
        "KV_GROUP": group,
        "KV_QLEN": q_len,
        "KV_META_F16": int(meta == "float16"),
        "KV_HAS_BIAS": int(has_bias),
        "KV_HAS_VALID": int(has_valid),
    }
    for side, lay in (("K", k_layout), ("V", v_layout)):
        out[f"KV_{side}_QUANT"] = int(lay is not None)
        out[f"KV_{side}_BITS"] = lay.bits if lay is not None else 8
        out[f"KV_{side}_G"] = lay.group_size if lay is not None else 1
        out[f"KV_{side}_AXIS_TOKEN"] = int(lay is not None and lay.axis == "token")
    return out


@overload
def decode_attention(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    slot_bias: torch.Tensor | None = ...,
    slot_valid: torch.Tensor | None = ...,
    scaling: float | None = ...,
    k_layout: Layout | None = ...,
    v_layout: Layout | None = ...,
    num_splits: int | None = ...,
    out: torch.Tensor | None = ...,
    return_lse: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def decode_attention(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    slot_bias: torch.Tensor | None = ...,
    slot_valid: torch.Tensor | None = ...,
    scaling: float | None = ...,
    k_layout: Layout | None = ...,
    v_layout: Layout | None = ...,
    num_splits: int | None = ...,
    out: torch.Tensor | None = ...,
    return_lse: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


def decode_attention(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    slot_bias: torch.Tensor | None = None,
    slot_valid: torch.Tensor | None = None,
    scaling: float | None = None,
    k_layout: Layout | None = None,
    v_layout: Layout | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of a few query tokens per sequence over the paged cache (split-K on CUDA).

    The torch path (CPU, no CuPy, or a shape the kernel does not take) is
    :func:`kvcore.attention.paged_attention`, the one reference of this kernel.

    The step's keys are already stored: token ``t`` of a chunk of ``q`` tokens sees stored
    tokens ``[0, len - q + t + 1)`` of its stream (``q = 1``: decode sees all of them)::

        stream b*H + h:  block_table[b*H + h, j // block_size] -> block; slot = block*bs + j%bs

    Args:
        query: ``(B, Hq, q, D)`` float16, bfloat16 or float32; ``Hq`` a multiple of ``H``.
        k_pool, v_pool: ``(num_blocks, block_size, D)`` of ``query``'s dtype, or
            ``(num_blocks, layout.nbytes)`` uint8 quantized pages (one block of
            ``layout.num_tokens = block_size`` tokens per page) with ``k_layout``/``v_layout``.
        block_table: ``(B * H, W)`` int64 block ids per stream (ragged: padded with block 0).
        lengths: ``(B * H,)`` int64 stored tokens per stream.
        slot_bias: optional ``(num_slots,)`` float32 logit bias (``log`` of a merged slot's count).
        slot_valid: optional ``(num_slots,)`` bool, False masks a slot.
        scaling: softmax scale, default ``D ** -0.5``.
        num_splits: key splits per stream (CUDA only); default from the longest stream.
        out: optional preallocated ``(B, q, Hq, D)`` result (CUDA path).
        return_lse: also return each row's log-sum-exp ``(B, q, Hq)`` float32 (``-inf``
            for a row with no visible key), to merge with attention over other keys.

    Returns:
        ``(B, q, Hq, D)`` in ``query``'s dtype; a row with no visible key is zeros. With
        ``return_lse``, the pair ``(out, lse)``.
    """
    b_sz, hq, q_len, d = query.shape
    n_streams, width = block_table.shape
    if n_streams % b_sz or hq % (n_streams // b_sz):
        raise ValueError(
            f"block_table rows ({n_streams}) and query heads ({hq}) do not match batch {b_sz}"
        )
    h = n_streams // b_sz
    group = hq // h
    kw: dict[str, Any] = dict(
        slot_bias=slot_bias,
        slot_valid=slot_valid,
        scaling=scaling,
        k_layout=k_layout,
        v_layout=v_layout,
        return_lse=return_lse,
    )
    rows = group * q_len
    if not _k.uses_kernel(query, k_pool, v_pool, block_table, lengths) or d % 32 or rows * d > 2048:
        # rows * d > 2048 would overflow the kernel's static shared memory: torch path
        ref: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = paged_attention(
            query, k_pool, v_pool, block_table, lengths, **kw
        )
        return ref
    dev = query.device
    for name, a in (("block_table", block_table), ("lengths", lengths)):
        if a.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {a.dtype}")
    valid_u8 = None if slot_valid is None else slot_valid.to(torch.uint8).contiguous()
    bias = None if slot_bias is None else slot_bias.to(torch.float32).contiguous()
    _check(dev, query=query, k_pool=k_pool, v_pool=v_pool, block_table=block_table, lengths=lengths)
    lay = k_layout or v_layout
    bs = lay.num_tokens if lay is not None else k_pool.shape[1]
    max_len = int(lengths.max()) if n_streams else 0
    if num_splits is None:
        # enough CTAs to fill the device: about 4 per SM, at least 256 tokens per split
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        num_splits = max(1, min(math.ceil(max_len / 256), math.ceil(4 * sms / max(n_streams, 1))))
    split_len = max(1, math.ceil(max_len / num_splits))
    for name, lay_ in (("k_layout", k_layout), ("v_layout", v_layout)):
        if lay_ is not None and (lay_.num_tokens, lay_.head_dim) != (bs, d):
            raise ValueError(
                f"{name} must cover one page of (block_size={bs}, head_dim={d}) tokens, got "
                f"({lay_.num_tokens}, {lay_.head_dim})"
            )
    if k_layout and v_layout and k_layout.meta_dtype != v_layout.meta_dtype:
        raise ValueError("k_layout and v_layout must share meta_dtype")
    defines = attention_defines(
        query.dtype, d, bs, group, q_len, k_layout, v_layout, bias is not None, valid_u8 is not None
    )
    ws_acc = torch.empty(n_streams, num_splits, rows, d, dtype=torch.float32, device=dev)
    ws_ml = torch.empty(n_streams, num_splits, rows, 2, dtype=torch.float32, device=dev)
    if out is None:
        out = torch.empty(b_sz, q_len, hq, d, dtype=query.dtype, device=dev)
    elif out.shape != (b_sz, q_len, hq, d) or out.dtype != query.dtype:
        raise ValueError(
            f"out must be {query.dtype} {(b_sz, q_len, hq, d)}, got {tuple(out.shape)}"
        )
    _check(dev, out=out)
    lse = torch.empty(b_sz, q_len, hq, dtype=torch.float32, device=dev) if return_lse else None
    scale = d**-0.5 if scaling is None else scaling
    _k._launch(
        dev,
        "decode_attention",
        defines,
        "kv_decode_partial",
        (num_splits, n_streams),
        (128,),
        (
            _ptr(query),
            _ptr(k_pool),
            _ptr(v_pool),
            _ptr(block_table),
            _ptr(lengths),
            _ptr(bias),
            _ptr(valid_u8),
            _ptr(ws_acc),
            _ptr(ws_ml),
            np.int64(width),
            np.int64(split_len),
            np.float32(scale),
        ),
    )
    _k._launch(
        dev,
        "decode_attention",
        defines,
        "kv_decode_reduce",
        (n_streams * rows,),
        (min(d, 256),),
        (_ptr(ws_acc), _ptr(ws_ml), _ptr(out), _ptr(lse), np.int32(num_splits), np.int64(h)),
    )
    if lse is not None:
        return out, lse
    return out


# Every public function checks its tensor arguments first (TypeError, not AttributeError).
_args.check_module(globals(), __name__)
