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


def tensor_bytes(c: KVCache) -> int:
    """The pool tensors' bytes, summed from the tensors themselves (not the cache's count)."""
    own = c.k_pool.nbytes + c.v_pool.nbytes
    if c.config.storage.kivi:  # each stream's open page
        own += c.store.res_k.nbytes + c.store.res_v.nbytes
    if c.lo_allocator is not None:
        own += c.lo_k_pool.nbytes + c.lo_v_pool.nbytes
    return int(own)


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
    assert a.capacity == 12
    # the pages held (stored 6 tokens a stream: 2 blocks) and one spare block a stream
    assert a.k_pool.shape[0] == 2 * L * H * (2 + 1) + 1
    assert a.memory_bytes() == tensor_bytes(a)
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
    # each layer compressed once stored: pools of the budget plus one layer's prompt, not of
    # the whole prompt in every layer
    assert 2 * H * 40 * per_token <= c.memory_bytes() < streams * 40 * per_token
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
    assert a.shrink() > 0  # the pages held and one spare block a stream
    assert a.capacity is None  # still sized on demand: the decode steps grow the pools
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
    # long enough that the last layer's compression leaves more free blocks than the spare
    ids = torch.randint(1, 64, (1, 100), generator=torch.Generator().manual_seed(3))

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
    streams = 2 * L * H
    prefill(auto, 700, padded=False)
    prefill(fixed, 700, padded=False)
    prefill_pools = auto.memory_bytes()
    assert auto.capacity is None  # no capacity: sized on demand
    # each layer compressed once stored: one layer's prompt (175 blocks a stream) and layer
    # 0's 6 kept tokens (2 blocks a stream), which layer 1 stored its prompt beside
    assert auto.k_pool.shape[0] == 2 * H * (700 // BS) + 2 * H * 2 + 1
    outs = [step(auto, 7000), step(fixed, 7000)]  # layer 0's update shrinks first
    # 6 kept + 1 new token a stream: 2 blocks, and one spare block a stream
    assert auto.k_pool.shape[0] == streams * (2 + 1) + 1
    assert auto.memory_bytes() == tensor_bytes(auto) < prefill_pools / 3
    assert auto.peak_memory_bytes() == prefill_pools + auto.memory_bytes()  # during the copy
    for x, y in zip(*outs, strict=True):
        assert torch.equal(x, y)
    for t in range(3):  # 10 tokens a stream take the spare blocks: no resize, same values
        for x, y in zip(step(auto, 7100 + 10 * t), step(fixed, 7100 + 10 * t), strict=True):
            assert torch.equal(x, y)
    assert auto.k_pool.shape[0] == streams * 3 + 1 and auto.allocator.num_free_blocks == 0
    auto.allocator.check_invariants()


@pytest.mark.parametrize("kw", FORMATS[:3], ids=["native", "int4", "kivi2"])
def test_on_demand_pools_grow_where_a_fixed_capacity_raises(kw):
    auto = KVCache(L, H, D, block_size=BS, **kw)  # no policy: every token is kept
    fixed = KVCache(L, H, D, block_size=BS, capacity=20 + 256, **kw)
    for c in (auto, fixed):
        for layer in range(L):
            c.update(layer, rnd(2, 20, layer), rnd(2, 20, 10 + layer))
    assert auto.capacity is None and fixed.capacity == 276
    assert fixed.k_pool.shape[0] == 2 * L * H * (276 // BS) + 1  # reserved at the capacity
    k, v = rnd(2, 300, 90), rnd(2, 300, 91)
    with pytest.raises(kvcore.OutOfBlocksError, match="exceed the capacity of 276"):
        fixed.update(0, k, v)
    assert (fixed.stored_lengths() == 20).all()  # unchanged
    keys, values = auto.update(0, k, v)
    assert (auto.stored_lengths()[:, 0] == 320).all()
    # grown once for the step of both layers: layer 1's 300 tokens fit without a copy
    pool = auto.k_pool
    assert auto.allocator.num_free_blocks >= 2 * H * 300 // BS
    auto.update(1, k, v)
    assert auto.k_pool is pool
    twin = KVCache(L, H, D, block_size=BS, capacity=400, **kw)
    twin.update(0, rnd(2, 20, 0), rnd(2, 20, 10))
    want_k, want_v = twin.update(0, k, v)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    auto.allocator.check_invariants()


def test_an_explicit_shrink_capacity_fixes_the_capacity():
    c = make(policy="streaming")
    prefill(c)
    assert c.shrink() > 0  # on demand: stays on demand
    assert c.capacity is None
    rows = c.k_pool.shape[0]
    c.update(0, rnd(2, 300, 1), rnd(2, 300, 2))
    assert c.k_pool.shape[0] > rows + 2 * H * 300 // BS  # grown for the step
    c.shrink(320)  # (the step's compression runs first: 6 tokens a stream)
    assert c.capacity == 320
    c.shrink(400)  # a larger capacity leaves it as it is
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


# ---------------------------------------------------------------- uneven budgets

UNEVEN = {
    "pyramidkv": ({"policy": "pyramidkv"}, {"window": 2, "kernel": 3}),
    "adakv": ({"policy": "adakv"}, {"window": 2, "kernel": 3}),
    "knorm-skip0": ({"policy": "knorm"}, {"skip_layers": (0,)}),  # layer 0 kept whole
    "mikv-adakv": (
        {"policy": "adakv", "evicted_format": "int2", "quant_group": 8},
        {"window": 2, "kernel": 3},
    ),
}


def uneven(name: str, **kw) -> KVCache:
    cache_kw, params = UNEVEN[name]
    cache_kw = dict(cache_kw)
    policy = cache_kw.pop("policy")
    return KVCache(
        L,
        H,
        D,
        block_size=BS,
        policy=get(policy, 12, **params),
        schedule=Schedule.prefill(),
        **cache_kw,
        **kw,
    )


def held_bytes(c: KVCache) -> tuple[int, int]:
    """Bytes of the blocks the streams hold, each tier (counted from the stored lengths)."""
    hi = int((-(-c.stored_lengths() // BS)).sum()) * c.page_bytes
    lo = int((-(-c.evicted_lengths() // BS)).sum()) * c.lo_page_bytes
    return hi, lo


@pytest.mark.parametrize("name", list(UNEVEN))
@pytest.mark.parametrize("capacity", [None, 64])
def test_uneven_budgets_after_a_shrink_the_pools_are_the_pages_held(name, capacity):
    a, b = uneven(name, capacity=capacity), uneven(name, capacity=capacity)
    streams = 2 * L * H
    for c in (a, b):
        prefill(c, 40, padded=False)
        c.flush()
    lens = a.stored_lengths()
    assert lens.min() < lens.max()  # the budgets differ by layer or head
    assert a.shrink() > 0
    hi, lo = held_bytes(a)
    # measured from the tensors: the pages held, within one block a stream (and the null
    # block) in each tier, well under streams x the longest stream
    spare = streams * a.page_bytes + a.page_bytes
    spare_lo = (streams + 1) * a.lo_page_bytes
    assert hi + lo <= tensor_bytes(a) <= hi + lo + spare + spare_lo
    assert a.memory_bytes() == tensor_bytes(a)
    assert tensor_bytes(a) < streams * -(-int(lens.max()) // BS) * a.page_bytes + lo
    if a.lo_allocator is not None:
        assert a.lo_k_pool.nbytes + a.lo_v_pool.nbytes <= lo + spare_lo
    # decoding past the spare blocks grows the pools and reads the same values
    rows = a.k_pool.shape[0]
    for t in range(2 * BS + 1):  # every stream takes two more blocks
        for x, y in zip(step(a, 9000 + 10 * t), step(b, 9000 + 10 * t), strict=True):
            assert torch.equal(x, y)
    assert a.k_pool.shape[0] > rows
    assert np.array_equal(a.stored_lengths(), b.stored_lengths())
    a.allocator.check_invariants()


def test_pools_never_grow_past_capacity_bytes():
    streams = 2 * L * H
    block = 2 * BS * D * 4  # K and V, float32
    cap_bytes = (streams * 7 + 1) * block  # 7 blocks, 28 tokens a stream
    c = uneven("adakv", capacity_bytes=cap_bytes)
    prefill(c, 24, padded=False)
    assert c.capacity == 28 and c.memory_bytes() == cap_bytes  # reserved once
    assert c.shrink() > 0 and c.capacity == 28
    longest = int(c.stored_lengths().max())
    for t in range(28 - longest):
        step(c, 100 + 10 * t)
        assert c.memory_bytes() == tensor_bytes(c) <= cap_bytes
    lengths = c.stored_lengths().copy()
    full = int(np.argmax(lengths.max(axis=(0, 2))))  # a layer with a stream at 28 tokens
    with pytest.raises(kvcore.OutOfBlocksError, match="exceed the capacity of 28"):
        c.update(full, rnd(2, 1, 1), rnd(2, 1, 2))
    assert np.array_equal(c.stored_lengths(), lengths)
    assert c.memory_bytes() <= cap_bytes
