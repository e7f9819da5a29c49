"""One request's compression under continuous batching: the policy's scores averaged over
layers and kv heads into one keep set, the table compacted, the emptied blocks freed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from kvcore import _kvcore as _k
from kvcore import statistics

if TYPE_CHECKING:
    from transformers.generation.continuous_batching.requests import RequestState

    from kvcore.serving.paged import KVCorePagedCache, _Request


def layer_mean_scores(cache: KVCorePagedCache, r: _Request, slots: torch.Tensor) -> torch.Tensor:
    policy = cache.settings.policy
    assert policy is not None
    n = len(slots)
    h = cache.num_kv_heads
    total = torch.zeros(n, dtype=torch.float32)
    positions = torch.arange(n, device=cache.device).expand(1, h, n)
    for layer in range(cache.num_layers):
        keys = cache.read(layer, "k", slots).transpose(0, 1).unsqueeze(0)
        q = r.queries[layer]
        queries = qpos = None
        if q is not None:
            queries = q.unsqueeze(0)
            qpos = torch.arange(n - q.shape[1], n, device=cache.device)
        inp = statistics.ScoreInputs(
            layer_idx=layer,
            keys=keys,
            valid=torch.ones(1, h, n, dtype=torch.bool, device=cache.device),
            positions=positions,
            accumulated=torch.zeros(1, h, n, device=cache.device),
            queries=queries,
            query_positions=qpos,
            query_valid=None,
            scaling=cache.scaling,
            num_layers=cache.num_layers,
        )
        s = torch.as_tensor(policy.scores_from(statistics.compute(policy, inp)))
        total += s[0].float().mean(0).cpu()
    return total / cache.num_layers


def compress(cache: KVCorePagedCache, r: _Request, state: RequestState) -> None:
    policy = cache.settings.policy
    assert policy is not None
    n = cache.allocator.num_tokens(r.table)
    lo = r.adopted  # shared prefix blocks: evicting from them frees nothing
    r.last_compressed_at = state.generated_len()
    if n - lo <= cache.settings.budget:
        return
    slots = torch.as_tensor(cache.allocator.slot_mapping(r.table), device=cache.device)
    scores = layer_mean_scores(cache, r, slots)[lo:].numpy()
    sel = policy.select(scores.reshape(1, 1, -1), budget=cache.settings.budget)
    keep = np.concatenate([np.arange(lo, dtype=np.int64), sel.positions + lo])
    used = cache.allocator.num_used_blocks
    try:
        src, dst = cache.allocator.compact(r.table, keep)
    except _k.OutOfBlocksError:
        cache._counters["compressions_skipped"] += 1
        return
    if len(src):
        s = torch.as_tensor(src, device=cache.device)
        d = torch.as_tensor(dst, device=cache.device)
        cache.move(s, d)
    evicted = n - len(keep)
    r.delta += evicted
    r.compressed = True
    state.position_offset = len(keep)
    cache._counters["compressions"] += 1
    cache._counters["tokens_evicted"] += evicted
    cache._counters["blocks_freed"] += max(0, used - cache.allocator.num_used_blocks)
