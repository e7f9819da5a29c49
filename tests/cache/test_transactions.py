"""Every failed public call of `KVCache` leaves the cache unchanged and usable.

Each test drives two caches through the same valid calls; one of them also receives a call
that must fail. Afterwards both take the same further steps and must agree on everything
they return (attention outputs, dense K/V, lengths, memory), so the failed call changed
nothing, not even the pending step or the observed queries.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch cache needs torch (pip install .[torch])")

from kvcore.cache import KVCache, Schedule  # noqa: E402
from kvcore.scoring import get  # noqa: E402

L, H, D, BS = 2, 2, 8, 4


def rnd(b: int, n: int, seed: int, heads: int = H, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, heads, n, D, generator=g) * scale


def snapkv(**kw) -> KVCache:
    return KVCache(L, H, D, block_size=BS, policy=get("snapkv", 6, window=2, kernel=3), **kw)


def step(c: KVCache, n: int, seed: int, observe: bool = True) -> list[torch.Tensor]:
    """One step of every layer: observe (maybe), update, attend; returns what they give."""
    outs = []
    for layer in range(L):
        q = rnd(2, n, seed + 7 + layer, heads=2 * H)
        if observe:
            c.observe(layer, q[:, :, -2:] if n > 1 else q)
        keys, values = c.update(layer, rnd(2, n, seed + layer), rnd(2, n, seed + 50 + layer))
        outs += [keys, values, c.attend(layer, q)]
    return outs


def same(a: KVCache, b: KVCache, steps: Callable[[KVCache], list[torch.Tensor]]) -> None:
    """Both caches give bit-identical results for the same further calls."""
    for x, y in zip(steps(a), steps(b), strict=True):
        assert torch.equal(x, y)
    assert np.array_equal(a.stored_lengths(), b.stored_lengths())
    assert a.memory_bytes() == b.memory_bytes() and a.used_bytes() == b.used_bytes()
    assert a.num_compressions == b.num_compressions
    for layer in range(L):
        assert a.get_seq_length(layer) == b.get_seq_length(layer)
        for x, y in zip(a.page_table(layer), b.page_table(layer), strict=True):
            assert np.array_equal(x, y)


def pending_step_and_decode(c: KVCache) -> list[torch.Tensor]:
    """Attend the last layer's step again (its compression is still pending: every other
    layer's ran at the next layer's update), then two decode steps."""
    last = L - 1
    outs = [c.attend(last, rnd(2, 40, 7 + last, heads=2 * H))]
    return outs + step(c, 1, 900) + step(c, 1, 910)


def test_a_failed_restore_keeps_the_pending_compression():
    a, b = snapkv(), snapkv()
    before = a.snapshot()  # before the first update: restoring it later is refused
    other = KVCache(L + 1, H, D).snapshot()
    for c in (a, b):
        step(c, 40, 0)  # its compression is pending: the step can still be attended
    with pytest.raises(ValueError, match="cannot restore: the cache compressed since"):
        a.restore(before)
    with pytest.raises(ValueError, match="cache of another shape"):
        a.restore(other)
    with pytest.raises(TypeError, match="snap must be a CacheSnapshot"):
        a.restore("x")  # type: ignore[arg-type]
    assert a.has_pending_step(L - 1)
    same(a, b, pending_step_and_decode)


def test_a_refused_compression_does_not_leave_the_cache_stuck():
    """SnapKV after a prefill without observed queries: refused at the update, so the next
    correct prefill works (it used to raise at every later call)."""
    a, b = snapkv(), snapkv()
    with pytest.raises(ValueError, match=r"snapkv needs the observed queries .* observe\(0"):
        step(a, 40, 0, observe=False)
    assert a.stored_lengths().shape == (0, L, H)  # nothing stored, pools not even sized
    same(a, b, lambda c: step(c, 40, 0) + step(c, 1, 100) + step(c, 1, 110))
    assert a.num_compressions == L
    with pytest.raises(ValueError, match="snapkv needs the observed queries"):
        a.compress()  # an explicit compression has no window either: refused up front
    same(a, b, lambda c: step(c, 1, 120))


def test_a_failed_compression_raises_once_moves_nothing_and_the_cache_goes_on():
    """A compression that cannot run (positions='compact' with uneven kept lengths once the
    padding is dropped) raises once, before it moves anything, and the cache goes on."""
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    c = KVCache(
        L, H, D, block_size=BS, policy=get("streaming", 6, sinks=2), positions="compact", rope=inv
    )
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :8] = False  # sequence 1 keeps 2 tokens, sequence 0 keeps 6
    k, v = rnd(2, 10, 0), rnd(2, 10, 1)
    c.update(0, k, v, valid=valid)
    with pytest.raises(ValueError, match="same kept length in every stream"):
        c.flush()
    c.flush()  # raised once: not retried by every later call
    assert np.array_equal(c.stored_lengths(0), np.full((2, H), 10))
    k1, v1 = rnd(2, 1, 2), rnd(2, 1, 3)
    keys, values = c.update(0, k1, v1)  # the stored tokens were not touched
    assert torch.equal(keys, torch.cat([k, k1], 2)) and torch.equal(values, torch.cat([v, v1], 2))


def test_a_failed_one_token_update_keeps_the_observed_queries():
    a, b = snapkv(), snapkv()
    window = rnd(2, 2, 3, heads=2 * H)
    for c in (a, b):
        c.observe(0, window)
    with pytest.raises(ValueError, match=r"observed queries \(2, 4, 2, 8\) do not fit a step"):
        a.update(0, rnd(2, 1, 1), rnd(2, 1, 2))  # 1 token: the 2 observed queries do not fit

    def rest(c: KVCache) -> list[torch.Tensor]:
        outs = list(c.update(0, rnd(2, 40, 0), rnd(2, 40, 50)))  # layer 0 uses `window`
        outs.append(c.attend(0, rnd(2, 40, 60, heads=2 * H)))
        c.observe(1, window)
        outs += c.update(1, rnd(2, 40, 1), rnd(2, 40, 51))
        return outs + step(c, 1, 300)

    same(a, b, rest)
    assert a.num_compressions == L


@pytest.mark.parametrize("kv_format", ["kivi2", "kivi4"])
def test_kivi_refuses_values_beyond_float16_at_the_update(kv_format):
    a, b = KVCache(L, H, D, block_size=BS, kv_format=kv_format), None
    b = KVCache(L, H, D, block_size=BS, kv_format=kv_format)
    for c in (a, b):
        step(c, 6, 0, observe=False)  # 6 tokens: one sealed page, two in the open page
    big = rnd(2, 1, 5, scale=1e5)  # finite, but beyond float16's 65504
    with pytest.raises(ValueError, match=r"float16's range \(\|x\| <= 65504\)"):
        a.update(0, big, rnd(2, 1, 6))
    with pytest.raises(ValueError, match="float16's range"):
        a.update(0, rnd(2, 1, 6), -big)
    # the next steps fill and seal the open page: they work and match the twin
    same(a, b, lambda c: step(c, 1, 10, observe=False) + step(c, 3, 20, observe=False))


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.shrink(1),
        lambda c: c.shrink(2.5),
        lambda c: c.page_table(0, "x"),
        lambda c: c.page_table(5),
        lambda c: c.stored_lengths("x"),
        lambda c: c.evicted_lengths(9),
        lambda c: c.compress(7),
        lambda c: c.update(0, rnd(2, 1, 0)[:, :1], rnd(2, 1, 1)),
        lambda c: c.update(0, rnd(3, 1, 0), rnd(3, 1, 1)),
        lambda c: c.update(0, rnd(2, 1, 0).double(), rnd(2, 1, 1).double()),
        lambda c: c.observe(0, rnd(2, 1, 0, heads=3)),
        lambda c: c.attend(0, rnd(2, 3, 0, heads=2 * H)),
    ],
    ids=[
        "shrink-1",
        "shrink-float",
        "page_table-layout",
        "page_table-layer",
        "stored_lengths-x",
        "evicted_lengths-9",
        "compress-7",
        "update-heads",
        "update-batch",
        "update-dtype",
        "observe-heads",
        "attend-length",
    ],
)
def test_calls_refused_on_their_arguments_do_not_run_the_pending_compression(call):
    a, b = snapkv(), snapkv()
    for c in (a, b):
        step(c, 40, 0)  # the prefill's compression is pending
    with pytest.raises((ValueError, TypeError, IndexError)):
        call(a)
    assert a.has_pending_step(L - 1)
    same(a, b, pending_step_and_decode)


def test_shrink_to_the_budget_still_waits_for_the_pending_compression():
    """A capacity that only the pending compression makes room for is a valid argument."""
    a, b = snapkv(), snapkv()
    for c in (a, b):
        step(c, 40, 0)
    assert a.shrink(8) > 0  # 40 stored now, 6 after the compression
    assert a.capacity == 8
    b.shrink(8)
    same(a, b, lambda c: step(c, 1, 500) + step(c, 1, 510))
    a2 = snapkv(schedule=Schedule.decode(100, on_prefill=False))
    step(a2, 40, 0)  # nothing pending will compress: 40 tokens must fit
    with pytest.raises(ValueError, match=r"capacity must be an int >= 40 .* got 8"):
        a2.shrink(8)
    assert a2.has_pending_step(L - 1)


@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        ({"scaling": math.nan}, ValueError, "scaling must be None or a finite float > 0"),
        ({"scaling": math.inf}, ValueError, "scaling must be None or a finite float > 0"),
        ({"scaling": 0.0}, ValueError, "scaling must be None or a finite float > 0"),
        ({"scaling": "1"}, ValueError, "scaling must be None or a finite float > 0"),
        ({"capacity_bytes": 1e6}, ValueError, "capacity_bytes must be an int >= 1, got 1000000.0"),
        ({"capacity_bytes": True}, ValueError, "capacity_bytes must be an int >= 1"),
        ({"capacity_bytes": 0}, ValueError, "capacity_bytes must be an int >= 1"),
        ({"schedule": "x"}, TypeError, "schedule must be a kvcore.cache.Schedule or None, got str"),
        ({"capacity": True}, ValueError, "capacity must be an int >= 1 tokens per stream"),
        ({"capacity": 8.0}, ValueError, "capacity must be an int >= 1 tokens per stream"),
    ],
)
def test_the_constructor_refuses_invalid_values(kw, err, match):
    with pytest.raises(err, match=match):
        KVCache(L, H, D, **kw)


def test_scaling_accepts_numpy_floats():
    c = KVCache(L, H, D, scaling=np.float32(0.25))
    assert c.scaling == 0.25


@pytest.mark.parametrize("kw", [{"block_size": 2**40}, {"capacity": 2**50}])
def test_pools_too_large_for_the_machine_are_refused_before_any_allocation(kw):
    """A huge block_size or capacity used to reach torch.zeros (a RuntimeError, or the machine
    swapping): the first update refuses it with a ValueError naming the pools, and the cache
    stays uninitialized."""
    c = KVCache(L, H, D, **kw)
    with pytest.raises(ValueError, match=r"the pools \(.* blocks of block_size=.*\) is too large"):
        c.update(0, rnd(2, 4, 1), rnd(2, 4, 2))
    assert not c.initialized
    ok = KVCache(L, H, D, block_size=BS)
    keys, _ = ok.update(0, rnd(2, 4, 1), rnd(2, 4, 2))
    assert keys.shape == (2, H, 4, D)
