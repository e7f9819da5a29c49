"""RazorAttention: retrieval heads keep everything, the others sinks, a window and one
compensation token."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from kvcore import _kvcore as _k
from kvcore.policies.base import HeadGroup, Policy, Selection, counts
from kvcore.policies.params import (
    BUDGET,
    F32,
    Param,
    nonneg_int,
    one_of,
    pos_int,
    scores3,
    unit,
)

if TYPE_CHECKING:
    from kvcore.statistics import Statistics


def _head_map(x: Any) -> bool:
    return x is None or (
        getattr(x, "ndim", None) == 2 and str(getattr(x, "dtype", "")) in ("bool", "torch.bool")
    )


class RazorPolicy(Policy):
    """RazorAttention (Tang et al., "RazorAttention: Efficient KV Cache Compression Through
    Retrieval Heads", arXiv 2407.15891): retrieval heads (top ``echo_ratio`` by echo score
    plus top ``induction_ratio`` by induction score, across all layers; :meth:`classify`)
    keep the whole cache; every other head keeps ``sinks`` and a window, the last of its
    ``local_capacity`` slots holding a compensation token (``compensation="mean"``: the
    mean of the dropped K and V, built by the caller from ``Selection.num_dropped`` rows;
    ``"mean_logcount"``: the same token with ``log(num_dropped)`` added to its logit, the
    paper's form as recalled, unverified; ``"none"``: no token, the window takes the slot).
    ``select`` takes ``retrieval=`` (bool per row) and ignores the budget and scores; in the
    cache the head map is the ``retrieval`` parameter, ``(num_layers, num_kv_heads)`` bool
    (default: no retrieval head)."""

    name = "razor"
    extra_inputs = ("retrieval",)
    paper = "arXiv 2407.15891"
    phase = ("prefill", "decode")
    granularity = "per head (static head map)"
    accepts_head_budgets = False
    head_budget_refusal = (
        "its head map decides each head's size (retrieval heads keep everything, the "
        "others sinks + local_capacity); set retrieval= and local_capacity= instead"
    )
    params = {
        "echo_ratio": Param(0.01, "golden-stick RAConfig echo_head_ratio=0.01", unit, "in [0, 1]"),
        "induction_ratio": Param(
            0.14, "golden-stick RAConfig induction_head_ratio=0.14", unit, "in [0, 1]"
        ),
        "sinks": Param(4, "golden-stick RAConfig sink_size=4", nonneg_int, "an int >= 0"),
        "local_capacity": Param(
            256, "golden-stick RAConfig local_capacity=256", pos_int, "an int > 0"
        ),
        "compensation": Param(
            "mean",
            "golden-stick RAConfig use_virtual_token=True (plain means of dropped K and V); "
            "'mean_logcount' weights it by the dropped count (paper, unverified)",
            one_of("none", "mean", "mean_logcount"),
            "'none', 'mean' or 'mean_logcount'",
        ),
        "retrieval": Param(
            None,
            "cache input: the head map (from classify on calibration scores); None: no "
            "retrieval head",
            _head_map,
            "None or a (num_layers, num_kv_heads) bool tensor",
        ),
        "budget": BUDGET,
    }

    def _validate(self) -> None:
        if self.local_capacity < self.sinks + (self.compensation != "none"):
            raise ValueError(
                f"razor: local_capacity ({self.local_capacity}) must be at least "
                f"sinks + 1 ({self.sinks + 1}) with a compensation token"
            )
        r = self.retrieval
        self._head_map: NDArray[np.bool_] | None = (
            None if r is None else np.asarray(r.cpu() if hasattr(r, "cpu") else r, bool)
        )

    def _budget(self, budget: int | None) -> int:
        # The head map decides the sizes: the budget is not read.
        if budget is None and self.config.get("budget") is None:
            return 0
        return super()._budget(budget)

    def classify(self, echo: F32, induction: F32) -> NDArray[np.bool_]:
        """Retrieval heads from ``(num_layers, num_heads)`` float32 echo and induction
        scores (see ``kvcore._kvcore.razor_head_scores``): a bool ``(num_layers * num_heads,)``."""
        return _k.razor_retrieval_heads(
            np.ascontiguousarray(echo, np.float32).ravel(),
            np.ascontiguousarray(induction, np.float32).ravel(),
            self.echo_ratio,
            self.induction_ratio,
        )

    @property
    def folds_dropped(self) -> bool:
        return bool(self.compensation != "none")

    def max_budget(self) -> int:
        return max(super().max_budget(), int(self.local_capacity))

    def kept_tokens(
        self, layer_idx: int, num_layers: int, num_heads: int, n: int
    ) -> NDArray[np.int64]:
        retrieval = (
            self._head_map[layer_idx] if self._head_map is not None else np.zeros(num_heads, bool)
        )
        indptr, _, dropped = _k.plan_razor(
            np.ascontiguousarray(retrieval, bool),
            n,
            self.sinks,
            self.local_capacity,
            self.compensation != "none",
        )
        # the compensation token is the host of a row's dropped tokens, kept besides them
        return (counts(indptr) + ((dropped > 0) & self.folds_dropped)).astype(np.int64)

    def check_shape(self, num_layers: int, num_heads: int) -> None:
        super().check_shape(num_layers, num_heads)
        if self._head_map is not None and self._head_map.shape != (num_layers, num_heads):
            raise ValueError(
                f"razor: retrieval has shape {tuple(self._head_map.shape)}, "
                f"expected {(num_layers, num_heads)}"
            )

    def scores_from(self, stats: Statistics) -> F32:
        return np.zeros(stats.shape, np.float32)  # a static head map: select reads the shape

    def select_inputs(self, stats: Statistics, group: HeadGroup) -> dict[str, Any]:
        L, h = stats.inputs.num_layers, stats.shape[1]
        head_map = self._head_map if self._head_map is not None else np.zeros((L, h), bool)
        if head_map.shape != (L, h):
            raise ValueError(f"razor: retrieval has shape {head_map.shape}, expected {(L, h)}")
        return {"retrieval": head_map[:, group.heads].reshape(-1)}

    def select(self, scores: F32, budget: int | None = None, **inputs: Any) -> Selection:
        self._check_inputs(inputs)
        s = scores3(scores)
        return self._select(s, 0, **inputs)

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        L, H, n = scores.shape
        retrieval = inputs.pop("retrieval", None)
        if retrieval is None:
            retrieval = np.zeros(L * H, bool)
        indptr, pos, dropped = _k.plan_razor(
            np.asarray(retrieval, bool).ravel(),
            n,
            self.sinks,
            self.local_capacity,
            self.compensation != "none",
        )
        return Selection(indptr, pos, counts(indptr), dropped)
