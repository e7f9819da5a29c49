"""StreamingLLM: attention sinks and the newest tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kvcore import _kvcore as _k
from kvcore.policies.base import Policy, Selection, counts
from kvcore.policies.params import BUDGET, F32, Param, nonneg_int

if TYPE_CHECKING:
    from kvcore.statistics import Statistics


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
        "sinks": Param(4, "streaming_llm/kv_cache.py start_size=4", nonneg_int, "an int >= 0"),
        "budget": BUDGET,
    }

    def scores_from(self, stats: Statistics) -> F32:
        return np.zeros(stats.shape, np.float32)  # a static pattern: select reads the shape

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        L, H, n = scores.shape
        s = min(self.sinks, budget)
        indptr, pos = _k.plan_streaming(L * H, n, s, budget - s)
        return Selection(indptr, pos, counts(indptr))
