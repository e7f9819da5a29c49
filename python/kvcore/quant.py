"""Torch reference of the quantized block format (docs/layouts.md), bit-identical to Rust.

This is the CPU path and the test oracle for the CUDA kernels. It follows the arithmetic of
docs/layouts.md section 4 op for op in float32 (``torch.round`` rounds half to even; products
and sums are separate ops, never fused), so its bytes equal those of :func:`kvcore.quantize`.
The metadata is written in the host byte order, which the reference requires to be
little-endian (checked on import of this module).

torch is an optional dependency of kvcore: ``import kvcore`` never imports it; this module does.
"""

from __future__ import annotations

import sys

import torch

from kvcore import _args
from kvcore._kvcore import QuantLayout

__all__ = ["dequantize", "quantize"]

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
    raise ImportError("kvcore.quant writes little-endian metadata and needs a little-endian host")

_META = {"float16": torch.float16, "float32": torch.float32}


def _groups(x: torch.Tensor, layout: QuantLayout) -> torch.Tensor:
    """``(B, T, D)`` float32 -> ``(B, num_groups, G)`` in group order (docs/layouts.md §2)."""
    b, t, d, g = x.shape[0], layout.num_tokens, layout.head_dim, layout.group_size
    if layout.axis == "channel":
        return x.reshape(b, t * d // g, g)
    # group m * D + c holds x[m*G + j, c]
    return x.reshape(b, t // g, g, d).permute(0, 1, 3, 2).reshape(b, (t // g) * d, g)


def _ungroup(q: torch.Tensor, layout: QuantLayout) -> torch.Tensor:
    """Inverse of :func:`_groups`."""
    b, t, d, g = q.shape[0], layout.num_tokens, layout.head_dim, layout.group_size
    if layout.axis == "channel":
        return q.reshape(b, t, d)
    return q.reshape(b, t // g, d, g).permute(0, 1, 3, 2).reshape(b, t, d)


def _meta_round(v: torch.Tensor, meta: str) -> torch.Tensor:
    return v.to(_META[meta]).to(torch.float32) if meta == "float16" else v


def quantize(x: torch.Tensor, layout: QuantLayout) -> torch.Tensor:
    """Quantizes blocks exactly like :func:`kvcore.quantize`.

    Args:
        x: ``(..., num_tokens, head_dim)`` float32, float16 or bfloat16 (CPU or CUDA).

    Returns:
        ``(..., layout.nbytes)`` uint8 on the device of ``x``.

    Raises:
        ValueError: a NaN or infinite value, metadata that does not fit the metadata dtype,
            or a shape that does not end in ``(num_tokens, head_dim)``.
        TypeError: an unsupported dtype.
    """
    t, d = layout.num_tokens, layout.head_dim
    if x.dim() < 2 or tuple(x.shape[-2:]) != (t, d):
        raise ValueError(
            f"x must have shape (..., num_tokens={t}, head_dim={d}), got {tuple(x.shape)}"
        )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    lead = tuple(x.shape[:-2])
    xf = x.to(torch.float32).reshape(-1, t, d)
    grp = _groups(xf, layout)
    if not bool(torch.isfinite(grp).all()):
        raise ValueError("input contains a non-finite value (NaN or inf)")
    qmax = float(2**layout.bits - 1)
    meta = layout.meta_dtype
    lo = grp.amin(dim=-1)
    hi = grp.amax(dim=-1)
    # + 0.0 maps -0.0 to +0.0 (amin/amax may return either zero; the bytes must not differ)
    zero = _meta_round(lo, meta) + 0.0
    if not bool(torch.isfinite(zero).all()):
        raise ValueError(f"a group minimum does not fit the {meta} metadata")
    rng = hi - zero
    if not bool(torch.isfinite(rng).all()):
        raise ValueError("a group range overflows float32")
    scale = _meta_round(rng.clamp(min=0.0) / qmax, meta) + 0.0
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"a group range gives a scale that does not fit the {meta} metadata")
    z = zero.unsqueeze(-1)
    s = scale.unsqueeze(-1)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round(((grp - z) / safe).clamp(0.0, qmax))
    q = torch.where(s == 0, torch.zeros_like(q), q).to(torch.uint8)
    nb = q.shape[0]
    per = 8 // layout.bits
    q = q.reshape(nb, -1, per)
    codes = q[..., 0].clone()
    for k in range(1, per):
        codes |= q[..., k] << (k * layout.bits)
    mdt = _META[meta]
    pad = layout.scales_offset - layout.codes_bytes
    parts = [
        codes,
        torch.zeros(nb, pad, dtype=torch.uint8, device=x.device),
        scale.to(mdt).contiguous().view(torch.uint8),
        zero.to(mdt).contiguous().view(torch.uint8),
    ]
    return torch.cat(parts, dim=-1).reshape(*lead, layout.nbytes)


def dequantize(blocks: torch.Tensor, layout: QuantLayout) -> torch.Tensor:
    """Dequantizes blocks exactly like :func:`kvcore.dequantize` (``code * scale + zero``).

    Args:
        blocks: ``(..., layout.nbytes)`` uint8.

    Returns:
        ``(..., num_tokens, head_dim)`` float32.
    """
    if blocks.dtype != torch.uint8 or blocks.dim() < 1 or blocks.shape[-1] != layout.nbytes:
        raise ValueError(
            f"blocks must be uint8 with shape (..., nbytes={layout.nbytes}), got "
            f"{blocks.dtype} {tuple(blocks.shape)}"
        )
    lead = tuple(blocks.shape[:-1])
    flat = blocks.reshape(-1, layout.nbytes)
    nb = flat.shape[0]
    ng, g = layout.num_groups, layout.group_size
    bits = layout.bits
    mdt = _META[layout.meta_dtype]
    m = torch.finfo(mdt).bits // 8
    so, zo = layout.scales_offset, layout.zeros_offset
    scale = flat[:, so : so + ng * m].contiguous().view(mdt).to(torch.float32)
    zero = flat[:, zo : zo + ng * m].contiguous().view(mdt).to(torch.float32)
    codes = flat[:, : layout.codes_bytes]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=blocks.device)
    q = (codes.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    q = q.reshape(nb, ng, g).to(torch.float32)
    y = q * scale.unsqueeze(-1)
    y = y + zero.unsqueeze(-1)
    return _ungroup(y, layout).reshape(*lead, layout.num_tokens, layout.head_dim)


# Every public function checks its tensor arguments first (TypeError, not AttributeError).
_args.check_module(globals(), __name__)
