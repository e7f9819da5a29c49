"""Merge plans: plain references for every method against the Rust plans, conservation of
mass through merges and compaction, the log-count bias, MiniCache's bounded error."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvcore
from kvcore import (
    InvalidPositionsError,
    MergeBook,
    MergePlan,
    cam_plan,
    ems_plan,
    kvmerger_plan,
    minicache_layer_pairs,
    minicache_merge,
    razor_plan,
)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    return 0.0 if na == 0 or nb == 0 else float(a64 @ b64 / (na * nb))


def plain_apply(n: int, entries: dict[int, list[tuple[int, float]]], x: np.ndarray) -> np.ndarray:
    """Reference application: each destination becomes its weighted sum (float64)."""
    y = x.astype(np.float64).copy()
    for d, srcs in entries.items():
        y[d] = sum(w * x[s].astype(np.float64) for s, w in srcs)
    return y


def plan_entries(p: MergePlan) -> dict[int, list[tuple[int, float]]]:
    out: dict[int, list[tuple[int, float]]] = {}
    for s, d, w in zip(p.src.tolist(), p.dst.tolist(), p.weight.tolist(), strict=True):
        out.setdefault(d, []).append((s, w))
    return out


def clustered_keys(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Runs of near-identical keys, so that merging sets actually form."""
    base = rng.standard_normal((n + 1, d))
    run = np.cumsum(rng.random(n) < 0.3)
    return (base[run] + 0.05 * rng.standard_normal((n, d))).astype(np.float32)


# ------------------------------------------------------------------------------- KVMerger


def kvmerger_ref(keys, attn, eps, sigma, mergeable):
    n = len(attn)
    m = min(mergeable, n)
    entries: dict[int, list[tuple[int, float]]] = {}
    start = 0
    while start < m:
        end = start + 1
        while end < m and cos(keys[end - 1], keys[end]) >= eps:
            end += 1
        if end - start >= 2:
            idx = list(range(start, end))
            p = idx[int(np.argmax(attn[start:end]))]
            dist = [float(np.sum((keys[p].astype(np.float64) - keys[i]) ** 2)) for i in idx]
            s2 = sigma**2 if sigma is not None else sum(dist) / (len(idx) - 1)
            g = [math.exp(-q / (2 * s2)) if s2 > 0 else 1.0 for q in dist]
            z = sum(g)
            entries[p] = [(i, gi / z) for i, gi in zip(idx, g, strict=True)]
        start = end
    return entries


@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.5, 0.9, 0.99]))
def test_kvmerger_matches_reference(seed: int, eps: float) -> None:
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(1, 60)), 8
    keys = clustered_keys(rng, n, d)
    attn = rng.random(n).astype(np.float32)
    sigma = None if seed % 2 else 0.5
    mergeable = max(n - int(rng.integers(0, 8)), 0)
    p = kvmerger_plan(keys, attn, eps, sigma=sigma, mergeable=mergeable)
    ref = kvmerger_ref(keys, attn, eps, sigma, mergeable)
    got = plan_entries(p)
    assert got.keys() == ref.keys()
    for dst, srcs in ref.items():
        assert [s for s, _ in got[dst]] == [s for s, _ in srcs]
        np.testing.assert_allclose([w for _, w in got[dst]], [w for _, w in srcs], rtol=1e-6)
        assert abs(sum(w for _, w in got[dst]) - 1) < 1e-5
    v = rng.standard_normal((n, d)).astype(np.float32)
    np.testing.assert_allclose(p.apply(v), plain_apply(n, ref, v), rtol=1e-5, atol=1e-5)
    kept = p.kept_positions()
    assert (kept >= mergeable).sum() == max(n - mergeable, 0)  # the window survives


# ------------------------------------------------------------------------------------ EMS


def ems_ref(keys, attn, retained, threshold):
    n = len(attn)
    members: dict[int, list[int]] = {c: [] for c in retained}
    evicted = []
    for j in range(n):
        if j in members:
            continue
        best, bs = None, -math.inf
        for c in retained:
            s = cos(keys[j], keys[c])
            if s > bs:
                best, bs = c, s
        if best is not None and bs >= threshold:
            members[best].append(j)
        else:
            evicted.append(j)
    entries = {}
    for c, js in members.items():
        if not js:
            continue
        idx = [c, *js]
        z = float(sum(float(attn[i]) for i in idx))
        entries[c] = [(i, float(attn[i]) / z if z > 0 else 1 / len(idx)) for i in idx]
    return entries, evicted


