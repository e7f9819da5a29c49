"""The policy's selection over one layer's stored tokens: the one place where the cache calls the
policy (statistics are computed by the policy from :class:`~kvcore.scoring.ScoreInputs`).
---
"""

from __future__ import annotations

import numpy as np
import torch

from kvcore.scoring import ScoreInputs, TorchPolicy


def layer_selection(
    policy: TorchPolicy, inp: ScoreInputs, lengths: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The policy's selection over one layer's stored tokens.

    Args:
        policy: the cache's policy.
        inp: the layer's :class:`ScoreInputs` (stored keys, validity, positions, scores and
            the observed window).
        lengths: ``(B, H)`` int64 stored tokens per stream.

    Returns:
        ``(keep, comp)``: ``(B, H, T)`` bool tokens kept and the ``(B, H)`` rows whose
        dropped tokens fold into a compensation slot (None: no such rows); or None when
        every token stays (nothing to evict).
    """
    b, h = lengths.shape
    budgets = policy.head_budgets(inp.layer_idx, h)
    n_valid = inp.valid.sum(-1).cpu()
    no_padding = bool((torch.from_numpy(lengths) == n_valid).all())
    # The policy decides: the statistics it declares, then its (Rust) selection.
    keep, comp = policy.keep(inp, budgets[None, :].expand(b, h))
    if no_padding and bool((keep == inp.valid).all()):
        return None  # everything stays: nothing to evict
    return keep, comp


def fold_plan(
    keep: torch.Tensor, comp: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """RazorAttention's compensation token, decided: each ``comp`` row's dropped valid tokens
    fold into the slot of the first of them, which is kept. Returns the new keep mask and,
    per folding row, its dropped slots (the host first)."""
    b, h, t = keep.shape
    dropped = (valid & ~keep & comp[..., None]).reshape(b * h, t)
    rows = torch.nonzero(dropped.any(-1), as_tuple=True)[0]
    if rows.numel() == 0:
        return keep, []
    keep = keep.clone().reshape(b * h, t)
    flat_slots = slots.reshape(b * h, t)
    folds = []
    for r in rows.tolist():
        idx = torch.nonzero(dropped[r], as_tuple=True)[0]
        folds.append(flat_slots[r, idx])
        keep[r, idx[0]] = True
    return keep.reshape(b, h, t), folds
