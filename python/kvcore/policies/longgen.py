"""LongGen: a static hybrid of full and sparse (sink or block-sparse) layers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from kvcore import _args
from kvcore import _kvcore as _k
from kvcore.policies.base import Policy, Selection, counts
from kvcore.policies.params import BUDGET, F32, Param, nonneg_int, one_of, pos_int

if TYPE_CHECKING:
    from kvcore.statistics import Statistics


def _layer_kinds(x: Any) -> bool:
    return x is None or (
        isinstance(x, (list, tuple)) and all(k in ("full", "sink", "block_sparse") for k in x)
    )


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
            _layer_kinds,
            "None or a sequence of 'full', 'sink', 'block_sparse'",
        ),
        "sparse_kind": Param(
            "sink",
            "AttnSink is one of the paper's two patterns",
            one_of("sink", "block_sparse"),
            "'sink' or 'block_sparse'",
        ),
        "sinks": Param(
            64,
            "unverified: 'a few tens of tokens' recalled",
            nonneg_int,
            "an int >= 0",
            unverified=True,
        ),
        "block": Param(
            64, "unverified: block size recalled", pos_int, "an int > 0", unverified=True
        ),
        "stride": Param(
            4, "unverified: block stride recalled", pos_int, "an int > 0", unverified=True
        ),
        "local_blocks": Param(
            1, "unverified: newest blocks kept", pos_int, "an int > 0", unverified=True
        ),
        "budget": BUDGET,
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

    def check_shape(self, num_layers: int, num_heads: int) -> None:
        super().check_shape(num_layers, num_heads)
        self.kinds(num_layers)  # raises ValueError on a layer map of another length

    def scores_from(self, stats: Statistics) -> F32:
        return np.zeros(stats.shape, np.float32)  # a static layer map: select reads the shape

    def _check_budget(self, budget: int) -> None:
        if self.sinks > budget:
            raise ValueError(f"longgen: sinks ({self.sinks}) is larger than the budget ({budget})")

    def kept_tokens(
        self, layer_idx: int, num_layers: int, num_heads: int, n: int
    ) -> NDArray[np.int64]:
        # the static pattern itself: its counts depend on the layer's kind and n alone
        indptr, _ = self._plan(num_layers, num_heads, n, self._budget(None))
        rows: NDArray[np.int64] = counts(indptr).reshape(num_layers, num_heads)[layer_idx]
        return rows

    def _plan(
        self, num_layers: int, num_heads: int, n: int, budget: int
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        return _k.plan_longgen(
            self.kinds(num_layers),
            num_heads,
            n,
            sinks=self.sinks,
            window=budget - self.sinks,
            block=self.block,
            stride=self.stride,
            local_blocks=self.local_blocks,
        )

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        L, H, n = scores.shape
        indptr, pos = self._plan(L, H, n, budget)
        return Selection(indptr, pos, counts(indptr))
