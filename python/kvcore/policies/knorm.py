"""K-norm: keep the keys with the lowest L2 norm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from kvcore import _kvcore as _k
from kvcore.policies.base import Need, Policy, Selection, select_topk
from kvcore.policies.params import BUDGET, F32, Param, check_nd, int_tuple

if TYPE_CHECKING:
    from kvcore.statistics import Statistics


class KNormPolicy(Policy):
    """K-norm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression", EMNLP 2024, arXiv 2406.11430): keep the keys with the lowest L2 norm
    (:meth:`score` gives ``-||k||``); layers in ``skip_layers`` keep everything."""

    name = "knorm"
    paper = "arXiv 2406.11430"
    phase = ("prefill", "decode")
    granularity = "per head"
    needs = frozenset({Need.KEYS})
    params = {
        "skip_layers": Param(
            (0, 1),
            "KVCache-Factory L2NormCluster skip_layers=[0,1]",
            int_tuple,
            "a tuple of ints >= 0",
        ),
        "budget": BUDGET,
    }

    def score(self, keys: F32) -> F32:
        """``keys`` ``(num_layers, num_heads, n, head_dim)`` float32 -> ``-||k||_2``
        ``(num_layers, num_heads, n)``."""
        check_nd(keys, "keys", "num_layers, num_heads, n, head_dim")
        L, H, n, d = keys.shape
        out: F32 = _k.key_norm_scores(keys.reshape(L * H, n, d)).reshape(L, H, n)
        return out

    def scores_from(self, stats: Statistics) -> F32:
        b, h, t = stats.shape
        keys = stats[Need.KEYS].float().cpu().numpy()
        out = [self.score(keys[i : i + 1])[0] for i in range(b)]
        return np.stack(out) if out else np.zeros((b, h, t), np.float32)

    def kept_tokens(
        self, layer_idx: int, num_layers: int, num_heads: int, n: int
    ) -> NDArray[np.int64]:
        if layer_idx in self.skip_layers:
            return np.full(num_heads, n, np.int64)
        return super().kept_tokens(layer_idx, num_layers, num_heads, n)

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        L, H, n = scores.shape
        per_layer = np.array(
            [n if layer in self.skip_layers else budget for layer in range(L)], np.int64
        )
        return select_topk(scores, np.repeat(per_layer, H))
