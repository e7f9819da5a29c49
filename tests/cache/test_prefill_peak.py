"""The peak of a compress-at-prefill cache: at most what it holds after the prefill plus one
layer's prompt (issue 18), with the same contents as pools sized for the whole prompt.

The bound is computed from the stored lengths and the pool tensors' page shapes and dtypes,
never from the cache's byte accounting (``memory_bytes``, ``used_bytes``).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="kvcore.cache needs torch")

from cache_view import low_tier_kv, stored_kv  # noqa: E402

from kvcore.cache import (  # noqa: E402
    KVCache,
    Schedule,
    resize,  # noqa: E402
)
from kvcore.scoring import get  # noqa: E402

L, H, D, BS, B, N, BUDGET = 4, 2, 16, 4, 2, 64, 16
ROPE = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))

# One policy per family, with parameters that fit a 64-token prompt and a budget of 16.
POLICIES: dict[str, dict[str, object]] = {
    "snapkv": {"window": 4, "kernel": 3},
    "tova": {},
    "knorm": {},  # skip_layers=(0, 1): those layers keep the whole prompt
    "pyramidkv": {"window": 4, "kernel": 3},
    "adakv": {"window": 4, "kernel": 3},
    "streaming": {"sinks": 4},
    "h2o": {},
    "expected_attention": {},
    "razor": {"local_capacity": 12, "sinks": 2},
    "longgen": {"sinks": 4, "block": 8, "stride": 2},
}
# Page formats with snapkv: quantized pages (KIVI's layout at 4 bits, the open page in
# full precision), KIVI-2, per-token int8 pages, and MiKV's int4 tier of evicted tokens.
FORMATS: dict[str, dict[str, object]] = {
    "int4": {"kv_format": "int4", "quant_group": 8},
    "kivi2": {"kv_format": "kivi2", "quant_group": 8},
    "int8-token": {"kv_format": "int8", "key_quant": "token", "quant_group": 8},
    "mikv-int4": {"evicted_format": "int4", "quant_group": 8},
}


def rnd(b: int, h: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(b, h, n, D, generator=torch.Generator().manual_seed(seed))


def build(policy: str, **kw: object) -> KVCache:
    return KVCache(
        L,
        H,
        D,
        block_size=BS,
        policy=get(policy, BUDGET, **POLICIES[policy]),
        schedule=Schedule.prefill(),
        rope=ROPE,
        **kw,
    )


def prefill(c: KVCache) -> list[tuple[torch.Tensor, ...]]:
    """Layer by layer, as a model's forward: observe, update (each layer's compression runs
    at the next layer's update), then read every layer back through the page formats: the
    kept K/V, and with a MiKV tier also the evicted tokens' K/V."""
    for layer in range(L):
        c.observe(layer, rnd(B, 2 * H, 8, 100 + layer))
        c.update(layer, rnd(B, H, N, layer), rnd(B, H, N, 10 + layer))
    c.flush()
    lo = c.lo_allocator is not None
    return [stored_kv(c, layer) + (low_tier_kv(c, layer) if lo else ()) for layer in range(L)]


def page_bytes(pool: torch.Tensor) -> int:
    """One page of a pool, from its shape and dtype: ``(blocks, BS, D)`` values or
    ``(blocks, nbytes)`` uint8 quantized blocks."""
    per = pool.shape[1] if pool.ndim == 2 else BS * pool.shape[2]
    return int(per * pool.element_size())


