"""Locret: scores from trained retaining heads, chunked prefill with stabilizers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvcore import _kvcore as _k
from kvcore.policies.base import Need, Policy, Selection, select_topk
from kvcore.policies.params import F32, Param, nonneg_int, opt_budget, opt_callable, pos_int

if TYPE_CHECKING:
    from kvcore.statistics import Provider, Statistics


class LocretPolicy(Policy):
    """Locret (Huang et al., "Locret: Enhancing Eviction in Long-Context LLM Inference with
    Trained Retaining Heads", arXiv 2410.01805): scores come from the trained retaining heads
    (or any external source) and live in a :class:`kvcore.ScoreState` that is compacted with
    the cache. Chunked prefill: each round keeps ``budget`` tokens per head, the newest
    ``stabilizers`` forced, except in the final round (``select(..., final=True)``).

    In the cache the scores are ``score_fn(inputs) -> (B, H, T)`` (the retaining heads;
    external scores), else the accumulated attention as a stand-in."""

    name = "locret"
    extra_inputs = ("final",)
    paper = "arXiv 2410.01805"
    phase = ("chunked_prefill",)
    granularity = "per head"
    needs = frozenset({Need.ACCUMULATED})  # without score_fn; with it, external scores
    params = {
        "stabilizers": Param(2500, "Locret infer.py stabilizers=2500", nonneg_int, "an int >= 0"),
        "local_len": Param(100, "Locret infer.py local_len=100", nonneg_int, "an int >= 0"),
        "chunk_size": Param(3072, "Locret infer.py chunk_size=3072", pos_int, "an int > 0"),
        "score_fn": Param(
            None,
            "cache input: the retaining heads; None: the accumulated attention",
            opt_callable,
            "None or a callable (ScoreInputs) -> (B, H, T) scores",
        ),
        "budget": Param(
            None, "Locret infer.py budget_size=6000 when set", opt_budget, "None or an int >= 0"
        ),
    }

    def _validate(self) -> None:
        if self.score_fn is not None:
            self.needs = frozenset({Need.EXTERNAL_SCORES})

    def new_state(self, num_rows: int) -> _k.ScoreState:
        """An empty score store with one row per (layer, head)."""
        return _k.ScoreState(num_rows)

    def _check_budget(self, budget: int) -> None:
        if self.stabilizers > budget:
            raise ValueError(
                f"locret: stabilizers ({self.stabilizers}) is larger than the budget ({budget})"
            )

    def providers(self) -> dict[Need, Provider]:
        return {} if self.score_fn is None else {Need.EXTERNAL_SCORES: self.score_fn}

    def scores_from(self, stats: Statistics) -> F32:
        need = Need.ACCUMULATED if self.score_fn is None else Need.EXTERNAL_SCORES
        out: F32 = stats[need].float().cpu().numpy()
        return out

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        final = bool(inputs.pop("final", False))
        return select_topk(scores, budget, window=0 if final else self.stabilizers)
