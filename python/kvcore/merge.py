"""Torch references of the merge bookkeeping (the CPU path and the oracle for GPU kernels).

* :func:`apply_plan` applies a :class:`kvcore.MergePlan` to rows on any device
  (``index_add``, float32), matching :meth:`kvcore.MergePlan.apply` up to summation order.
* :func:`minicache_merge` / :func:`minicache_restore` implement MiniCache's SLERP pair store
  with the rules of :func:`kvcore.minicache_merge` (float64 math, float32 results).

torch is optional for ``import kvcore``; this module imports it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kvcore import _args
from kvcore._kvcore import MergePlan

__all__ = [
    "MiniCacheTorchPair",
    "apply_plan",
    "attention_with_bias",
    "minicache_merge",
    "minicache_restore",
]


def apply_plan(plan: MergePlan, x: torch.Tensor) -> torch.Tensor:
    """``x'[d] = sum(w * x[s])`` over the plan's entries; other rows unchanged.

    Args:
        plan: the plan, over ``x.shape[0]`` slots.
        x: ``(num_slots, dim)`` float tensor.

    Returns:
        ``(num_slots, dim)`` tensor of ``x``'s dtype (compact it with
        ``x'[plan.kept_positions()]``).
    """
    if x.dim() != 2 or x.shape[0] != plan.num_slots:
        raise ValueError(
            f"x must have shape (num_slots={plan.num_slots}, dim), got {tuple(x.shape)}"
        )
    src = torch.from_numpy(plan.src).to(x.device)
    dst = torch.from_numpy(plan.dst).to(x.device)
    w = torch.from_numpy(plan.weight).to(x.device, torch.float32)
    out = x.to(torch.float32).clone()
    if len(src):
        out[torch.unique(dst)] = 0
        out.index_add_(0, dst, x[src].to(torch.float32) * w.unsqueeze(1))
    return out.to(x.dtype)


def attention_with_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_count_bias: torch.Tensor | None
) -> torch.Tensor:
    """Reference attention over a merged cache: ``softmax(q k^T / sqrt(d) + bias) v``.

    With ``bias = MergeBook.log_count_bias()``, a slot that stands for ``m`` tokens gets
    ``m`` times the weight of one token, exactly as ``m`` copies of it would.

    Args:
        q: ``(num_queries, d)``; k, v: ``(num_slots, d)``; log_count_bias: ``(num_slots,)``.

    Returns:
        ``(num_queries, d)`` float32.
    """
    logits = (q.float() @ k.float().T) / math.sqrt(q.shape[-1])
    if log_count_bias is not None:
        logits = logits + log_count_bias.float().unsqueeze(0)
    return torch.softmax(logits, dim=-1) @ v.float()


class MiniCacheTorchPair(NamedTuple):
    """The stored state of one merged layer pair (see :func:`kvcore.minicache_merge`)."""

    direction: torch.Tensor  # (n, d) float32 unit rows
    mag_a: torch.Tensor  # (n,) float32
    mag_b: torch.Tensor  # (n,) float32
    angle: torch.Tensor  # (n,) float32 radians
    retained: torch.Tensor  # (r,) int64, increasing
    retained_a: torch.Tensor  # (r, d)
    retained_b: torch.Tensor  # (r, d)


def minicache_merge(
    a: torch.Tensor, b: torch.Tensor, t: float = 0.6, retention_ratio: float = 0.05
) -> MiniCacheTorchPair:
    """SLERP of the directions of layers ``a`` (l-1) and ``b`` (l), ``(n, d)`` each."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must have the same (n, d) shape, got {a.shape} and {b.shape}")
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    ma = a64.norm(dim=1, keepdim=True)
    mb = b64.norm(dim=1, keepdim=True)
    u = torch.where(ma > 0, a64 / ma.clamp_min(1e-300), torch.zeros_like(a64))
    v = torch.where(mb > 0, b64 / mb.clamp_min(1e-300), torch.zeros_like(b64))
    w = torch.arccos((u * v).sum(1).clamp(-1 + 1e-7, 1 - 1e-7)).unsqueeze(1)
    s = torch.sin(w)
    small = s < 1e-6
    safe = torch.where(small, torch.ones_like(s), s)
    ca = torch.where(small, torch.full_like(s, 1 - t), torch.sin((1 - t) * w) / safe)
    cb = torch.where(small, torch.full_like(s, t), torch.sin(t * w) / safe)
    e = ca * u + cb * v
    en = e.norm(dim=1, keepdim=True)
    e = torch.where(en > 0, e / en.clamp_min(1e-300), torch.zeros_like(e))
    n = a.shape[0]
    r = min(math.ceil(retention_ratio * n), n)
    angle = w.squeeze(1).to(torch.float32)
    # largest angle first, lowest index on ties (stable sort of the negated angle)
    order = torch.sort(-angle, stable=True).indices[:r]
    retained = torch.sort(order).values
    return MiniCacheTorchPair(
        e.to(torch.float32),
        ma.squeeze(1).to(torch.float32),
        mb.squeeze(1).to(torch.float32),
        angle,
        retained,
        a[retained].clone(),
        b[retained].clone(),
    )


def minicache_restore(pair: MiniCacheTorchPair, which: int) -> torch.Tensor:
    """Layer a (``which=0``) or b (``1``): ``direction * magnitude``, retained rows verbatim."""
    if which not in (0, 1):
        raise ValueError(f"which must be 0 (layer a) or 1 (layer b), got {which}")
    mag, kept = (pair.mag_a, pair.retained_a) if which == 0 else (pair.mag_b, pair.retained_b)
    out = pair.direction * mag.unsqueeze(1)
    out[pair.retained] = kept.to(out.dtype)
    return out


# Every public function checks its tensor arguments first (TypeError, not AttributeError).
_args.check_module(globals(), __name__)
