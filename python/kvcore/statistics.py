"""The statistics a policy declares, computed from the cache's stored state.

A policy lists what it scores from in ``policy.needs`` (:class:`kvcore.policies.Need`).
:func:`compute` looks each need up in :data:`STATISTICS`, a map from need to the function
that computes it from one layer's :class:`ScoreInputs`; a policy may bring its own function
for a need (:meth:`kvcore.policies.Policy.providers`, e.g. Locret's ``score_fn``). A need
with no function is an error at :class:`kvcore.KVCache` construction (:func:`check_needs`),
never a silent zero score.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kvcore.policies.base import Need, Policy

__all__ = [
    "STATISTICS",
    "Provider",
    "ScoreInputs",
    "Statistics",
    "check_needs",
    "compute",
    "head_novelty",
    "key_novelty",
    "window_attention",
    "window_probs",
]


@dataclass
class ScoreInputs:
    """One layer's stored tokens, padded to the longest stream.

    Attributes:
        layer_idx: the layer.
        keys: ``(B, H, T, D)`` stored (rotated) keys.
        valid: ``(B, H, T)`` bool, False past a stream's length and for padding tokens.
        positions: ``(B, H, T)`` int64 sequence index of each token (causality).
        accumulated: ``(B, H, T)`` float32 per-slot score state (H2O's accumulated attention).
        queries: ``(B, Hq, w, D)`` observed queries of the last step, or None.
        query_positions: ``(w,)`` int64 sequence index of each observed query.
        query_valid: ``(B, w)`` bool, False for padding queries.
        scaling: the attention softmax scale.
        num_layers: layers of the cache (layer-dependent rules need it).
        values: ``(B, H, T, D)`` stored values, read only for a policy that needs them
            (None otherwise).
        rope: ``(R / 2,)`` the layer's RoPE ``inv_freq`` when the cache has them, else None.
    """

    layer_idx: int
    keys: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    accumulated: torch.Tensor
    queries: torch.Tensor | None
    query_positions: torch.Tensor | None
    query_valid: torch.Tensor | None
    scaling: float
    num_layers: int = 1
    values: torch.Tensor | None = None
    rope: torch.Tensor | None = None


Provider = Callable[[ScoreInputs], Any]


def window_probs(inp: ScoreInputs) -> torch.Tensor:
    """Softmax probabilities of the observed queries over the stored keys.

    Returns:
        ``(B, Hq, w, T)`` float32; zero where a query does not see the key (causality,
        padding); rows with no visible key are all zero.
    """
    if inp.queries is None or inp.query_positions is None:
        raise ValueError("this policy needs observed queries: call cache.observe(...) first")
    q = inp.queries.float()
    h = inp.keys.shape[1]
    group = q.shape[1] // h
    keys = inp.keys.float().repeat_interleave(group, dim=1)
    logits = torch.matmul(q, keys.transpose(2, 3)) * inp.scaling  # (B, Hq, w, T)
    visible = inp.valid[:, :, None, :] & (
        inp.positions[:, :, None, :] <= inp.query_positions[None, None, :, None]
    )
    if inp.query_valid is not None:
        visible = visible & inp.query_valid[:, None, :, None]
    visible = visible.repeat_interleave(group, dim=1)
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def window_attention(inp: ScoreInputs) -> torch.Tensor:
    """Attention probabilities of the observed queries, summed over queries and averaged over
    each GQA group.

    Returns:
        ``(B, H, T)`` float32; zeros where no observed query sees the key.
    """
    probs = window_probs(inp).sum(dim=2)  # (B, Hq, T)
    b, hq, _ = probs.shape
    h = inp.keys.shape[1]
    return probs.reshape(b, h, hq // h, -1).mean(dim=2)


def key_novelty(inp: ScoreInputs) -> torch.Tensor:
    """InfiniPot's novelty stand-in, one value per token shared by the heads: ``1 - cos``
    between a key and the mean valid key of its head, averaged over heads.

    Returns:
        ``(B, T)`` float32 (0 for invalid tokens).
    """
    k = inp.keys.float()
    m = inp.valid[..., None].float()
    mean = (k * m).sum(2, keepdim=True) / m.sum(2, keepdim=True).clamp(min=1.0)
    cos = F.cosine_similarity(k, mean.expand_as(k), dim=-1)
    nov = ((1.0 - cos) * inp.valid).sum(1) / inp.valid.sum(1).clamp(min=1)
    return nov.float()


def head_novelty(keys: torch.Tensor) -> torch.Tensor:
    """The novelty of one head's own keys ``(n, D)``: ``1 - cos`` with their mean, ``(n,)``
    float32 on the CPU (InfiniPot's heads of different lengths select alone with it)."""
    k = keys.float()
    cos = F.cosine_similarity(k, k.mean(0, keepdim=True).expand_as(k), dim=-1)
    return (1.0 - cos).cpu()


def _accumulated(inp: ScoreInputs) -> torch.Tensor:
    return inp.accumulated


def _keys(inp: ScoreInputs) -> torch.Tensor:
    return inp.keys


def _values(inp: ScoreInputs) -> torch.Tensor:
    if inp.values is None:
        raise ValueError("the stored values were not read for this layer's statistics")
    return inp.values


def _queries(inp: ScoreInputs) -> torch.Tensor:
    if inp.queries is None:
        raise ValueError("this policy needs observed queries: call cache.observe(...) first")
    return inp.queries


#: The cache's provider of each need. ``Need.EXTERNAL_SCORES`` has none on purpose: such
#: scores come from outside (the policy's :meth:`~kvcore.policies.Policy.providers`).
STATISTICS: dict[Need, Provider] = {
    Need.WINDOW_PROBS: window_probs,
    Need.QUERY_ATTENTION: window_attention,
    Need.ACCUMULATED: _accumulated,
    Need.KEYS: _keys,
    Need.VALUES: _values,
    Need.QUERIES: _queries,
    Need.NOVELTY: key_novelty,
}


def _shape(need: Need, inp: ScoreInputs) -> tuple[int, ...]:
    b, h, t = inp.valid.shape
    if need is Need.WINDOW_PROBS:
        assert inp.queries is not None  # window_probs refused a step without queries
        return (b, inp.queries.shape[1], inp.queries.shape[2], t)
    if need in (Need.KEYS, Need.VALUES):
        return (b, h, t, inp.keys.shape[3])
    if need is Need.QUERIES:
        assert inp.queries is not None  # _queries refused a step without queries
        return tuple(inp.queries.shape)
    if need is Need.NOVELTY:
        return (b, t)
    return (b, h, t)


@dataclass(frozen=True)
class Statistics:
    """The statistics of one layer that a policy declared, by need.

    Attributes:
        inputs: the layer's stored state they were computed from.
        values: one tensor per declared need (shapes: :class:`kvcore.policies.Need`).
    """

    inputs: ScoreInputs
    values: Mapping[Need, torch.Tensor]

    def __getitem__(self, need: Need) -> torch.Tensor:
        if need not in self.values:
            raise KeyError(
                f"the {need.value!r} statistic was not computed: add Need.{need.name} "
                "to the policy's needs"
            )
        return self.values[need]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, H, T)``: sequences, kv heads, stored tokens of the layer."""
        b, h, t = self.inputs.valid.shape
        return int(b), int(h), int(t)


def _providers(policy: Policy) -> dict[Need, Provider]:
    own = policy.providers()
    for need, fn in own.items():
        if not isinstance(need, Need) or not callable(fn):
            raise TypeError(
                f"{policy.name}: providers() must map kvcore.policies.Need to a callable, "
                f"got {need!r}: {fn!r}"
            )
    return {**STATISTICS, **own}


def check_needs(policy: Policy) -> None:
    """Raise when the cache cannot compute one of ``policy.needs``: TypeError for something
    that is not a :class:`~kvcore.policies.Need`, ValueError for a need without a provider."""
    needs = policy.needs
    if not isinstance(needs, frozenset):
        raise TypeError(f"{policy.name}: needs must be a frozenset of Need, got {needs!r}")
    providers = _providers(policy)
    for need in needs:
        if not isinstance(need, Need):
            raise TypeError(
                f"{policy.name}: unknown need {need!r}; valid needs: "
                f"{', '.join('Need.' + n.name for n in Need)}"
            )
        if need not in providers:
            raise ValueError(
                f"{policy.name}: the cache cannot compute the {need.value!r} statistic; "
                "the policy must provide it (providers(), e.g. locret's score_fn=)"
            )


def compute(policy: Policy, inp: ScoreInputs) -> Statistics:
    """The statistics ``policy`` declares, computed on ``inp``'s device in the order of
    :class:`~kvcore.policies.Need`.

    Raises:
        TypeError, ValueError: see :func:`check_needs`; ValueError also when a provider
            returns the wrong shape, or a query statistic has no observed queries.
    """
    check_needs(policy)
    providers = _providers(policy)
    values: dict[Need, torch.Tensor] = {}
    for need in Need:
        if need not in policy.needs:
            continue
        out = torch.as_tensor(providers[need](inp))
        want = _shape(need, inp)
        if tuple(out.shape) != want:
            raise ValueError(
                f"{policy.name}: the {need.value!r} statistic has shape "
                f"{tuple(out.shape)}, expected {want}"
            )
        values[need] = out
    return Statistics(inp, values)
