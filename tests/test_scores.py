"""Score providers, ScoreState and rule-based plans, against plain numpy references.

Max reductions and selections are compared exactly. Sums are taken in float64 by both sides
and rounded once to float32; the summation order still differs (numpy is pairwise), so sums
are compared with rtol=1e-6, which is far below one float32 ulp of disagreement in practice.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvcore import _kvcore as k

SUM_RTOL = 1e-6


def arrays(shape_st):
    return shape_st.flatmap(
        lambda shape: st.integers(0, 2**32 - 1).map(
            lambda seed: np.random.default_rng(seed).random(shape, dtype=np.float32)
        )
    )


@settings(max_examples=60)
@given(arrays(st.tuples(st.integers(0, 4), st.integers(1, 6), st.integers(0, 40))))
def test_window_reduce(p):
    f64 = p.astype(np.float64)
    np.testing.assert_allclose(k.window_reduce(p, "sum"), f64.sum(1).astype(np.float32), SUM_RTOL)
    np.testing.assert_allclose(k.window_reduce(p, "mean"), f64.mean(1).astype(np.float32), SUM_RTOL)
    np.testing.assert_array_equal(k.window_reduce(p, "max"), p.max(1))


@settings(max_examples=60)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 30), st.integers(0, 2**32 - 1))
def test_group_reduce(hkv, g, n, seed):
    s = np.random.default_rng(seed).random((hkv * g, n), dtype=np.float32)
    grouped = s.reshape(hkv, g, n)
    np.testing.assert_allclose(
        k.group_reduce(s, hkv), grouped.astype(np.float64).mean(1).astype(np.float32), SUM_RTOL
    )
    np.testing.assert_array_equal(k.group_reduce(s, hkv, "max"), grouped.max(1))


def ref_pool(s: np.ndarray, kernel: int, how: str) -> np.ndarray:
    half = kernel // 2
    rows, n = s.shape
    out = np.zeros_like(s)
    for r in range(rows):
        for i in range(n):
            win = s[r, max(0, i - half) : min(n, i + half + 1)]
            out[r, i] = win.max() if how == "max" else win.astype(np.float64).sum() / kernel
    return out


@settings(max_examples=60)
@given(
    arrays(st.tuples(st.integers(0, 3), st.integers(0, 30))),
    st.sampled_from([1, 3, 5, 7]),
    st.sampled_from(["avg", "max"]),
)
def test_pool1d(s, kernel, how):
    got = k.pool1d(s, kernel, how)
    want = ref_pool(s, kernel, how)
    if how == "max":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, SUM_RTOL)


def test_pool_and_reduce_errors():
    s = np.ones((2, 5), np.float32)
    with pytest.raises(ValueError, match="odd"):
        k.pool1d(s, 4)
    with pytest.raises(ValueError, match="'avg', 'max'"):
        k.pool1d(s, 3, "sum")
    with pytest.raises(ValueError, match="multiple"):
        k.group_reduce(np.ones((3, 5), np.float32), 2)
    with pytest.raises(ValueError, match="positive"):
        k.window_reduce(np.ones((2, 0, 5), np.float32))
    with pytest.raises(TypeError, match="float32"):
        k.window_reduce(np.ones((2, 1, 5), np.float64))


def test_tova_and_key_norm():
    rng = np.random.default_rng(4)
    a = rng.random((3, 4, 20), dtype=np.float32)
    np.testing.assert_allclose(
        k.tova_scores(a), a.astype(np.float64).mean(1).astype(np.float32), SUM_RTOL
    )
    keys = rng.standard_normal((5, 20, 16)).astype(np.float32)
    want = -np.sqrt((keys.astype(np.float64) ** 2).sum(-1)).astype(np.float32)
    np.testing.assert_allclose(k.key_norm_scores(keys), want, SUM_RTOL)
    bad = keys.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        k.key_norm_scores(bad)


def ref_razor(P: np.ndarray, period: int, prefix: int) -> tuple[float, float]:
    s = P.shape[0]
    echo = np.zeros((s, s), bool)
    ind = np.zeros((s, s), bool)
    for i in range(s):
        for j in range(s):
            if i >= prefix and j >= prefix and j < i and (i - j) % period == 0:
                echo[i, j] = True
                ind[i, j + 1] = True
    P64 = P.astype(np.float64)
    return float((P64 * echo).sum() / s**2), float((P64 * ind).sum() / s**2)


@settings(max_examples=30)
@given(st.integers(1, 24), st.integers(1, 6), st.integers(0, 2), st.integers(0, 2**32 - 1))
def test_razor_head_scores(s, period, prefix, seed):
    P = np.random.default_rng(seed).random((s, s), dtype=np.float32)
    e, i = k.razor_head_scores(P, period, prefix)
    we, wi = ref_razor(P, period, prefix)
    assert e == pytest.approx(we, rel=SUM_RTOL, abs=1e-12)
    assert i == pytest.approx(wi, rel=SUM_RTOL, abs=1e-12)


def test_razor_retrieval_heads_on_calibration_like_maps():
    # 3 layers x 4 heads; head (1, 2) is a perfect echo head, (2, 0) a perfect induction head.
    period, prefix, s = 5, 1, 21
    maps = np.full((12, s, s), 1.0 / s, np.float32)
    e_map = np.zeros((s, s), np.float32)
    i_map = np.zeros((s, s), np.float32)
    for i in range(prefix + period, s):
        e_map[i, i - period] = 1.0
        i_map[i, i - period + 1] = 1.0
    maps[1 * 4 + 2] = e_map
    maps[2 * 4 + 0] = i_map
    scores = np.array([k.razor_head_scores(m, period, prefix) for m in maps], np.float32)
    heads = k.razor_retrieval_heads(scores[:, 0], scores[:, 1], 0.01, 0.05)
    assert np.flatnonzero(heads).tolist() == [6, 8]


@settings(max_examples=60)
@given(
    st.lists(st.floats(-5, 5, width=32), min_size=0, max_size=30),
    st.sampled_from([0.0, 0.01, 0.1, 0.5]),
    st.sampled_from([0.0, 0.14, 0.5]),
    st.integers(0, 2**32 - 1),
)
@example([-0.0, 0.0], 0.5, 0.0, 0)  # signed zeros tie (hypothesis found it)
def test_razor_retrieval_heads_reference(echo, er, ir, seed):
    e = np.array(echo, np.float32)
    i = np.random.default_rng(seed).random(len(e), dtype=np.float32)
    got = k.razor_retrieval_heads(e, i, er, ir)
    want = np.zeros(len(e), bool)
    for vals, ratio in ((e, er), (i, ir)):
        kk = min(len(e), int(np.ceil(round(ratio * len(e), 9))))
        order = np.lexsort((np.arange(len(e)), -vals.astype(np.float64)))
        want[order[:kk]] = True
    np.testing.assert_array_equal(got, want)


@settings(max_examples=60)
@given(st.integers(1, 4), st.lists(st.integers(0, 6), min_size=1, max_size=6), st.data())
def test_score_state_h2o_and_compaction_model(rows, steps, data):
    """A numpy model of H2O accumulation (with decay) interleaved with compactions."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    decay = data.draw(st.sampled_from([1.0, 0.5, 0.9]))
    state = k.ScoreState(rows)
    model = [np.zeros(0, np.float32) for _ in range(rows)]
    for q in steps:
        lengths = [len(m) for m in model]
        m = max(lengths) + q
        new = rng.random((rows, m), dtype=np.float32)
        state.accumulate(new, decay)
        for r in range(rows):
            old = model[r]
            upd = (np.float32(decay) * old + new[r, : len(old)]).astype(np.float32)
            model[r] = np.concatenate([upd, new[r, len(old) :]])
        # compact with a random plan (variable length per row, like Ada-KV)
        keep = [
            np.sort(rng.choice(len(x), rng.integers(0, len(x) + 1), replace=False)) for x in model
        ]
        indptr = np.concatenate([[0], np.cumsum([len(x) for x in keep])])
        state.compact(indptr, np.concatenate(keep).astype(np.int64))
        model = [x[kp] for x, kp in zip(model, keep, strict=True)]
        for r in range(rows):
            np.testing.assert_array_equal(state.row(r), model[r])
    assert state.lengths().tolist() == [len(x) for x in model]


