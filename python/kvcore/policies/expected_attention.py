"""Expected Attention: the attention future queries are expected to pay, from the statistics of
the queries seen so far."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from kvcore.policies.base import Need, Policy, Selection, select_topk
from kvcore.policies.params import BUDGET, F32, Param, nonneg_int, pos_int

if TYPE_CHECKING:
    import torch

    from kvcore.statistics import Statistics

# The score of an attention sink: above every softmax probability times a value norm.
_SINK = float(np.finfo(np.float32).max)


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool)


def _nonneg_float(x: Any) -> bool:
    return (
        isinstance(x, (int, float))
        and not isinstance(x, bool)
        and math.isfinite(x)
        and float(x) >= 0.0
    )


def mean_rotation(inv_freq: torch.Tensor, head_dim: int, start: int, count: int) -> torch.Tensor:
    """The RoPE rotation averaged over positions ``start .. start + count - 1``, as a
    ``(head_dim, head_dim)`` float64 matrix ``R`` with ``rotated(x) = R @ x`` averaged.

    RoPE (``rotate_half`` convention) turns channel pair ``(i, i + R/2)`` by ``p * inv_freq[i]``;
    channels past ``R = 2 * len(inv_freq)`` are not rotated::

        R[i, i] = R[i+h, i+h] = mean cos      R[i, i+h] = -mean sin      R[i+h, i] = mean sin
    """
    import torch

    h = inv_freq.numel()
    p = torch.arange(start, start + count, dtype=torch.float64, device=inv_freq.device)
    ang = p[:, None] * inv_freq.to(torch.float64)[None, :]
    c, s = ang.cos().mean(0), ang.sin().mean(0)
    r = torch.eye(head_dim, dtype=torch.float64, device=inv_freq.device)
    i = torch.arange(h, device=inv_freq.device)
    r[i, i], r[i + h, i + h] = c, c
    r[i, i + h], r[i + h, i] = -s, s
    return r


def expected_attention(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    query_valid: torch.Tensor | None,
    inv_freq: torch.Tensor,
    scaling: float,
    n_future_positions: int,
    n_sink: int,
    use_covariance: bool,
    use_vnorm: bool,
    epsilon: float,
) -> torch.Tensor:
    """Expected attention scores of one layer's stored tokens.

    Args:
        keys, values: ``(B, H, T, D)`` stored keys (rotated) and values.
        positions: ``(B, H, T)`` int64 sequence index of each token.
        valid: ``(B, H, T)`` bool.
        queries: ``(B, Hq, w, D)`` observed queries, rotated at ``query_positions`` ``(w,)``.
        query_valid: ``(B, w)`` bool or None (all valid).
        inv_freq: ``(R / 2,)`` the layer's RoPE frequencies.
        scaling: the attention softmax scale (``D ** -0.5``: kvpress's ``1 / sqrt(d)``).

    Returns:
        ``(B, H, T)`` float32: per query head, ``softmax_t(scaling * mu . k_t + scaling^2 / 2 *
        k_t^T Sigma k_t)`` over the valid non-sink tokens, averaged over the GQA group, times
        ``||v_t||`` (``use_vnorm``, after adding ``epsilon``); sinks (position < ``n_sink``)
        score the float32 maximum, invalid tokens 0. ``mu`` and ``Sigma`` are the mean and
        covariance of the observed queries past the sinks, taken back before RoPE, then
        turned by the rotation averaged over the next ``n_future_positions`` positions.
    """
    import torch

    from kvcore.cache.controller import rotate_keys

    b, hq, w, d = queries.shape
    h = keys.shape[1]
    q = queries.to(torch.float64)
    qpos = query_positions.to(q.device)
    # back before RoPE: rotate each query by minus its position
    flat = q.reshape(-1, d)
    delta = (-qpos).repeat(b * hq)
    pre = rotate_keys(flat, delta, inv_freq).reshape(b, hq, w, d)
    qv = torch.ones(b, w, dtype=torch.bool, device=q.device)
    if query_valid is not None:
        qv = query_valid.to(q.device).bool()
    past_sinks = qv & (qpos >= n_sink)[None, :]
    # a prompt no longer than the sinks: its valid queries are all there is
    m = torch.where(past_sinks.any(1, keepdim=True), past_sinks, qv).to(torch.float64)
    n = m.sum(1).clamp(min=1.0)[:, None, None]  # (B, 1, 1)
    mu = (pre * m[:, None, :, None]).sum(2) / n  # (B, Hq, D)
    rot = mean_rotation(inv_freq.to(q.device), d, int(qpos.max()) + 1, n_future_positions)
    mu = mu @ rot.T
    k = keys.to(torch.float64).repeat_interleave(hq // h, dim=1)  # (B, Hq, T, D)
    logits = scaling * torch.einsum("bhd,bhtd->bht", mu, k)
    if use_covariance:
        c = (pre - (pre * m[:, None, :, None]).sum(2, keepdim=True) / n[..., None]) * m[
            :, None, :, None
        ]
        cov = c.transpose(2, 3) @ c / n[..., None]  # (B, Hq, D, D)
        cov = rot @ cov @ rot.T
        logits = logits + 0.5 * scaling**2 * torch.einsum("bhtd,bhde,bhte->bht", k, cov, k)
    sink = valid & (positions < n_sink)
    scored = (valid & ~sink).repeat_interleave(hq // h, dim=1)
    probs = torch.softmax(logits.masked_fill(~scored, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0).reshape(b, h, hq // h, -1).mean(2)
    if use_vnorm:
        probs = (probs + epsilon) * values.to(torch.float64).norm(dim=-1)
    out = torch.where(sink, torch.full_like(probs, _SINK), probs * valid)
    return out.float()


class ExpectedAttentionPolicy(Policy):
    """Expected Attention (Devoto, Jeblick and Jégou, "Expected Attention: KV Cache
    Compression by Estimating Attention from Future Queries Distribution", arXiv 2510.00636,
    2025; kvpress's ``ExpectedAttentionPress``): a query-agnostic score. The queries of the
    step (the prompt, past its sinks) give a Gaussian model of the queries to come, before
    RoPE; the rotation averaged over the next ``n_future_positions`` positions turns its mean
    ``mu`` and covariance ``Sigma``; a key's expected attention is then
    ``E[exp(s q . k)] = exp(s mu . k + s^2 / 2 k^T Sigma k)`` (``s`` the softmax scale),
    normalised over the layer's non-sink tokens, averaged over the GQA group and multiplied by
    ``||v||``. The first ``n_sink`` positions are always kept.

    Differences from kvpress, on purpose: the statistics come from the observed queries
    themselves (kvpress projects the mean hidden state with the query weight and no bias, so
    Qwen2's query bias is left out there), and the cache's softmax scale replaces
    ``1 / sqrt(d)`` (equal by default). Needs the layers' RoPE frequencies
    (``KVCache(rope=...)``; :func:`kvcore.hf.compressed_cache` passes the model's).
    """

    name = "expected_attention"
    paper = "arXiv 2510.00636"
    phase = ("prefill",)
    granularity = "per head"
    needs = frozenset({Need.KEYS, Need.VALUES, Need.QUERIES})
    needs_rope = True
    params = {
        "n_future_positions": Param(
            512, "kvpress ExpectedAttentionPress n_future_positions=512", pos_int, "an int > 0"
        ),
        "n_sink": Param(4, "kvpress ExpectedAttentionPress n_sink=4", nonneg_int, "an int >= 0"),
        "use_covariance": Param(
            True, "kvpress ExpectedAttentionPress use_covariance=True", _is_bool, "a bool"
        ),
        "use_vnorm": Param(
            True, "kvpress ExpectedAttentionPress use_vnorm=True", _is_bool, "a bool"
        ),
        "epsilon": Param(
            0.0, "kvpress ExpectedAttentionPress epsilon=0.0", _nonneg_float, "a float >= 0"
        ),
        "budget": BUDGET,
    }

    def scores_from(self, stats: Statistics) -> F32:
        inp = stats.inputs
        if inp.rope is None:
            raise ValueError(
                f"{self.name} needs the layers' RoPE frequencies (KVCache(rope=...)) to take "
                "the observed queries back before RoPE"
            )
        assert inp.query_positions is not None  # Need.QUERIES refused a step without them
        out = expected_attention(
            stats[Need.KEYS],
            stats[Need.VALUES],
            inp.positions,
            inp.valid,
            stats[Need.QUERIES],
            inp.query_positions,
            inp.query_valid,
            inp.rope,
            inp.scaling,
            int(self.n_future_positions),
            int(self.n_sink),
            bool(self.use_covariance),
            bool(self.use_vnorm),
            float(self.epsilon),
        )
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)

    def _select(self, scores: F32, budget: int, **inputs: Any) -> Selection:
        return select_topk(scores, budget)