@given(seed=st.integers(0, 10_000), threshold=st.sampled_from([-1.0, 0.0, 0.5, 0.95]))
def test_ems_matches_reference(seed: int, threshold: float) -> None:
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(1, 50)), 8
    keys = clustered_keys(rng, n, d)
    attn = rng.random(n).astype(np.float32)
    retained = np.sort(rng.choice(n, size=int(rng.integers(0, n + 1)), replace=False))
    p = ems_plan(keys, attn, retained, threshold)
    ref, evicted = ems_ref(keys, attn, retained.tolist(), threshold)
    assert p.evicted.tolist() == evicted
    got = plan_entries(p)
    assert got.keys() == ref.keys()
    for c, srcs in ref.items():
        assert [s for s, _ in got[c]] == [s for s, _ in srcs]
        np.testing.assert_allclose([w for _, w in got[c]], [w for _, w in srcs], rtol=1e-6)
    assert p.kept_positions().tolist() == retained.tolist()


# ------------------------------------------------------------------------ RazorAttention


@pytest.mark.parametrize("n", [3, 10, 256, 257, 1000])
def test_razor_compensation_token_is_the_mean(n: int) -> None:
    rng = np.random.default_rng(n)
    k = rng.standard_normal((n, 16)).astype(np.float32)
    v = rng.standard_normal((n, 16)).astype(np.float32)
    p = razor_plan(n)  # defaults: sink 4, local capacity 256
    if n <= 256:
        assert len(p) == 0 and p.kept_positions().tolist() == list(range(n))
        return
    tail = 256 - 4 - 1
    dropped = np.arange(4, n - tail)
    kept = p.kept_positions()
    assert kept.tolist() == [0, 1, 2, 3, 4, *range(n - tail, n)]
    assert len(kept) == 256
    for x in (k, v):
        y = p.apply(x)[kept]
        np.testing.assert_allclose(y[4], x[dropped].astype(np.float64).mean(0), atol=1e-5)
        np.testing.assert_array_equal(y[:4], x[:4])
        np.testing.assert_array_equal(y[5:], x[n - tail :])
    book = MergeBook(n)
    book.apply(p)
    bias = book.log_count_bias()
    assert bias[4] == pytest.approx(math.log(len(dropped)))
    assert (bias[np.arange(256) != 4] == 0).all()
    with pytest.raises(ValueError, match="at least sink \\+ 2"):
        razor_plan(10, sink=4, local_capacity=5)


# ------------------------------------------------------------------------------------ CaM


def cam_ref(attn, evicted, draws, window):
    n = len(attn)
    kept = [i for i in range(n) if i not in set(evicted)]
    amax = max([float(attn[i]) for i in kept], default=0.0)
    adds: dict[int, list[tuple[int, float]]] = {}
    zero = []
    for e, u in zip(evicted, draws, strict=True):
        p = min(max(float(attn[e]) / amax, 0.0), 1.0) if amax > 0 else 0.0
        rec = [k for k in kept if k > e][:window]
        if u < p and rec:
            for r in rec:
                adds.setdefault(r, []).append((e, 1 / len(rec)))
        else:
            zero.append(e)
    return {r: [*srcs, (r, 1.0)] for r, srcs in adds.items()}, zero