def test_score_state_locret_append_and_errors():
    st_ = k.ScoreState(2)
    st_.append(np.array([[1, 2, 3], [4, 5, 6]], np.float32))
    st_.append(np.array([[7], [8]], np.float32))
    indptr, vals = st_.to_csr()
    np.testing.assert_array_equal(indptr, [0, 4, 8])
    np.testing.assert_array_equal(vals, [1, 2, 3, 7, 4, 5, 6, 8])
    st_.compact(np.array([0, 1, 3]), np.array([3, 0, 2]))
    np.testing.assert_array_equal(st_.row(0), [7])
    np.testing.assert_array_equal(st_.row(1), [4, 6])
    with pytest.raises(ValueError, match="ascending"):
        st_.compact(np.array([0, 0, 2]), np.array([1, 0]))
    with pytest.raises(ValueError, match="keep_indptr"):
        st_.compact(np.array([0, 5, 1]), np.array([0]))
    with pytest.raises(ValueError, match="rows"):
        st_.append(np.ones((3, 1), np.float32))
    with pytest.raises(ValueError, match="cover only"):
        st_.accumulate(np.ones((2, 1), np.float32))
    with pytest.raises(ValueError, match="decay"):
        st_.accumulate(np.ones((2, 5), np.float32), 2.0)
    with pytest.raises(ValueError, match="finite"):
        st_.append(np.full((2, 1), np.inf, np.float32))
    with pytest.raises(ValueError, match="out of range"):
        st_.row(2)


