"""KVCache.shrink: the pools reallocated smaller after a compression, contents unchanged."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="kvcore.cache needs torch")

import kvcore  # noqa: E402
from kvcore.cache import KVCache, Schedule  # noqa: E402
from kvcore.scoring import get  # noqa: E402

L, H, D, BS = 2, 2, 16, 4


def rnd(b: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(b, H, n, D, generator=torch.Generator().manual_seed(seed))


def make(schedule: Schedule | None = None, policy: str = "snapkv", **kw) -> KVCache:
    params = {"window": 2, "kernel": 3} if policy == "snapkv" else {}
    return KVCache(
        L,
        H,
        D,
        block_size=BS,
        policy=get(policy, 6, **params),
        schedule=schedule or Schedule.prefill(),
        **kw,
    )


def prefill(c: KVCache, n: int = 40, padded: bool = True) -> None:
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, :5] = not padded  # a left-padded second sequence
    for layer in range(L):
        c.observe(layer, rnd(2, 2, 50 + layer))
        c.update(layer, rnd(2, n, layer), rnd(2, n, 10 + layer), valid=valid)
        c.attend(layer, rnd(2, n, 20 + layer))


def step(c: KVCache, seed: int) -> list[torch.Tensor]:
    outs = []
    for layer in range(L):
        q = rnd(2, 1, seed + 200 + layer)
        c.observe(layer, q)
        c.update(layer, rnd(2, 1, seed + layer), rnd(2, 1, seed + 100 + layer))
        outs.append(c.attend(layer, q))
    return outs


FORMATS = [
    {},
    {"kv_format": "int4", "quant_group": 8},
    {"kv_format": "kivi2"},
    {"evicted_format": "int2", "quant_group": 8},
]


@pytest.mark.parametrize("kw", FORMATS, ids=["native", "int4", "kivi2", "mikv-int2"])
def test_shrink_frees_memory_and_keeps_every_answer(kw):
    a, b = make(**kw), make(**kw)
    prefill(a)
    prefill(b)
    before = a.memory_bytes()
    freed = a.shrink(12)
    assert freed == before - a.memory_bytes() > 0
    assert a.capacity == 12 and a.k_pool.shape[0] == 2 * L * H * 3 + 1  # 3 blocks a stream
    own = a.k_pool.nbytes + a.v_pool.nbytes
    if a.kivi:
        own += a.res_k.nbytes + a.res_v.nbytes
    if a.lo_allocator is not None:
        own += a.lo_k_pool.nbytes + a.lo_v_pool.nbytes
    assert a.memory_bytes() == own  # measured from the tensors
    assert a.used_bytes() == b.used_bytes()
    assert np.array_equal(a.stored_lengths(), b.stored_lengths())
    assert np.array_equal(a.evicted_lengths(), b.evicted_lengths())
    a.allocator.check_invariants()
    for t in range(4):  # decoding reads the same values (and writes the same new ones)
        for x, y in zip(step(a, 1000 + 10 * t), step(b, 1000 + 10 * t), strict=True):
            assert torch.equal(x, y)


def test_after_a_shrink_to_the_budget_the_pools_are_the_budget_within_one_block_per_stream():
    c = make()  # snapkv, budget 6, the 40-token prompt compressed at the prefill
    prefill(c)
    streams, per_token = 2 * L * H, 2 * D * 4  # K and V, float32
    assert c.memory_bytes() >= streams * 40 * per_token  # sized for the whole prompt
    c.shrink(6)
    pools = c.k_pool.nbytes + c.v_pool.nbytes  # measured from the tensors
    assert c.memory_bytes() == pools
    extra = pools - streams * 6 * per_token
    assert 0 <= extra <= streams * BS * per_token + BS * per_token  # + the null block


@pytest.mark.parametrize("policy", ["snapkv", "h2o"])  # h2o: per-slot accumulated scores
def test_shrink_then_decode_compressions_match_the_unshrunk_cache(policy):
    a, b = make(Schedule.decode(3), policy), make(Schedule.decode(3), policy)
    prefill(a)
    prefill(b)
    assert a.shrink() > 0  # default: longest stream + 256 tokens of headroom
    assert a.capacity == -(-(6 + 256) // BS) * BS
    for t in range(7):
        for x, y in zip(step(a, 3000 + 10 * t), step(b, 3000 + 10 * t), strict=True):
            assert torch.equal(x, y)
    assert np.array_equal(a.stored_lengths(), b.stored_lengths())
    assert a.num_compressions == b.num_compressions > 1


def test_shrink_refuses_a_capacity_below_the_contents_and_is_a_no_op_when_small():
    c = make()
    assert c.shrink() == 0  # before the first update
    prefill(c)
    pools = (c.k_pool, c.v_pool)
    with pytest.raises(ValueError, match="capacity must be an int >= 6"):
        c.shrink(5)
    with pytest.raises(ValueError, match="capacity must be an int"):
        c.shrink(8.5)  # type: ignore[arg-type]
    assert c.k_pool is pools[0] and c.v_pool is pools[1]
    assert c.shrink(8) > 0
    assert c.shrink(8) == 0  # already that small
    assert c.shrink(100) == 0  # never grows


def test_running_out_after_a_shrink_is_the_documented_error():
    c = make()
    prefill(c)
    c.shrink(8)  # 6 stored + room for 2 tokens
    step(c, 5000)
    step(c, 5010)
    lengths = c.stored_lengths().copy()
    with pytest.raises(kvcore.OutOfBlocksError, match="exceed the capacity of 8"):
        c.update(0, rnd(2, 1, 1), rnd(2, 1, 2))
    assert np.array_equal(c.stored_lengths(), lengths)


def test_hf_cache_shrink_keeps_generation():
    pytest.importorskip("transformers", reason="kvcore.hf needs transformers")
    from tiny_llama import tiny

    import kvcore.hf as kh

    model = tiny("kvcore")
    ids = torch.randint(1, 64, (1, 40), generator=torch.Generator().manual_seed(3))

    def run(shrink: bool) -> tuple[torch.Tensor, int]:
        cache = kh.compressed_cache(model, "snapkv", 8, window=4)
        with torch.inference_mode():
            out = model(input_ids=ids, **kh.cache_kwargs(model, cache))
            nxt = out.logits[:, -1:].argmax(-1)
            freed = cache.shrink() if shrink else 0
            toks = [nxt]
            for _ in range(5):
                out = model(input_ids=toks[-1], **kh.cache_kwargs(model, cache))
                toks.append(out.logits[:, -1:].argmax(-1))
        return torch.cat(toks, 1), freed

    plain, _ = run(False)
    shrunk, freed = run(True)
    assert freed > 0
    assert torch.equal(plain, shrunk)


# ---------------------------------------------------------------- pools sized on demand


def test_on_demand_pools_shrink_once_the_prefill_is_compressed():
    auto, fixed = make(), make(capacity=1000)  # snapkv, budget 6
    prefill(auto, 700, padded=False)
    prefill(fixed, 700, padded=False)
    prefill_pools = auto.memory_bytes()
    assert auto.capacity == 700 + 256  # first step + slack, whole blocks
    outs = [step(auto, 7000), step(fixed, 7000)]  # layer 0's update shrinks first
    # room for the budget, the step and the slack: ceil((6 + 1 + 256) / 4) blocks
    assert auto.capacity == 264 and auto.k_pool.shape[0] == 2 * L * H * 66 + 1
    assert auto.memory_bytes() < prefill_pools / 3
    assert auto.peak_memory_bytes() == prefill_pools + auto.memory_bytes()  # during the copy
    for x, y in zip(*outs, strict=True):
        assert torch.equal(x, y)
    for t in range(3):  # later steps neither shrink nor grow, and read the same values
        for x, y in zip(step(auto, 7100 + 10 * t), step(fixed, 7100 + 10 * t), strict=True):
            assert torch.equal(x, y)
    assert auto.capacity == 264
    auto.allocator.check_invariants()


@pytest.mark.parametrize("kw", FORMATS[:3], ids=["native", "int4", "kivi2"])
def test_on_demand_pools_grow_where_a_fixed_capacity_raises(kw):
    auto = KVCache(L, H, D, block_size=BS, **kw)  # no policy: every token is kept
    fixed = KVCache(L, H, D, block_size=BS, capacity=20 + 256, **kw)
    for c in (auto, fixed):
        for layer in range(L):
            c.update(layer, rnd(2, 20, layer), rnd(2, 20, 10 + layer))
    assert auto.capacity == fixed.capacity == 276
    k, v = rnd(2, 300, 90), rnd(2, 300, 91)
    with pytest.raises(kvcore.OutOfBlocksError, match="exceed the capacity of 276"):
        fixed.update(0, k, v)
    assert (fixed.stored_lengths() == 20).all()  # unchanged
    keys, values = auto.update(0, k, v)
    assert auto.capacity == 20 + 300 + 256 and (auto.stored_lengths()[:, 0] == 320).all()
    twin = KVCache(L, H, D, block_size=BS, capacity=400, **kw)
    twin.update(0, rnd(2, 20, 0), rnd(2, 20, 10))
    want_k, want_v = twin.update(0, k, v)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    auto.allocator.check_invariants()


def test_an_explicit_shrink_capacity_fixes_the_capacity():
    c = make(policy="streaming")
    prefill(c)
    assert c.shrink() > 0  # on demand: stays on demand
    c.update(0, rnd(2, 300, 1), rnd(2, 300, 2))  # grows
    assert c.capacity == -(-(6 + 300 + 256) // BS) * BS
    c.shrink(320)  # (the step's compression runs first: 6 tokens a stream)
    assert c.capacity == 320
    with pytest.raises(kvcore.OutOfBlocksError, match="exceed the capacity of 320"):
        c.update(0, rnd(2, 315, 3), rnd(2, 315, 4))


def test_hf_generation_with_on_demand_pools_equals_a_fixed_capacity():
    pytest.importorskip("transformers", reason="kvcore.hf needs transformers")
    from tiny_llama import tiny

    import kvcore.hf as kh

    model = tiny("kvcore")
    ids = torch.randint(1, 64, (1, 600), generator=torch.Generator().manual_seed(5))

    def run(**kw) -> tuple[torch.Tensor, KVCache]:
        cache = kh.compressed_cache(model, "snapkv", 16, window=4, **kw)
        with torch.inference_mode():
            out = model.generate(
                ids,
                **kh.cache_kwargs(model, cache),
                max_new_tokens=6,
                do_sample=False,
                min_new_tokens=6,
            )
        return out, cache.kv

    auto, kv = run()
    fixed, kv_fixed = run(capacity=700)
    assert torch.equal(auto, fixed)
    assert kv.memory_bytes() < kv_fixed.memory_bytes() / 2  # shrunk after the prefill
    assert kv.peak_memory_bytes() > kv.memory_bytes()