@given(seed=st.integers(0, 10_000), window=st.integers(1, 6))
def test_cam_matches_reference(seed: int, window: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    attn = rng.random(n).astype(np.float32)
    evicted = np.sort(rng.choice(n, size=int(rng.integers(0, n + 1)), replace=False))
    draws = rng.random(len(evicted)).astype(np.float32)
    p = cam_plan(attn, evicted, draws, window)
    ref, zero = cam_ref(attn, evicted.tolist(), draws.tolist(), window)
    assert p.evicted.tolist() == zero
    v = rng.standard_normal((n, 4)).astype(np.float32)
    np.testing.assert_allclose(p.apply(v), plain_apply(n, ref, v), rtol=1e-5, atol=1e-5)
    kept = [i for i in range(n) if i not in set(evicted.tolist())]
    assert p.kept_positions().tolist() == kept


# ---------------------------------------------------------------------- conservation


@given(seed=st.integers(0, 10_000))
def test_mass_is_conserved_through_merges_and_compaction(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, d = 80, 8
    keys = clustered_keys(rng, n, d)
    book = MergeBook(n)
    total = float(n)
    for step in range(4):
        m = book.num_slots
        attn = rng.random(m).astype(np.float32)
        kind = (seed + step) % 4
        if kind == 0:
            p = kvmerger_plan(keys, attn, 0.9)
        elif kind == 1:
            ret = np.sort(rng.choice(m, size=max(1, m // 2), replace=False))
            p = ems_plan(keys, attn, ret, 0.3)
        elif kind == 2:
            p = razor_plan(m, sink=2, local_capacity=max(4, m // 2))
        else:
            ev = np.sort(rng.choice(m, size=m // 3, replace=False))
            p = cam_plan(attn, ev, rng.random(len(ev)).astype(np.float32), 3)
        kept = book.apply(p)
        assert kept.tolist() == p.kept_positions().tolist()
        keys = p.apply(keys)[kept]
        assert book.total_mass + book.evicted_mass == pytest.approx(total)
        # a plain eviction afterwards (compaction) keeps the books balanced too
        keep = np.sort(rng.choice(book.num_slots, size=book.num_slots * 3 // 4, replace=False))
        book.compact(keep)
        keys = keys[keep]
        assert book.total_mass + book.evicted_mass == pytest.approx(total)
        book.extend(5)
        keys = np.concatenate([keys, rng.standard_normal((5, d)).astype(np.float32)])
        total += 5
    assert (book.mass >= 0).all()
    np.testing.assert_allclose(book.log_count_bias(), np.log(book.mass), rtol=1e-6)


def test_kvmerger_counts_tokens() -> None:
    # 3 identical keys then 2 identical keys: two sets, masses 3 and 2.
    keys = np.array([[1, 0]] * 3 + [[0, 1]] * 2, np.float32)
    attn = np.array([0.1, 0.9, 0.1, 0.2, 0.1], np.float32)
    p = kvmerger_plan(keys, attn, 0.99)
    book = MergeBook(5)
    assert book.apply(p).tolist() == [1, 3]
    assert book.mass.tolist() == [3.0, 2.0]


def test_plan_errors() -> None:
    with pytest.raises(ValueError, match="out of range"):
        MergePlan(3, np.array([0]), np.array([3]), np.array([1.0], np.float32))
    with pytest.raises(ValueError, match="one length"):
        MergePlan(3, np.array([0, 1]), np.array([1]), np.array([1.0], np.float32))
    with pytest.raises(ValueError, match="both evicted and a merge destination"):
        MergePlan(3, np.array([0]), np.array([1]), np.array([1.0], np.float32), np.array([1]))
    with pytest.raises(ValueError, match="non-negative"):
        MergePlan(3, np.array([0]), np.array([1]), np.array([-1.0], np.float32))
    with pytest.raises(TypeError, match="float32"):
        kvmerger_plan(np.zeros((3, 2)), np.zeros(3, np.float32), 0.9)
    with pytest.raises(ValueError, match="one entry per token"):
        kvmerger_plan(np.zeros((3, 2), np.float32), np.zeros(4, np.float32), 0.9)
    with pytest.raises(ValueError, match="non-finite"):
        kvmerger_plan(np.full((3, 2), np.nan, np.float32), np.zeros(3, np.float32), 0.9)
    with pytest.raises(InvalidPositionsError, match="strictly increasing"):
        ems_plan(np.ones((3, 2), np.float32), np.ones(3, np.float32), np.array([2, 1]), 0.5)
    with pytest.raises(InvalidPositionsError, match="strictly increasing"):
        MergeBook(3).compact(np.array([1, 1]))
    with pytest.raises(ValueError, match="one number per evicted token"):
        cam_plan(np.ones(3, np.float32), np.array([1]), np.ones(2, np.float32), 2)


# ------------------------------------------------------------------------------ MiniCache


def slerp_ref(a: np.ndarray, b: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ma = np.linalg.norm(a64, axis=1, keepdims=True)
    mb = np.linalg.norm(b64, axis=1, keepdims=True)
    u = np.divide(a64, ma, out=np.zeros_like(a64), where=ma > 0)
    v = np.divide(b64, mb, out=np.zeros_like(b64), where=mb > 0)
    w = np.arccos(np.clip((u * v).sum(1), -1 + 1e-7, 1 - 1e-7))[:, None]
    s = np.sin(w)
    small = s < 1e-6
    ca = np.where(small, 1 - t, np.sin((1 - t) * w) / np.where(small, 1, s))
    cb = np.where(small, t, np.sin(t * w) / np.where(small, 1, s))
    e = ca * u + cb * v
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return e, w[:, 0]


def test_minicache_matches_reference_and_error_is_bounded(record_property) -> None:
    rng = np.random.default_rng(7)
    n, d = 200, 64
    a = rng.standard_normal((n, d)).astype(np.float32)
    b = (a + 0.3 * rng.standard_normal((n, d))).astype(np.float32)  # similar adjacent layers
    pair = minicache_merge(a, b)  # t = 0.6, retention 5%
    e, w = slerp_ref(a, b, 0.6)
    np.testing.assert_allclose(pair.direction, e, atol=1e-6)
    np.testing.assert_allclose(pair.angle, w, atol=1e-6)
    r = math.ceil(0.05 * n)
    assert sorted(pair.retained.tolist()) == sorted(np.argsort(-w, kind="stable")[:r].tolist())
    report = {}
    for which, x, frac in ((0, a, 0.6), (1, b, 0.4)):
        y = pair.restore(which)
        err = np.linalg.norm(x - y, axis=1)
        mag = np.linalg.norm(x.astype(np.float64), axis=1)
        keep = np.zeros(n, bool)
        keep[pair.retained] = True
        assert (err[keep] == 0).all()
        assert (err[~keep] <= mag[~keep] * frac * w[~keep] + 1e-4).all()
        rel = float(np.linalg.norm(x - y) / np.linalg.norm(x))
        report[f"layer_{'ab'[which]}_rel_frobenius"] = rel
        assert rel < 0.3
    record_property("minicache_reconstruction", report)
    print("MiniCache relative Frobenius reconstruction error:", report)
    assert pair.num_stored_elements < 2 * n * d * 0.6
    assert minicache_layer_pairs(8) == [(4, 5), (6, 7)]
    with pytest.raises(ValueError, match="same shape"):
        minicache_merge(a, b[:10])
    with pytest.raises(ValueError, match="which must be 0"):
        pair.restore(2)


def test_exports() -> None:
    for name in ("MergePlan", "MergeBook", "kvmerger_plan", "ems_plan", "razor_plan", "cam_plan"):
        assert hasattr(kvcore, name)


def test_plan_composes_with_allocator_compaction() -> None:
    """A merge plan applied to K/V stored in allocator slots, then the allocator compacts the
    table to ``kept_positions()``: the table reads back the merged rows in order, and the
    MergeBook's mass follows the same moves."""
    rng = np.random.default_rng(11)
    n, d, bs = 50, 8, 4
    alloc = kvcore.BlockAllocator(64, bs)
    table = alloc.create_table()
    slots, _ = alloc.append(table, n)
    pool_k = np.zeros((64 * bs, d), np.float32)
    pool_k[slots] = clustered_keys(rng, n, d)
    attn = rng.random(n).astype(np.float32)
    keys = pool_k[alloc.slot_mapping(table)]
    plan = kvmerger_plan(keys, attn, 0.9)
    merged = plan.apply(keys)
    pool_k[alloc.slot_mapping(table)] = merged  # write the merged rows in place
    book = MergeBook(n)
    mass_before = book.mass.copy()
    kept = book.apply(plan)
    assert len(kept) < n
    src, dst = alloc.compact(table, kept)
    pool_k[dst] = pool_k[src]
    got = pool_k[alloc.slot_mapping(table)]
    np.testing.assert_array_equal(got, merged[kept])
    assert book.num_slots == alloc.num_tokens(table)
    assert book.total_mass == pytest.approx(mass_before.sum())


def test_huge_sizes_are_errors_not_aborts() -> None:
    with pytest.raises(ValueError, match="too large"):
        MergeBook(2**62)
    with pytest.raises(ValueError, match="too large"):
        razor_plan(2**62, sink=4, local_capacity=256)
    with pytest.raises(ValueError, match="too large"):
        MergeBook(3).extend(2**62)
    with pytest.raises(ValueError, match="overflow a byte count"):
        kvcore.kivi_nbytes(2**62, 2**20)
