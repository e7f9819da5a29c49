"""InfiniPot: a fixed pot distilled by catalyst attention and token novelty."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from kvcore import _kvcore as _k
from kvcore.policies.base import HeadGroup, Need, Policy, Selection, counts
from kvcore.policies.params import BUDGET, F32, Param, opt_callable, pos_int, rows, unit

if TYPE_CHECKING:
    from kvcore.statistics import Provider, Statistics


class InfiniPotPolicy(Policy):
    """InfiniPot (Kim et al., "InfiniPot: Infinite Context Processing on Memory-Constrained
    LLMs", EMNLP 2024, arXiv 2410.01518): a fixed pot of ``pot_size`` tokens; when it is full
    it is distilled to ``budget`` tokens (the compressed size). Scores: the catalyst-prompt
    attention (``scores``) and the token-level novelty ``nuc`` (``select(..., nuc=...)``),
    both computed by the caller; ``nuc_ratio`` of the budget goes to novelty (shared by all
    heads), the rest to each head's catalyst score. ``compressed_ratio`` and ``nuc_ratio``
    are *unverified* (recalled, not checked against the paper).

    In the cache the catalyst is the attention of the last 32 observed queries and the
    novelty ``1 - cos(k, mean k)`` averaged over heads (``kvcore.statistics.key_novelty``);
    ``nuc_fn(inputs) -> (B, T)`` replaces it."""

    name = "infinipot"
    extra_inputs = ("nuc",)
    paper = "arXiv 2410.01518"
    phase = ("chunked_prefill",)
    granularity = "per head (novelty set shared)"
    needs = frozenset({Need.QUERY_ATTENTION, Need.NOVELTY, Need.KEYS})
    couples_heads = True
    params = {
        "pot_size": Param(4096, "paper headline setting: 4K pot", pos_int, "an int > 0"),
        "compressed_ratio": Param(
            0.5,
            "unverified: the paper's |C'|/|C| ratio was not read",
            unit,
            "in [0, 1]",
            unverified=True,
        ),
        "nuc_ratio": Param(
            0.5,
            "unverified: split-budget combination recalled",
            unit,
            "in [0, 1]",
            unverified=True,
        ),
        "nuc_fn": Param(
            None,
            "cache input: the default novelty is key_novelty (1 - cos with the mean key)",
            opt_callable,
            "None or a callable (ScoreInputs) -> (B, T) novelty",
        ),
        "budget": BUDGET,
    }

    def compressed_size(self) -> int:
        """Tokens kept after each distillation: ``floor(compressed_ratio * pot_size)``."""
        return int(math.floor(self.compressed_ratio * self.pot_size))

    def _budget(self, budget: int | None) -> int:
        # Without an explicit budget, a distillation keeps the schedule's compressed size.
        if budget is None and self.config.get("budget") is None:
            return self.compressed_size()
        return super()._budget(budget)

    def should_compress(self, num_tokens: int) -> bool:
        """The schedule: distill when the pot is full."""
        return bool(num_tokens >= self.pot_size)

    @property
    def observe_window(self) -> int | None:
        return 32  # the catalyst window

    def providers(self) -> dict[Need, Provider]:
        return {} if self.nuc_fn is None else {Need.NOVELTY: self.nuc_fn}

    def scores_from(self, stats: Statistics) -> F32:
        out: F32 = stats[Need.QUERY_ATTENTION].cpu().numpy()
        return out

    def selects_alone(self, counts: list[int]) -> bool:
        # The novelty is one value per token position shared by the heads; heads of
        # different lengths hold different tokens at a position, so each selects alone.
        return len(set(counts)) > 1

    def select_inputs(self, stats: Statistics, group: HeadGroup) -> dict[str, Any]:
        nuc = stats[Need.NOVELTY].float().cpu()
        batch, tokens = group.batch, group.tokens
        if group.alone:
            (tok,) = tokens
            if self.nuc_fn is None:  # the head's own keys against their mean
                from kvcore.statistics import head_novelty

                keys = stats[Need.KEYS]
                own = head_novelty(keys[batch, group.heads[0], tok.to(keys.device)])
            else:
                own = nuc[batch, tok]
            return {"nuc": np.ascontiguousarray(own.numpy(), np.float32)}
        # One novelty vector per token of the group (their valid tokens agree unless the
        # group is ragged; padded places get the lowest novelty).
        longest = max(range(len(tokens)), key=lambda r: len(tokens[r]))
        return {"nuc": np.ascontiguousarray(nuc[batch, tokens[longest]].numpy(), np.float32)}

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        L, H, n = scores.shape
        nuc = inputs.pop("nuc", None)
        if nuc is None:
            nuc = np.zeros(n, np.float32)
        indptr, pos = _k.plan_infinipot(rows(scores), nuc, budget, self.nuc_ratio)
        return Selection(indptr, pos, counts(indptr))
