"""Registry of training-free KV-cache policies: which tokens stay.

Build a policy with :func:`get`::

    policy = kvcore.policies.get("snapkv", window=32, kernel=7)
    scores = policy.score(window_probs, num_kv_heads=8)   # (layers, kv_heads, n) float32
    sel = policy.select(scores, budget=512)               # CSR ready for compact_batch
    allocator.compact_batch(tables, sel.indptr, sel.positions)

Every policy works on numpy arrays; the torch layer computes the heavy statistics (softmax of
a few query rows against the keys) and hands them over as float32 arrays. Scores are laid out
``(num_layers, num_heads, n)``; rows of the returned CSR are ``row = layer * num_heads + head``.

Each parameter has a default and the source it was read from
(``shared/research/seed_algorithms.md``); defaults marked *unverified* were recalled from a
paper body and not checked against it, so they are parameters with the recommended value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from kvcore import _args
from kvcore import _kvcore as _k

__all__ = [
    "Param",
    "Policy",
    "Selection",
    "get",
    "names",
    "REGISTRY",
]

F32 = NDArray[np.float32]


@dataclass(frozen=True)
class Param:
    """One policy parameter: its default, where the default comes from, and a check."""

    default: Any
    source: str
    check: Callable[[Any], bool]
    expected: str
    unverified: bool = False


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


def _nonneg_int(x: Any) -> bool:
    return bool(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0)


def _pos_int(x: Any) -> bool:
    return _nonneg_int(x) and x > 0


def _odd_int(x: Any) -> bool:
    return bool(_pos_int(x) and x % 2 == 1)


def _unit(x: Any) -> bool:
    return bool(
        isinstance(x, (int, float, np.floating)) and not isinstance(x, bool) and 0.0 <= x <= 1.0
    )


def _one_of(*opts: str) -> Callable[[Any], bool]:
    return lambda x: x in opts


def _int_tuple(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and all(_nonneg_int(v) for v in x)


def _opt_budget(x: Any) -> bool:
    return x is None or _nonneg_int(x)


_BUDGET = Param(None, "given at select time when None", _opt_budget, "None or an int >= 0")


def _scores3(scores: Any) -> F32:
    if not isinstance(scores, np.ndarray):
        raise TypeError(
            "scores must be a numpy float32 array of shape (num_layers, num_heads, n), "
            f"got {type(scores).__name__}"
        )
    if scores.dtype != np.float32:
        raise TypeError(
            "scores must be a numpy float32 array of shape (num_layers, num_heads, n), "
            f"got dtype {scores.dtype}"
        )
    if isinstance(scores, np.ma.MaskedArray):
        raise TypeError("scores must be a numpy float32 array, got a masked array")
    if scores.ndim != 3:
        raise ValueError(
            f"scores must have shape (num_layers, num_heads, n), got shape {scores.shape}"
        )
    _args.size(scores.size, "scores", scores.itemsize)  # a broadcast view is copied below
    return scores


def _check_nd(a: Any, name: str, dims: str) -> None:
    """TypeError unless a float32 numpy array, ValueError unless it has ``dims``."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        got = f"dtype {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"{name} must be a numpy float32 array of shape ({dims}), got {got}")
    if a.ndim != len(dims.split(",")):
        raise ValueError(f"{name} must have shape ({dims}), got shape {a.shape}")


def _rows(scores: F32) -> F32:
    L, H, n = scores.shape
    return np.ascontiguousarray(scores.reshape(L * H, n))


def _counts(indptr: NDArray[np.int64]) -> NDArray[np.int64]:
    return np.diff(indptr).astype(np.int64)


