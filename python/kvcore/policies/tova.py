"""TOVA: the last query's attention, one index set per layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvcore import _kvcore as _k
from kvcore.policies.base import Need, Policy, Selection, counts
from kvcore.policies.params import BUDGET, F32

if TYPE_CHECKING:
    from kvcore.statistics import Statistics


class TOVAPolicy(Policy):
    """TOVA (Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024,
    arXiv 2401.06104): the last query's attention averaged over heads; one index set per layer,
    shared by all its heads; the newest token is always kept (kvpress)."""

    name = "tova"
    paper = "arXiv 2401.06104"
    phase = ("prefill", "decode")
    granularity = "per layer"
    needs = frozenset({Need.QUERY_ATTENTION})
    couples_heads = True
    params = {"budget": BUDGET}

    @property
    def observe_window(self) -> int | None:
        return 1  # the last query

    def scores_from(self, stats: Statistics) -> F32:
        out: F32 = stats[Need.QUERY_ATTENTION].cpu().numpy()
        return out

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        L, H, n = scores.shape
        per_layer = _k.tova_scores(scores)
        indptr, pos = _k.select_per_layer(per_layer, H, budget, window=1)
        return Selection(indptr, pos, counts(indptr))
