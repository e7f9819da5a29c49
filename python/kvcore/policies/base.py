"""The policy protocol: what a policy declares, and the select contract every policy keeps.

A policy is one class (one file per policy in this package) that declares

* its parameters (``params``: a default with its source and a check),
* the statistics it scores from (``needs``, a frozenset of :class:`Need`), which the cache
  computes from its stored state (:mod:`kvcore.statistics`, a map from need to function),
* whether the heads of a layer share one decision (``couples_heads``) and whether it accepts
  a per-head budget tensor (``accepts_head_budgets``),

and implements two steps: :meth:`Policy.scores_from` turns the statistics into
``(B, H, T)`` scores, :meth:`Policy._select` calls the Rust selection. The numpy API
(:meth:`Policy.select` on ``(num_layers, num_heads, n)`` scores) works without torch; the
cache calls :meth:`Policy.keep`, which runs the shared torch loop of
:mod:`kvcore.policies.keep`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from kvcore import _kvcore as _k
from kvcore.policies.params import F32, Param, is_tensor, nonneg_int, rows, scores3

if TYPE_CHECKING:
    import torch

    from kvcore.statistics import Provider, ScoreInputs, Statistics


class Need(enum.Enum):
    """A statistic a policy scores from. Shapes are per layer, padded to its longest stream:
    ``B`` sequences, ``H`` kv heads, ``Hq`` query heads, ``T`` stored tokens, ``w`` observed
    queries, ``D`` head size."""

    #: ``(B, Hq, w, T)`` float32 softmax probabilities of the observed queries (the window).
    WINDOW_PROBS = "window_probs"
    #: ``(B, H, T)`` float32 attention of the observed queries, summed over them and averaged
    #: over each GQA group (one observed query: the last query's attention).
    QUERY_ATTENTION = "query_attention"
    #: ``(B, H, T)`` float32 attention accumulated over every step in the cache's per-slot
    #: score (the cache then accumulates each step's attention).
    ACCUMULATED = "accumulated"
    #: ``(B, H, T, D)`` stored (rotated) keys.
    KEYS = "keys"
    #: ``(B, H, T, D)`` stored values.
    VALUES = "values"
    #: ``(B, Hq, w, D)`` the observed (rotated) queries themselves, at the positions
    #: ``inputs.query_positions``.
    QUERIES = "queries"
    #: ``(B, T)`` float32 novelty of each token, shared by the heads (``1 - cos`` with the
    #: mean key, averaged over heads).
    NOVELTY = "novelty"
    #: ``(B, H, T)`` scores from outside the cache (a trained scorer); the cache has no
    #: provider, so the policy must bring one (:meth:`Policy.providers`).
    EXTERNAL_SCORES = "external_scores"


# Needs that read the observed queries of a step (the HF hooks then compute them).
_QUERY_NEEDS = frozenset({Need.WINDOW_PROBS, Need.QUERY_ATTENTION, Need.ACCUMULATED, Need.QUERIES})


@dataclass(frozen=True)
class Selection:
    """A keep plan: CSR over ``(layer, head)`` rows plus what each row was promised.

    Attributes:
        indptr: ``(num_rows + 1,)`` int64.
        positions: ascending kept positions per row, int64.
        budgets: ``(num_rows,)`` int64, the number of tokens each row keeps.
        num_dropped: RazorAttention only: ``(num_rows,)`` int64 tokens folded into each row's
            compensation token (0: none); ``None`` for every other policy.
    """

    indptr: NDArray[np.int64]
    positions: NDArray[np.int64]
    budgets: NDArray[np.int64]
    num_dropped: NDArray[np.int64] | None = None


@dataclass(frozen=True)
class HeadGroup:
    """Heads of one sequence whose rows are selected together (:meth:`Policy.select_inputs`).

    Attributes:
        batch: the sequence.
        heads: the kv heads, in row order.
        tokens: each head's valid token indices ``(n_j,)`` int64 into the layer's stored grid.
        alone: a head of a coupled layer selecting by itself (:meth:`Policy.selects_alone`).
    """

    batch: int
    heads: list[int]
    tokens: list[torch.Tensor]
    alone: bool


def counts(indptr: NDArray[np.int64]) -> NDArray[np.int64]:
    return np.diff(indptr).astype(np.int64)


def select_topk(scores: F32, budgets: Any, **force: Any) -> Selection:
    """Each ``(layer, head)`` row keeps its top ``budgets`` tokens (Rust ``select_topk``:
    higher score first, ties to the lower position; ``sinks=``, ``window=`` force-keep).

    Args:
        scores: ``(num_layers, num_heads, n)`` float32.
        budgets: an int, or ``(num_layers * num_heads,)`` int64 per row.
    """
    indptr, pos = _k.select_topk(rows(scores3(scores)), budgets, **force)
    return Selection(indptr, pos, counts(indptr))


class Policy:
    """Base class: parameters with defaults and sources, declared needs, validation, the
    select contract and the cache's side of the protocol.

    Subclasses set ``name``, ``paper``, ``phase``, ``granularity``, ``params`` and ``needs``,
    and implement :meth:`scores_from` and :meth:`_select`. ``budget`` is a parameter of every
    policy: ``None`` (given at select time), an int, or a ``(num_layers, num_kv_heads)`` int
    tensor of per-head budgets for the cache.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    phase: ClassVar[tuple[str, ...]]
    granularity: ClassVar[str]
    params: ClassVar[dict[str, Param]]
    #: The extra keyword inputs ``select`` takes (anything else is a TypeError).
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    #: The statistics :meth:`scores_from` reads (an instance may narrow it in ``_validate``).
    needs: frozenset[Need] = frozenset()
    #: The heads of a layer share one decision: their rows are selected together.
    couples_heads: ClassVar[bool] = False
    #: Whether a per-head budget tensor can be honoured; if not, ``head_budget_refusal``
    #: says why (the ValueError's message).
    accepts_head_budgets: ClassVar[bool] = True
    head_budget_refusal: ClassVar[str] = ""
    #: Whether scoring needs the layers' RoPE frequencies (``ScoreInputs.rope``): a cache
    #: built without ``rope=`` refuses the policy.
    needs_rope: ClassVar[bool] = False
    #: The heads of a layer split the layer's total budget among themselves by score
    #: (Ada-KV): one head may keep more than its share, the layer's total stays.
    splits_layer_budget: ClassVar[bool] = False

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(self.params))
        if unknown:
            raise TypeError(
                f"{self.name}: unknown parameter(s) {', '.join(unknown)}; "
                f"valid parameters: {', '.join(sorted(self.params))}"
            )
        values = {k: p.default for k, p in self.params.items()}
        values.update(kwargs)
        for k, v in values.items():
            p = self.params[k]
            if not p.check(v):
                raise ValueError(f"{self.name}: {k} must be {p.expected}, got {v!r}")
        self.config: dict[str, Any] = values
        self._validate()
        budget = values.get("budget")
        if is_tensor(budget):
            values["budget"] = self._head_budgets(budget)
        elif budget is not None:
            self._check_budget(budget)

    def __getattr__(self, key: str) -> Any:
        config = self.__dict__.get("config")
        if config is not None and key in config:
            return config[key]
        raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"kvcore.policies.get({self.name!r}, {args})"

    # ------------------------------------------------------------------ checks

    def _validate(self) -> None:
        """Cross-parameter checks (window larger than the budget, ...)."""

    def _check_budget(self, budget: int) -> None:
        """Budget-dependent checks; raise ValueError."""

    def _head_budgets(self, budget: Any) -> Any:
        """Checks a per-head budget tensor; returns it as int64."""
        if not self.accepts_head_budgets:
            raise ValueError(
                f"{self.name}: a per-head budget tensor cannot be honoured: "
                f"{self.head_budget_refusal}"
            )
        if budget.ndim != 2 or budget.dtype.is_floating_point or bool((budget < 0).any()):
            raise ValueError(
                "budget must be an int >= 0 or a (num_layers, num_kv_heads) integer tensor "
                f">= 0, got a tensor of shape {tuple(budget.shape)} and dtype {budget.dtype}"
            )
        for v in sorted({int(x) for x in budget.flatten().tolist()}):
            self._check_budget(v)  # e.g. a window larger than one head's budget
        return budget.long().cpu()

    def _budget(self, budget: int | None) -> int:
        b = self.config.get("budget") if budget is None else budget
        if b is None:
            raise ValueError(f"{self.name}: a budget is needed (pass budget=... to select or get)")
        if is_tensor(b):
            raise ValueError(
                f"{self.name}: the budget is a per-head tensor; pass an int budget= to select"
            )
        if not nonneg_int(b):
            raise ValueError(f"{self.name}: budget must be an int >= 0, got {b!r}")
        self._check_budget(int(b))
        return int(b)

    def check_budget(self, budget: int) -> None:
        """Raise ValueError when ``select`` would refuse ``budget`` (a negative value, one
        below the policy's forced tokens such as a window or stabilizers)."""
        self._budget(budget)

    # ------------------------------------------------------------------ numpy selection

    def select(self, scores: F32, budget: int | None = None, **inputs: Any) -> Selection:
        """Which tokens stay.

        Args:
            scores: ``(num_layers, num_heads, n)`` float32, higher means keep (static
                patterns only read the shape).
            budget: per-(layer, head) average number of kept tokens; defaults to the
                policy's ``budget`` parameter.
            **inputs: policy-specific extra inputs (documented per policy).

        Returns:
            A :class:`Selection` whose CSR feeds ``BlockAllocator.compact_batch``.
        """
        self._check_inputs(inputs)
        s = scores3(scores)
        return self._select(s, self._budget(budget), **inputs)

    def _check_inputs(self, inputs: dict[str, Any]) -> None:
        """TypeError naming the valid inputs when ``select`` got a keyword it does not take."""
        unknown = sorted(set(inputs) - set(self.extra_inputs))
        if unknown:
            valid = ", ".join(("scores", "budget", *self.extra_inputs))
            raise TypeError(
                f"{self.name}.select: unknown input(s) {', '.join(unknown)}; valid: {valid}"
            )

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        raise NotImplementedError(f"{type(self).__name__} does not implement _select")

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """Name, phase, granularity, needs and defaults (with their sources), for the docs."""
        return {
            "name": cls.name,
            "class": cls.__name__,
            "phase": cls.phase,
            "granularity": cls.granularity,
            "needs": tuple(n.value for n in Need if n in cls.needs),
            "defaults": {k: p.default for k, p in cls.params.items() if k != "budget"},
        }

    # ------------------------------------------------------------------ the cache's side

    @property
    def needs_queries(self) -> bool:
        """Whether the cache must observe the queries of a step (``cache.observe``)."""
        return bool(self.needs & _QUERY_NEEDS)

    @property
    def accumulates(self) -> bool:
        """Whether the cache accumulates each step's attention into its per-slot score."""
        return Need.ACCUMULATED in self.needs

    @property
    def observe_window(self) -> int | None:
        """Queries observed per step (None: every query of the step)."""
        return None

    @property
    def folds_dropped(self) -> bool:
        """Whether a row's dropped tokens fold into one compensation slot (``num_dropped``)."""
        return False

    @property
    def has_head_budgets(self) -> bool:
        return is_tensor(self.config.get("budget"))

    def providers(self) -> dict[Need, Provider]:
        """Statistics this policy computes itself (e.g. Locret's ``score_fn``); they replace
        the cache's providers of the same need."""
        return {}

    def scores_from(self, stats: Statistics) -> F32:
        """``(B, H, T)`` float32 scores (higher means keep) from the declared statistics.

        Static patterns return zeros on purpose: their ``_select`` reads only the shape.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not say how its statistics become scores "
            "(implement scores_from)"
        )

    def select_inputs(self, stats: Statistics, group: HeadGroup) -> dict[str, Any]:
        """Extra ``select`` inputs for the rows of ``group``, e.g. InfiniPot's novelty or
        Razor's head map."""
        return {}

    def selects_alone(self, counts: list[int]) -> bool:
        """Whether the heads of a coupled layer with these stored lengths must select one by
        one (a per-token input shared by heads cannot be shared by ragged heads)."""
        return False

    def max_budget(self) -> int:
        """The most tokens a stream keeps after a compression."""
        b = self.config.get("budget")
        return int(b.max()) if is_tensor(b) else self._budget(None)

    def head_budgets(self, layer_idx: int, num_heads: int) -> torch.Tensor:
        """``(num_heads,)`` int64 budgets of one layer."""
        import torch

        b = self.config.get("budget")
        if is_tensor(b):
            if layer_idx >= b.shape[0] or b.shape[1] != num_heads:
                raise ValueError(
                    f"per-head budget has shape {tuple(b.shape)}, "
                    f"expected (num_layers, {num_heads})"
                )
            out: torch.Tensor = b[layer_idx].cpu()
            return out
        return torch.full((num_heads,), self._budget(None), dtype=torch.int64)

    def kept_tokens(
        self, layer_idx: int, num_layers: int, num_heads: int, n: int
    ) -> NDArray[np.int64]:
        """``(num_heads,)`` int64: the most tokens each head of a layer keeps when a
        compression sees ``n`` stored tokens in every head (``splits_layer_budget``: each
        head's share, the layer keeping at most their sum).

        The cache sizes its pools for a compressed prefill by it (:mod:`kvcore.cache.pools`),
        so that layer ``l + 1`` stores its prompt in the blocks layer ``l``'s compression
        freed. The default is each head's budget (plus its compensation slot), at most
        ``n``; a rule that keeps more in some layers or heads overrides it. An underestimate
        only costs memory (the pools then grow by a copy), never a wrong result.
        """
        b = self.head_budgets(layer_idx, num_heads).numpy().astype(np.int64)
        return np.minimum(b + int(self.folds_dropped), n)

    def check_shape(self, num_layers: int, num_heads: int) -> None:
        """Raise ValueError (or TypeError) when the policy cannot serve a cache of this shape
        or the cache cannot compute one of its needs (called by :class:`kvcore.KVCache` at
        construction, so that it fails before any step)."""
        from kvcore import statistics

        b = self.config.get("budget")
        if is_tensor(b) and tuple(b.shape) != (num_layers, num_heads):
            raise ValueError(
                f"per-head budget has shape {tuple(b.shape)}, expected ({num_layers}, {num_heads})"
            )
        self.max_budget()  # a budget is needed
        statistics.check_needs(self)

    def keep(
        self, inp: ScoreInputs, budgets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``(B, H, T)`` keep mask of one layer for ``(B, H)`` budgets, and the ``(B, H)``
        rows whose dropped tokens fold into a compensation slot (None: no such rows).

        The cache's one call: the declared statistics (:func:`kvcore.statistics.compute`),
        :meth:`scores_from`, then :meth:`select` per group of heads."""
        from kvcore.policies.keep import keep_mask

        return keep_mask(self, inp, budgets)
