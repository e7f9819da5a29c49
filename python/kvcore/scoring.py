"""The torch side of the policies, kept for compatibility, and a reference keep-set selection.

The policies are one hierarchy, :mod:`kvcore.policies` (one file per policy); the statistics
they declare are computed by :mod:`kvcore.statistics`. This module keeps the names that
scripts import:

* :func:`get` ``(name, budget, **params)``: a registry policy with its budget (an int, or a
  ``(num_layers, num_kv_heads)`` int tensor of per-head budgets);
* :func:`select_keep`, the reference top-k (forced tokens first, then highest score, ties
  broken by the lower position), and :func:`select`, the same computed by the Rust
  ``select_topk``;
* the torch reference policies :class:`StreamingPolicy`, :class:`SnapKVPolicy`,
  :class:`H2OPolicy` and :class:`KNormPolicy`: the registry policies of the same name whose
  scores are recomputed in torch and selected by :func:`select` on whole rows with a force
  mask; tests compare them with the registry's selection;
* ``TorchPolicy`` and ``RegistryPolicy``, now :class:`kvcore.policies.Policy`, and
  ``ScoreInputs``, ``window_probs``, ``window_attention``, ``key_novelty`` from
  :mod:`kvcore.statistics`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kvcore import policies as reg
from kvcore.policies import Policy
from kvcore.statistics import ScoreInputs, key_novelty, window_attention, window_probs

__all__ = [
    "H2OPolicy",
    "KNormPolicy",
    "NO_HEAD_BUDGETS",
    "RegistryPolicy",
    "ScoreInputs",
    "SnapKVPolicy",
    "StreamingPolicy",
    "TorchPolicy",
    "get",
    "key_novelty",
    "names",
    "select",
    "select_keep",
    "window_attention",
    "window_probs",
]

TorchPolicy = Policy
RegistryPolicy = Policy


def _no_head_budgets() -> dict[str, str]:
    return {
        name: cls.head_budget_refusal
        for name, cls in reg.REGISTRY.items()
        if not cls.accepts_head_budgets
    }


# Registry policies whose rule sets each head's budget itself, so that a user-given
# (num_layers, num_kv_heads) budget tensor cannot be honoured (the reason is the message).
NO_HEAD_BUDGETS = _no_head_budgets()

# Cache inputs of some policies; another policy refuses them with this message.
_CACHE_INPUTS = ("retrieval", "score_fn", "nuc_fn")


def names() -> list[str]:
    """The policy names :func:`get` accepts: the registry's (``kvcore.policies``)."""
    return reg.names()


def get(name: str, budget: int | torch.Tensor, **params: Any) -> Policy:
    """Build a cache policy by name, e.g. ``get("snapkv", budget=256, window=16)``.

    The registry checks the name and parameters (its ValueError / TypeError) and decides
    what stays. ``budget`` is an int (tokens per stream) or a ``(num_layers, num_kv_heads)``
    int tensor: each head keeps its own budget (every policy except those in
    :data:`NO_HEAD_BUDGETS`, which raise ValueError saying why).
    """
    if not isinstance(budget, torch.Tensor) and (
        not isinstance(budget, int) or isinstance(budget, bool) or budget < 0
    ):
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")
    cls = reg.REGISTRY.get(name) if isinstance(name, str) else None
    for key in _CACHE_INPUTS:
        if cls is not None and params.get(key) is not None and key not in cls.params:
            raise TypeError(f"{name}: {key}= is not an input of this policy")
    return reg.get(name, budget=budget, **params)


