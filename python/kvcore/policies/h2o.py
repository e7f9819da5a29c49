"""H2O: heavy hitters of the attention accumulated over every step."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from kvcore import _kvcore as _k
from kvcore.policies.base import Need, Policy, Selection, select_topk
from kvcore.policies.params import BUDGET, F32, Param, unit

if TYPE_CHECKING:
    from kvcore.statistics import Statistics


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
    needs = frozenset({Need.ACCUMULATED})
    params = {
        "recent_ratio": Param(
            0.5, "h2o_hf lm-eval scripts: heavy_ratio = recent_ratio = 0.1", unit, "in [0, 1]"
        ),
        "decay": Param(1.0, "plain H2O accumulates without decay", unit, "in [0, 1]"),
        "budget": BUDGET,
    }

    def new_state(self, num_rows: int) -> _k.ScoreState:
        """An empty accumulator with one row per (layer, head)."""
        return _k.ScoreState(num_rows)

    def scores_from(self, stats: Statistics) -> F32:
        out: F32 = stats[Need.ACCUMULATED].float().cpu().numpy()
        return out

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        recent = int(math.floor(self.recent_ratio * budget))
        return select_topk(scores, budget, window=recent)
