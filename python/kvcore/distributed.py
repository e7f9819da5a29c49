"""Tensor-parallel consistency: one compression decision for kv heads split across ranks.

Under tensor parallelism each rank holds a contiguous slice of a model's kv heads (the column
split of ``k_proj`` / ``v_proj``)::

    num_kv_heads = 8, group of 4 ranks, local = 8 / 4 = 2 heads per rank
    heads   0 1 | 2 3 | 4 5 | 6 7
    rank      0 |   1 |   2 |   3        rank r holds heads [r * local, (r + 1) * local)

A policy whose heads share one decision (``couples_heads``: Ada-KV splits a layer's budget
among all its heads, TOVA averages them) must see every head's scores, and an engine that
shares one block table across heads needs one keep set for all heads on all ranks.
:func:`shard` wraps a policy for one rank: the cache (or a caller of ``select``) gives it the
rank's heads only, and it

* gathers what the decision needs with ``torch.distributed.all_gather``: the rank's
  ``(B, local, T)`` float32 scores (invalid tokens carried as NaN) and ``(B, local)`` budgets,
  after a small header that checks every rank is at the same compression;
* runs the policy's own Rust selection on the gathered heads, so every rank computes the same
  decision from the same bytes, equal to one process on the unsplit heads;
* keeps its own heads' rows, and, with ``check=True``, compares an 8-byte digest of the whole
  decision across ranks (a mismatch raises on every rank).

Scores are gathered, not all-reduced: a reduction sums in the library's order, which need not
be one process's order, and a one-ulp difference can flip a tie in the top-k.

Policies whose heads decide alone (SnapKV, H2O, K-norm, ...) need no communication: each rank
selects its own heads and gets what one process would (``shared_keep=False``). Policies that
take per-token or per-head inputs computed from one rank's heads (``select_inputs``:
InfiniPot's novelty, RazorAttention's head map) are refused.

Every rank must call at the same points (the cache does: every rank runs the same schedule on
the same tokens). A rank that never arrives is bounded by the group's timeout
(``init_process_group(timeout=...)``).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from kvcore import _kvcore as _k
from kvcore.policies.base import Policy, Selection, counts
from kvcore.policies.keep import LayerScores, layer_scores, select_mask
from kvcore.policies.params import F32, scores3

if TYPE_CHECKING:
    from kvcore.statistics import ScoreInputs

__all__ = ["Sharding", "shard", "shared_keep_mask"]

# Header kinds: a rank at a cache compression and one at a numpy select never pair up.
_KEEP, _SELECT = 1, 2


@dataclass(frozen=True)
class Sharding:
    """Where one rank stands in a tensor-parallel group.

    Attributes:
        group: the ``torch.distributed`` process group (gloo on the CPU, NCCL on GPUs).
        rank: this rank in ``group``.
        size: ranks in ``group``.
        num_kv_heads: the model's kv heads, all ranks together.
        shared_keep: every head of a sequence keeps the same tokens (one keep set per layer).
        check: compare a digest of every decision across ranks.
        couples_heads: the policy's heads share one decision.
    """

    group: Any
    rank: int
    size: int
    num_kv_heads: int
    shared_keep: bool
    check: bool
    couples_heads: bool

    @property
    def local_heads(self) -> int:
        return self.num_kv_heads // self.size

    @property
    def heads(self) -> slice:
        """This rank's kv heads in the model's head order."""
        return slice(self.rank * self.local_heads, (self.rank + 1) * self.local_heads)

    @property
    def gathers(self) -> bool:
        """Whether a decision needs the other ranks' scores."""
        return self.shared_keep or self.couples_heads


