"""The policy registry: construction, validation, docs, and the select -> compact matrix."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import kvcore
from kvcore import policies as P

DOCS = Path(__file__).resolve().parent.parent / "docs" / "policies.md"
ALL = P.names()


def test_registry_has_every_method_of_the_issue():
    want = {
        "streaming",
        "h2o",
        "snapkv",
        "pyramidkv",
        "adakv",
        "tova",
        "knorm",
        "infinipot",
        "razor",
        "locret",
        "longgen",
        "expected_attention",
    }
    assert set(ALL) == want


@pytest.mark.parametrize("name", ALL)
def test_docstring_cites_the_paper_and_defaults_have_sources(name):
    cls = P.REGISTRY[name]
    assert cls.__doc__ and cls.paper in cls.__doc__
    assert cls.__name__.endswith("Policy")
    for key, p in cls.params.items():
        assert p.source, f"{name}.{key} has no source"
        assert p.check(p.default), f"{name}.{key}'s default fails its own check"
        if p.unverified:
            assert "unverified" in p.source and "unverified" in cls.__doc__
    assert P.get(name).config == {k: p.default for k, p in cls.params.items()}


def test_unknown_names_and_params_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown policy 'snap'.*snapkv.*pyramidkv"):
        P.get("snap")
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) windw.*valid parameters:.*window"):
        P.get("snapkv", windw=32)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("snapkv", {"window": -1}, "window must be an int > 0"),
        ("snapkv", {"kernel": 4}, "kernel must be a positive odd int"),
        ("snapkv", {"pooling": "mean"}, "pooling must be 'avg' or 'max'"),
        ("snapkv", {"window": 64, "budget": 32}, r"window \(64\) is larger than the budget \(32\)"),
        ("adakv", {"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ("pyramidkv", {"beta": 0}, "beta must be an int > 0"),
        ("streaming", {"sinks": True}, "sinks must be an int >= 0"),
        ("razor", {"sinks": 8, "local_capacity": 8}, "local_capacity"),
        ("locret", {"stabilizers": 100, "budget": 50}, "stabilizers"),
        ("knorm", {"skip_layers": (0, -1)}, "skip_layers"),
        ("longgen", {"layer_kinds": ("full", "dense")}, "layer_kinds"),
        ("h2o", {"budget": -3}, "budget must be None or an int >= 0"),
        ("expected_attention", {"n_future_positions": 0}, "n_future_positions must be an int"),
    ],
)
def test_parameter_validation(name, params, match):
    with pytest.raises(ValueError, match=match):
        P.get(name, **params)


def test_select_time_validation():
    pol = P.get("snapkv")
    s = np.zeros((1, 1, 100), np.float32)
    with pytest.raises(ValueError, match="larger than the budget"):
        pol.select(s, 16)
    with pytest.raises(ValueError, match="a budget is needed"):
        pol.select(s)
    with pytest.raises(TypeError, match="float32"):
        pol.select(s.astype(np.float64), 64)
    with pytest.raises(ValueError, match=r"shape \(num_layers, num_heads, n\)"):
        pol.select(s[0], 64)
    with pytest.raises(TypeError, match="unknown input"):
        P.get("locret", stabilizers=0).select(s, 8, finale=True)


def _doc_row(name: str) -> str:
    cls = P.REGISTRY[name]
    d = cls.describe()
    defaults = "; ".join(
        f"`{k}={v!r}`" + (" (unverified)" if cls.params[k].unverified else "")
        for k, v in d["defaults"].items()
    )
    needs = ", ".join(f"`{n}`" for n in d["needs"])
    return (
        f"| `{name}` | `{d['class']}` | {', '.join(d['phase'])} | {d['granularity']} | "
        f"{needs or '—'} | {defaults or '—'} | {cls.paper} |"
    )


def test_docs_table_matches_the_registry():
    rows = [
        ln for ln in DOCS.read_text().splitlines() if re.match(r"\| `\w+` \| `\w+Policy` \|", ln)
    ]
    assert rows == [_doc_row(n) for n in ALL]


# --- The matrix: every policy through select, then the allocator's compaction ------------


def _inputs(name: str, L: int, H: int, n: int, rng: np.random.Generator) -> dict:
    if name == "infinipot":
        return {"nuc": rng.random(n, dtype=np.float32)}
    if name == "razor":
        return {"retrieval": rng.random(L * H) < 0.3}
    return {}


def _expected(name: str, pol: P.Policy, L: int, H: int, n: int, budget: int, inputs: dict):
    """Per-row kept counts each policy promises, written from its definition."""
    b = min(budget, n)
    if name == "knorm":
        return np.repeat([n if layer in pol.skip_layers else b for layer in range(L)], H)
    if name == "razor":
        keep = n if n <= pol.local_capacity else pol.local_capacity - 1
        return np.where(inputs["retrieval"], n, keep)
    if name == "longgen":
        kinds = pol.kinds(L)
        return np.repeat([n if kd == "full" else b for kd in kinds], H)
    if name == "pyramidkv":
        return np.repeat(kvcore._kvcore.budget_pyramid(L, n, budget, pol.window, pol.beta), H)
    if name == "adakv":
        return None  # adaptive per head: checked per layer below
    return np.full(L * H, b)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    ("L", "H", "n", "budget"), [(3, 2, 400, 96), (1, 1, 50, 64), (5, 4, 700, 40)]
)
def test_every_policy_select_then_compact(name, L, H, n, budget):
    rng = np.random.default_rng(abs(hash((name, L, H, n))) % 2**32)
    params = {"window": 8} if name in ("snapkv", "pyramidkv", "adakv") else {}
    if name == "locret":
        params = {"stabilizers": 16}
    if name == "longgen":
        params = {"sinks": 4}
    pol = P.get(name, **params)
    scores = rng.random((L, H, n), dtype=np.float32)
    inputs = _inputs(name, L, H, n, rng)
    sel = pol.select(scores, budget, **inputs)

    counts = np.diff(sel.indptr)
    np.testing.assert_array_equal(counts, sel.budgets)
    expected = _expected(name, pol, L, H, n, budget, inputs)
    if expected is not None:
        np.testing.assert_array_equal(counts, expected)
    else:  # Ada-KV: each layer keeps H * b in all; each head at least window + its floor
        np.testing.assert_array_equal(counts.reshape(L, H).sum(1), H * min(budget, n))
        b = min(budget, n)
        floor = min(pol.window, b) + int(pol.alpha * (b - min(pol.window, b)))
        assert (counts >= floor).all()
    if name in ("h2o", "snapkv", "adakv", "tova", "locret", "infinipot", "streaming"):
        assert counts.sum() == L * H * min(budget, n)  # exact, nothing left unused
    if name == "pyramidkv" and n >= budget:
        assert counts.sum() == L * H * budget

    # One table per (layer, head); compaction must leave exactly the promised tokens.
    alloc = kvcore.BlockAllocator(L * H * (n // 16 + 2) + 1, 16)
    tables = alloc.create_tables(L * H)
    alloc.append_batch(tables, n)
    src, dst, _ = alloc.compact_batch(tables, sel.indptr, sel.positions)
    assert [alloc.num_tokens(int(t)) for t in tables] == counts.tolist()
    alloc.check_invariants()

    # Score state compacted by the same plan keeps the selected scores.
    state = kvcore.ScoreState(L * H)
    state.append(scores.reshape(L * H, n))
    state.compact(sel.indptr, sel.positions)
    _, vals = state.to_csr()
    np.testing.assert_array_equal(vals, scores.reshape(L * H, n)[_rows_of(sel), sel.positions])


def _rows_of(sel: P.Selection) -> np.ndarray:
    return np.repeat(np.arange(len(sel.indptr) - 1), np.diff(sel.indptr))


def test_snapkv_scores_from_window_attention_match_numpy():
    rng = np.random.default_rng(7)
    L, Hq, Hkv, w, n = 2, 4, 2, 3, 30
    probs = rng.random((L, Hq, w, n), dtype=np.float32)
    pol = P.get("snapkv", window=w, kernel=3, pooling="max")
    got = pol.score(probs, Hkv)
    summed = probs.astype(np.float64).sum(2).astype(np.float32)  # (L, Hq, n)
    grouped = summed.reshape(L, Hkv, Hq // Hkv, n).astype(np.float64).mean(2).astype(np.float32)
    pad = np.pad(grouped, ((0, 0), (0, 0), (1, 1)), constant_values=-np.inf)
    want = np.maximum(np.maximum(pad[..., :-2], pad[..., 1:-1]), pad[..., 2:])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_knorm_score_keeps_lowest_norms_and_skips_layers():
    rng = np.random.default_rng(8)
    keys = rng.standard_normal((3, 2, 40, 8)).astype(np.float32)
    pol = P.get("knorm", skip_layers=(1,))
    sel = pol.select(pol.score(keys), 10)
    norms = np.linalg.norm(keys.astype(np.float64), axis=-1)
    for row in range(6):
        kept = sel.positions[sel.indptr[row] : sel.indptr[row + 1]]
        layer, head = divmod(row, 2)
        if layer == 1:
            assert len(kept) == 40
        else:
            np.testing.assert_array_equal(kept, np.sort(np.argsort(norms[layer, head])[:10]))


def test_h2o_state_round_trip_with_selection():
    pol = P.get("h2o", recent_ratio=0.25, decay=0.5)
    state = pol.new_state(2)
    rng = np.random.default_rng(9)
    state.accumulate(rng.random((2, 50), dtype=np.float32), pol.decay)
    state.accumulate(rng.random((2, 51), dtype=np.float32), pol.decay)
    _, vals = state.to_csr()
    scores = vals.reshape(1, 2, 51)
    sel = pol.select(scores, 20)
    state.compact(sel.indptr, sel.positions)
    assert state.lengths().tolist() == [20, 20]
    # recent window of floor(0.25 * 20) = 5 tokens is always kept
    for r in range(2):
        assert set(range(46, 51)) <= set(sel.positions[sel.indptr[r] : sel.indptr[r + 1]].tolist())


def test_infinipot_schedule_and_tova_shared_sets():
    pol = P.get("infinipot", pot_size=100, compressed_ratio=0.25)
    assert pol.compressed_size() == 25
    assert not pol.should_compress(99) and pol.should_compress(100)
    pot = np.random.default_rng(2).random((2, 2, 100), dtype=np.float32)
    sel = pol.select(pot, nuc=np.arange(100, dtype=np.float32))
    assert np.diff(sel.indptr).tolist() == [25] * 4  # the compressed size by default
    # 12 = floor(0.5 * 25) novelty tokens (the newest, by this nuc) are shared by every head
    assert all(
        set(range(88, 100)) <= set(sel.positions[sel.indptr[r] : sel.indptr[r + 1]])
        for r in range(4)
    )
    tova = P.get("tova").select(np.random.default_rng(1).random((2, 3, 30), dtype=np.float32), 5)
    rows = [tova.positions[tova.indptr[i] : tova.indptr[i + 1]].tolist() for i in range(6)]
    assert rows[0] == rows[1] == rows[2] and rows[3] == rows[4] == rows[5]
    assert 29 in rows[0]  # the newest token is always kept


def test_razor_classify_then_select():
    pol = P.get("razor", local_capacity=16, sinks=2)
    echo = np.zeros((4, 25), np.float32)
    ind = np.zeros((4, 25), np.float32)
    echo[2, 3] = 1.0
    ind[0, :15] = np.arange(15, 0, -1, dtype=np.float32)
    heads = pol.classify(echo, ind)
    # 100 heads: ceil(1%) = 1 echo head, ceil(14%) = 14 induction heads
    assert heads.sum() == 15 and heads[2 * 25 + 3] and heads[:14].all() and not heads[14]
    sel = pol.select(np.zeros((4, 25, 40), np.float32), retrieval=heads)
    assert sel.num_dropped is not None
    assert (np.diff(sel.indptr)[heads] == 40).all()
    assert (sel.num_dropped[~heads] == 40 - 2 - 13).all()


def test_razor_without_compensation_gives_the_slot_to_the_window():
    pol = P.get("razor", local_capacity=16, sinks=2, compensation="none")
    sel = pol.select(np.zeros((1, 2, 40), np.float32), retrieval=np.array([False, True]))
    assert np.diff(sel.indptr).tolist() == [16, 40]
    np.testing.assert_array_equal(sel.positions[:16], [0, 1, *range(26, 40)])
    with pytest.raises(ValueError, match="compensation must be"):
        P.get("razor", compensation="sum")


def test_importing_kvcore_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, kvcore, kvcore.policies; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_score_helpers_check_types_and_shapes():
    with pytest.raises(TypeError, match=r"window_probs must be a numpy float32 array.*float64"):
        P.get("snapkv").score(np.ones((1, 2, 3, 4)), 2)
    with pytest.raises(ValueError, match=r"window_probs must have shape"):
        P.get("snapkv").score(np.ones((2, 3, 4), np.float32), 2)
    with pytest.raises(TypeError, match=r"keys must be a numpy float32 array.*list"):
        P.get("knorm").score([1.0])  # type: ignore[arg-type]
