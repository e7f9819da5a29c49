"""Which tokens stay: the torch side of the policies and a reference keep-set selection.

The cache asks a policy two questions per layer, on that layer's stored tokens
(:class:`ScoreInputs`, all tensors padded to the longest stream of the layer):

* :meth:`TorchPolicy.score` -> ``(B, H, T)`` float32, higher means keep;
* :meth:`TorchPolicy.force_keep` -> ``(B, H, T)`` bool, tokens kept whatever their score
  (attention sinks, the observation window, the recent window).

and :func:`select_keep` turns scores, forced tokens and per-(layer, head) budgets into a keep
mask. The heavy statistics (softmax of observation-window queries against the keys, key norms)
are computed here in torch, on the cache's device.

**The registry drives the cache.** :func:`get` builds a :class:`RegistryPolicy` for every
name of issue 3's :mod:`kvcore.policies`: the registry validates the parameters and its Rust
selection decides what stays (:meth:`RegistryPolicy.keep`), from the statistics computed here.
:func:`select_keep` is the reference top-k (forced tokens first, then highest score, ties
broken by the lower position) of the torch reference policies (:class:`SnapKVPolicy`, ...,
kept as references); :func:`select` is the same computed by the Rust ``select_topk``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "H2OPolicy",
    "KNormPolicy",
    "RegistryPolicy",
    "ScoreInputs",
    "SnapKVPolicy",
    "StreamingPolicy",
    "TorchPolicy",
    "NO_HEAD_BUDGETS",
    "get",
    "names",
    "select",
    "select_keep",
    "window_attention",
    "window_probs",
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
    num_layers: int = 1


def window_attention(inp: ScoreInputs) -> torch.Tensor:
    """Attention probabilities of the observed queries, summed over queries and averaged over
    each GQA group.

    Returns:
        ``(B, H, T)`` float32; zeros where no observed query sees the key.
    """
    probs = window_probs(inp).sum(dim=2)  # (B, Hq, T)
    b, hq, _ = probs.shape
    h = inp.keys.shape[1]
    return probs.reshape(b, h, hq // h, -1).mean(dim=2)


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
    decay = 1.0  # per-step decay of the accumulated score
    compensation = "none"  # RazorAttention's compensation token ("none": dropped are gone)

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

    def check_shape(self, num_layers: int, num_heads: int) -> None:
        """Raise ValueError when the policy cannot serve a cache of this shape (called by
        :class:`kvcore.KVCache` at construction, so that a bad shape fails before any step)."""
        if isinstance(self.budget, torch.Tensor) and tuple(self.budget.shape) != (
            num_layers,
            num_heads,
        ):
            raise ValueError(
                f"per-head budget has shape {tuple(self.budget.shape)}, "
                f"expected ({num_layers}, {num_heads})"
            )

    def score(self, inp: ScoreInputs) -> torch.Tensor:
        raise NotImplementedError

    def force_keep(self, inp: ScoreInputs) -> torch.Tensor:
        return torch.zeros_like(inp.valid)

    def keep(
        self, inp: ScoreInputs, budgets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``(B, H, T)`` keep mask of one layer for ``(B, H)`` budgets, and the ``(B, H)``
        rows whose dropped tokens fold into a compensation slot (None: no such rows)."""
        return select(self.score(inp), inp.valid, self.force_keep(inp), budgets), None

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


# Registry policies whose rule sets each head's budget itself, so that a user-given
# (num_layers, num_kv_heads) budget tensor cannot be honoured (the reason is the message).
NO_HEAD_BUDGETS = {
    "pyramidkv": "its rule derives every layer's budget from one average budget (the "
    "pyramid); give an int budget, or use snapkv (pooling='avg', kernel=5) for explicit "
    "per-head budgets",
    "adakv": "its rule decides each head's budget itself (the layer's total split among the "
    "heads by one global top-k); give an int budget",
    "razor": "its head map decides each head's size (retrieval heads keep everything, the "
    "others sinks + local_capacity); set retrieval= and local_capacity= instead",
}


def names() -> list[str]:
    """The policy names :func:`get` accepts: issue 3's registry (``kvcore.policies``)."""
    from kvcore import policies as reg

    return reg.names()


def get(name: str, budget: int | torch.Tensor, **params: object) -> TorchPolicy:
    """Build a cache policy by name, e.g. ``get("snapkv", budget=256, window=16)``.

    Every name of :mod:`kvcore.policies` (issue 3's registry) gives a :class:`RegistryPolicy`:
    the registry checks the name and parameters (its ValueError / TypeError) and decides
    what stays. ``budget`` is an int (tokens per stream) or a ``(num_layers, num_kv_heads)``
    int tensor: each head keeps its own budget (every policy except those in
    :data:`NO_HEAD_BUDGETS`, which raise ValueError saying why).
    """
    return RegistryPolicy(name, budget, **params)  # type: ignore[arg-type]


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


