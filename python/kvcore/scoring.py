"""Which tokens stay: the torch side of the policies and a reference keep-set selection.

The cache asks a policy two questions per layer, on that layer's stored tokens
(:class:`ScoreInputs`, all tensors padded to the longest stream of the layer):

* :meth:`TorchPolicy.score` -> ``(B, H, T)`` float32, higher means keep;
* :meth:`TorchPolicy.force_keep` -> ``(B, H, T)`` bool, tokens kept whatever their score
  (attention sinks, the observation window, the recent window).

and :func:`select_keep` turns scores, forced tokens and per-(layer, head) budgets into a keep
mask. The heavy statistics (softmax of observation-window queries against the keys, key norms)
are computed here in torch, on the cache's device.

**Where the Rust selection plugs in.** :func:`select_keep` is the reference top-k (forced
tokens first, then highest score, ties broken by the lower position). :func:`select` is what
the cache calls: it uses the Rust ``kvcore._kvcore.select_topk`` (issue 3) when the extension
has it and falls back to :func:`select_keep` otherwise, so the merge needs no code change here.
Issue 3's
``kvcore.policies.get(name).select(scores, budget)`` takes ``(num_layers, num_heads, n)``
float32 numpy scores and returns a CSR ``Selection(indptr, positions, budgets)`` with rows
``layer * num_heads + head``. With ``num_layers = 1`` and one call per sequence it computes the
same thing as :func:`select_keep` for one layer; :meth:`kvcore.cache.KVCache._compress_layer`
is the single call site to switch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "H2OPolicy",
    "KNormPolicy",
    "ScoreInputs",
    "SnapKVPolicy",
    "StreamingPolicy",
    "TorchPolicy",
    "get",
    "names",
    "select",
    "select_keep",
    "window_attention",
]


@dataclass
class ScoreInputs:
    """One layer's stored tokens, padded to the longest stream.

    Attributes:
        layer_idx: the layer.
        keys: ``(B, H, T, D)`` stored (rotated) keys.
        valid: ``(B, H, T)`` bool, False past a stream's length and for padding tokens.
        positions: ``(B, H, T)`` int64 sequence index of each token (causality).
        accumulated: ``(B, H, T)`` float32 per-slot score state (H2O's accumulated attention).
        queries: ``(B, Hq, w, D)`` observed queries of the last step, or None.
        query_positions: ``(w,)`` int64 sequence index of each observed query.
        query_valid: ``(B, w)`` bool, False for padding queries.
        scaling: the attention softmax scale.
    """

    layer_idx: int
    keys: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    accumulated: torch.Tensor
    queries: torch.Tensor | None
    query_positions: torch.Tensor | None
    query_valid: torch.Tensor | None
    scaling: float


def window_attention(inp: ScoreInputs) -> torch.Tensor:
    """Attention probabilities of the observed queries, summed over queries and averaged over
    each GQA group.

    Returns:
        ``(B, H, T)`` float32; zeros where no observed query sees the key.
    """
    if inp.queries is None or inp.query_positions is None:
        raise ValueError("this policy needs observed queries: call cache.observe(...) first")
    q = inp.queries.float()
    b, hq, w, _ = q.shape
    h = inp.keys.shape[1]
    group = hq // h
    keys = inp.keys.float().repeat_interleave(group, dim=1)
    logits = torch.matmul(q, keys.transpose(2, 3)) * inp.scaling  # (B, Hq, w, T)
    visible = inp.valid[:, :, None, :] & (
        inp.positions[:, :, None, :] <= inp.query_positions[None, None, :, None]
    )
    if inp.query_valid is not None:
        visible = visible & inp.query_valid[:, None, :, None]
    visible = visible.repeat_interleave(group, dim=1)
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0).sum(dim=2)  # (B, Hq, T)
    return probs.reshape(b, h, group, -1).mean(dim=2)


def _newest(valid: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` newest valid tokens of each stream (tokens are stored in position order)."""
    rank_from_end = valid.flip(-1).long().cumsum(-1).flip(-1)  # 1 for the newest valid
    return valid & (rank_from_end <= n)


def _oldest(valid: torch.Tensor, n: int) -> torch.Tensor:
    return valid & (valid.long().cumsum(-1) <= n)


class TorchPolicy:
    """Base class: a budget per (layer, kv-head) and the two questions of the module doc.

    Args:
        budget: tokens kept per (layer, head) stream, or a ``(num_layers, num_kv_heads)``
            int tensor of ragged per-head budgets.
    """

    name = "base"
    needs_queries = False
    accumulates = False
    observe_window: int | None = None  # observed queries per step (None: all of the step)

    def __init__(self, budget: int | torch.Tensor) -> None:
        if isinstance(budget, torch.Tensor):
            if budget.ndim != 2 or budget.dtype.is_floating_point or (budget < 0).any():
                raise ValueError(
                    "budget must be an int >= 0 or a (num_layers, num_kv_heads) integer tensor "
                    f">= 0, got a tensor of shape {tuple(budget.shape)} and dtype {budget.dtype}"
                )
            self.budget: int | torch.Tensor = budget.to(torch.int64)
            low = int(budget.min())
        else:
            if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
                raise ValueError(f"budget must be an int >= 0, got {budget!r}")
            self.budget = budget
            low = budget
        if low < self.min_budget():
            raise ValueError(
                f"{self.name}: budget {low} is below what the policy needs "
                f"({self.min_budget()} forced tokens per head)"
            )

    def min_budget(self) -> int:
        """Tokens forced per stream; a smaller budget is an error."""
        return 0

    def max_budget(self) -> int:
        return int(self.budget.max()) if isinstance(self.budget, torch.Tensor) else self.budget

    def head_budgets(self, layer_idx: int, num_heads: int) -> torch.Tensor:
        """``(num_heads,)`` int64 budgets of one layer."""
        if isinstance(self.budget, torch.Tensor):
            if layer_idx >= self.budget.shape[0] or self.budget.shape[1] != num_heads:
                raise ValueError(
                    f"per-head budget has shape {tuple(self.budget.shape)}, "
                    f"expected (num_layers, {num_heads})"
                )
            return self.budget[layer_idx].cpu()
        return torch.full((num_heads,), self.budget, dtype=torch.int64)

    def score(self, inp: ScoreInputs) -> torch.Tensor:
        raise NotImplementedError

    def force_keep(self, inp: ScoreInputs) -> torch.Tensor:
        return torch.zeros_like(inp.valid)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget!r})"


