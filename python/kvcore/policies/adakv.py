"""Ada-KV: a layer's budget shared among its heads by one global top-k."""

from __future__ import annotations

from typing import Any

from kvcore import _kvcore as _k
from kvcore.policies.base import Selection, counts
from kvcore.policies.params import F32, Param, unit
from kvcore.policies.window import WindowScored, window_params


class AdaKVPolicy(WindowScored):
    """Ada-KV (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
    Allocation", arXiv 2407.11550): SnapKV-style scores (mean over window queries), then the
    layer's budget is shared among its heads by a global top-k, each head guaranteed
    ``floor(alpha * (budget - window))`` of its own best tokens."""

    name = "adakv"
    paper = "arXiv 2407.11550"
    phase = ("prefill",)
    granularity = "per head, adaptive within a layer"
    window_agg = "mean"
    couples_heads = True
    accepts_head_budgets = False
    head_budget_refusal = (
        "its rule decides each head's budget itself (the layer's total split among the "
        "heads by one global top-k); give an int budget"
    )
    params = window_params(
        (32, "AdaKV configs c*_w32_k7_maxpool"),
        (7, "AdaKV configs c*_w32_k7_maxpool"),
        ("max", "AdaKV configs c*_w32_k7_maxpool"),
        alpha=Param(0.2, "AdaKV pred.py --floor_alpha 0.2", unit, "in [0, 1]"),
    )

    # one global top-k per layer: a head keeps more or less than the layer's average
    splits_layer_budget = True

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        indptr, pos = _k.select_adakv(scores, budget, self.alpha, window=self.window)
        return Selection(indptr, pos, counts(indptr))
