"""The SnapKV family's shared scoring: observation-window votes, GQA reduction, pooling."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from kvcore import _kvcore as _k
from kvcore.policies.base import Need, Policy
from kvcore.policies.params import BUDGET, F32, GQA, Param, check_nd, odd_int, one_of, pos_int

if TYPE_CHECKING:
    from kvcore.statistics import Statistics


def window_params(
    window: tuple[int, str], kernel: tuple[int, str], pooling: tuple[str, str], **extra: Param
) -> dict[str, Param]:
    """The SnapKV family's parameters from ``(default, source)`` pairs, then ``extra``,
    ``gqa_reduce`` and ``budget``."""
    return {
        "window": Param(*window, pos_int, "an int > 0"),
        "kernel": Param(*kernel, odd_int, "a positive odd int"),
        "pooling": Param(*pooling, one_of("avg", "max"), "'avg' or 'max'"),
        **extra,
        "gqa_reduce": GQA,
        "budget": BUDGET,
    }


class WindowScored(Policy):
    """Shared SnapKV-family scoring (P-1 of the research notes): needs the observation
    window's probabilities; subclasses set ``params`` with ``window``, ``kernel``,
    ``pooling`` and ``gqa_reduce``."""

    window_agg: ClassVar[str] = "sum"
    needs = frozenset({Need.WINDOW_PROBS})

    def score(self, window_probs: F32, num_kv_heads: int) -> F32:
        """Scores from observation-window attention.

        Args:
            window_probs: ``(num_layers, num_q_heads, w, n)`` float32 softmax probabilities of
                the last ``w`` queries (the window's own columns included, causally masked).
            num_kv_heads: KV heads; query heads are reduced per GQA group by ``gqa_reduce``.

        Returns:
            ``(num_layers, num_kv_heads, n)`` float32: window reduction, GQA reduction, then
            pooling with ``kernel``.
        """
        check_nd(window_probs, "window_probs", "num_layers, num_q_heads, w, n")
        L, Hq, w, n = window_probs.shape
        red = _k.window_reduce(window_probs.reshape(L * Hq, w, n), self.window_agg)
        out = np.empty((L, num_kv_heads, n), dtype=np.float32)
        for layer in range(L):
            g = _k.group_reduce(red[layer * Hq : (layer + 1) * Hq], num_kv_heads, self.gqa_reduce)
            out[layer] = _k.pool1d(g, self.kernel, self.pooling)
        return out

    @property
    def observe_window(self) -> int | None:
        return int(self.window)

    def scores_from(self, stats: Statistics) -> F32:
        b, h, t = stats.shape
        probs = stats[Need.WINDOW_PROBS].cpu().numpy()
        out = [self.score(probs[i : i + 1], h)[0] for i in range(b)]
        return np.stack(out) if out else np.zeros((b, h, t), np.float32)

    def _check_budget(self, budget: int) -> None:
        if self.window > budget:
            raise ValueError(
                f"{self.name}: window ({self.window}) is larger than the budget ({budget})"
            )