def shard(
    policy: Policy,
    group: Any = None,
    *,
    num_kv_heads: int,
    shared_keep: bool = False,
    check: bool = True,
) -> Policy:
    """The policy of one tensor-parallel rank, for a cache that holds the rank's kv heads.

    ``policy`` is configured for the whole model (a per-head budget tensor is
    ``(num_layers, num_kv_heads)``); the result is a copy that a :class:`kvcore.KVCache` of
    ``num_kv_heads // group size`` heads takes as its policy, and whose :meth:`select` takes
    the rank's ``(num_layers, local_heads, n)`` scores and returns the rank's rows::

        dist.init_process_group("gloo", ..., timeout=datetime.timedelta(seconds=60))
        policy = kvcore.distributed.shard(kvcore.policies.get("adakv", budget=256),
                                          num_kv_heads=8)
        cache = kvcore.KVCache(num_layers, 8 // dist.get_world_size(), head_dim,
                               policy=policy, capacity=...)

    Args:
        policy: a :class:`kvcore.policies.Policy` (not already sharded).
        group: the tensor-parallel process group; None: the default group.
        num_kv_heads: the model's kv heads, all ranks together; rank ``r`` holds heads
            ``[r * local, (r + 1) * local)`` with ``local = num_kv_heads // size``.
        shared_keep: one keep set per layer for every head of a sequence, on every rank (an
            engine whose block table is shared by heads): the heads' scores are averaged
            (the Rust ``tova_scores``) and the policy selects on that one row.
        check: all-gather an 8-byte digest of every gathered decision and raise RuntimeError
            on every rank when they differ.

    Returns:
        A copy of ``policy`` (still an instance of its class) that decides with the group.

    Raises:
        TypeError: ``policy`` is not a Policy, or is already sharded; ``num_kv_heads`` not
            an int.
        ValueError: ``num_kv_heads`` < 1 or not divisible by the group size; a policy whose
            ``select_inputs`` are computed from one rank's heads; ``shared_keep`` with a
            policy that folds dropped tokens.
        RuntimeError: ``torch.distributed`` is not initialized.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"shard: policy must be a kvcore.policies.Policy, got {policy!r}")
    if isinstance(policy, _Sharded):
        raise TypeError(f"shard: {policy.name} is already sharded")
    if not isinstance(num_kv_heads, int) or isinstance(num_kv_heads, bool):
        raise TypeError(f"shard: num_kv_heads must be an int, got {num_kv_heads!r}")
    if num_kv_heads < 1:
        raise ValueError(f"shard: num_kv_heads must be >= 1, got {num_kv_heads}")
    if type(policy).select_inputs is not Policy.select_inputs:
        raise ValueError(
            f"shard: {policy.name} takes select inputs computed from the heads one rank "
            "holds (select_inputs); kvcore.distributed gathers scores and budgets only"
        )
    if shared_keep and policy.folds_dropped:
        raise ValueError(
            f"shard: {policy.name} folds each head's dropped tokens into its own slot; "
            "shared_keep=True needs one keep set for all heads"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "shard: torch.distributed is not initialized: call "
            "torch.distributed.init_process_group first"
        )
    size = dist.get_world_size(group)
    if num_kv_heads % size:
        raise ValueError(
            f"shard: num_kv_heads={num_kv_heads} is not divisible by the tensor-parallel "
            f"group size {size}"
        )
    sharding = Sharding(
        group=group,
        rank=dist.get_rank(group),
        size=size,
        num_kv_heads=num_kv_heads,
        shared_keep=bool(shared_keep),
        check=bool(check),
        couples_heads=type(policy).couples_heads,
    )
    out = copy.copy(policy)
    out.__class__ = _sharded_class(type(policy))
    out.__dict__["sharding"] = sharding
    out.__dict__["unsharded"] = policy
    return out


# ---------------------------------------------------------------------- the sharded policy


class _Sharded(Policy):
    """Overrides the cache-facing methods that depend on the head split; everything else
    (needs, statistics, schedule hints) is the wrapped policy's class."""

    sharding: Sharding
    unsharded: Policy

    def __repr__(self) -> str:
        s = self.sharding
        return (
            f"kvcore.distributed.shard({self.unsharded!r}, num_kv_heads={s.num_kv_heads}, "
            f"shared_keep={s.shared_keep}, check={s.check})  # rank {s.rank} of {s.size}"
        )

    def _check_local(self, num_heads: int) -> None:
        s = self.sharding
        if num_heads != s.local_heads:
            raise ValueError(
                f"{self.name}: this rank holds {s.local_heads} of {s.num_kv_heads} kv heads "
                f"(group size {s.size}), got {num_heads}"
            )

    def check_shape(self, num_layers: int, num_heads: int) -> None:
        self._check_local(num_heads)
        self.unsharded.check_shape(num_layers, self.sharding.num_kv_heads)

    def head_budgets(self, layer_idx: int, num_heads: int) -> torch.Tensor:
        self._check_local(num_heads)
        full = self.unsharded.head_budgets(layer_idx, self.sharding.num_kv_heads)
        return full[self.sharding.heads].clone()

    def keep(
        self, inp: ScoreInputs, budgets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s, pol = self.sharding, self.unsharded
        self._check_local(int(inp.valid.shape[1]))
        if not s.gathers:
            return pol.keep(inp, budgets)  # heads decide alone: the rank's own are enough
        from kvcore import statistics

        scores = layer_scores(pol, statistics.compute(pol, inp))
        valid = inp.valid.cpu()
        b, h, t = valid.shape
        headers = _gather(s, _header(s, _KEEP, inp.layer_idx, b, h, t))
        _check_headers(s, headers, what="compression", same_tokens=False)
        t_max = int(max(int(x[-1]) for x in headers))
        # Invalid tokens travel as NaN (the scores are finite), padded to the longest rank.
        local = torch.full((b, h, t_max), float("nan"), dtype=torch.float32)
        local[:, :, :t] = scores.masked_fill(~valid, float("nan"))
        everyone = torch.cat(_gather(s, local), dim=1)
        all_budgets = torch.cat(_gather(s, budgets.to(torch.int64).cpu()), dim=1)
        keep, comp = _decide_keep(s, pol, everyone, all_budgets, inp.layer_idx, inp.num_layers)
        if s.check:
            _check_digest(s, keep, f"layer {inp.layer_idx}")
        mine = keep[:, s.heads, :t]
        return mine.to(inp.valid.device), None if comp is None else comp[:, s.heads]

    def select(self, scores: F32, budget: int | None = None, **inputs: Any) -> Selection:
        """:meth:`Policy.select` on this rank's ``(num_layers, local_heads, n)`` float32
        scores; the returned CSR has this rank's rows (``layer * local_heads + head``) of
        the decision over every rank's heads."""
        s, pol = self.sharding, self.unsharded
        local = scores3(scores)
        L, h, n = local.shape
        self._check_local(h)
        if not s.gathers:
            return pol.select(local, budget, **inputs)
        pol._check_inputs(inputs)
        pol._budget(budget)  # refused on every rank alike, before any collective
        headers = _gather(s, _header(s, _SELECT, L, 1, h, n))
        _check_headers(s, headers, what="select call", same_tokens=True)
        everyone = torch.cat(_gather(s, torch.from_numpy(np.ascontiguousarray(local))), dim=1)
        full = everyone.numpy()
        if s.shared_keep:
            agg = _k.tova_scores(full)[:, None, :]  # (L, 1, n): every head's mean
            one = pol.select(np.ascontiguousarray(agg), budget, **inputs)
            rows = np.repeat(np.arange(L, dtype=np.int64), s.num_kv_heads)
            sel = _rows(one, rows)
        else:
            sel = pol.select(full, budget, **inputs)
        if s.check:
            _check_digest(
                s, torch.from_numpy(np.concatenate([sel.indptr, sel.positions])), "a select"
            )
        heads = np.arange(s.num_kv_heads)[s.heads]
        return _rows(sel, (np.arange(L)[:, None] * s.num_kv_heads + heads[None, :]).ravel())


_CLASSES: dict[type[Policy], type[Policy]] = {}


def _sharded_class(cls: type[Policy]) -> type[Policy]:
    """``cls`` with the sharded overrides in front (one class per policy class), so the
    result is still an instance of the user's policy class."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Sharded{cls.__name__}", (_Sharded, cls), {})
    return _CLASSES[cls]


# ---------------------------------------------------------------------- decisions


def _decide_keep(
    s: Sharding,
    policy: Policy,
    scores: torch.Tensor,
    budgets: torch.Tensor,
    layer: int,
    num_layers: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decision over every head: ``scores`` ``(B, H, T)`` float32 with NaN for tokens a
    head does not hold, ``budgets`` ``(B, H)`` int64. Identical inputs on every rank."""
    grid = LayerScores(
        torch.nan_to_num(scores, nan=0.0), ~torch.isnan(scores), budgets, layer, num_layers
    )
    if s.shared_keep:
        return shared_keep_mask(policy, grid), None
    return select_mask(policy, grid, lambda group: {})


def shared_keep_mask(policy: Policy, grid: LayerScores) -> torch.Tensor:
    """One keep set per sequence for all its heads: the heads' scores averaged by the Rust
    ``tova_scores``, then the policy's own selection on that one row with the heads' budget.

    Args:
        policy: the policy whose selection decides (not sharded).
        grid: the layer's scores; every head of a sequence must hold the same tokens, and
            with per-head budgets have the same budget.

    Returns:
        ``(B, H, T)`` bool, the same tokens for every head of a sequence.

    Raises:
        ValueError: heads of a sequence hold different tokens, or have different budgets.
    """
    scores, valid, budgets, layer = grid.scores, grid.valid, grid.budgets, grid.layer
    b, h, t = valid.shape
    keep = torch.zeros(b, h, t, dtype=torch.bool)
    for i in range(b):
        if bool((valid[i] != valid[i, :1]).any()):
            raise ValueError(
                f"{policy.name}: a keep set shared by heads needs every head of a sequence to "
                f"hold the same tokens; sequence {i} has heads of lengths "
                f"{valid[i].sum(-1).tolist()}"
            )
        budget: int | None = None
        if policy.has_head_budgets:
            if bool((budgets[i] != budgets[i, :1]).any()):
                raise ValueError(
                    f"{policy.name}: a keep set shared by heads needs one budget for the "
                    f"heads of layer {layer}, got {budgets[i].tolist()}"
                )
            budget = int(budgets[i, 0])
        idx = torch.nonzero(valid[i, 0], as_tuple=True)[0]
        rows = np.zeros((grid.num_layers, 1, len(idx)), np.float32)
        rows[layer, 0] = _k.tova_scores(np.ascontiguousarray(scores[i][None, :, idx].numpy()))[0]
        sel = policy.select(rows, budget=budget)
        pos = sel.positions[sel.indptr[layer] : sel.indptr[layer + 1]]
        keep[i, :, idx[torch.from_numpy(pos)]] = True
    return keep


def _rows(sel: Selection, rows: np.ndarray) -> Selection:
    """The CSR of ``sel``'s rows ``rows`` (int64, in order; a row may repeat)."""
    n = counts(sel.indptr)[rows]
    indptr = np.zeros(len(rows) + 1, np.int64)
    indptr[1:] = np.cumsum(n)
    parts = [sel.positions[sel.indptr[r] : sel.indptr[r + 1]] for r in rows.tolist()]
    positions = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    dropped = None if sel.num_dropped is None else sel.num_dropped[rows]
    return Selection(indptr, positions, sel.budgets[rows], dropped)


# ---------------------------------------------------------------------- collectives


def _device(group: Any) -> torch.device:
    """Where the group's collectives take their tensors (NCCL: the current CUDA device)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(s: Sharding, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on every rank), in rank order, on CPU."""
    t = tensor.contiguous().to(_device(s.group))
    out = [torch.empty_like(t) for _ in range(s.size)]
    dist.all_gather(out, t, group=s.group)
    return [o.cpu() for o in out]


def _header(s: Sharding, kind: int, layer: int, batch: int, heads: int, n: int) -> torch.Tensor:
    """What every rank must agree on before the payload is gathered, the tokens last."""
    return torch.tensor(
        [kind, layer, batch, heads, s.num_kv_heads, int(s.shared_keep), int(s.check), n]
    )


_HEADER = "[kind, layer, batch, local heads, num_kv_heads, shared_keep, check, tokens]"


def _check_headers(s: Sharding, headers: list[torch.Tensor], what: str, same_tokens: bool) -> None:
    """Every rank at the same call, with the same batch, heads and sharding arguments
    (tokens may differ for a cache, whose heads can be ragged); raises on every rank alike."""
    rows = [x.tolist() for x in headers]
    key = [r if same_tokens else r[:-1] for r in rows]
    if any(k != key[0] for k in key):
        raise ValueError(
            f"kvcore.distributed: the ranks are not at the same {what}: per rank {_HEADER} = "
            f"{rows} (kind {_KEEP}: a cache compression, {_SELECT}: a select; for a select "
            "the layer field is the number of layers)"
        )


def _check_digest(s: Sharding, decision: torch.Tensor, what: str) -> None:
    """Raise on every rank when the ranks' decisions differ (8-byte BLAKE2b digests)."""
    raw = hashlib.blake2b(decision.contiguous().numpy().tobytes(), digest_size=8).digest()
    mine = torch.from_numpy(np.frombuffer(raw, dtype=np.int64).copy())
    digests = [int(d) for d in _gather(s, mine)]
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"kvcore.distributed: the ranks reached different decisions for {what} "
            f"(digests per rank: {[f'{d & (2**64 - 1):016x}' for d in digests]}); the "
            "gathered scores or the selection differ between ranks"
        )
