"""Quantization and dequantization of pages (``quant.cu``).

Part of :mod:`kvcore.kernels`, which re-exports its public functions; the kernel path is
taken when ``kvcore.kernels.uses_kernel`` says so and launches through ``kvcore.kernels._launch``
(looked up at call time, so the CPU emulation can replace both).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kvcore import _args
from kvcore import kernels as _k
from kvcore.kernels import _DT, _THREADS, Layout, _blocks, _check, _ptr


def quant_defines(layout: Layout, in_dtype: torch.dtype, out_dtype: torch.dtype) -> dict[str, int]:
    """The preamble of ``quant.cu`` for one layout."""
    return {
        "KV_BITS": layout.bits,
        "KV_G": layout.group_size,
        "KV_T": layout.num_tokens,
        "KV_D": layout.head_dim,
        "KV_AXIS_TOKEN": int(layout.axis == "token"),
        "KV_META_F16": int(layout.meta_dtype == "float16"),
        "KV_IN_DT": _DT[in_dtype],
        "KV_OUT_DT": _DT[out_dtype],
    }


_QUANT_ERRORS = (
    (1, "input contains a non-finite value (NaN or inf)"),
    (2, "a group minimum does not fit the {meta} metadata"),
    (4, "a group range overflows float32"),
    (8, "a group range gives a scale that does not fit the {meta} metadata"),
)


def quantize(x: torch.Tensor, layout: Layout, out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantizes blocks, bit-identical to :func:`kvcore.quant.quantize` (docs/layouts.md).

    Args:
        x: ``(..., num_tokens, head_dim)`` float32, float16 or bfloat16.
        layout: a :class:`kvcore.QuantLayout`.
        out: optional preallocated ``(..., layout.nbytes)`` uint8 result (CUDA path).

    Returns:
        ``(..., layout.nbytes)`` uint8 on ``x``'s device.

    Raises:
        ValueError: a non-finite value or metadata overflow (same messages as the reference).
    """
    if not _k.uses_kernel(x):
        from kvcore import quant

        return quant.quantize(x, layout)  # type: ignore[arg-type]
    t, d = layout.num_tokens, layout.head_dim
    if x.dim() < 2 or tuple(x.shape[-2:]) != (t, d):
        raise ValueError(
            f"x must have shape (..., num_tokens={t}, head_dim={d}), got {tuple(x.shape)}"
        )
    if x.dtype not in _DT:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    _check(x.device, x=x)
    lead = tuple(x.shape[:-2])
    nb = math.prod(lead)
    if out is None:
        out = torch.empty(*lead, layout.nbytes, dtype=torch.uint8, device=x.device)
    elif out.shape != (*lead, layout.nbytes) or out.dtype != torch.uint8:
        raise ValueError(
            f"out must be uint8 {(*lead, layout.nbytes)}, got {out.dtype} {tuple(out.shape)}"
        )
    _check(x.device, out=out)
    err = torch.zeros(1, dtype=torch.int32, device=x.device)
    ng = nb * t * d // layout.group_size
    _k._launch(
        x.device,
        "quant",
        quant_defines(layout, x.dtype, torch.float32),
        "kv_quantize",
        (_blocks(ng),),
        (_THREADS,),
        (_ptr(x), _ptr(out), _ptr(err), np.int64(nb)),
    )
    code = int(err.item())
    for bit, msg in _QUANT_ERRORS:
        if code & bit:
            raise ValueError(msg.format(meta=layout.meta_dtype))
    return out


def dequantize(
    blocks: torch.Tensor,
    layout: Layout,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``code * scale + zero``, bit-identical to :func:`kvcore.quant.dequantize` in float32.

    Args:
        blocks: ``(..., layout.nbytes)`` uint8.
        dtype: of the result; float32 is exact, float16/bfloat16 round the float32 values.
        out: optional preallocated result (CUDA path).

    Returns:
        ``(..., num_tokens, head_dim)`` of ``dtype``.
    """
    if not _k.uses_kernel(blocks):
        from kvcore import quant

        return quant.dequantize(blocks, layout).to(dtype)  # type: ignore[arg-type]
    if blocks.dtype != torch.uint8 or blocks.dim() < 1 or blocks.shape[-1] != layout.nbytes:
        raise ValueError(
            f"blocks must be uint8 with shape (..., nbytes={layout.nbytes}), got "
            f"{blocks.dtype} {tuple(blocks.shape)}"
        )
    _check(blocks.device, blocks=blocks)
    lead = tuple(blocks.shape[:-1])
    nb = math.prod(lead)
    shape = (*lead, layout.num_tokens, layout.head_dim)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=blocks.device)
    elif out.shape != shape or out.dtype != dtype:
        raise ValueError(f"out must be {dtype} {shape}, got {out.dtype} {tuple(out.shape)}")
    _check(blocks.device, out=out)
    ng = nb * layout.num_tokens * layout.head_dim // layout.group_size
    _k._launch(
        blocks.device,
        "quant",
        quant_defines(layout, torch.float32, dtype),
        "kv_dequantize",
        (_blocks(ng),),
        (_THREADS,),
        (_ptr(blocks), _ptr(out), np.int64(nb)),
    )
    return out


# Every public function checks its tensor arguments first (TypeError, not AttributeError).
_args.check_module(globals(), __name__)
