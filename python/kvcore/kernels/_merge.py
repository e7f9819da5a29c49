"""Merge plans: folding evicted tokens into kept ones (``merge.cu``).

Part of :mod:`kvcore.kernels`, which re-exports its public functions; the kernel path is
taken when ``kvcore.kernels.uses_kernel`` says so and launches through ``kvcore.kernels._launch``
(looked up at call time, so the CPU emulation can replace both).
"""

from __future__ import annotations

import numpy as np
import torch

from kvcore import _args
from kvcore import kernels as _k
from kvcore.kernels import _DT, _THREADS, _blocks, _check, _ptr


def _removed(
    num_rows: int, src: torch.Tensor, dst: torch.Tensor, evicted: torch.Tensor | None
) -> torch.Tensor:
    """Bool ``(num_rows,)``: sources that are no destination, and evicted slots."""
    is_dst = torch.zeros(num_rows, dtype=torch.bool, device=src.device)
    is_dst[dst] = True
    removed = torch.zeros(num_rows, dtype=torch.bool, device=src.device)
    removed[src] = True
    removed &= ~is_dst
    if evicted is not None:
        removed[evicted] = True
    return removed


def _mass_frac(
    num_rows: int, src: torch.Tensor, weight: torch.Tensor, removed: torch.Tensor
) -> torch.Tensor:
    """Per entry: the share ``w / (total weight leaving s)`` of a removed source's mass."""
    out_w = torch.zeros(num_rows, dtype=torch.float64, device=src.device)
    out_w.index_add_(0, src, weight.to(torch.float64))
    w = out_w[src]
    frac = torch.where(removed[src] & (w > 0), weight.to(torch.float64) / w.clamp_min(1e-300), 0.0)
    return frac.to(torch.float32)


def merge_reference(
    x: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    weight: torch.Tensor,
    counts: torch.Tensor | None = None,
    evicted: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Torch reference of :func:`apply_merge` (the rules of ``MergePlan.apply`` and
    ``MergeBook.apply``, before compaction)."""
    n = x.shape[0]
    out = x.to(torch.float32).clone()
    if len(src):
        out[torch.unique(dst)] = 0
        out.index_add_(0, dst, x[src].to(torch.float32) * weight.to(torch.float32).unsqueeze(1))
    if counts is None:
        return out.to(x.dtype), None
    removed = _removed(n, src, dst, evicted)
    frac = _mass_frac(n, src, weight, removed)
    c = counts.to(torch.float32).clone()
    c.index_add_(0, dst, frac * counts[src])
    c[removed] = 0
    return out.to(x.dtype), c


def apply_merge(
    x: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    weight: torch.Tensor,
    counts: torch.Tensor | None = None,
    evicted: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Applies a merge plan (docs/merging.md) to the rows of one stream.

    Args:
        x: ``(num_rows, dim)`` float32, float16 or bfloat16.
        src, dst: ``(num_entries,)`` int64, weight ``(num_entries,)`` float32: the plan's
            entries (``kvcore.MergePlan.src / dst / weight``).
        counts: optional ``(num_rows,)`` float32 mass per slot (1 for an unmerged token).
        evicted: optional ``(num_evicted,)`` int64, the plan's zero class.

    Returns:
        ``(rows, counts)``: ``rows[d] = sum w * x[s]`` over the entries of ``d`` (float32
        accumulation in plan order), other rows unchanged; ``counts`` as ``MergeBook.apply``
        before compaction (removed slots 0), or None without ``counts``.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (num_rows, dim), got {tuple(x.shape)}")
    if not _k.uses_kernel(x, src, dst, weight):
        return merge_reference(x, src, dst, weight, counts, evicted)
    dev = x.device
    n, dim = x.shape
    _check(dev, x=x, counts=counts)
    order = torch.sort(dst, stable=True).indices
    s_src, s_dst = src[order].contiguous(), dst[order]
    s_w = weight[order].to(torch.float32).contiguous()
    dst_rows, per = torch.unique_consecutive(s_dst, return_counts=True)
    indptr = torch.zeros(len(dst_rows) + 1, dtype=torch.int64, device=dev)
    indptr[1:] = per.cumsum(0)
    out = x.clone()
    frac = c_out = removed_idx = None
    num_removed = 0
    if counts is not None:
        removed = _removed(n, src, dst, evicted)
        frac = _mass_frac(n, src, weight, removed)[order].contiguous()
        removed_idx = removed.nonzero().flatten().contiguous()
        num_removed = len(removed_idx)
        counts = counts.to(torch.float32).contiguous()
        c_out = counts.clone()
    total = len(dst_rows) * dim + num_removed
    if total:
        _k._launch(
            dev,
            "merge",
            {"KV_DT": _DT[x.dtype]},
            "kv_merge",
            (_blocks(total),),
            (_THREADS,),
            (
                _ptr(x),
                _ptr(out),
                _ptr(dst_rows.contiguous()),
                _ptr(indptr),
                _ptr(s_src),
                _ptr(s_w),
                _ptr(frac),
                _ptr(counts),
                _ptr(c_out),
                _ptr(removed_idx),
                np.int64(len(dst_rows)),
                np.int64(dim),
                np.int64(num_removed),
            ),
        )
    return out, c_out


# Every public function checks its tensor arguments first (TypeError, not AttributeError).
_args.check_module(globals(), __name__)