def bound(c: KVCache) -> tuple[int, int]:
    """``(held, one layer's prompt)`` in bytes, from the stored lengths and the page shapes."""
    page = page_bytes(c.k_pool) + page_bytes(c.v_pool)
    held = int((-(-c.stored_lengths() // BS)).sum()) * page
    if c.config.kivi:  # KIVI: each stream's open page, in full precision
        held += 2 * c.store.res_k.shape[0] * BS * D * c.store.res_k.element_size()
    if c.lo_allocator is not None:
        lo_page = page_bytes(c.lo_k_pool) + page_bytes(c.lo_v_pool)
        held += int((-(-c.evicted_lengths() // BS)).sum()) * lo_page
    return held, B * H * -(-N // BS) * page


def check(kw: dict[str, object], policy: str) -> KVCache:
    c = build(policy, **kw)
    got = prefill(c)
    assert c.num_compressions > 0
    held, layer_prompt = bound(c)
    # no layer's compression is a no-op here: the bound is not the whole prompt
    assert held + layer_prompt < L * B * H * N * 2 * D * 4
    assert c.peak_memory_bytes() <= held + layer_prompt
    # the same compressions as pools reserved for the whole prompt in every layer
    ref = build(policy, capacity=N + BS, **kw)
    want = prefill(ref)
    ref_page = page_bytes(ref.k_pool) + page_bytes(ref.v_pool)
    assert ref.peak_memory_bytes() >= L * B * H * (N // BS) * ref_page  # the whole prompt
    assert c.num_compressions == ref.num_compressions
    assert np.array_equal(c.stored_lengths(), ref.stored_lengths())
    assert np.array_equal(c.evicted_lengths(), ref.evicted_lengths())
    for mine, theirs in zip(got, want, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(mine, theirs, strict=True))
    for layer in range(L):  # a decode step reads the pages alike
        k1, v1, q = rnd(B, H, 1, 200 + layer), rnd(B, H, 1, 300 + layer), rnd(B, 2 * H, 1, layer)
        for x in (c, ref):
            x.append(layer, k1, v1)
        assert torch.equal(c.attend(layer, q), ref.attend(layer, q))
    c.allocator.check_invariants()
    return c


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_compressed_prefill_peak_is_the_held_pages_plus_one_layers_prompt(policy):
    check({}, policy)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_compressed_prefill_peak_holds_for_page_formats_and_the_mikv_tier(fmt):
    c = check(FORMATS[fmt], "snapkv")
    if c.lo_allocator is not None:
        assert int(c.evicted_lengths().sum()) > 0


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_kept_tokens_bounds_every_layers_pages(policy):
    """The policy's bound covers what each layer's compression really keeps (an
    underestimate would grow the pools by a copy in the middle of the prefill)."""
    c = build(policy)
    prefill(c)
    pol = c.policy
    assert pol is not None
    lens = c.stored_lengths()  # (B, L, H)
    for layer in range(L):
        k = pol.kept_tokens(layer, L, H, N)
        for b in range(B):
            held = resize.pages(lens[b, layer], BS)
            assert held <= resize.head_pages(k, N, BS, pol.splits_layer_budget)
        if not pol.splits_layer_budget:
            assert (lens[:, layer] <= k).all()


def test_a_prefill_no_layer_compresses_keeps_the_spare_block_sizing():
    c = KVCache(L, H, D, block_size=BS, policy=get("snapkv", 80, window=4, kernel=3), rope=ROPE)
    prefill(c)  # 64 tokens under a budget of 80: kept whole
    streams = B * L * H
    assert c.k_pool.shape[0] == resize.fitted(streams * (N // BS), streams, None)


def test_hf_prefill_peak_and_generation_match_the_reserved_pools():
    pytest.importorskip("transformers", reason="kvcore.hf needs transformers")
    from tiny_llama import tiny

    import kvcore.hf as kh

    model = tiny("sdpa", num_hidden_layers=4)
    n = 96
    ids = torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(7))

    def run(**kw: object) -> tuple[torch.Tensor, KVCache]:
        cache = kh.compressed_cache(model, "snapkv", 24, window=4, kernel=3, **kw)
        with torch.inference_mode():
            out = model.generate(
                ids, **kh.cache_kwargs(model, cache), max_new_tokens=5, do_sample=False
            )
        return out, cache.kv

    auto, kv = run()
    fixed, kv_fixed = run(capacity=n + 8)
    assert torch.equal(auto, fixed)
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    page = 2 * kv.block_size * d * 4  # K and V, float32
    layer_prompt = cfg.num_key_value_heads * -(-n // kv.block_size) * page
    # budget 24 plus the decode steps: two pages a stream in every layer
    held = cfg.num_hidden_layers * cfg.num_key_value_heads * 2 * page
    assert kv.peak_memory_bytes() <= held + layer_prompt < kv_fixed.peak_memory_bytes()


def test_the_benchmarks_replay_leaves_the_cache_the_models_forward_leaves():
    """bench/prefill_peak.py replays a recorded prefill instead of running the model per
    method: the same peak and lengths (and, with native pages, the same K/V)."""
    pytest.importorskip("transformers", reason="kvcore.hf needs transformers")
    import sys
    from pathlib import Path

    from tiny_llama import tiny

    import kvcore.hf as kh

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import prefill_peak as pp

    model = tiny("sdpa", num_hidden_layers=4)
    ids = torch.randint(1, 64, (1, 96), generator=torch.Generator().manual_seed(11))
    layers = pp.capture(model, ids)
    for policy, kw in (("snapkv", {}), ("tova", {"kv_format": "int4", "quant_group": 8})):
        cache = kh.compressed_cache(model, policy, 48, **kw)
        with torch.no_grad():
            model(input_ids=ids, **kh.cache_kwargs(model, cache))
        kv = cache.kv
        kv.flush()
        rep = pp.replay(layers, policy, 48, kw, kh._rope(model))
        assert kv.num_compressions == rep.num_compressions > 0
        assert rep.peak_memory_bytes() == kv.peak_memory_bytes()
        assert np.array_equal(rep.stored_lengths(), kv.stored_lengths())
        if kw:
            # quantized pages: the model's later layers read dequantized pages, the recording
            # full-precision ones, so which tokens are kept may differ, not how many
            continue
        for layer in range(kv.num_layers):
            for x, y in zip(stored_kv(rep, layer), stored_kv(kv, layer), strict=True):
                assert torch.equal(x, y)
