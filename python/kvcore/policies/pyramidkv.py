"""PyramidKV: SnapKV scores under linearly decreasing per-layer budgets."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from kvcore import _kvcore as _k
from kvcore.policies.base import Selection, select_topk
from kvcore.policies.params import F32, Param, pos_int
from kvcore.policies.window import WindowScored, window_params


class PyramidKVPolicy(WindowScored):
    """PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
    Information Funneling", arXiv 2406.02069): SnapKV scores, with linearly decreasing
    per-layer budgets (``beta`` = 20) that sum exactly to ``num_layers * budget``; short
    prompts (``n < budget``: keep all; ``n < 2 (budget - window)``: uniform) follow the
    reference code."""

    name = "pyramidkv"
    paper = "arXiv 2406.02069"
    phase = ("prefill",)
    granularity = "per layer budget, per head selection"
    accepts_head_budgets = False
    head_budget_refusal = (
        "its rule derives every layer's budget from one average budget (the "
        "pyramid); give an int budget, or use snapkv (pooling='avg', kernel=5) for explicit "
        "per-head budgets"
    )
    params = window_params(
        (32, "init_pyramidkv window_size=32"),
        (5, "init_pyramidkv kernel_size=5"),
        ("avg", "init_pyramidkv pooling=avgpool"),
        beta=Param(20, "PyramidKVCluster(beta=20)", pos_int, "an int > 0"),
    )

    def kept_tokens(
        self, layer_idx: int, num_layers: int, num_heads: int, n: int
    ) -> NDArray[np.int64]:
        per_layer = _k.budget_pyramid(num_layers, n, self._budget(None), self.window, self.beta)
        return np.full(num_heads, min(int(per_layer[layer_idx]), n), np.int64)

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        L, H, n = scores.shape
        per_layer = _k.budget_pyramid(L, n, budget, self.window, self.beta)
        return select_topk(scores, np.repeat(per_layer, H), window=self.window)