def test_streaming_longgen_razor_plans():
    indptr, pos = k.plan_streaming(2, 10, 2, 3)
    np.testing.assert_array_equal(indptr, [0, 5, 10])
    np.testing.assert_array_equal(pos[:5], [0, 1, 7, 8, 9])
    indptr, pos = k.plan_longgen(
        ["full", "sink", "block_sparse"], 2, 10, sinks=1, window=2, block=2, stride=3
    )
    rows = [pos[indptr[i] : indptr[i + 1]].tolist() for i in range(6)]
    assert rows[0] == list(range(10)) and rows[2] == [0, 8, 9] and rows[4] == [0, 1, 6, 7, 8, 9]
    assert rows[0] == rows[1] and rows[2] == rows[3] and rows[4] == rows[5]
    with pytest.raises(ValueError, match="layer kinds"):
        k.plan_longgen(["dense"], 1, 10, sinks=1, window=2)
    indptr, pos, dropped = k.plan_razor(np.array([True, False, False]), 300, 4, 256)
    assert np.diff(indptr).tolist() == [300, 255, 255]
    assert dropped.tolist() == [0, 45, 45]
    np.testing.assert_array_equal(pos[300:304], [0, 1, 2, 3])
    assert pos[304] == 300 - 251
    with pytest.raises(ValueError, match="local_capacity"):
        k.plan_razor(np.array([False]), 10, 4, 4)


def ref_infinipot(cap, nuc, compressed, ratio):
    rows, n = cap.shape
    kn = min(int(np.floor(ratio * compressed)), compressed, n)
    order = np.lexsort((np.arange(n), -nuc.astype(np.float64)))
    shared = set(order[:kn].tolist())
    out = []
    for r in range(rows):
        if compressed >= n:
            out.append(np.arange(n))
            continue
        rest = np.array([i for i in range(n) if i not in shared], np.int64)
        o = rest[np.lexsort((rest, -cap[r, rest].astype(np.float64)))]
        out.append(np.sort(np.concatenate([list(shared), o[: compressed - kn]]).astype(np.int64)))
    return out


@settings(max_examples=60)
@given(st.integers(1, 4), st.integers(0, 40), st.integers(0, 45), st.data())
def test_infinipot_plan(rows, n, compressed, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    cap = rng.integers(0, 5, (rows, n)).astype(np.float32)
    nuc = rng.integers(0, 5, n).astype(np.float32)
    ratio = data.draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    indptr, pos = k.plan_infinipot(cap, nuc, compressed, ratio)
    want = ref_infinipot(cap, nuc, compressed, ratio)
    for r in range(rows):
        np.testing.assert_array_equal(pos[indptr[r] : indptr[r + 1]], want[r])


def test_snapkv_scoring_matches_a_torch_reference():
    """The SnapKV chain (window sum, GQA mean, pooling) against torch written as kvpress
    and SnapKV write it (F.avg_pool1d with count_include_pad, F.max_pool1d)."""
    torch = pytest.importorskip("torch", reason="torch is optional: install kvcore[torch]")
    F = torch.nn.functional
    rng = np.random.default_rng(11)
    Hq, Hkv, w, n = 8, 2, 4, 50
    probs = rng.random((Hq, w, n), dtype=np.float32)
    summed = k.window_reduce(probs, "sum")
    grouped = k.group_reduce(summed, Hkv, "mean")
    t = torch.from_numpy(probs).double().sum(dim=1).float()
    t = t.view(Hkv, Hq // Hkv, n).double().mean(dim=1).float()
    np.testing.assert_allclose(grouped, t.numpy(), rtol=SUM_RTOL)
    for kernel in (1, 5, 7):
        avg = F.avg_pool1d(torch.from_numpy(grouped)[None], kernel, 1, kernel // 2)[0]
        mx = F.max_pool1d(torch.from_numpy(grouped)[None], kernel, 1, kernel // 2)[0]
        np.testing.assert_allclose(k.pool1d(grouped, kernel, "avg"), avg.numpy(), rtol=SUM_RTOL)
        np.testing.assert_array_equal(k.pool1d(grouped, kernel, "max"), mx.numpy())


def test_topk_matches_torch_topk_on_distinct_scores():
    """On distinct scores the kept set is torch's topk (kvpress: topk, then sort)."""
    torch = pytest.importorskip("torch", reason="torch is optional: install kvcore[torch]")
    rng = np.random.default_rng(12)
    s = rng.permutation(16 * 3000).astype(np.float32).reshape(16, 3000)
    indptr, pos = k.select_topk(s, 200)
    want = torch.from_numpy(s).topk(200, dim=-1).indices.sort(dim=-1).values
    np.testing.assert_array_equal(pos.reshape(16, 200), want.numpy())