# ---------------------------------------------------------------------- the registry policies

# Policies whose heads of a layer share one decision (a layer budget split among heads, one
# index set per layer, a novelty set shared by heads): their rows are selected together.
_COUPLED = frozenset({"adakv", "tova", "infinipot"})
_WINDOW_SCORED = frozenset({"snapkv", "pyramidkv", "adakv"})
# Tokens of ragged rows padded in front for a coupled selection: never chosen first.
_LOW = -3.0e38


def window_probs(inp: ScoreInputs) -> torch.Tensor:
    """Softmax probabilities of the observed queries over the stored keys.

    Returns:
        ``(B, Hq, w, T)`` float32; zero where a query does not see the key (causality,
        padding); rows with no visible key are all zero.
    """
    if inp.queries is None or inp.query_positions is None:
        raise ValueError("this policy needs observed queries: call cache.observe(...) first")
    q = inp.queries.float()
    h = inp.keys.shape[1]
    group = q.shape[1] // h
    keys = inp.keys.float().repeat_interleave(group, dim=1)
    logits = torch.matmul(q, keys.transpose(2, 3)) * inp.scaling  # (B, Hq, w, T)
    visible = inp.valid[:, :, None, :] & (
        inp.positions[:, :, None, :] <= inp.query_positions[None, None, :, None]
    )
    if inp.query_valid is not None:
        visible = visible & inp.query_valid[:, None, :, None]
    visible = visible.repeat_interleave(group, dim=1)
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def key_novelty(inp: ScoreInputs) -> torch.Tensor:
    """InfiniPot's novelty stand-in, one value per token shared by the heads: ``1 - cos``
    between a key and the mean valid key of its head, averaged over heads.

    Returns:
        ``(B, T)`` float32 (0 for invalid tokens).
    """
    k = inp.keys.float()
    m = inp.valid[..., None].float()
    mean = (k * m).sum(2, keepdim=True) / m.sum(2, keepdim=True).clamp(min=1.0)
    cos = F.cosine_similarity(k, mean.expand_as(k), dim=-1)
    nov = ((1.0 - cos) * inp.valid).sum(1) / inp.valid.sum(1).clamp(min=1)
    return nov.float()


