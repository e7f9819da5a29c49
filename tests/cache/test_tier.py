"""MiKV mixed precision in KVCache: evicted tokens kept in a low-precision tier."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="kvcore.cache needs torch")

from cache_view import low_tier_slots  # noqa: E402

import kvcore  # noqa: E402
import kvcore.quant as kq  # noqa: E402
from kvcore import QuantLayout  # noqa: E402
from kvcore.cache import KVCache, Schedule  # noqa: E402
from kvcore.scoring import get  # noqa: E402

L, H, D, BS = 2, 2, 32, 8


def make(evicted_format=None, budget=16, **kw) -> KVCache:
    return KVCache(
        L,
        H,
        D,
        block_size=BS,
        policy=get("streaming", budget, sinks=4),
        schedule=Schedule.decode(4),
        evicted_format=evicted_format,
        **kw,
    )


def prompt(b=2, t=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, H, t, D, generator=g)
    v = torch.randn(b, H, t, D, generator=g)
    return k, v


def attend_all(cache, k, v, q):
    """Prefill every layer (compressing at the next update), then one decode step."""
    for layer in range(L):
        cache.update(layer, k, v)
    cache.flush()
    b = k.shape[0]
    g = torch.Generator().manual_seed(7)
    k1 = torch.randn(b, H, 1, D, generator=g)
    v1 = torch.randn(b, H, 1, D, generator=g)
    cache.update(0, k1, v1)
    return cache.attend(0, q), torch.cat([k, k1], 2), torch.cat([v, v1], 2)


def dense(q, k, v):
    # q (B, Hq, 1, D), k/v (B, H, T, D), Hq = H here
    s = (q @ k.transpose(-1, -2)) * D**-0.5
    return (s.softmax(-1) @ v).transpose(1, 2)  # (B, 1, H, D)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2"])
def test_low_tier_attention_is_closer_to_the_full_cache(fmt):
    k, v = prompt()
    q = torch.randn(2, H, 1, D, generator=torch.Generator().manual_seed(3)) * 2
    out_drop, kf, vf = attend_all(make(None), k, v, q)
    out_mikv, _, _ = attend_all(make(fmt), k, v, q)
    full = dense(q, kf, vf)
    # relative errors measured: dropping 1.17; int8 0.006, int4 0.098, int2 0.51
    e_drop = ((out_drop - full).norm() / full.norm()).item()
    e_mikv = ((out_mikv - full).norm() / full.norm()).item()
    assert e_mikv < e_drop
    assert e_mikv <= {"int8": 0.02, "int4": 0.2, "int2": 0.7}[fmt]
    assert e_mikv <= 0.6 * e_drop


def test_tiers_lengths_bytes_and_round_trips():
    k, v = prompt()
    cache = make("int2", quant_group=8)
    for layer in range(L):
        cache.update(layer, k, v)
    cache.flush()
    # high tier: exactly the budget; low tier: every other prompt token
    assert (cache.stored_lengths() == 16).all()
    assert (cache.evicted_lengths() == 40 - 16).all()
    assert cache.evicted_lengths(1).shape == (2, H)
    lo = cache.lo_format.layout
    assert lo is not None and lo.nbytes == QuantLayout(2, 8, BS, D, "channel", "float16").nbytes
    # pool bytes: the low tier's layout bytes x pages (K and V)
    n_lo_blocks = cache.lo_k_pool.shape[0]
    assert cache.lo_k_pool.nbytes == lo.nbytes * n_lo_blocks
    assert cache.memory_bytes() == (
        cache.k_pool.nbytes + cache.v_pool.nbytes + 2 * lo.nbytes * n_lo_blocks
    )
    streams = 2 * L * H
    high_blocks = streams * 2  # 16 tokens in 2 blocks of 8
    lo_blocks = streams * 3  # 24 tokens in 3 blocks of 8
    assert cache.used_bytes() == high_blocks * cache.page_bytes + lo_blocks * 2 * lo.nbytes
    # the evicted tokens (StreamingLLM: 4 sinks + 12 recent kept -> positions 4..27 evicted)
    # dequantize to kvcore.quant round trips of the originals
    tok = QuantLayout(2, 8, 1, D, "channel", "float16")
    slots, mask = low_tier_slots(cache, 1)
    assert mask.all()
    pos = cache.lo_slot_pos[slots].reshape(2, H, -1)
    assert (pos == torch.arange(4, 28)).all()
    # keys are stored balanced, K / s; without observed queries (StreamingLLM)
    # s = sqrt(max|K_c| / mean_c max|K_c|) over the layer's stored tokens, per stream
    kmax = k.abs().amax(2)
    scale = (kmax / kmax.mean(-1, keepdim=True)).sqrt()
    torch.testing.assert_close(cache.lo_key_scale[:, 1], scale)
    for side, x in (("k", k / cache.lo_key_scale[:, 1, :, None]), ("v", v)):
        got = cache.lo_format.read(cache.lo_store, side, slots.reshape(-1)).reshape(2, H, -1, D)
        orig = x[:, :, 4:28].reshape(-1, 1, D)
        ref = kq.dequantize(kq.quantize(orig, tok), tok).reshape(2, H, -1, D)
        assert torch.equal(got, ref)
        # Rust's MixedPrecisionStore is the oracle of a token demoted to the int2 tier
        store = kvcore.MixedPrecisionStore(D, group_size=8)
        store.append(orig.reshape(-1, D).numpy(), "int2")
        assert torch.equal(got.reshape(-1, D), torch.from_numpy(store.read()))
    assert cache.is_ragged(0)


def test_later_compressions_demote_and_the_low_tier_is_fifo_bounded():
    k, v = prompt(t=24)
    cache = make("int4", evicted_capacity=12)
    assert cache.memory_bytes() == 0
    cache.update(0, k, v)
    cache.update(1, k, v)
    cache.flush()
    assert cache.lo_capacity == 16  # rounded up to blocks
    assert (cache.evicted_lengths() == 8).all()
    g = torch.Generator().manual_seed(5)
    for _ in range(8):  # two decode compressions of 4 new tokens each
        for layer in range(L):
            cache.update(
                layer, torch.randn(2, H, 1, D, generator=g), torch.randn(2, H, 1, D, generator=g)
            )
    cache.flush()
    assert (cache.stored_lengths() == 16).all()
    # 8 + 4 + 4 = 16 = capacity: nothing dropped yet
    assert (cache.evicted_lengths() == 16).all()
    for _ in range(4):
        for layer in range(L):
            cache.update(
                layer, torch.randn(2, H, 1, D, generator=g), torch.randn(2, H, 1, D, generator=g)
            )
    cache.flush()
    assert (cache.evicted_lengths() == 16).all()
    # the earliest demoted (positions 4..7) were dropped; the window's oldest were added
    slots, _ = low_tier_slots(cache, 0)
    pos = cache.lo_slot_pos[slots]
    assert (pos == torch.arange(8, 24)).all()
    # still attends
    q = torch.randn(2, H, 1, D)
    for layer in range(L):
        cache.update(layer, torch.randn(2, H, 1, D), torch.randn(2, H, 1, D))
        assert torch.isfinite(cache.attend(layer, q)).all()


@pytest.mark.parametrize("evicted_capacity", [None, 12])
def test_low_tier_pools_hold_its_pages_within_one_block_per_stream(evicted_capacity):
    k, v = prompt(t=40)
    a, b = (make("int2", quant_group=8, evicted_capacity=evicted_capacity) for _ in range(2))
    for c in (a, b):
        for layer in range(L):
            c.update(layer, k, v)
        c.flush()
    streams, page = 2 * L * H, a.lo_page_bytes

    def lo_tensor_bytes(c: KVCache) -> int:  # from the tensors, not the cache's count
        return int(c.lo_k_pool.nbytes + c.lo_v_pool.nbytes)

    def lo_held(c: KVCache) -> int:
        return int((-(-c.evicted_lengths() // BS)).sum()) * page

    if evicted_capacity is None:  # lo_capacity: the prompt + 256 tokens a stream
        # grown by the demotions from one spare block a stream, not sized for lo_capacity
        assert lo_tensor_bytes(a) < streams * (a.lo_capacity // BS) * page / 8
    a.shrink()
    assert lo_held(a) <= lo_tensor_bytes(a) <= lo_held(a) + (streams + 1) * page
    limit = (streams * (a.lo_capacity // BS) + 1) * page  # never past lo_capacity a stream
    g = torch.Generator().manual_seed(11)
    for _ in range(12):  # three decode compressions demote 4 tokens a stream each
        for layer in range(L):
            x, y = torch.randn(2, H, 1, D, generator=g), torch.randn(2, H, 1, D, generator=g)
            q = torch.randn(2, H, 1, D, generator=g)
            outs = []
            for c in (a, b):
                c.update(layer, x, y)
                outs.append(c.attend(layer, q))
            assert torch.equal(*outs)  # the moved pages read the same values
            assert lo_tensor_bytes(a) <= limit
    assert (a.evicted_lengths() == b.evicted_lengths()).all()
    assert lo_held(a) <= lo_tensor_bytes(a) and a.memory_bytes() <= b.memory_bytes()
    a.lo_allocator.check_invariants()


def test_padding_is_never_demoted():
    k, v = prompt(t=24)
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[1, :5] = False
    cache = make("int8")
    for layer in range(L):
        cache.update(layer, k, v, valid=valid)
    cache.flush()
    ev = cache.evicted_lengths()
    assert (ev[0] == 8).all() and (ev[1] == 3).all()
    assert bool(cache.lo_slot_valid.sum() == 2 * H * (8 + 3))


@pytest.mark.parametrize("high", ["native", "int8"])
def test_prefill_multi_query_sees_the_whole_low_tier(high):
    # a multi-token step after a compression: every query token sees every low-tier token
    # (with quantized high-tier pages too, whose prefill chunks take another attention path)
    k, v = prompt(b=1, t=24)
    # a MiKV high tier of int pages encodes tokens alone: keys per token (key_quant="token")
    per_token = {} if high == "native" else {"key_quant": "token"}
    cache = make("int8", budget=16, kv_format=high, **per_token)
    cache.update(0, k, v)
    cache.compress(0)
    k2, v2 = prompt(b=1, t=3, seed=9)
    cache.update(0, k2, v2)
    q = torch.randn(1, H, 3, D)
    out = cache.attend(0, q)
    # reference: high tier (causal over the step) + all low-tier tokens, dequantized
    tok = cache.lo_format.token_layout
    s = cache.lo_key_scale[:, 0, :, None]  # (1, H, 1, D): keys stored as K / s
    lo_k = kq.dequantize(kq.quantize((k / s)[:, :, 4:12].reshape(-1, 1, D), tok), tok)
    lo_k = lo_k.reshape(1, H, 8, D) * s
    lo_v = kq.dequantize(kq.quantize(v[:, :, 4:12].reshape(-1, 1, D), tok), tok).reshape(1, H, 8, D)
    hk = torch.cat([k[:, :, :4], k[:, :, 12:], k2], 2)
    hv = torch.cat([v[:, :, :4], v[:, :, 12:], v2], 2)
    kk, vv = torch.cat([lo_k, hk], 2), torch.cat([lo_v, hv], 2)
    t = kk.shape[2]
    s = (q @ kk.transpose(-1, -2)) * D**-0.5
    causal = torch.arange(t)[None, :] <= (t - 3 + torch.arange(3))[:, None]
    s = s.masked_fill(~causal, float("-inf"))
    ref = (s.softmax(-1) @ vv).transpose(1, 2)
    if high == "native":
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    else:  # the stored high-tier prefix is int8 too: within its rounding
        torch.testing.assert_close(out, ref, atol=0.03, rtol=0.0)
    # and not the high tier alone
    s_hi = s[..., 8:]
    no_lo = (s_hi.softmax(-1) @ hv).transpose(1, 2)
    assert (out - no_lo).abs().max().item() > 0.1


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(evicted_format="int3"), "evicted_format must be None or one of 'int8'"),
        (dict(evicted_format="int2", kv_format="kivi2"), "needs a kv_format other than KIVI"),
        (dict(evicted_format="int2", merge="ems"), "needs merge=None"),
        (dict(evicted_capacity=8), "evicted_capacity .* needs evicted_format"),
        (
            dict(evicted_format="int2", evicted_capacity=0),
            "evicted_capacity must be None or an int >= 1",
        ),
        (dict(evicted_format="int2", quant_group=5), "divide"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)
    with pytest.raises(ValueError, match="needs a policy"):
        KVCache(L, H, D, evicted_format="int4")


def test_generation_through_compressed_cache():
    pytest.importorskip("transformers", reason="kvcore.hf needs transformers")
    from tiny_llama import tiny

    import kvcore.hf as kh

    model = tiny("kvcore")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0

    def generate(m, cache, n):
        return m.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            do_sample=False,
            **kh.cache_kwargs(m, cache),
            pad_token_id=0,
        )

    def run(**kw):
        cache = kh.compressed_cache(model, "snapkv", 8, window=4, **kw)
        return generate(model, cache, 4), cache

    out, cache = run(evicted_format="int4")
    assert out.shape == (2, 28)
    ev = cache.kv.evicted_lengths()
    assert (ev[0] == 16).all() and (ev[1] == 13).all()  # padding dropped, never demoted
    assert (cache.kv.stored_lengths() <= 8 + 3).all()
    dropped, _ = run()
    assert dropped.shape == (2, 28)
    # sdpa cannot read the low tier: a clear error
    sd = tiny("sdpa")  # the same seeded weights
    cache = kh.compressed_cache(sd, "snapkv", 8, window=4, evicted_format="int4")
    with pytest.raises(ValueError, match="kvcore"):
        generate(sd, cache, 2)


def test_key_balancer_uses_the_observed_queries_and_flattens_outlier_channels():
    # SnapKV observes queries: s_c = sqrt(max|K_c| / max|Q_c|) over the GQA group's heads;
    # with an outlier key channel the balanced int2 tier is much closer to the originals
    g = torch.Generator().manual_seed(5)
    hq = 2 * H  # GQA: two query heads per kv head
    k = torch.randn(1, H, 40, D, generator=g)
    k[..., 3] *= 30.0  # an outlier channel, as in real keys
    v = torch.randn(1, H, 40, D, generator=g)
    q = torch.randn(1, hq, 8, D, generator=g)
    cache = KVCache(
        1,
        H,
        D,
        block_size=BS,
        policy=get("snapkv", 16, window=8),
        schedule=Schedule.prefill(),
        evicted_format="int2",
    )
    cache.observe(0, q)
    cache.update(0, k, v)
    cache.flush()
    qmax = q.abs().reshape(1, H, 2 * 8, D).amax(2)
    want = (k.abs().amax(2) / qmax).sqrt()
    torch.testing.assert_close(cache.lo_key_scale[0:1, 0], want)
    # attention over the low tier with Q * s on K / s: q . k unchanged up to rounding; the
    # balanced tier's scores are closer to the exact ones than an unbalanced int2 round trip
    slots, _ = low_tier_slots(cache, 0)
    pos = cache.lo_slot_pos[slots].reshape(1, H, -1)
    orig = torch.gather(k, 2, pos[..., None].expand(-1, -1, -1, D))
    s = cache.lo_key_scale[:, 0, :, None]
    balanced = cache.lo_format.read(cache.lo_store, "k", slots.reshape(-1))
    balanced = balanced.reshape(1, H, -1, D) * s
    tok = cache.lo_format.token_layout
    plain = kq.dequantize(kq.quantize(orig.reshape(-1, 1, D), tok), tok).reshape(orig.shape)
    qs = q.reshape(1, H, 2, 8, D)[:, :, 0]  # one query head per group
    exact = qs @ orig.transpose(-1, -2)
    e_bal = (qs @ balanced.transpose(-1, -2) - exact).norm() / exact.norm()
    e_plain = (qs @ plain.transpose(-1, -2) - exact).norm() / exact.norm()
    assert e_bal < 0.5 * e_plain, (e_bal, e_plain)