class StreamingPolicy(TorchPolicy):
    """StreamingLLM (arXiv 2309.17453): the first ``sinks`` tokens and the newest ones."""

    name = "streaming"

    def __init__(self, budget: int | torch.Tensor, sinks: int = 4) -> None:
        self.sinks = sinks
        super().__init__(budget)

    def min_budget(self) -> int:
        return self.sinks

    def score(self, inp: ScoreInputs) -> torch.Tensor:
        return inp.positions.float()

    def force_keep(self, inp: ScoreInputs) -> torch.Tensor:
        return _oldest(inp.valid, self.sinks)


class SnapKVPolicy(TorchPolicy):
    """SnapKV (arXiv 2404.14469): the last ``window`` queries vote, votes are max-pooled
    over ``kernel`` neighbours, the window itself is kept."""

    name = "snapkv"
    needs_queries = True

    def __init__(
        self, budget: int | torch.Tensor, window: int = 32, kernel: int = 7, pooling: str = "max"
    ) -> None:
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"snapkv: kernel must be a positive odd int, got {kernel}")
        if pooling not in ("max", "avg"):
            raise ValueError(f"snapkv: pooling must be 'max' or 'avg', got {pooling!r}")
        self.window, self.kernel, self.pooling = window, kernel, pooling
        self.observe_window = window
        super().__init__(budget)

    def min_budget(self) -> int:
        return self.window

    def score(self, inp: ScoreInputs) -> torch.Tensor:
        s = window_attention(inp)
        b, h, t = s.shape
        flat = s.reshape(b * h, 1, t)
        pad = self.kernel // 2
        if self.pooling == "max":
            pooled = F.max_pool1d(flat, self.kernel, stride=1, padding=pad)
        else:
            pooled = F.avg_pool1d(flat, self.kernel, stride=1, padding=pad, count_include_pad=False)
        return pooled.reshape(b, h, t)

    def force_keep(self, inp: ScoreInputs) -> torch.Tensor:
        return _newest(inp.valid, self.window)