class RegistryPolicy(TorchPolicy):
    """A policy of issue 3's registry (:mod:`kvcore.policies`) driven from the cache.

    The registry is the one source of truth for names, defaults and validation, and its
    Rust selection decides what stays (per-layer budgets of PyramidKV, Ada-KV's ragged head
    budgets, TOVA's shared index set, the static patterns). The torch side computes what each
    policy scores from:

    * ``snapkv``, ``pyramidkv``, ``adakv``: the observation window's softmax probabilities
      (:func:`window_probs`), reduced by the registry's ``score`` (window, GQA, pooling);
    * ``h2o``: attention accumulated in the cache's per-slot score (with ``decay``);
    * ``tova``: the last query's attention; ``knorm``: the registry's ``-||k||``;
    * ``infinipot``: the last ``window`` queries' attention as the catalyst scores and
      :func:`key_novelty` as the novelty (``nuc_fn`` replaces it);
    * ``locret``: ``score_fn(inp) -> (B, H, T)`` (the retaining heads' scores) when given,
      else the accumulated attention as a stand-in;
    * ``streaming``, ``longgen``, ``razor``: static patterns (positions only). Razor's
      retrieval heads come from ``retrieval`` ``(num_layers, num_kv_heads)`` bool (default:
      none); with ``compensation`` other than ``"none"`` the dropped tokens are folded into
      one compensation slot (count-weighted mean of K and V, ``log(count)`` logit bias for
      ``"mean_logcount"``).

    Per-head budgets: with a ``(num_layers, num_kv_heads)`` int tensor as ``budget``, each
    head keeps its own number of tokens: the registry selects head by head with that head's
    budget (TOVA and InfiniPot, whose heads share a ranking, select once per distinct budget
    of a layer, so a head keeps the top of the shared ranking and the sets are nested).
    Entries of layers whose rule ignores the budget (K-norm's ``skip_layers``, LongGen's
    full and block-sparse layers) are not read, as an int budget is not. PyramidKV, Ada-KV
    and RazorAttention set head budgets themselves and raise ValueError
    (:data:`NO_HEAD_BUDGETS`).

    Args:
        name: a registry name (``kvcore.policies.names()``).
        budget: tokens per (layer, kv-head) stream (the registry's average budget), or a
            ``(num_layers, num_kv_heads)`` int tensor of per-head budgets.
        retrieval, score_fn, nuc_fn, window: the cache-side inputs above.
        **params: the registry policy's parameters.
    """

    def __init__(
        self,
        name: str,
        budget: int | torch.Tensor,
        *,
        retrieval: object = None,
        score_fn: object = None,
        nuc_fn: object = None,
        window: int | None = None,
        **params: object,
    ) -> None:
        from kvcore import policies as reg

        per_head = isinstance(budget, torch.Tensor)
        if not per_head and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
            raise ValueError(f"budget must be an int >= 0, got {budget!r}")
        extras = {"retrieval": retrieval, "score_fn": score_fn, "nuc_fn": nuc_fn}
        allowed = {"razor": {"retrieval"}, "locret": {"score_fn"}, "infinipot": {"nuc_fn"}}
        for key, val in extras.items():
            if val is not None and key not in allowed.get(name, set()):
                raise TypeError(f"{name}: {key}= is not an input of this policy")
        if window is not None:
            params["window"] = window
        self.reg = reg.get(name, budget=None if per_head else budget, **params)
        self.name = name
        if per_head:
            if name in NO_HEAD_BUDGETS:
                raise ValueError(
                    f"{name}: a per-head budget tensor cannot be honoured: {NO_HEAD_BUDGETS[name]}"
                )
            TorchPolicy.__init__(self, budget)  # the tensor's shape, dtype and sign
            assert isinstance(self.budget, torch.Tensor)
            for v in torch.unique(self.budget).tolist():
                self.reg.check_budget(int(v))  # e.g. a window larger than a head's budget
        self.retrieval = None
        if retrieval is not None:
            r = torch.as_tensor(retrieval)
            if r.dtype != torch.bool or r.ndim != 2:
                raise ValueError(
                    "razor: retrieval must be a (num_layers, num_kv_heads) bool tensor"
                )
            self.retrieval = r.cpu()
        for key, fn in (("score_fn", score_fn), ("nuc_fn", nuc_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}: {key} must be callable, got {type(fn).__name__}")
        self.score_fn = score_fn
        self.nuc_fn = nuc_fn
        self.decay = float(self.reg.config.get("decay", 1.0))
        self.needs_queries = name in _WINDOW_SCORED | {"h2o", "tova", "infinipot"} or (
            name == "locret" and score_fn is None
        )
        self.accumulates = name == "h2o" or (name == "locret" and score_fn is None)
        if name in _WINDOW_SCORED:
            self.observe_window = int(self.reg.config["window"])
        elif name == "tova":
            self.observe_window = 1
        elif name == "infinipot":
            self.observe_window = 32
        comp = self.reg.config.get("compensation", "none") if name == "razor" else "none"
        self.compensation = str(comp)
        super().__init__(budget)

    def __repr__(self) -> str:
        return f"RegistryPolicy({self.reg!r})"

    def check_shape(self, num_layers: int, num_heads: int) -> None:
        super().check_shape(num_layers, num_heads)
        if self.retrieval is not None and tuple(self.retrieval.shape) != (num_layers, num_heads):
            raise ValueError(
                f"razor: retrieval has shape {tuple(self.retrieval.shape)}, "
                f"expected {(num_layers, num_heads)}"
            )
        if self.name == "longgen":
            self.reg.kinds(num_layers)  # raises ValueError on a layer map of another length

    def max_budget(self) -> int:
        b = int(self.budget.max()) if isinstance(self.budget, torch.Tensor) else int(self.budget)
        if self.name == "razor":
            return max(b, int(self.reg.config["local_capacity"]))
        return b

    def _scores(self, inp: ScoreInputs) -> torch.Tensor:
        """``(B, H, T)`` float32 scores on the stored-token grid."""
        b, h, t = inp.valid.shape
        name = self.name
        if name in _WINDOW_SCORED:
            probs = window_probs(inp).cpu().numpy()
            out = [self.reg.score(probs[i : i + 1], h)[0] for i in range(b)]
            return torch.from_numpy(np.stack(out)) if out else torch.zeros(b, h, t)
        if name == "knorm":
            keys = inp.keys.float().cpu().numpy()
            return torch.from_numpy(
                np.stack([self.reg.score(keys[i : i + 1])[0] for i in range(b)])
            )
        if name == "h2o":
            return inp.accumulated.float().cpu()
        if name == "locret":
            if self.score_fn is not None:
                s = torch.as_tensor(self.score_fn(inp))  # type: ignore[operator]
                if s.shape != (b, h, t):
                    raise ValueError(
                        f"locret: score_fn returned {tuple(s.shape)}, expected {(b, h, t)}"
                    )
                return s.float().cpu()
            return inp.accumulated.float().cpu()
        if name in ("tova", "infinipot"):
            return window_probs(inp).sum(2).reshape(b, h, -1, t).mean(2).cpu()
        return torch.zeros(b, h, t)

    def keep(
        self, inp: ScoreInputs, budgets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The keep mask ``(B, H, T)`` of the layer from the registry's selection, and for
        Razor the ``(B, H)`` rows whose dropped tokens fold into a compensation slot."""
        layer, L = inp.layer_idx, inp.num_layers
        valid = inp.valid.cpu()
        b, h, t = valid.shape
        scores = torch.nan_to_num(self._scores(inp), nan=0.0, posinf=3e38, neginf=-3e38)
        nuc = None
        if self.name == "infinipot":
            nuc = (
                torch.as_tensor(self.nuc_fn(inp)).float().cpu()  # type: ignore[operator]
                if self.nuc_fn is not None
                else key_novelty(inp).cpu()
            )
            if nuc.shape != (b, t):
                raise ValueError(
                    f"infinipot: novelty has shape {tuple(nuc.shape)}, expected {(b, t)}"
                )
        retrieval = None
        if self.name == "razor":
            retrieval = (
                self.retrieval
                if self.retrieval is not None
                else torch.zeros(L, h, dtype=torch.bool)
            )
            if tuple(retrieval.shape) != (L, h):
                raise ValueError(
                    f"razor: retrieval has shape {tuple(retrieval.shape)}, expected {(L, h)}"
                )
        keep = torch.zeros(b, h, t, dtype=torch.bool)
        comp = torch.zeros(b, h, dtype=torch.bool) if self.compensation != "none" else None
        per_head = isinstance(self.budget, torch.Tensor)
        for i in range(b):
            idx = [torch.nonzero(valid[i, j], as_tuple=True)[0] for j in range(h)]
            counts = [len(x) for x in idx]
            groups: list[list[int]]
            # InfiniPot's novelty is one value per token position shared by the heads; heads of
            # different lengths (per-head budgets) hold different tokens at a position, so
            # each selects alone with its own tokens' novelty.
            alone = per_head and self.name == "infinipot" and len(set(counts)) > 1
            if (self.name in _COUPLED and not alone) or (len(set(counts)) == 1 and not per_head):
                groups = [list(range(h))]
            else:
                groups = [[j] for j in range(h)]
            for g in groups:
                n = max(counts[j] for j in g)
                rows = np.zeros((L, len(g), n), np.float32)
                lead = []
                for r, j in enumerate(g):
                    pad = n - counts[j]
                    lead.append(pad)
                    rows[layer, r, :pad] = _LOW
                    rows[layer, r, pad:] = scores[i, j, idx[j]].numpy()
                inputs: dict[str, Any] = {}
                if nuc is not None and alone:
                    (j,) = g
                    if self.nuc_fn is None:  # the head's own keys against their mean
                        k = inp.keys[i, j, idx[j].to(inp.keys.device)].float()
                        cos = F.cosine_similarity(k, k.mean(0, keepdim=True).expand_as(k), dim=-1)
                        own = (1.0 - cos).cpu()
                    else:
                        own = nuc[i, idx[j]]
                    inputs["nuc"] = np.ascontiguousarray(own.numpy(), np.float32)
                elif nuc is not None:
                    # one novelty vector per token of the group (their valid tokens agree
                    # unless the group is ragged; padded places get the lowest novelty)
                    j0 = max(g, key=lambda j: counts[j])
                    inputs["nuc"] = np.ascontiguousarray(nuc[i, idx[j0]].numpy(), np.float32)
                if retrieval is not None:
                    inputs["retrieval"] = retrieval[:, g].reshape(-1).numpy()
                # per-head budgets: one selection per distinct budget of the group, each head
                # reads its own row of the selection made with its budget
                calls: list[tuple[int | None, list[int]]] = (
                    [
                        (bud, [r for r, j in enumerate(g) if int(budgets[i, j]) == bud])
                        for bud in sorted({int(budgets[i, j]) for j in g})
                    ]
                    if per_head
                    else [(None, list(range(len(g))))]
                )
                for bud, members in calls:
                    sel = self.reg.select(rows, budget=bud, **inputs)
                    for r in members:
                        j = g[r]
                        row = layer * len(g) + r
                        pos = sel.positions[sel.indptr[row] : sel.indptr[row + 1]] - lead[r]
                        pos = pos[pos >= 0]
                        keep[i, j, idx[j][torch.from_numpy(pos)]] = True
                        if comp is not None and sel.num_dropped is not None:
                            comp[i, j] = bool(sel.num_dropped[row] > 0)
        return keep.to(inp.valid.device), comp
