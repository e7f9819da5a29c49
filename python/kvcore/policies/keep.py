"""The cache's side of a policy, written once for every policy: statistics, scores, then the
policy's Rust selection per group of heads, mapped back to a keep mask.

The registry sees one layer at a time inside a ``(num_layers, heads, n)`` array (the other
layers' rows are zero and ignored), so layer-dependent rules (PyramidKV, K-norm's
``skip_layers``, LongGen's layer map) apply. Padding tokens are removed before the call and
never kept. Rows of one sequence are selected together when the policy couples its heads
(``couples_heads``) or when every head has the same length and budget; shorter rows of a
coupled group are padded in front with the lowest score::

    stored (valid) tokens of head j   ->  row of the group, padded in front
    idx[j] = [0, 2, 3]                    [LOW, LOW, s0, s2, s3]   lead = 2

Per-head budgets: one selection per distinct budget of the group, each head reading its own
row of the selection made with its budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvcore import statistics
from kvcore.policies.base import HeadGroup

if TYPE_CHECKING:
    from kvcore.policies.base import Policy
    from kvcore.statistics import ScoreInputs

# Tokens of ragged rows padded in front for a coupled selection: never chosen first.
_LOW = -3.0e38


def layer_scores(policy: Policy, stats: statistics.Statistics) -> torch.Tensor:
    """The policy's ``(B, H, T)`` scores as a finite float32 CPU tensor (checked)."""
    raw = policy.scores_from(stats)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.float32 or raw.shape != stats.shape:
        got = f"{raw.dtype} {raw.shape}" if isinstance(raw, np.ndarray) else type(raw).__name__
        raise ValueError(
            f"{policy.name}: scores_from must return a numpy float32 array of shape "
            f"{stats.shape}, got {got}"
        )
    return torch.nan_to_num(torch.from_numpy(raw), nan=0.0, posinf=3e38, neginf=-3e38)


@dataclass(frozen=True)
class LayerScores:
    """One layer's scores over its stored tokens, as the selection reads them.

    Attributes:
        scores: ``(B, H, T)`` float32 CPU, finite.
        valid: ``(B, H, T)`` bool CPU, the stored tokens (the rest is never kept).
        budgets: ``(B, H)`` int budgets (read only when the policy has per-head budgets).
        layer: the layer's row in the ``(num_layers, heads, n)`` selection input.
        num_layers: layers of the model.
    """

    scores: torch.Tensor
    valid: torch.Tensor
    budgets: torch.Tensor
    layer: int
    num_layers: int


def keep_mask(
    policy: Policy, inp: ScoreInputs, budgets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """See :meth:`kvcore.policies.Policy.keep`."""
    stats = statistics.compute(policy, inp)
    grid = LayerScores(
        layer_scores(policy, stats), inp.valid.cpu(), budgets, inp.layer_idx, inp.num_layers
    )
    keep, comp = select_mask(policy, grid, lambda group: policy.select_inputs(stats, group))
    return keep.to(inp.valid.device), comp


def select_mask(
    policy: Policy, grid: LayerScores, inputs_for: Callable[[HeadGroup], dict[str, Any]]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The selection half of :func:`keep_mask`, on scores already computed (also called by
    :mod:`kvcore.distributed` on the heads gathered from every rank), with ``inputs_for``
    giving the extra ``select`` inputs of a group of heads.

    Returns:
        The ``(B, H, T)`` CPU keep mask and the ``(B, H)`` folding rows (or None).
    """
    scores, valid, budgets, layer = grid.scores, grid.valid, grid.budgets, grid.layer
    L = grid.num_layers
    b, h, t = valid.shape
    keep = torch.zeros(b, h, t, dtype=torch.bool)
    comp = torch.zeros(b, h, dtype=torch.bool) if policy.folds_dropped else None
    per_head = policy.has_head_budgets
    for i in range(b):
        idx = [torch.nonzero(valid[i, j], as_tuple=True)[0] for j in range(h)]
        counts = [len(x) for x in idx]
        groups: list[list[int]]
        alone = per_head and policy.selects_alone(counts)
        if (policy.couples_heads and not alone) or (len(set(counts)) == 1 and not per_head):
            groups = [list(range(h))]
        else:
            groups = [[j] for j in range(h)]
        for g in groups:
            n = max(counts[j] for j in g)
            rows = np.zeros((L, len(g), n), np.float32)
            lead = []
            for r, j in enumerate(g):
                pad = n - counts[j]
                lead.append(pad)
                rows[layer, r, :pad] = _LOW
                rows[layer, r, pad:] = scores[i, j, idx[j]].numpy()
            group = HeadGroup(i, g, [idx[j] for j in g], alone)
            inputs: dict[str, Any] = inputs_for(group)
            calls: list[tuple[int | None, list[int]]] = (
                [
                    (bud, [r for r, j in enumerate(g) if int(budgets[i, j]) == bud])
                    for bud in sorted({int(budgets[i, j]) for j in g})
                ]
                if per_head
                else [(None, list(range(len(g))))]
            )
            for bud, members in calls:
                sel = policy.select(rows, budget=bud, **inputs)
                for r in members:
                    j = g[r]
                    row = layer * len(g) + r
                    pos = sel.positions[sel.indptr[row] : sel.indptr[row + 1]] - lead[r]
                    pos = pos[pos >= 0]
                    keep[i, j, idx[j][torch.from_numpy(pos)]] = True
                    if comp is not None and sel.num_dropped is not None:
                        comp[i, j] = bool(sel.num_dropped[row] > 0)
    return keep, comp