def select_keep(
    scores: torch.Tensor, valid: torch.Tensor, force: torch.Tensor, budgets: torch.Tensor
) -> torch.Tensor:
    """Reference keep-set selection per stream.

    Args:
        scores: ``(B, H, T)`` float, higher means keep.
        valid: ``(B, H, T)`` bool; invalid tokens are never kept.
        force: ``(B, H, T)`` bool; forced valid tokens are kept first.
        budgets: ``(B, H)`` int64 tokens kept per stream (fewer if fewer are valid).

    Returns:
        ``(B, H, T)`` bool keep mask. Order: forced, then higher score, then lower position
        (tokens are stored in position order, so a stable sort gives the tie-break).
    """
    s = torch.nan_to_num(scores.float(), nan=float("-inf"))
    s = torch.where(force & valid, torch.full_like(s, float("inf")), s)
    # Finite keys for valid tokens so that an invalid token (key +inf) never sorts before one.
    key = torch.nan_to_num(-s, posinf=3.0e38, neginf=-3.0e38)
    key = torch.where(valid, key, torch.full_like(s, float("inf")))
    order = torch.sort(key, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    return valid & (rank < budgets.to(s.device)[..., None])


def select(
    scores: torch.Tensor, valid: torch.Tensor, force: torch.Tensor, budgets: torch.Tensor
) -> torch.Tensor:
    """:func:`select_keep` computed by the Rust core's ``select_topk``.

    Same arguments and result as :func:`select_keep`. The Rust call takes finite float32
    scores ``(rows, n)`` and per-row budgets and returns a CSR; invalid tokens get the lowest
    finite score and are excluded by capping each budget at the row's valid count, forced
    tokens get the highest.
    """
    from kvcore import _kvcore

    b, h, n = scores.shape
    big = 3.0e38
    s = torch.nan_to_num(scores.float(), nan=-big, posinf=big / 2, neginf=-big / 2)
    s = s.clamp(-big / 2, big / 2)
    s = torch.where(valid, s, torch.full_like(s, -big))
    s = torch.where(force & valid, torch.full_like(s, big), s)
    cap = torch.minimum(budgets.to(valid.device), valid.sum(-1)).reshape(-1)
    rows = np.ascontiguousarray(s.reshape(b * h, n).cpu().numpy(), dtype=np.float32)
    indptr, positions = _kvcore.select_topk(
        rows, np.ascontiguousarray(cap.cpu().numpy(), dtype=np.int64)
    )
    keep = torch.zeros(b * h, n, dtype=torch.bool)
    row_of = torch.repeat_interleave(torch.arange(b * h), torch.from_numpy(np.diff(indptr)))
    keep[row_of, torch.from_numpy(positions)] = True
    return keep.reshape(b, h, n).to(valid.device) & valid


# ------------------------------------------------------------------ torch reference policies


def _newest(valid: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` newest valid tokens of each stream (tokens are stored in position order)."""
    rank_from_end = valid.flip(-1).long().cumsum(-1).flip(-1)  # 1 for the newest valid
    return valid & (rank_from_end <= n)


def _oldest(valid: torch.Tensor, n: int) -> torch.Tensor:
    return valid & (valid.long().cumsum(-1) <= n)


def _low(policy: Policy) -> int:
    b = policy.budget
    return int(b.min()) if isinstance(b, torch.Tensor) else int(b)


class StreamingPolicy(reg.StreamingPolicy):
    """Torch reference of StreamingLLM: the first ``sinks`` tokens and the newest ones."""

    def __init__(self, budget: int | torch.Tensor, sinks: int = 4) -> None:
        super().__init__(sinks=sinks, budget=budget)
        if _low(self) < sinks:
            raise ValueError(
                f"streaming: budget {_low(self)} is below what the policy needs "
                f"({sinks} forced tokens per head)"
            )

    def keep(
        self, inp: ScoreInputs, budgets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        force = _oldest(inp.valid, self.sinks)
        return select(inp.positions.float(), inp.valid, force, budgets), None


class SnapKVPolicy(reg.SnapKVPolicy):
    """Torch reference of SnapKV: window votes max- (or avg-) pooled over ``kernel``
    neighbours in torch, the window kept."""

    def __init__(
        self, budget: int | torch.Tensor, window: int = 32, kernel: int = 7, pooling: str = "max"
    ) -> None:
        super().__init__(window=window, kernel=kernel, pooling=pooling, budget=budget)

    def keep(
        self, inp: ScoreInputs, budgets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = window_attention(inp)
        b, h, t = s.shape
        flat = s.reshape(b * h, 1, t)
        pad = self.kernel // 2
        if self.pooling == "max":
            pooled = F.max_pool1d(flat, self.kernel, stride=1, padding=pad)
        else:
            pooled = F.avg_pool1d(flat, self.kernel, stride=1, padding=pad, count_include_pad=False)
        force = _newest(inp.valid, self.window)
        return select(pooled.reshape(b, h, t), inp.valid, force, budgets), None


class H2OPolicy(reg.H2OPolicy):
    """Torch reference of H2O: the accumulated attention, the ``recent_ratio`` share of the
    smallest budget kept as the newest tokens."""

    def __init__(self, budget: int | torch.Tensor, recent_ratio: float = 0.5) -> None:
        super().__init__(recent_ratio=recent_ratio, budget=budget)

    def keep(
        self, inp: ScoreInputs, budgets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        force = _newest(inp.valid, int(math.floor(self.recent_ratio * _low(self))))
        return select(inp.accumulated.float(), inp.valid, force, budgets), None


class KNormPolicy(reg.KNormPolicy):
    """Torch reference of K-norm: the keys with the lowest L2 norm, every layer."""

    def __init__(self, budget: int | torch.Tensor) -> None:
        super().__init__(skip_layers=(), budget=budget)

    def keep(
        self, inp: ScoreInputs, budgets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        norms: torch.Tensor = -inp.keys.float().norm(dim=-1)
        return select(norms, inp.valid, torch.zeros_like(inp.valid), budgets), None
