"""Budget splits: uniform, weighted (HeadKV), PyramidKV and Ada-KV, against plain references.

Every split must be exact: it sums to min(total, sum of caps), never over and never leaving
budget unused while a row has tokens left.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore import _kvcore as k


def ref_split(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Water-filling + largest remainder, in exact rational arithmetic."""
    rows = len(weights)
    if total >= sum(caps):
        return list(caps)
    w = [Fraction(x) for x in weights]
    if all(x == 0 for x in w):
        w = [Fraction(1)] * rows
    out = [0] * rows
    active = [r for r in range(rows) if caps[r] > 0]
    remaining = total
    while True:
        wsum = sum(w[r] for r in active)
        sat = [r for r in active if wsum > 0 and remaining * w[r] / wsum >= caps[r]]
        if not sat:
            break
        for r in sat:
            out[r] = caps[r]
        active = [r for r in active if r not in sat]
        remaining = total - sum(out)
    wsum = sum(w[r] for r in active)
    shares = {r: (remaining * w[r] / wsum if wsum > 0 else Fraction(0)) for r in active}
    for r in active:
        out[r] = int(shares[r])  # floor (non-negative)
    left = remaining - sum(out[r] for r in active)
    order = sorted(active, key=lambda r: (-(shares[r] - int(shares[r])), r))
    while left > 0:
        moved = False
        for r in order:
            if left and out[r] < caps[r]:
                out[r] += 1
                left -= 1
                moved = True
        if not moved:
            break
    return out


def test_uniform_rounding_rule():
    np.testing.assert_array_equal(k.budget_uniform(10, 4, 100), [3, 3, 2, 2])
    np.testing.assert_array_equal(k.budget_uniform(10, 4, 2), [2, 2, 2, 2])
    assert k.budget_uniform(7, 0, 5).size == 0


@settings(max_examples=200)
@given(
    st.integers(0, 500),
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 120)), min_size=0, max_size=12),
)
def test_split_matches_exact_reference(total, rows):
    # Small-integer weights keep the float64 shares exact, so the result must be identical.
    weights = [float(w) for w, _ in rows]
    caps = [c for _, c in rows]
    got = k.budget_split(total, np.array(weights), np.array(caps, np.int64))
    assert got.tolist() == ref_split(total, weights, caps)
    assert got.sum() == min(total, sum(caps))
    assert all(0 <= g <= c for g, c in zip(got, caps, strict=True))


def test_split_rejects_bad_weights():
    with pytest.raises(ValueError, match="non-negative"):
        k.budget_split(3, np.array([1.0, -1.0]), 5)
    with pytest.raises(TypeError, match="float64"):
        k.budget_split(3, np.array([1, 2]), 5)


def ref_pyramid(L: int, n: int, C: int, w: int, beta: int) -> list[int]:
    """seed_algorithms.md 11.4, then the documented exactness fix."""
    c1 = C - w
    if n < C:
        return [n] * L
    if n < 2 * c1 or L == 1:
        return [C] * L
    mn = c1 // beta
    mx = 2 * c1 - mn
    if mx >= n - w:
        mx = n - w
        mn = 2 * c1 - mx
    steps = (mx - mn) // (L - 1)
    caps = [mx - layer * steps for layer in range(L)]
    excess = sum(caps) - L * c1
    while excess > 0:
        for i in range(L):
            if excess and caps[i] > 0:
                caps[i] -= 1
                excess -= 1
    return [min(c + w, n) for c in caps]


@settings(max_examples=200)
@given(st.integers(1, 40), st.integers(0, 20000), st.integers(1, 3000), st.data())
def test_pyramid_matches_reference_and_is_exact(L, n, C, data):
    w = data.draw(st.integers(0, C))
    beta = data.draw(st.integers(1, 30))
    got = k.budget_pyramid(L, n, C, w, beta).tolist()
    assert got == ref_pyramid(L, n, C, w, beta)
    if n >= C:
        assert sum(got) == L * C
        assert all(a >= b for a, b in zip(got, got[1:], strict=False))
    assert all(0 <= g <= n for g in got)


