"""Tensor-parallel consistency (kvcore.distributed, docs/serving.md section 6): two gloo
processes on the CPU, each holding half of the kv heads, reach the same decisions, equal to
one process on the unsplit heads.

The two ranks run every case in one spawn (starting torch twice costs seconds); each writes
what it kept to a file and the parent compares them with one-process references computed
here by the plain policy on all heads. Collectives time out after 30 s and the parent kills
the ranks after 120 s, so a desynchronised rank fails the test instead of hanging CI.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="kvcore.distributed is built on torch.distributed")
dist = pytest.importorskip("torch.distributed", reason="needs torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("this torch build has no gloo backend", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

import kvcore  # noqa: E402
from kvcore import _kvcore as _k  # noqa: E402
from kvcore import distributed as kd  # noqa: E402
from kvcore import policies as P  # noqa: E402
from kvcore.cache import KVCache  # noqa: E402
from kvcore.policies.keep import LayerScores  # noqa: E402

L, H, HQ, D, BS, N, W = 2, 4, 8, 8, 4, 24, 4  # layers, kv heads, query heads, ...
RANKS = 2
HL = H // RANKS
BUDGET = 6
HEAD_BUDGETS = torch.tensor([[3, 5, 7, 9], [9, 3, 4, 6]])

# The cache cases: name -> (policy params, whether it is sharded with shared_keep).
CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "adakv": ({"window": 2}, False),  # couples heads: gathered
    "tova": ({}, False),  # couples heads: gathered
    "snapkv": ({"window": 2, "kernel": 3}, False),  # heads decide alone: no collective
    "snapkv_shared": ({"window": 2, "kernel": 3}, True),  # one keep set for every head
}


def _policy(case: str, budget: Any = BUDGET) -> P.Policy:
    params, _ = CASES[case]
    return kvcore.scoring.get(case.removesuffix("_shared"), budget, **params)


B, PAD, TURNS = 2, 3, (24, 8)  # sequences, left padding of the second, tokens per turn

# Kept positions: per turn, per layer, per row ``b * heads + head``.
Kept = list[list[list[list[int]]]]


def _inputs(seed: int = 5) -> list[list[tuple[torch.Tensor, ...]]]:
    """Per turn and layer: keys, values ``(B, H, n, D)`` and queries ``(B, HQ, W, D)``."""
    g = torch.Generator().manual_seed(seed)
    return [
        [
            tuple(
                torch.randn(B, heads, m, D, generator=g) for heads, m in ((H, n), (H, n), (HQ, W))
            )
            for _ in range(L)
        ]
        for n in TURNS
    ]


def kept_positions(c: KVCache, layer: int) -> list[list[int]]:
    """Stored positions of each stream of ``layer`` (row ``b * heads + head``)."""
    _, slots, lens = c.page_table(layer, "vllm")
    pos = c.slot_pos[torch.from_numpy(slots.astype(np.int64))].tolist()
    ends = np.cumsum(lens).tolist()
    return [pos[e - n : e] for e, n in zip(ends, lens.tolist(), strict=True)]


def run_cache(policy: P.Policy, heads: slice) -> Kept:
    """Two turns (a prefill with the second sequence left-padded, then a new turn, which
    compresses again: by then Ada-KV's heads are ragged) over ``heads`` of the inputs."""
    nh = heads.stop - heads.start
    c = KVCache(L, nh, D, block_size=BS, capacity=96, policy=policy)
    qs = slice(heads.start * HQ // H, heads.stop * HQ // H)
    kept = []
    for turn, steps in enumerate(_inputs()):
        valid = torch.ones(B, TURNS[turn], dtype=torch.bool)
        if turn == 0:
            valid[1, :PAD] = False
        for layer, (k, v, q) in enumerate(steps):
            c.observe(layer, q[:, qs].contiguous())
            c.update(layer, k[:, heads].contiguous(), v[:, heads].contiguous(), valid)
        kept.append([kept_positions(c, layer) for layer in range(L)])
    assert c.num_compressions == L * len(TURNS)
    return kept


def _select_scores(seed: int = 9) -> np.ndarray:
    g = np.random.default_rng(seed)
    return g.random((L, H, 20), dtype=np.float32)


def _select_policy(name: str) -> P.Policy:
    return P.get(name, budget=5, **({"window": 2} if name == "adakv" else {}))


def _rows(sel: P.Selection) -> list[list[int]]:
    ptr, pos = sel.indptr, sel.positions
    return [pos[ptr[r] : ptr[r + 1]].tolist() for r in range(len(ptr) - 1)]


# ---------------------------------------------------------------------- the ranks


def _rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=RANKS,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        res: dict[str, Any] = {}
        mine = slice(rank * HL, (rank + 1) * HL)
        for case, (_, shared) in CASES.items():
            pol = kd.shard(_policy(case), num_kv_heads=H, shared_keep=shared)
            res[case] = run_cache(pol, mine)
        # Per-head budgets (L, H) of the whole model: each rank reads its own heads' budgets.
        pol = kd.shard(_policy("snapkv", HEAD_BUDGETS), num_kv_heads=H)
        res["snapkv_head_budgets"] = run_cache(pol, mine)

        # The unsplit shared keep set, through a group of one rank (rank 0 only).
        solo = [dist.new_group([0]), dist.new_group([1])]
        if rank == 0:
            pol = kd.shard(_policy("snapkv_shared"), solo[0], num_kv_heads=H, shared_keep=True)
            res["snapkv_shared_unsplit"] = run_cache(pol, slice(0, H))

        # numpy select on the rank's (L, HL, n) scores.
        local = np.ascontiguousarray(_select_scores()[:, mine])
        for name, shared in (("adakv", False), ("tova", False), ("adakv", True)):
            pol = kd.shard(_select_policy(name), num_kv_heads=H, shared_keep=shared)
            res[f"select_{name}_{shared}"] = _rows(pol.select(local))

        # Errors, raised alike on both ranks (no rank is left waiting in a collective).
        with pytest.raises(ValueError, match=r"num_kv_heads=3 is not divisible by the "):
            kd.shard(_policy("adakv"), num_kv_heads=3)
        with pytest.raises(ValueError, match=r"this rank holds 2 of 4 kv heads \(group size 2\)"):
            KVCache(L, H, D, capacity=64, policy=kd.shard(_policy("adakv"), num_kv_heads=H))
        pol = kd.shard(_select_policy("adakv"), num_kv_heads=H)
        ragged = np.ascontiguousarray(_select_scores()[:, mine, : 10 + 2 * rank])
        with pytest.raises(ValueError, match=r"the ranks are not at the same select call: "):
            pol.select(ragged)
        differs = kd.shard(_select_policy("adakv"), num_kv_heads=H, check=rank == 0)
        with pytest.raises(
            ValueError, match=r"shared_keep, check, tokens\] = \[\[2, 2, 1, 2, 4, 0, 1"
        ):
            differs.select(local)
        with pytest.raises(ValueError, match=r"adakv: this rank holds 2 of 4 kv heads"):
            pol.select(_select_scores())  # every head, not the rank's
        # A rank whose gathered scores differ (a fault after the gather): the digest check
        # raises on both ranks.
        if rank == 1:
            decide = kd._decide_keep

            def faulty(s: Any, policy: Any, scores: torch.Tensor, *a: Any) -> Any:
                return decide(s, policy, scores.flip(-1).contiguous(), *a)

            kd._decide_keep = faulty  # type: ignore[assignment]
        with pytest.raises(RuntimeError, match=r"ranks reached different decisions for layer 0"):
            run_cache(kd.shard(_policy("adakv"), num_kv_heads=H), mine)
        res["done"] = True
        torch.save(res, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("tp")
    ctx = mp.start_processes(
        _rank, args=(str(tmp / "store"), str(tmp)), nprocs=RANKS, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish within 120 s")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(RANKS)]


def _rank_rows(r: int) -> list[int]:
    return [b * H + r * HL + j for b in range(B) for j in range(HL)]


def _split(full: Kept) -> list[Kept]:
    """Each rank's rows of a one-process result over every head."""
    return [
        [[[layer[row] for row in _rank_rows(r)] for layer in turn] for turn in full]
        for r in range(RANKS)
    ]


# ---------------------------------------------------------------------- the checks


@pytest.mark.parametrize("case", ["adakv", "tova", "snapkv"])
def test_ranks_keep_what_one_process_keeps(ranks, case):
    """Each rank's heads keep what one process with every head and the plain policy keeps."""
    reference = run_cache(_policy(case), slice(0, H))
    assert [ranks[r][case] for r in range(RANKS)] == _split(reference)


def test_adakv_budget_split_needs_the_other_ranks_scores():
    """The case can fail: Ada-KV decided by each rank alone over its own heads keeps other
    tokens (its budget split is over all heads of the layer), the split is uneven, and after
    the first turn the two ranks' longest heads differ (the gather pads to the longest)."""
    reference = run_cache(_policy("adakv"), slice(0, H))
    alone = [run_cache(_policy("adakv"), slice(r * HL, (r + 1) * HL)) for r in range(RANKS)]
    assert alone != _split(reference)
    first = reference[0]
    assert any(len(row) != BUDGET for layer in first for row in layer)
    longest = [
        [max(len(layer[row]) for row in _rank_rows(r)) for r in range(RANKS)] for layer in first
    ]
    assert any(a != b for a, b in longest), longest


def test_per_head_budget_tensor_is_split_with_the_heads(ranks):
    reference = run_cache(_policy("snapkv", HEAD_BUDGETS), slice(0, H))
    assert [ranks[r]["snapkv_head_budgets"] for r in range(RANKS)] == _split(reference)
    for turn in reference:
        assert [[len(row) for row in layer] for layer in turn] == [
            budgets * B for budgets in HEAD_BUDGETS.tolist()
        ]


def test_shared_keep_set_is_one_token_set_on_every_rank(ranks):
    """Every head on both ranks keeps the same positions, equal to the unsplit shared set."""
    unsplit = ranks[0]["snapkv_shared_unsplit"]
    assert [ranks[r]["snapkv_shared"] for r in range(RANKS)] == _split(unsplit)
    for turn in unsplit:
        for layer in turn:
            for b in range(B):
                rows = layer[b * H : (b + 1) * H]
                assert len(rows[0]) == BUDGET and all(row == rows[0] for row in rows)
    # Not what every head keeps on its own: the set is decided from every head's scores.
    own = run_cache(_policy("snapkv"), slice(0, H))
    assert own != unsplit


@pytest.mark.parametrize(("name", "shared"), [("adakv", False), ("tova", False), ("adakv", True)])
def test_select_on_a_ranks_scores_returns_its_rows_of_the_whole_decision(ranks, name, shared):
    full = _select_scores()
    pol = _select_policy(name)
    if shared:
        one = pol.select(np.ascontiguousarray(_k.tova_scores(full)[:, None, :]))
        expected = [_rows(one)[layer] for layer in range(L) for _ in range(H)]
    else:
        expected = _rows(pol.select(full))
    got = [ranks[r][f"select_{name}_{shared}"] for r in range(RANKS)]
    assert got == [
        [expected[layer * H + h] for layer in range(L) for h in range(r * HL, (r + 1) * HL)]
        for r in range(RANKS)
    ]


def test_both_ranks_finished_every_error_case(ranks):
    assert all(r["done"] for r in ranks)


# ---------------------------------------------------------------------- one process


def test_shared_keep_mask_is_the_policys_selection_on_the_head_mean():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(2, H, 12, generator=g)
    valid = torch.ones(2, H, 12, dtype=torch.bool)
    valid[1, :, :3] = False  # left padding of the second sequence
    pol = P.get("snapkv", budget=4, window=1, kernel=1)
    keep = kd.shared_keep_mask(pol, LayerScores(scores, valid, torch.full((2, H), 4), 1, 2))
    for i, lo in ((0, 0), (1, 3)):
        mean = scores[i, :, lo:].double().mean(0).float().numpy()
        rows = np.zeros((2, 1, 12 - lo), np.float32)
        rows[1, 0] = mean
        sel = pol.select(rows)
        want = torch.zeros(12, dtype=torch.bool)
        want[lo + torch.tensor(_rows(sel)[1], dtype=torch.long)] = True
        assert torch.equal(keep[i], want[None].expand(H, 12))
    valid[0, 1, 0] = False
    with pytest.raises(ValueError, match=r"every head of a sequence to hold the same tokens"):
        kd.shared_keep_mask(pol, LayerScores(scores, valid, torch.full((2, H), 4), 1, 2))


def test_shard_refuses_bad_input_before_touching_torch_distributed():
    with pytest.raises(TypeError, match=r"policy must be a kvcore.policies.Policy, got 'adakv'"):
        kd.shard("adakv", num_kv_heads=4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"num_kv_heads must be an int, got 4.0"):
        kd.shard(_select_policy("adakv"), num_kv_heads=4.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_kv_heads must be >= 1, got 0"):
        kd.shard(_select_policy("adakv"), num_kv_heads=0)
    for name in ("infinipot", "razor"):
        with pytest.raises(ValueError, match=rf"{name} takes select inputs computed from"):
            kd.shard(P.get(name, budget=8), num_kv_heads=4)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match=r"torch.distributed is not initialized"):
            kd.shard(_select_policy("adakv"), num_kv_heads=4)
