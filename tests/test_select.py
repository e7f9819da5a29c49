"""Per-row top-k with force-keep ranges (kvcore._kvcore.select_topk / select_per_layer).

The reference is a full stable sort in numpy: slow and obviously right. The Rust result must
match it exactly (selection is integer bookkeeping over a total order).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcore
from kvcore import _kvcore as k


def ref_row(
    scores: np.ndarray, budget: int, sinks: int, window: int, protected: list[tuple[int, int]]
) -> np.ndarray:
    """Forced tokens in priority order (sinks, newest window first, spans), then the rest by
    score descending with the lower position winning ties."""
    n = len(scores)
    if budget >= n:
        return np.arange(n)
    keep = np.zeros(n, bool)
    order = list(range(min(sinks, n)))
    order += list(range(n - 1, n - min(window, n) - 1, -1))
    for s, e in protected:
        order += list(range(min(s, n), min(e, n)))
    left = budget
    for i in order:
        if left and not keep[i]:
            keep[i] = True
            left -= 1
    rest = np.flatnonzero(~keep)
    # lexsort: last key is primary -> score descending, then position ascending.
    ranked = rest[np.lexsort((rest, -scores[rest].astype(np.float64)))]
    keep[ranked[:left]] = True
    return np.flatnonzero(keep)


def ref_select(scores, budgets, sinks=0, window=0, protected=()):
    rows = [
        ref_row(scores[r], int(budgets[r]), sinks, window, list(protected))
        for r in range(scores.shape[0])
    ]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    pos = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return indptr, pos


@st.composite
def problems(draw):
    rows = draw(st.integers(0, 5))
    n = draw(st.integers(0, 80))
    levels = draw(st.integers(1, 12))  # few distinct values: many ties
    scores = draw(
        st.lists(st.integers(-levels, levels), min_size=rows * n, max_size=rows * n).map(
            lambda v: (np.array(v, np.float32) * np.float32(0.37)).reshape(rows, n)
        )
    )
    budgets = np.array(
        draw(st.lists(st.integers(0, n + 3), min_size=rows, max_size=rows)), np.int64
    )
    sinks = draw(st.integers(0, 6))
    window = draw(st.integers(0, 10))
    spans = draw(st.lists(st.tuples(st.integers(0, 90), st.integers(0, 20)), max_size=2))
    protected = [(s, s + w) for s, w in spans]
    return scores, budgets, sinks, window, protected


@settings(max_examples=150)
@given(problems())
def test_matches_numpy_reference(p):
    scores, budgets, sinks, window, protected = p
    got = k.select_topk(scores, budgets, sinks=sinks, window=window, protected=protected)
    want = ref_select(scores, budgets, sinks, window, protected)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    n = scores.shape[1]
    np.testing.assert_array_equal(np.diff(got[0]), np.minimum(budgets, n))
    two = k.select_topk(
        scores, budgets, sinks=sinks, window=window, protected=protected, num_threads=2
    )
    np.testing.assert_array_equal(two[1], got[1])


@settings(max_examples=40)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 12000), st.data())
def test_wide_scores_match_reference(layers, heads, n, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    scores = (rng.standard_normal((layers * heads, n)) * 1e3).astype(np.float32)
    budget = data.draw(st.integers(0, n))
    got = k.select_topk(scores, budget, sinks=4, window=16)
    want = ref_select(scores, [budget] * (layers * heads), 4, 16)
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("k_", [1, 500, 1024, 2000, 6000])
def test_large_rows_with_adversarial_samples_and_ties(k_):
    # Rows of >= 4096 free tokens take a sampled-threshold fast path; here the sampled
    # (strided) entries are the high ones, which must send it to the exact fallback, and the
    # few score levels make ties everywhere.
    n = 8192
    s = (np.arange(n) % 7).astype(np.float32)[None, :].repeat(2, 0)
    s[:, ::8] = 10.0
    s[1] = s[1][::-1]
    got = k.select_topk(s, k_, sinks=3, window=5)
    want = ref_select(s, [k_, k_], 3, 5)
    np.testing.assert_array_equal(got[1], want[1])


def test_budget_at_least_length_keeps_all():
    s = np.random.default_rng(0).random((3, 10), dtype=np.float32)
    indptr, pos = k.select_topk(s, np.array([10, 11, 10**9]))
    np.testing.assert_array_equal(indptr, [0, 10, 20, 30])
    np.testing.assert_array_equal(pos, np.tile(np.arange(10), 3))


def test_budget_below_sinks_plus_window_keeps_sinks_then_newest():
    s = np.zeros((1, 20), np.float32)
    _, pos = k.select_topk(s, 6, sinks=4, window=8)
    np.testing.assert_array_equal(pos, [0, 1, 2, 3, 18, 19])
    _, pos = k.select_topk(s, 3, sinks=4, window=8)
    np.testing.assert_array_equal(pos, [0, 1, 2])


def test_ties_lower_position_wins_and_negative_zero_equals_zero():
    s = np.array([[1.0, 2.0, 2.0, 1.0, 2.0, -0.0, 0.0]], np.float32)
    _, pos = k.select_topk(s, 2)
    np.testing.assert_array_equal(pos, [1, 2])
    _, pos = k.select_topk(s[:, 5:], 1)
    np.testing.assert_array_equal(pos, [0])


def test_empty_inputs():
    indptr, pos = k.select_topk(np.zeros((0, 7), np.float32), 3)
    np.testing.assert_array_equal(indptr, [0])
    assert pos.size == 0
    indptr, pos = k.select_topk(np.zeros((4, 0), np.float32), 3, sinks=2, window=2)
    np.testing.assert_array_equal(indptr, [0, 0, 0, 0, 0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_a_clear_error(bad):
    s = np.ones((2, 5), np.float32)
    s[1, 3] = bad
    with pytest.raises(ValueError, match=r"finite.*row 1, position 3"):
        k.select_topk(s, 2)


def test_wrong_dtype_shape_and_budgets():
    with pytest.raises(TypeError, match="float32.*got dtype float64"):
        k.select_topk(np.ones((2, 3)), 1)
    with pytest.raises(TypeError, match="float32"):
        k.select_topk([[1.0, 2.0]], 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \(num_rows, n\)"):
        k.select_topk(np.ones(3, np.float32), 1)
    with pytest.raises(ValueError, match="one entry per row"):
        k.select_topk(np.ones((2, 3), np.float32), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="non-negative"):
        k.select_topk(np.ones((2, 3), np.float32), np.array([1, -2]))
    with pytest.raises(ValueError, match="start <= end"):
        k.select_topk(np.ones((1, 3), np.float32), 1, protected=[(2, 1)])
    with pytest.raises(TypeError, match="float32"):
        k.select_topk(np.ones((2, 3), np.float16), 1)


def test_one_head_many_layers_per_layer_selection():
    rng = np.random.default_rng(1)
    layers, heads, n = 40, 1, 50
    s = rng.random((layers, n), dtype=np.float32)
    indptr, pos = k.select_per_layer(s, heads, 7, window=1)
    want = ref_select(s, [7] * layers, 0, 1)
    np.testing.assert_array_equal(pos, want[1])
    indptr, pos = k.select_per_layer(s, 3, 7)
    assert len(indptr) == layers * 3 + 1
    for layer in range(layers):
        rows = [pos[indptr[layer * 3 + h] : indptr[layer * 3 + h + 1]] for h in range(3)]
        np.testing.assert_array_equal(rows[0], rows[1])
        np.testing.assert_array_equal(rows[0], rows[2])


def test_output_feeds_compact_batch():
    rng = np.random.default_rng(2)
    rows, n = 6, 100
    alloc = kvcore.BlockAllocator(200, 16)
    tables = alloc.create_tables(rows)
    alloc.append_batch(tables, n)
    budgets = np.array([0, 1, 17, 50, 99, 100])
    indptr, pos = k.select_topk(rng.random((rows, n), dtype=np.float32), budgets, sinks=1)
    alloc.compact_batch(tables, indptr, pos)
    assert [alloc.num_tokens(int(t)) for t in tables] == list(np.minimum(budgets, n))
    alloc.check_invariants()


def test_non_contiguous_input_is_accepted():
    s = np.random.default_rng(3).random((10, 8), dtype=np.float32).T  # (8, 10) view
    got = k.select_topk(s, 3)
    want = ref_select(np.ascontiguousarray(s), [3] * 8)
    np.testing.assert_array_equal(got[1], want[1])


def test_selection_releases_the_gil_and_is_thread_safe():
    """A counting thread keeps running Python while selection works (GIL released), and
    concurrent calls from several threads give the same results as serial ones."""
    import threading
    import time

    rng = np.random.default_rng(5)
    s = rng.random((64, 20000), dtype=np.float32)
    serial = k.select_topk(s, 1000, window=8)
    ticks: list[float] = []
    windows: list[tuple[float, float]] = []
    stop = threading.Event()
    started = threading.Event()

    def count() -> None:
        started.set()
        while not stop.is_set():
            ticks.append(time.perf_counter())

    results: list[tuple[np.ndarray, np.ndarray]] = []

    def work() -> None:
        for _ in range(3):
            t0 = time.perf_counter()
            results.append(k.select_topk(s, 1000, window=8))
            windows.append((t0, time.perf_counter()))

    c = threading.Thread(target=count)
    c.start()
    started.wait()
    workers = [threading.Thread(target=work) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    c.join()
    inside = sum(1 for x in ticks if any(a < x < b for a, b in windows))
    assert inside > 0, "no Python code ran while selection worked: the GIL was held"
    assert len(results) == 9
    for indptr, pos in results:
        np.testing.assert_array_equal(indptr, serial[0])
        np.testing.assert_array_equal(pos, serial[1])


@pytest.mark.parametrize(
    "call",
    [
        lambda: k.budget_uniform(-1, 3, 4),
        lambda: k.budget_pyramid(4, -100, 10, 2),
        lambda: k.plan_streaming(2, 10, -1, 3),
        lambda: k.select_topk(np.ones((1, 4), np.float32), 2, num_threads=-2),
        lambda: k.pool1d(np.ones((1, 4), np.float32), -3),
    ],
)
def test_negative_counts_are_value_errors(call):
    with pytest.raises(ValueError, match="non-negative"):
        call()


def test_bool_and_float_counts_are_type_errors():
    with pytest.raises(TypeError, match="int"):
        k.budget_uniform(True, 3, 4)
    with pytest.raises(TypeError, match="int"):
        k.plan_streaming(2, 10.0, 1, 3)  # type: ignore[arg-type]