class Policy:
    """Base class: parameters with defaults and sources, validation, and the select contract.

    Subclasses set ``name``, ``paper``, ``phase``, ``granularity`` and ``params``, and
    implement :meth:`_select`.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    phase: ClassVar[tuple[str, ...]]
    granularity: ClassVar[str]
    params: ClassVar[dict[str, Param]]
    #: The extra keyword inputs ``select`` takes (anything else is a TypeError).
    inputs: ClassVar[tuple[str, ...]] = ()

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
        if values.get("budget") is not None:
            self._check_budget(values["budget"])

    def __getattr__(self, key: str) -> Any:
        config = self.__dict__.get("config")
        if config is not None and key in config:
            return config[key]
        raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"kvcore.policies.get({self.name!r}, {args})"

    def _validate(self) -> None:
        """Cross-parameter checks (window larger than the budget, ...)."""

    def _check_budget(self, budget: int) -> None:
        """Budget-dependent checks; raise ValueError."""

    def _budget(self, budget: int | None) -> int:
        b = self.config.get("budget") if budget is None else budget
        if b is None:
            raise ValueError(f"{self.name}: a budget is needed (pass budget=... to select or get)")
        if not _nonneg_int(b):
            raise ValueError(f"{self.name}: budget must be an int >= 0, got {b!r}")
        self._check_budget(int(b))
        return int(b)

    def check_budget(self, budget: int) -> None:
        """Raise ValueError when ``select`` would refuse ``budget`` (a negative value, one
        below the policy's forced tokens such as a window or stabilizers)."""
        self._budget(budget)

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
        s = _scores3(scores)
        return self._select(s, self._budget(budget), **inputs)

    def _check_inputs(self, inputs: dict[str, Any]) -> None:
        unknown = sorted(set(inputs) - set(self.inputs))
        if unknown:
            valid = ", ".join(("scores", "budget", *self.inputs))
            raise TypeError(
                f"{self.name}.select: unknown input(s) {', '.join(unknown)}; valid: {valid}"
            )

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        raise NotImplementedError

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """Name, phase, granularity and defaults (with their sources), for the docs."""
        return {
            "name": cls.name,
            "class": cls.__name__,
            "phase": cls.phase,
            "granularity": cls.granularity,
            "defaults": {k: p.default for k, p in cls.params.items() if k != "budget"},
        }


def _topk(scores: F32, budgets: Any, **force: Any) -> Selection:
    indptr, pos = _k.select_topk(_rows(scores), budgets, **force)
    return Selection(indptr, pos, _counts(indptr))


class StreamingPolicy(Policy):
    """StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
    ICLR 2024, arXiv 2309.17453): keep the first ``sinks`` tokens (attention sinks) and the
    newest ``budget - sinks`` tokens; scores are ignored. A static pattern, the same for every
    layer and head. If ``budget < sinks`` only the first ``budget`` tokens are kept."""

    name = "streaming"
    paper = "arXiv 2309.17453"
    phase = ("prefill", "decode", "chunked_prefill")
    granularity = "static (all layers and heads)"
    params = {
        "sinks": Param(4, "streaming_llm/kv_cache.py start_size=4", _nonneg_int, "an int >= 0"),
        "budget": _BUDGET,
    }

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        L, H, n = scores.shape
        s = min(self.sinks, budget)
        indptr, pos = _k.plan_streaming(L * H, n, s, budget - s)
        return Selection(indptr, pos, _counts(indptr))


class H2OPolicy(Policy):
    """H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
    Large Language Models", NeurIPS 2023, arXiv 2306.14048): accumulated attention per
    (layer, head) and token, kept in a :class:`kvcore.ScoreState` (:meth:`new_state`,
    ``state.accumulate(attn, decay)``) and compacted with the cache. Each head keeps its
    ``recent`` newest tokens and its top heavy hitters. ``recent_ratio`` is the share of the
    budget given to the recent window (0.5: the official runs use heavy = recent = 10%)."""

    name = "h2o"
    paper = "arXiv 2306.14048"
    phase = ("prefill", "decode")
    granularity = "per head"
    params = {
        "recent_ratio": Param(
            0.5, "h2o_hf lm-eval scripts: heavy_ratio = recent_ratio = 0.1", _unit, "in [0, 1]"
        ),
        "decay": Param(1.0, "plain H2O accumulates without decay", _unit, "in [0, 1]"),
        "budget": _BUDGET,
    }

    def new_state(self, num_rows: int) -> _k.ScoreState:
        """An empty accumulator with one row per (layer, head)."""
        return _k.ScoreState(num_rows)

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        recent = int(math.floor(self.recent_ratio * budget))
        return _topk(scores, budget, window=recent)


class _WindowScored(Policy):
    """Shared SnapKV-family scoring (P-1 of the research notes)."""

    window_agg: ClassVar[str] = "sum"

    def score(self, window_probs: F32, num_kv_heads: int) -> F32:
        """Scores from observation-window attention.

        Args:
            window_probs: ``(num_layers, num_q_heads, w, n)`` float32 softmax probabilities of
                the last ``w`` queries (the window's own columns included, causally masked).
            num_kv_heads: KV heads; query heads are reduced per GQA group by ``gqa_reduce``.

        Returns:
            ``(num_layers, num_kv_heads, n)`` float32: window reduction, GQA reduction, then
            pooling with ``kernel``.
        """
        _check_nd(window_probs, "window_probs", "num_layers, num_q_heads, w, n")
        L, Hq, w, n = window_probs.shape
        red = _k.window_reduce(window_probs.reshape(L * Hq, w, n), self.window_agg)
        out = np.empty((L, num_kv_heads, n), dtype=np.float32)
        for layer in range(L):
            g = _k.group_reduce(red[layer * Hq : (layer + 1) * Hq], num_kv_heads, self.gqa_reduce)
            out[layer] = _k.pool1d(g, self.kernel, self.pooling)
        return out

    def _validate(self) -> None:
        pass

    def _check_budget(self, budget: int) -> None:
        if self.window > budget:
            raise ValueError(
                f"{self.name}: window ({self.window}) is larger than the budget ({budget})"
            )


_GQA = Param(
    "mean",
    "AdaKV pred.py gqa_func=mean; kvpress mean per group",
    _one_of("mean", "max"),
    "'mean' or 'max'",
)


class SnapKVPolicy(_WindowScored):
    """SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
    NeurIPS 2024, arXiv 2404.14469): the last ``window`` queries vote (sum of softmax
    probabilities), votes are pooled with ``kernel``, each KV head keeps its top tokens plus
    the window. Applied once at the end of prefill; the defaults are the paper's LongBench
    configuration."""

    name = "snapkv"
    paper = "arXiv 2404.14469"
    phase = ("prefill",)
    granularity = "per head"
    params = {
        "window": Param(
            32, "SnapKV LongBench config ablation_c4096_w32_k7_maxpool", _pos_int, "an int > 0"
        ),
        "kernel": Param(7, "SnapKV LongBench config (k7)", _odd_int, "a positive odd int"),
        "pooling": Param(
            "max", "SnapKV LongBench config (maxpool)", _one_of("avg", "max"), "'avg' or 'max'"
        ),
        "gqa_reduce": _GQA,
        "budget": _BUDGET,
    }

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        return _topk(scores, budget, window=self.window)


class PyramidKVPolicy(_WindowScored):
    """PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
    Information Funneling", arXiv 2406.02069): SnapKV scores, with linearly decreasing
    per-layer budgets (``beta`` = 20) that sum exactly to ``num_layers * budget``; short
    prompts (``n < budget``: keep all; ``n < 2 (budget - window)``: uniform) follow the
    reference code."""

    name = "pyramidkv"
    paper = "arXiv 2406.02069"
    phase = ("prefill",)
    granularity = "per layer budget, per head selection"
    params = {
        "window": Param(32, "init_pyramidkv window_size=32", _pos_int, "an int > 0"),
        "kernel": Param(5, "init_pyramidkv kernel_size=5", _odd_int, "a positive odd int"),
        "pooling": Param(
            "avg", "init_pyramidkv pooling=avgpool", _one_of("avg", "max"), "'avg' or 'max'"
        ),
        "beta": Param(20, "PyramidKVCluster(beta=20)", _pos_int, "an int > 0"),
        "gqa_reduce": _GQA,
        "budget": _BUDGET,
    }

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        L, H, n = scores.shape
        per_layer = _k.budget_pyramid(L, n, budget, self.window, self.beta)
        return _topk(scores, np.repeat(per_layer, H), window=self.window)


class AdaKVPolicy(_WindowScored):
    """Ada-KV (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
    Allocation", arXiv 2407.11550): SnapKV-style scores (mean over window queries), then the
    layer's budget is shared among its heads by a global top-k, each head guaranteed
    ``floor(alpha * (budget - window))`` of its own best tokens."""

    name = "adakv"
    paper = "arXiv 2407.11550"
    phase = ("prefill",)
    granularity = "per head, adaptive within a layer"
    window_agg = "mean"
    params = {
        "window": Param(32, "AdaKV configs c*_w32_k7_maxpool", _pos_int, "an int > 0"),
        "kernel": Param(7, "AdaKV configs c*_w32_k7_maxpool", _odd_int, "a positive odd int"),
        "pooling": Param(
            "max", "AdaKV configs c*_w32_k7_maxpool", _one_of("avg", "max"), "'avg' or 'max'"
        ),
        "alpha": Param(0.2, "AdaKV pred.py --floor_alpha 0.2", _unit, "in [0, 1]"),
        "gqa_reduce": _GQA,
        "budget": _BUDGET,
    }

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        indptr, pos = _k.select_adakv(scores, budget, self.alpha, window=self.window)
        return Selection(indptr, pos, _counts(indptr))


class TOVAPolicy(Policy):
    """TOVA (Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024,
    arXiv 2401.06104): the last query's attention averaged over heads; one index set per layer,
    shared by all its heads; the newest token is always kept (kvpress)."""

    name = "tova"
    paper = "arXiv 2401.06104"
    phase = ("prefill", "decode")
    granularity = "per layer"
    params = {"budget": _BUDGET}

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        L, H, n = scores.shape
        per_layer = _k.tova_scores(scores)
        indptr, pos = _k.select_per_layer(per_layer, H, budget, window=1)
        return Selection(indptr, pos, _counts(indptr))


class KNormPolicy(Policy):
    """K-norm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression", EMNLP 2024, arXiv 2406.11430): keep the keys with the lowest L2 norm
    (:meth:`score` gives ``-||k||``); layers in ``skip_layers`` keep everything."""

    name = "knorm"
    paper = "arXiv 2406.11430"
    phase = ("prefill", "decode")
    granularity = "per head"
    params = {
        "skip_layers": Param(
            (0, 1),
            "KVCache-Factory L2NormCluster skip_layers=[0,1]",
            _int_tuple,
            "a tuple of ints >= 0",
        ),
        "budget": _BUDGET,
    }

    def score(self, keys: F32) -> F32:
        """``keys`` ``(num_layers, num_heads, n, head_dim)`` float32 -> ``-||k||_2``
        ``(num_layers, num_heads, n)``."""
        _check_nd(keys, "keys", "num_layers, num_heads, n, head_dim")
        L, H, n, d = keys.shape
        return _k.key_norm_scores(keys.reshape(L * H, n, d)).reshape(L, H, n)

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        L, H, n = scores.shape
        per_layer = np.array(
            [n if layer in self.skip_layers else budget for layer in range(L)], np.int64
        )
        return _topk(scores, np.repeat(per_layer, H))


class InfiniPotPolicy(Policy):
    """InfiniPot (Kim et al., "InfiniPot: Infinite Context Processing on Memory-Constrained
    LLMs", EMNLP 2024, arXiv 2410.01518): a fixed pot of ``pot_size`` tokens; when it is full
    it is distilled to ``budget`` tokens (the compressed size). Scores: the catalyst-prompt
    attention (``scores``) and the token-level novelty ``nuc`` (``select(..., nuc=...)``),
    both computed by the caller; ``nuc_ratio`` of the budget goes to novelty (shared by all
    heads), the rest to each head's catalyst score. ``compressed_ratio`` and ``nuc_ratio``
    are *unverified* (recalled, not checked against the paper)."""

    name = "infinipot"
    inputs = ("nuc",)
    paper = "arXiv 2410.01518"
    phase = ("chunked_prefill",)
    granularity = "per head (novelty set shared)"
    params = {
        "pot_size": Param(4096, "paper headline setting: 4K pot", _pos_int, "an int > 0"),
        "compressed_ratio": Param(
            0.5,
            "unverified: the paper's |C'|/|C| ratio was not read",
            _unit,
            "in [0, 1]",
            unverified=True,
        ),
        "nuc_ratio": Param(
            0.5,
            "unverified: split-budget combination recalled",
            _unit,
            "in [0, 1]",
            unverified=True,
        ),
        "budget": _BUDGET,
    }

    def compressed_size(self) -> int:
        """Tokens kept after each distillation: ``floor(compressed_ratio * pot_size)``."""
        return int(math.floor(self.compressed_ratio * self.pot_size))

    def _budget(self, budget: int | None) -> int:
        # Without an explicit budget, a distillation keeps the schedule's compressed size.
        if budget is None and self.config.get("budget") is None:
            return self.compressed_size()
        return super()._budget(budget)

    def should_compress(self, num_tokens: int) -> bool:
        """The schedule: distill when the pot is full."""
        return bool(num_tokens >= self.pot_size)

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        L, H, n = scores.shape
        nuc = inputs.pop("nuc", None)
        if inputs:
            raise TypeError(f"infinipot.select: unknown input(s) {sorted(inputs)}; valid: nuc")
        if nuc is None:
            nuc = np.zeros(n, np.float32)
        indptr, pos = _k.plan_infinipot(_rows(scores), nuc, budget, self.nuc_ratio)
        return Selection(indptr, pos, _counts(indptr))


class RazorPolicy(Policy):
    """RazorAttention (Tang et al., "RazorAttention: Efficient KV Cache Compression Through
    Retrieval Heads", arXiv 2407.15891): retrieval heads (top ``echo_ratio`` by echo score
    plus top ``induction_ratio`` by induction score, across all layers; :meth:`classify`)
    keep the whole cache; every other head keeps ``sinks`` and a window, the last of its
    ``local_capacity`` slots holding a compensation token (``compensation="mean"``: the
    mean of the dropped K and V, built by the caller from ``Selection.num_dropped`` rows;
    ``"mean_logcount"``: the same token with ``log(num_dropped)`` added to its logit, the
    paper's form as recalled, unverified; ``"none"``: no token, the window takes the slot).
    ``select`` takes ``retrieval=`` (bool per row) and ignores the budget and scores."""

    name = "razor"
    inputs = ("retrieval",)
    paper = "arXiv 2407.15891"
    phase = ("prefill", "decode")
    granularity = "per head (static head map)"
    params = {
        "echo_ratio": Param(0.01, "golden-stick RAConfig echo_head_ratio=0.01", _unit, "in [0, 1]"),
        "induction_ratio": Param(
            0.14, "golden-stick RAConfig induction_head_ratio=0.14", _unit, "in [0, 1]"
        ),
        "sinks": Param(4, "golden-stick RAConfig sink_size=4", _nonneg_int, "an int >= 0"),
        "local_capacity": Param(
            256, "golden-stick RAConfig local_capacity=256", _pos_int, "an int > 0"
        ),
        "compensation": Param(
            "mean",
            "golden-stick RAConfig use_virtual_token=True (plain means of dropped K and V); "
            "'mean_logcount' weights it by the dropped count (paper, unverified)",
            _one_of("none", "mean", "mean_logcount"),
            "'none', 'mean' or 'mean_logcount'",
        ),
        "budget": _BUDGET,
    }

    def _validate(self) -> None:
        if self.local_capacity < self.sinks + (self.compensation != "none"):
            raise ValueError(
                f"razor: local_capacity ({self.local_capacity}) must be at least "
                f"sinks + 1 ({self.sinks + 1}) with a compensation token"
            )

    def classify(self, echo: F32, induction: F32) -> NDArray[np.bool_]:
        """Retrieval heads from ``(num_layers, num_heads)`` float32 echo and induction
        scores (see ``kvcore._kvcore.razor_head_scores``): a bool ``(num_layers * num_heads,)``."""
        return _k.razor_retrieval_heads(
            np.ascontiguousarray(echo, np.float32).ravel(),
            np.ascontiguousarray(induction, np.float32).ravel(),
            self.echo_ratio,
            self.induction_ratio,
        )

    def select(self, scores: F32, budget: int | None = None, **inputs: Any) -> Selection:
        self._check_inputs(inputs)
        s = _scores3(scores)
        return self._select(s, 0, **inputs)

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        L, H, n = scores.shape
        retrieval = inputs.pop("retrieval", None)
        if inputs:
            raise TypeError(f"razor.select: unknown input(s) {sorted(inputs)}; valid: retrieval")
        if retrieval is None:
            retrieval = np.zeros(L * H, bool)
        indptr, pos, dropped = _k.plan_razor(
            np.asarray(retrieval, bool).ravel(),
            n,
            self.sinks,
            self.local_capacity,
            self.compensation != "none",
        )
        return Selection(indptr, pos, _counts(indptr), dropped)


class LocretPolicy(Policy):
    """Locret (Huang et al., "Locret: Enhancing Eviction in Long-Context LLM Inference with
    Trained Retaining Heads", arXiv 2410.01805): scores come from the trained retaining heads
    (or any external source) and live in a :class:`kvcore.ScoreState` that is compacted with
    the cache. Chunked prefill: each round keeps ``budget`` tokens per head, the newest
    ``stabilizers`` forced, except in the final round (``select(..., final=True)``)."""

    name = "locret"
    inputs = ("final",)
    paper = "arXiv 2410.01805"
    phase = ("chunked_prefill",)
    granularity = "per head"
    params = {
        "stabilizers": Param(2500, "Locret infer.py stabilizers=2500", _nonneg_int, "an int >= 0"),
        "local_len": Param(100, "Locret infer.py local_len=100", _nonneg_int, "an int >= 0"),
        "chunk_size": Param(3072, "Locret infer.py chunk_size=3072", _pos_int, "an int > 0"),
        "budget": Param(
            None, "Locret infer.py budget_size=6000 when set", _opt_budget, "None or an int >= 0"
        ),
    }

    def new_state(self, num_rows: int) -> _k.ScoreState:
        """An empty score store with one row per (layer, head)."""
        return _k.ScoreState(num_rows)

    def _check_budget(self, budget: int) -> None:
        if self.stabilizers > budget:
            raise ValueError(
                f"locret: stabilizers ({self.stabilizers}) is larger than the budget ({budget})"
            )

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        final = bool(inputs.pop("final", False))
        if inputs:
            raise TypeError(f"locret.select: unknown input(s) {sorted(inputs)}; valid: final")
        return _topk(scores, budget, window=0 if final else self.stabilizers)


class LongGenPolicy(Policy):
    """LongGen (Ge et al., "A Little Goes a Long Way: Efficient Long Context Training and
    Inference with Partial Contexts", arXiv 2410.01485): a static hybrid, about a third of
    the layers (the middle ones) full and the others sparse: sinks + window (``"sink"``) or
    block-sparse. The layer map is ``layer_kinds`` (default: middle third full). The sink and
    block sizes are *unverified* (recalled). ``"sink"`` layers keep ``budget`` tokens;
    ``"block_sparse"`` layers keep the sinks, every ``stride``-th block and the
    ``local_blocks`` newest blocks (a static count that does not depend on the budget)."""

    name = "longgen"
    paper = "arXiv 2410.01485"
    phase = ("prefill", "decode")
    granularity = "static per layer"
    params = {
        "layer_kinds": Param(
            None,
            "middle third full (sciencestack TL;DR)",
            lambda x: (
                x is None
                or (
                    isinstance(x, (list, tuple))
                    and all(k in ("full", "sink", "block_sparse") for k in x)
                )
            ),
            "None or a sequence of 'full', 'sink', 'block_sparse'",
        ),
        "sparse_kind": Param(
            "sink",
            "AttnSink is one of the paper's two patterns",
            _one_of("sink", "block_sparse"),
            "'sink' or 'block_sparse'",
        ),
        "sinks": Param(
            64,
            "unverified: 'a few tens of tokens' recalled",
            _nonneg_int,
            "an int >= 0",
            unverified=True,
        ),
        "block": Param(
            64, "unverified: block size recalled", _pos_int, "an int > 0", unverified=True
        ),
        "stride": Param(
            4, "unverified: block stride recalled", _pos_int, "an int > 0", unverified=True
        ),
        "local_blocks": Param(
            1, "unverified: newest blocks kept", _pos_int, "an int > 0", unverified=True
        ),
        "budget": _BUDGET,
    }

    def kinds(self, num_layers: int) -> list[str]:
        """The layer map for ``num_layers`` layers."""
        num_layers = _args.size(num_layers, "num_layers", 8)  # one list entry a layer
        if self.layer_kinds is not None:
            if len(self.layer_kinds) != num_layers:
                raise ValueError(
                    f"longgen: layer_kinds has {len(self.layer_kinds)} entries "
                    f"for {num_layers} layers"
                )
            return list(self.layer_kinds)
        lo, hi = num_layers // 3, num_layers - num_layers // 3
        return ["full" if lo <= layer < hi else self.sparse_kind for layer in range(num_layers)]

    def _check_budget(self, budget: int) -> None:
        if self.sinks > budget:
            raise ValueError(f"longgen: sinks ({self.sinks}) is larger than the budget ({budget})")

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        L, H, n = scores.shape
        indptr, pos = _k.plan_longgen(
            self.kinds(L),
            H,
            n,
            sinks=self.sinks,
            window=budget - self.sinks,
            block=self.block,
            stride=self.stride,
            local_blocks=self.local_blocks,
        )
        return Selection(indptr, pos, _counts(indptr))


REGISTRY: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        StreamingPolicy,
        H2OPolicy,
        SnapKVPolicy,
        PyramidKVPolicy,
        AdaKVPolicy,
        TOVAPolicy,
        KNormPolicy,
        InfiniPotPolicy,
        RazorPolicy,
        LocretPolicy,
        LongGenPolicy,
    )
}


def names() -> list[str]:
    """The registered policy names."""
    return list(REGISTRY)


def get(name: str, **params: Any) -> Policy:
    """Builds the policy ``name`` with ``params`` over its defaults.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or an invalid value.
        TypeError: unknown parameter (the message lists the valid ones).
    """
    try:
        cls = REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown policy {name!r}; valid policies: {', '.join(REGISTRY)}"
        ) from None
    return cls(**params)