def test_pyramid_short_prompt_rules_and_errors():
    np.testing.assert_array_equal(k.budget_pyramid(4, 100, 200, 8), [100] * 4)
    np.testing.assert_array_equal(k.budget_pyramid(4, 300, 200, 8), [200] * 4)
    np.testing.assert_array_equal(k.budget_pyramid(4, 450, 300, 100), [450, 350, 250, 150])
    with pytest.raises(ValueError, match="window"):
        k.budget_pyramid(4, 450, 30, 100)
    with pytest.raises(ValueError, match="beta"):
        k.budget_pyramid(4, 450, 300, 10, 0)


def ref_adakv(scores: np.ndarray, budget: int, alpha: float, sinks: int, window: int) -> list[int]:
    L, H, n = scores.shape
    if budget >= n:
        return [n] * (L * H)
    forced = np.zeros(n, bool)
    left = budget
    for i in list(range(min(sinks, n))) + list(range(n - 1, n - min(window, n) - 1, -1)):
        if left and not forced[i]:
            forced[i] = True
            left -= 1
    F = budget - left
    b1 = budget - F
    floor = int(alpha * b1)
    out = []
    for layer in range(L):
        rest = []
        for h in range(H):
            cand = [(-float(scores[layer, h, i]), h, i) for i in range(n) if not forced[i]]
            cand.sort()
            rest += cand[floor:]
        rest.sort()
        counts = [0] * H
        for _, h, _ in rest[: H * (b1 - floor)]:
            counts[h] += 1
        out += [F + floor + c for c in counts]
    return out


@settings(max_examples=100)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(0, 60), st.data())
def test_adakv_matches_reference_and_is_exact(L, H, n, data):
    levels = data.draw(st.integers(1, 8))
    vals = data.draw(st.lists(st.integers(0, levels), min_size=L * H * n, max_size=L * H * n))
    scores = np.array(vals, np.float32).reshape(L, H, n)
    budget = data.draw(st.integers(0, n + 2))
    alpha = data.draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    sinks, window = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 5))
    got = k.budget_adakv(scores, budget, alpha, sinks=sinks, window=window)
    assert got.tolist() == ref_adakv(scores, budget, alpha, sinks, window)
    per_layer = got.reshape(L, H).sum(axis=1)
    assert (per_layer == H * min(budget, n)).all()
    # The budgets and select_topk agree: the union of kept tokens is the global choice.
    indptr, pos = k.select_topk(scores.reshape(L * H, n), got, sinks=sinks, window=window)
    np.testing.assert_array_equal(np.diff(indptr), got)
    fused = k.select_adakv(scores, budget, alpha, sinks=sinks, window=window)
    np.testing.assert_array_equal(fused[0], indptr)
    np.testing.assert_array_equal(fused[1], pos)


@settings(max_examples=20)
@given(st.integers(1, 2), st.integers(1, 8), st.integers(1000, 6000), st.data())
def test_adakv_large_rows_fast_path(L, H, n, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    scores = rng.random((L, H, n), dtype=np.float32)
    budget = data.draw(st.integers(0, n // 4))
    got = k.budget_adakv(scores, budget, 0.2, window=16)
    assert got.tolist() == ref_adakv(scores, budget, 0.2, 0, 16)


def test_adakv_errors():
    with pytest.raises(ValueError, match="alpha"):
        k.budget_adakv(np.ones((1, 2, 5), np.float32), 2, 1.5)
    with pytest.raises(ValueError, match=r"shape \(num_layers, num_heads, n\)"):
        k.budget_adakv(np.ones((2, 5), np.float32), 2)


@settings(max_examples=100)
@given(
    st.integers(1, 400),
    st.lists(st.integers(0, 50), min_size=1, max_size=16),
    st.integers(1, 600),
)
def test_head_weighted_is_exact(C, weights, n):
    w = np.array(weights, np.float64)
    got = k.budget_head_weighted(C, w, n)
    rows = len(weights)
    assert got.sum() == min(C, n) * rows
    assert (got <= n).all()
    base = min(C - int(C / 1.01), n)
    expect = [
        base + e for e in ref_split(min(C, n) * rows - base * rows, weights, [n - base] * rows)
    ]
    assert got.tolist() == expect
