"""SnapKV: the observation window votes, each head keeps its top tokens and the window."""

from __future__ import annotations

from typing import Any

from kvcore.policies.base import Selection, select_topk
from kvcore.policies.params import F32
from kvcore.policies.window import WindowScored, window_params


class SnapKVPolicy(WindowScored):
    """SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
    NeurIPS 2024, arXiv 2404.14469): the last ``window`` queries vote (sum of softmax
    probabilities), votes are pooled with ``kernel``, each KV head keeps its top tokens plus
    the window. Applied once at the end of prefill; the defaults are the paper's LongBench
    configuration."""

    name = "snapkv"
    paper = "arXiv 2404.14469"
    phase = ("prefill",)
    granularity = "per head"
    params = window_params(
        (32, "SnapKV LongBench config ablation_c4096_w32_k7_maxpool"),
        (7, "SnapKV LongBench config (k7)"),
        ("max", "SnapKV LongBench config (maxpool)"),
    )

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        return select_topk(scores, budget, window=self.window)