class H2OPolicy(TorchPolicy):
    """H2O (arXiv 2306.14048): attention accumulated over every step (per-slot score state,
    moved with the cache by compaction); the ``recent_ratio`` share of the budget goes to the
    newest tokens."""

    name = "h2o"
    needs_queries = True
    accumulates = True

    def __init__(self, budget: int | torch.Tensor, recent_ratio: float = 0.5) -> None:
        if not 0.0 <= recent_ratio <= 1.0:
            raise ValueError(f"h2o: recent_ratio must be in [0, 1], got {recent_ratio!r}")
        self.recent_ratio = recent_ratio
        super().__init__(budget)

    def score(self, inp: ScoreInputs) -> torch.Tensor:
        return inp.accumulated.float()

    def force_keep(self, inp: ScoreInputs) -> torch.Tensor:
        low = int(self.budget.min()) if isinstance(self.budget, torch.Tensor) else int(self.budget)
        return _newest(inp.valid, int(math.floor(self.recent_ratio * low)))


class KNormPolicy(TorchPolicy):
    """K-norm (arXiv 2406.11430): keep the keys with the lowest L2 norm."""

    name = "knorm"

    def score(self, inp: ScoreInputs) -> torch.Tensor:
        out: torch.Tensor = -inp.keys.float().norm(dim=-1)
        return out


_REGISTRY: dict[str, type[TorchPolicy]] = {
    p.name: p for p in (StreamingPolicy, SnapKVPolicy, H2OPolicy, KNormPolicy)
}


def names() -> list[str]:
    """The policy names :func:`get` accepts."""
    return sorted(_REGISTRY)


def get(name: str, budget: int | torch.Tensor, **params: object) -> TorchPolicy:
    """Build a torch policy by name, e.g. ``get("snapkv", budget=256, window=16)``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(names())}")
    try:
        return _REGISTRY[name](budget, **params)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None


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
    """:func:`select_keep` computed by the Rust core when it has ``select_topk`` (issue 3).

    Same arguments and result as :func:`select_keep`. The Rust call takes finite float32
    scores ``(rows, n)`` and per-row budgets and returns a CSR; invalid tokens get the lowest
    finite score and are excluded by capping each budget at the row's valid count, forced
    tokens get the highest.
    """
    from kvcore import _kvcore

    rust = getattr(_kvcore, "select_topk", None)
    if rust is None:
        return select_keep(scores, valid, force, budgets)
    import numpy as np

    b, h, n = scores.shape
    big = 3.0e38
    s = torch.nan_to_num(scores.float(), nan=-big, posinf=big / 2, neginf=-big / 2)
    s = s.clamp(-big / 2, big / 2)
    s = torch.where(valid, s, torch.full_like(s, -big))
    s = torch.where(force & valid, torch.full_like(s, big), s)
    cap = torch.minimum(budgets.to(valid.device), valid.sum(-1)).reshape(-1)
    rows = np.ascontiguousarray(s.reshape(b * h, n).cpu().numpy(), dtype=np.float32)
    indptr, positions = rust(rows, np.ascontiguousarray(cap.cpu().numpy(), dtype=np.int64))
    keep = torch.zeros(b * h, n, dtype=torch.bool)
    row_of = torch.repeat_interleave(torch.arange(b * h), torch.from_numpy(np.diff(indptr)))
    keep[row_of, torch.from_numpy(positions)] = True
    return keep.reshape(b, h, n).to(valid.device) & valid
