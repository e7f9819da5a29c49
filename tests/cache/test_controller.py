"""KVCache compression internals: the kernel dispatch of compaction, re-rotation and merges,
the merge methods (EMS, KVMerger, CaM) and per-head budgets for every registry policy
(tiny random shapes; the rest of the cache is in tests/cache/test_kvcache.py)."""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch cache needs torch (pip install .[torch])")

from cache_view import stream_slots  # noqa: E402

import kvcore  # noqa: E402
from kvcore import _kvcore, kernels  # noqa: E402
from kvcore.cache import KVCache, Schedule, rotate_keys  # noqa: E402
from kvcore.scoring import get  # noqa: E402

L, H, D, BS = 2, 2, 8, 4
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))


def kv(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, H, n, D, generator=g)


class Spy:
    """Wraps a kernels function, records its arguments and calls through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.fn = getattr(kernels, name)
        self.calls: list[tuple[Any, ...]] = []
        monkeypatch.setattr(kernels, name, self)

    def __call__(self, *args: Any, **kw: Any) -> Any:
        self.calls.append(args)
        return self.fn(*args, **kw)


# ------------------------------------------------------------------ 1. kernel dispatch


def test_compaction_moves_pools_and_slot_state_in_one_compact_pools_call(monkeypatch):
    spy = Spy(monkeypatch, "compact_pools")
    c = KVCache(L, H, D, block_size=BS, capacity=16, policy=get("knorm", 3, skip_layers=()))
    k, v = kv(1, 10), kv(1, 10, 1)
    for layer in range(L):
        c.update(layer, k, v)
    c.flush()
    assert c.num_compressions == L
    assert len(spy.calls) == L  # one call per compression, everything in it
    for tensors, plan_of, src, _dst, indptr, num_slots in spy.calls:
        want = [c.k_pool, c.v_pool, c.slot_pos, c.slot_valid, c.slot_score, c.slot_count]
        assert len(tensors) == len(want) and all(a is b for a, b in zip(tensors, want, strict=True))
        assert list(plan_of) == [0] * 6 and indptr.tolist() == [0, len(src)]
        assert num_slots == c.slot_pos.numel() and len(src) > 0
    # and the moves are right: the kept keys (lowest norms) with their positions
    for layer in range(L):
        idx = stream_slots(c, layer)
        for h in range(H):
            kept = torch.sort(torch.topk(-k[0, h].norm(dim=-1), 3).indices).values
            torch.testing.assert_close(c.k_pool.view(-1, D)[idx[h]], k[0, h, kept])
            torch.testing.assert_close(c.v_pool.view(-1, D)[idx[h]], v[0, h, kept])
            assert c.slot_pos[idx[h]].tolist() == kept.tolist()
            assert c.slot_valid[idx[h]].all() and (c.slot_count[idx[h]] == 1).all()


def test_compact_positions_rerotate_through_rotate_slots(monkeypatch):
    spy = Spy(monkeypatch, "rotate_slots")
    c = KVCache(
        1,
        H,
        D,
        block_size=BS,
        capacity=16,
        policy=get("streaming", 4, sinks=1),
        positions="compact",
        rope=INV_FREQ,
    )
    k = kv(1, 8)
    c.update(0, k, k)
    c.flush()
    assert len(spy.calls) == 1
    pool, slots, delta, _ = spy.calls[0]
    assert pool is c.k_pool and slots.numel() == H * 4
    kept = torch.tensor([0, 5, 6, 7])
    assert delta.tolist() == (torch.arange(4) - kept).repeat(H).tolist()
    idx = stream_slots(c, 0)
    for h in range(H):
        want = rotate_keys(k[0, h, kept], torch.arange(4) - kept, INV_FREQ)
        torch.testing.assert_close(c.k_pool.view(-1, D)[idx[h]], want)


def test_quantized_compact_positions_rotate_then_reencode(monkeypatch):
    spy = Spy(monkeypatch, "rotate_slots")
    kw: dict[str, Any] = dict(
        block_size=BS,
        capacity=16,
        policy=get("streaming", 4, sinks=1),
        positions="compact",
        rope=INV_FREQ,
    )
    c = KVCache(1, H, D, kv_format="int8", **kw)
    k = kv(1, 8)
    c.update(0, k, k)
    c.flush()
    assert spy.calls == []  # uint8 pages: read, rotate, write back
    idx = stream_slots(c, 0)
    kept = torch.tensor([0, 5, 6, 7])
    for h in range(H):
        want = rotate_keys(k[0, h, kept], torch.arange(4) - kept, INV_FREQ)
        torch.testing.assert_close(c.format.read(c.store, "k", idx[h]), want, atol=0.05, rtol=0.05)


def test_rope_must_fit_the_head_dim():
    with pytest.raises(ValueError, match=r"rope\[0\] must be a 1-d inv_freq tensor of at most"):
        KVCache(1, H, D, positions="compact", rope=torch.ones(D))


def test_ems_merge_goes_through_apply_merge(monkeypatch):
    spy = Spy(monkeypatch, "apply_merge")
    c = KVCache(
        1,
        H,
        D,
        block_size=BS,
        capacity=16,
        policy=get("knorm", 4, skip_layers=()),
        merge="ems",
        merge_threshold=-1.0,
    )
    c.update(0, kv(1, 12, 1), kv(1, 12, 2))
    c.flush()
    # per stream: values with counts, keys without
    assert len(spy.calls) == 2 * H
    assert sum(1 for a in spy.calls if len(a) > 4 and a[4] is not None) == H
    assert c.slot_count[stream_slots(c, 0)].sum().item() == H * 12


@pytest.mark.skipif(shutil.which("g++") is None, reason="the kernel emulation needs g++")
def test_cache_through_the_emulated_cuda_kernels_equals_the_torch_path(monkeypatch):
    """The CUDA path of compact_pools, rotate_slots and apply_merge (host logic included),
    emulated on the CPU (tests/emu_launch.py), gives the cache the torch path gives."""

    def run() -> KVCache:
        c = KVCache(
            L,
            H,
            D,
            block_size=BS,
            capacity=24,
            policy=get("knorm", 5, skip_layers=()),
            schedule=Schedule.decode(2),
            positions="compact",
            rope=INV_FREQ,
            merge="ems",
            merge_threshold=0.0,
        )
        for layer in range(L):
            c.update(layer, kv(1, 11, layer), kv(1, 11, 5 + layer))
        for step in range(4):
            for layer in range(L):
                c.update(layer, kv(1, 1, 20 + step), kv(1, 1, 30 + step))
        c.flush()
        return c

    ref = run()
    from emu_launch import emulated_launch

    launches: list[str] = []

    def counted(device, name, *a, **kw):  # noqa: ANN001
        launches.append(name)
        return emulated_launch(device, name, *a, **kw)

    monkeypatch.setattr(kernels, "_launch", counted)
    monkeypatch.setattr(kernels, "uses_kernel", lambda *t: True)
    got = run()
    assert {"compact", "rope", "merge"} <= set(launches)
    assert np.array_equal(got.lengths, ref.lengths)
    for layer in range(L):
        a, b = stream_slots(got, layer), stream_slots(ref, layer)
        torch.testing.assert_close(got.k_pool.view(-1, D)[a], ref.k_pool.view(-1, D)[b])
        torch.testing.assert_close(got.v_pool.view(-1, D)[a], ref.v_pool.view(-1, D)[b])
        assert torch.equal(got.slot_pos[a], ref.slot_pos[b])
        torch.testing.assert_close(got.slot_count[a], ref.slot_count[b])


# ------------------------------------------------------------------ 2. merge methods


def one_head_cache(n_keep: int, **kw: Any) -> KVCache:
    """One layer, one kv-head; streaming keeps token 0 and the newest ``n_keep - 1``."""
    return KVCache(
        1, 1, D, block_size=BS, capacity=16, policy=get("streaming", n_keep, sinks=1), **kw
    )


def basis(*parts: tuple[int, float]) -> torch.Tensor:
    x = torch.zeros(D)
    for i, a in parts:
        x[i] += a
    return x


def test_kvmerger_merges_runs_into_their_kept_pivot_with_gaussian_weights():
    # runs of similar adjacent keys: {0,1} (0 kept), {2,3} (no kept token), {4},
    # {5,6,7,8} (7 and 8 kept: 7 is the pivot, the first kept on equal attention), {9}
    keys = torch.stack(
        [
            basis((0, 1.0)),
            basis((0, 1.0), (5, 0.3)),
            basis((1, 1.0)),
            basis((1, 1.0), (5, 0.2)),
            basis((2, 1.0)),
            basis((3, 1.0), (6, 0.4)),
            basis((3, 1.0), (6, 0.1)),
            basis((3, 1.0)),
            basis((3, 1.0), (7, 0.2)),
            basis((4, 1.0)),
        ]
    )
    values = torch.randn(10, D, generator=torch.Generator().manual_seed(3))
    c = one_head_cache(4, merge="kvmerger", merge_threshold=0.9, merge_sigma=0.5)
    c.update(0, keys[None, None], values[None, None])
    c.flush()
    assert c.stored_lengths(0).tolist() == [[4]]  # the policy's budget: 0, 7, 8, 9
    idx = stream_slots(c, 0)[0]
    assert c.slot_pos[idx].tolist() == [0, 7, 8, 9]

    def gauss_mean(members: list[int], pivot: int) -> tuple[torch.Tensor, torch.Tensor]:
        d2 = ((keys[members] - keys[pivot]) ** 2).sum(-1).double()
        g = torch.exp(-d2 / (2 * 0.5**2))
        w = (g / g.sum()).float()[:, None]
        return (w * keys[members]).sum(0), (w * values[members]).sum(0)

    k0, v0 = gauss_mean([0, 1], 0)
    k7, v7 = gauss_mean([5, 6, 7], 7)
    want_k = torch.stack([k0, k7, keys[8], keys[9]])
    want_v = torch.stack([v0, v7, values[8], values[9]])
    torch.testing.assert_close(c.k_pool.view(-1, D)[idx], want_k)
    torch.testing.assert_close(c.v_pool.view(-1, D)[idx], want_v)
    # mass: 2 + 3 + 1 + 1 stays, tokens 2, 3, 4 (no kept token in their runs) are dropped
    assert c.slot_count[idx].tolist() == [2.0, 3.0, 1.0, 1.0]
    assert c.logcount_bias


def test_kvmerger_pivot_is_the_most_attended_kept_token():
    keys = torch.stack([basis((0, 1.0), (5, 0.1 * i)) for i in range(6)])
    values = torch.randn(6, D, generator=torch.Generator().manual_seed(4))
    c = one_head_cache(3, merge="kvmerger", merge_threshold=0.5)  # keeps 0, 4, 5
    c.update(0, keys[None, None], values[None, None])
    idx = stream_slots(c, 0)[0]
    c.slot_score[idx] = torch.tensor([0.1, 0.9, 0.9, 0.9, 0.2, 0.3])  # the attention used
    c.flush()
    kept = stream_slots(c, 0)[0]
    # one run 0..5: pivot 5 (most attended kept token), the evicted 1, 2, 3 join it
    assert c.slot_count[kept].tolist() == [1.0, 1.0, 4.0]
    members = [1, 2, 3, 5]
    run = ((keys - keys[5]) ** 2).sum(-1).double()
    s2 = run.sum() / 5  # sigma=None: RMS distance of the whole run (0..5) to its pivot
    g = torch.exp(-run[members] / (2 * s2))
    w = (g / g.sum()).float()[:, None]
    torch.testing.assert_close(c.v_pool.view(-1, D)[kept[2]], (w * values[members]).sum(0))
    torch.testing.assert_close(c.v_pool.view(-1, D)[kept[:2]], values[[0, 4]])


def test_cam_adds_evicted_values_to_the_next_kept_ones():
    keys = torch.randn(8, D, generator=torch.Generator().manual_seed(5))
    values = torch.randn(8, D, generator=torch.Generator().manual_seed(6))
    c = one_head_cache(4, merge="cam", merge_window=2)  # keeps 0, 5, 6, 7
    c.update(0, keys[None, None], values[None, None])
    idx = stream_slots(c, 0)[0]
    # p = attn / max kept attn (1.0): tokens 1, 3, 4 always merge (p = 1), 2 never (p = 0)
    c.slot_score[idx] = torch.tensor([1.0, 1.0, 0.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    c.flush()
    kept = stream_slots(c, 0)[0]
    assert c.slot_pos[kept].tolist() == [0, 5, 6, 7]
    spread = (values[1] + values[3] + values[4]) / 2  # each into the 2 next kept: 5 and 6
    want_v = torch.stack([values[0], values[5] + spread, values[6] + spread, values[7]])
    torch.testing.assert_close(c.v_pool.view(-1, D)[kept], want_v)
    torch.testing.assert_close(c.k_pool.view(-1, D)[kept], keys[[0, 5, 6, 7]])  # keys: no merge
    assert c.slot_count[kept].tolist() == [1.0, 2.5, 2.5, 1.0]  # 7 = 8 - token 2
    assert not c.logcount_bias  # values are sums already
    assert one_head_cache(4, merge="cam", merge_bias=True).logcount_bias


def test_cam_draws_are_seeded():
    def run(seed: int) -> torch.Tensor:
        c = one_head_cache(4, merge="cam", merge_window=2, merge_seed=seed)
        x = torch.randn(1, 1, 12, D, generator=torch.Generator().manual_seed(7))
        c.update(0, x, x)
        idx = stream_slots(c, 0)[0]
        c.slot_score[idx] = torch.full((12,), 0.5)
        c.slot_score[idx[0]] = 1.0  # p = 0.5 for every evicted token
        c.flush()
        return c.slot_count[stream_slots(c, 0)[0]].clone()

    counts = {tuple(run(s).tolist()) for s in range(6)}
    assert run(3).tolist() == run(3).tolist()
    assert len(counts) > 1  # the draws decide which tokens merge
    for cnt in counts:
        # every evicted token adds 1 (merged) or 0 (dropped) to the 4 kept slots' mass
        assert 4.0 <= sum(cnt) <= 12.0 and float(sum(cnt)).is_integer()


@pytest.mark.parametrize("method", ["ems", "kvmerger", "cam"])
def test_merges_conserve_mass_across_compressions(method, monkeypatch):
    """slot_count equals MergeBook's mass for the plan each compression applied (replayed
    from the plans the cache built), and kept + merged-away + dropped mass is every token."""
    c = KVCache(
        1,
        H,
        D,
        block_size=BS,
        capacity=20,
        policy=get("h2o", 6, recent_ratio=0.5),
        schedule=Schedule.decode(3),
        merge=method,
        merge_threshold=0.0,
    )
    # every plan the cache builds, as the Rust core returns it (KVMerger's is rebuilt with
    # MergePlan from its raw plan)
    plans: list[Any] = []

    def recorder(fn: Any) -> Any:
        def call(*a: Any) -> Any:
            plans.append(fn(*a))
            return plans[-1]

        return call

    for name in ("ems_plan", "cam_plan", "MergePlan"):
        monkeypatch.setattr(_kvcore, name, recorder(getattr(_kvcore, name)))
    c.observe(0, kv(1, 4, 1).repeat_interleave(2, 1))
    c.update(0, kv(1, 12, 2), kv(1, 12, 3))
    c.flush()
    for step in range(3):
        c.observe(0, kv(1, 1, 10 + step).repeat_interleave(2, 1))
        c.update(0, kv(1, 1, 20 + step), kv(1, 1, 30 + step))
    c.flush()
    assert c.num_compressions == 2 and len(plans) == 2 * H
    idx = stream_slots(c, 0)
    for h in range(H):
        book = kvcore.MergeBook(12)
        book.apply(plans[h])
        book.extend(3)
        book.apply(plans[H + h])
        torch.testing.assert_close(c.slot_count[idx[h]].double(), torch.from_numpy(book.mass))
        assert book.total_mass + book.evicted_mass == pytest.approx(15.0)
    assert (c.slot_count[idx] > 1).any()  # something was merged


def test_merge_parameter_errors():
    with pytest.raises(ValueError, match="merge must be None or one of 'ems', 'kvmerger', 'cam'"):
        KVCache(L, H, D, merge="minicache")
    with pytest.raises(ValueError, match="merge_sigma is a parameter of merge='kvmerger'"):
        KVCache(L, H, D, merge="ems", merge_sigma=1.0)
    with pytest.raises(ValueError, match="merge_window is a parameter of merge='cam'"):
        KVCache(L, H, D, merge="kvmerger", merge_window=4)
    with pytest.raises(ValueError, match="merge_seed is a parameter of merge='cam'"):
        KVCache(L, H, D, merge_seed=1)
    with pytest.raises(ValueError, match="merge_sigma must be None or a finite float > 0"):
        KVCache(L, H, D, merge="kvmerger", merge_sigma=0.0)
    with pytest.raises(ValueError, match="merge_window must be an int >= 1"):
        KVCache(L, H, D, merge="cam", merge_window=0)
    with pytest.raises(ValueError, match="merge_seed must be an int >= 0"):
        KVCache(L, H, D, merge="cam", merge_seed=-1)
    with pytest.raises(ValueError, match="merge_bias must be None or a bool, and needs a merge"):
        KVCache(L, H, D, merge_bias=True)
    with pytest.raises(ValueError, match=r"merge_threshold must be a float in \[-1, 1\]"):
        KVCache(L, H, D, merge="kvmerger", merge_threshold=1.5)


@pytest.mark.parametrize("method", ["kvmerger", "cam"])
def test_merging_cache_generates_through_hf(method):
    pytest.importorskip("transformers", reason="kvcore.hf needs transformers")
    from tiny_llama import tiny

    import kvcore.hf as kh

    model = tiny("kvcore")
    ids = torch.randint(1, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    extra = {"merge_sigma": 2.0} if method == "kvmerger" else {"merge_window": 4}
    cache = kh.compressed_cache(
        model, "snapkv", 8, window=4, merge=method, merge_threshold=0.0, **extra
    )
    assert cache.kv.merge == method
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=3,
        do_sample=False,
        **kh.cache_kwargs(model, cache),
        pad_token_id=0,
    )
    assert out.shape == (2, 27)
    kv_ = cache.kv
    idx = stream_slots(kv_, 0)
    counts = kv_.slot_count[idx[:, :8]]
    assert (counts > 1).any()  # evicted prompt tokens were merged into kept slots
    assert (counts.sum(-1) <= 24).all()  # never more mass than prompt tokens


# ------------------------------------------------------------------ 3. per-head budgets

# Parameters that make each policy fit the tiny shapes (windows below the smallest budget).
HEAD_BUDGET_PARAMS: dict[str, dict[str, Any]] = {
    "streaming": {"sinks": 1},
    "h2o": {},
    "snapkv": {"window": 2, "kernel": 3},
    "tova": {},
    "knorm": {"skip_layers": ()},
    "infinipot": {},
    "locret": {"stabilizers": 1},
    "longgen": {"layer_kinds": ("sink", "sink"), "sinks": 1},
    "expected_attention": {"n_sink": 1, "n_future_positions": 8},
}
BUDGETS = torch.tensor([[3, 5], [6, 2]])


def test_every_registry_policy_is_covered_by_the_per_head_budget_tests():
    from kvcore.scoring import NO_HEAD_BUDGETS, names

    assert set(HEAD_BUDGET_PARAMS) | set(NO_HEAD_BUDGETS) == set(names())
    assert not set(HEAD_BUDGET_PARAMS) & set(NO_HEAD_BUDGETS)


def fill(c: KVCache, n: int, seed: int) -> None:
    for layer in range(L):
        c.observe(layer, kv(1, min(n, 2), seed + layer).repeat_interleave(2, 1))
        c.update(layer, kv(1, n, seed + 10 + layer), kv(1, n, seed + 20 + layer))


def stored_positions(c: KVCache, layer: int) -> list[list[int]]:
    idx = stream_slots(c, layer)
    lens = c.lengths[0, layer]
    return [c.slot_pos[idx[h, : lens[h]]].tolist() for h in range(H)]


@pytest.mark.parametrize("name", sorted(HEAD_BUDGET_PARAMS))
def test_per_head_budgets_hold_for_every_policy(name):
    params = HEAD_BUDGET_PARAMS[name]
    c = KVCache(
        L,
        H,
        D,
        block_size=BS,
        capacity=24,
        policy=get(name, BUDGETS, **params),
        schedule=Schedule.decode(2),
        rope=INV_FREQ,  # read by the policies that need it (Expected Attention)
    )
    fill(c, 14, 0)
    c.flush()
    assert c.stored_lengths()[0].tolist() == BUDGETS.tolist()
    assert c.allocator is not None
    # blocks really freed: ceil(budget / 4) per stream, nothing else held
    assert c.allocator.num_used_blocks == sum(-(-b // BS) for b in BUDGETS.flatten().tolist())
    c.allocator.check_invariants()
    if name == "streaming":  # sinks=1 and the newest budget - 1 tokens of each head
        assert stored_positions(c, 0) == [[0, 12, 13], [0, 10, 11, 12, 13]]
    if name == "tova":  # one ranking per layer: a smaller head keeps a subset of a larger one
        small, big = stored_positions(c, 0)
        assert set(small) < set(big)
    # two decode steps later the ragged heads compress back to their own budgets
    for step in range(2):
        fill(c, 1, 40 + step)
    c.flush()
    assert c.num_compressions == 2 * L
    assert c.stored_lengths()[0].tolist() == BUDGETS.tolist()
    assert c.allocator.num_used_blocks == sum(-(-b // BS) for b in BUDGETS.flatten().tolist())


@pytest.mark.parametrize("name", sorted(HEAD_BUDGET_PARAMS))
def test_a_uniform_budget_tensor_selects_what_the_int_budget_selects(name):
    params = HEAD_BUDGET_PARAMS[name]
    got = []
    for budget in (4, torch.full((L, H), 4)):
        pol = get(name, budget, **params)
        c = KVCache(L, H, D, block_size=BS, capacity=24, policy=pol, rope=INV_FREQ)
        fill(c, 14, 3)
        c.flush()
        got.append([stored_positions(c, layer) for layer in range(L)])
    assert got[0] == got[1]
    assert all(len(p) == 4 for layer in got[0] for p in layer)


def test_policies_that_set_head_budgets_themselves_refuse_a_budget_tensor():
    from kvcore.scoring import NO_HEAD_BUDGETS

    for name, why in NO_HEAD_BUDGETS.items():
        with pytest.raises(ValueError) as e:
            get(name, BUDGETS)
        assert str(e.value) == f"{name}: a per-head budget tensor cannot be honoured: {why}"
    with pytest.raises(ValueError, match=r"snapkv: window \(2\) is larger than the budget \(1\)"):
        get("snapkv", torch.tensor([[1, 4], [4, 4]]), window=2)
    with pytest.raises(ValueError, match=r"budget must be an int >= 0 or a \(num_layers"):
        get("h2o", torch.tensor([[1.5, 4.0]]))
    with pytest.raises(ValueError, match=r"per-head budget has shape \(1, 2\), expected \(2, 2\)"):
        KVCache(L, H, D, policy=get("h2o", torch.tensor([[4, 4]])))
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        get("nope", BUDGETS)


# ------------------------------------------------------------------ storage x merge x positions


def _run_combo(kv_format: str, merge: str | None, positions: str) -> tuple[KVCache, torch.Tensor]:
    """Prefill 20 tokens with observed queries, compress to 8 per head, decode 3 steps."""
    c = KVCache(
        L,
        H,
        D,
        block_size=BS,
        capacity=32,
        policy=get("snapkv", 8, window=4),
        kv_format=kv_format,
        quant_group=D if kv_format != "native" else None,
        # int8: the per-token layout. Per-channel int pages are KIVI's pages (kivi4 below); an
        # int8 one flips one of CaM's random merge draws at this seed (0.29 vs native; at
        # seed 2 the per-token one does), which is not what this test is about.
        key_quant="token" if kv_format.startswith("int") else None,
        merge=merge,
        positions=positions,
        rope=INV_FREQ if positions == "compact" else None,
    )
    g = torch.Generator().manual_seed(7)
    outs = []
    for step, n in enumerate((20, 1, 1, 1)):
        k, v = torch.randn(1, H, n, D, generator=g), torch.randn(1, H, n, D, generator=g)
        q = torch.randn(1, 2 * H, n, D, generator=g)
        for layer in range(L):
            if step == 0:
                c.observe(layer, q[:, :, -4:])
            c.update(layer, k, v)
            outs.append(c.attend(layer, q))
    c.flush()
    return c, torch.cat([o.reshape(-1) for o in outs[L:]])  # the decode steps' outputs


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("merge", [None, "ems", "kvmerger", "cam"])
@pytest.mark.parametrize("kv_format", ["int8", "kivi4"])
def test_storage_formats_compose_with_merges_and_positions(kv_format, merge, positions):
    """Every storage format with every merge method and both position policies: the budget
    holds exactly, and the decode outputs stay close to the native-storage cache's."""
    ref, want = _run_combo("native", merge, positions)
    c, got = _run_combo(kv_format, merge, positions)
    assert (c.stored_lengths() == 8 + 3).all()
    assert (c.stored_lengths() == ref.stored_lengths()).all()
    assert torch.isfinite(got).all()
    # int8: a 1/255 range step per value; KIVI 4-bit: a 1/15 step per key channel group
    tol = 0.02 if kv_format == "int8" else 0.4  # measured: <= 0.010 and <= 0.22
    err = (got - want).abs().max().item()
    assert err < tol, f"{kv_format}/{merge}/{positions}: max error {err:.3f} >= {tol}"
    if positions == "compact":
        assert c.get_seq_length(0) == 8 + 3
