"""kvcore.presets: the table is the committed grid's kvcore Pareto front, and a memory target
picks what bench/quality_report.py's equal-memory table calls kvcore's best."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
import presets_table  # noqa: E402
import quality  # noqa: E402
import quality_report as qr  # noqa: E402

import kvcore.hf as kh  # noqa: E402
from kvcore import presets  # noqa: E402
from kvcore.cache import Schedule  # noqa: E402


def _summary() -> list[dict[str, Any]]:
    path = ROOT / presets.SOURCE
    if not path.exists():
        pytest.skip(f"{presets.SOURCE} is not committed yet (the 4k grid has not run)")
    summary: list[dict[str, Any]] = json.loads(path.read_text())["summary"]
    return summary


def test_no_table_without_the_grid() -> None:
    """Until the grid's JSON is committed there is nothing measured to pick from, and
    memory= says so rather than guess."""
    if (ROOT / presets.SOURCE).exists():
        assert presets.MEASURED
    else:
        assert presets.MEASURED == ()
        with pytest.raises(ValueError, match="no measured presets"):
            presets.pick(0.25)


def test_the_table_is_the_committed_grids_front() -> None:
    """MEASURED is what bench/presets_table.py derives from the committed JSON: same methods,
    kept fractions, bytes and accuracies, and the keywords the benchmark ran them with."""
    front = presets_table.front(_summary())
    assert presets.MEASURED, "the table is empty"
    assert [(p.method, p.keep, p.bytes_frac, p.accuracy) for p in presets.MEASURED] == [
        (r["method"].removeprefix("kvcore:"), r["keep"], r["bytes_frac"], r["accuracy"])
        for r in front
    ]
    for p in presets.MEASURED:
        spec = quality.kvcore_methods([p.method])[f"kvcore:{p.method}"]
        kw = p.keywords(4000)
        assert {k: v for k, v in kw.items() if k not in ("budget", "schedule")} == spec
        assert kw["budget"] == max(1, round(p.keep * 4000))
        assert kw["schedule"] == Schedule.prefill(multi_turn="once")


def test_pick_is_the_equal_memory_best() -> None:
    """At every byte fraction the grid measured (and the report's targets), pick() answers the
    kvcore method quality_report.best_at names; where none fits, pick() refuses."""
    rows = qr.with_fractions(_summary())
    fracs = {*qr.TARGETS, 1.0, 0.01}
    fracs |= {r["bytes_frac"] for r in rows if qr.side(r["method"]) and r["bytes_frac"] <= 1.0}
    for f in sorted(fracs):
        best = qr.best_at(rows, "kvcore", presets_table.PROTOCOL, f)
        if best is None:
            with pytest.raises(ValueError, match="no measured recipe holds at most"):
                presets.pick(f)
            continue
        p = presets.pick(f)
        assert (p.method, p.keep) == (best["method"].removeprefix("kvcore:"), best["keep"]), f
        assert (p.bytes_frac, p.accuracy) == (best["bytes_frac"], best["accuracy"]), f


def _preset(method: str, bytes_frac: float, accuracy: float) -> presets.Preset:
    return presets.Preset(method, 0.5, "tova", None, None, None, bytes_frac, accuracy)


def test_page_sizes_travel_from_the_method_name_to_the_recipe() -> None:
    """``+bs64`` / ``+g64`` in a method's name set block_size / quant_group; the preset
    table prints them as keywords and the preset passes them to compressed_cache."""
    name = "full+k4v2+bs64+g64"
    spec = quality.kvcore_methods([name])[f"kvcore:{name}"]
    assert spec == {"policy": None, "kv_format": "k4v2", "block_size": 64, "quant_group": 64}
    row = {"method": f"kvcore:{name}", "keep": 1.0, "protocol": "agnostic"}
    full = {"method": qr.FULL, "keep": 1.0, "protocol": "agnostic"}
    summary = [
        {**full, "kv_bytes": 1000, "accuracy": 1.0},
        {**row, "kv_bytes": 240, "accuracy": 1.0},
    ]
    table = presets_table.render(summary)
    assert 'Preset("full+k4v2+bs64+g64", 1.0, None, "k4v2", None, None, 0.24, 1.0, ' in table
    assert "block_size=64, quant_group=64)," in table
    p = presets.Preset(name, 1.0, None, "k4v2", None, None, 0.24, 1.0, block_size=64)
    assert p.keywords(100)["block_size"] == 64 and "quant_group" not in p.keywords(100)
    for bad in ("full+bs16+bs32", "full+g0", "full+bs"):
        with pytest.raises(ValueError, match="unknown or repeated storage variant"):
            quality.kvcore_methods([bad])


def test_pick_prefers_accuracy_then_fewer_bytes() -> None:
    table = (_preset("a", 0.1, 0.5), _preset("b", 0.2, 0.75), _preset("c", 0.3, 0.75))
    assert presets.pick(0.1, table).method == "a"
    assert presets.pick(0.25, table).method == "b"
    assert presets.pick(1.0, table).method == "b"  # c is no better and holds more
    with pytest.raises(ValueError, match=r"smallest, a at keep 0.5, held 10.0%"):
        presets.pick(0.05, table)
    with pytest.raises(ValueError, match="no measured presets"):
        presets.pick(0.5, ())


@pytest.mark.parametrize(
    ("memory", "exc", "match"),
    [
        (0.0, ValueError, r"memory must be in \(0, 1\]"),
        (-0.25, ValueError, r"memory must be in \(0, 1\]"),
        (1.5, ValueError, r"memory must be in \(0, 1\]"),
        (math.nan, ValueError, r"memory must be in \(0, 1\]"),
        (True, TypeError, "memory must be a real number"),
        ("0.25", TypeError, "memory must be a real number"),
        (None, TypeError, "memory must be a real number"),
    ],
)
def test_pick_refuses_bad_memory(memory: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        presets.pick(memory)


@pytest.mark.parametrize(
    ("bad", "exc", "match"),
    [
        (0, ValueError, "must be an int >= 1, got 0"),
        (-1, ValueError, "must be non-negative, got -1"),
        (2.5, TypeError, "must be an int, got float"),
        (True, TypeError, "must be an int, got bool"),
        ("4096", TypeError, "must be an int, got str"),
        (None, TypeError, "must be an int, got NoneType"),
    ],
)
def test_bad_prompt_tokens_and_bytes(bad: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match="prompt_tokens " + match):
        _preset("a", 0.1, 0.5).keywords(bad)
    with pytest.raises(exc, match="memory_bytes " + match):
        presets.fraction_of(bad, 100)
    with pytest.raises(exc, match="full_bytes " + match):
        presets.fraction_of(100, bad)


def test_fraction_of_caps_at_the_full_cache() -> None:
    assert presets.fraction_of(25, 100) == 0.25
    assert presets.fraction_of(300, 100) == 1.0


# ------------------------------------------------------------------------------------------
# kvcore.hf.compressed_cache(model, memory=..., prompt_tokens=...)
# ------------------------------------------------------------------------------------------


def _full_bytes(model: Any, prompt_tokens: int) -> int:
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * itemsize * prompt_tokens


def _config_of(p: presets.Preset, cache: Any) -> tuple[Any, ...]:
    kv = cache.kv
    pol = kv.policy
    return (None if pol is None else pol.name, None if pol is None else pol.budget, kv.config)


def test_memory_builds_the_picked_recipe() -> None:
    from tiny_llama import tiny

    _summary()  # skips before the grid is committed
    model = tiny("sdpa")
    n = 200
    for memory in (0.125, 0.25, 0.5, 1.0):
        try:
            p = presets.pick(memory)
        except ValueError:
            continue
        got = kh.compressed_cache(model, memory=memory, prompt_tokens=n)
        want = kh.compressed_cache(model, **p.keywords(n))
        assert _config_of(p, got) == _config_of(p, want), memory
    # a byte budget picks by its share of this prompt's full cache
    full = _full_bytes(model, n)
    p = presets.pick(presets.MEASURED[-1].bytes_frac)
    got = kh.compressed_cache(model, memory_bytes=math.ceil(p.bytes_frac * full), prompt_tokens=n)
    assert _config_of(p, got) == _config_of(p, kh.compressed_cache(model, **p.keywords(n)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"memory": 0.25}, "memory= needs prompt_tokens="),
        ({"memory_bytes": 1000}, "memory_bytes= needs prompt_tokens="),
        ({"memory": 0.25, "memory_bytes": 1000, "prompt_tokens": 8}, "not both"),
        ({"memory": 0.25, "prompt_tokens": 8, "policy": "tova"}, "memory= picks policy"),
        ({"memory": 0.25, "prompt_tokens": 8, "budget": 4}, "memory= picks budget"),
        ({"memory": 0.25, "prompt_tokens": 8, "kv_format": "int4"}, "memory= picks kv_format"),
        ({"memory": 0.25, "prompt_tokens": 8, "block_size": 8}, "memory= picks block_size"),
        ({"memory_bytes": 10, "prompt_tokens": 8, "window": 4}, "memory_bytes= picks window"),
        ({"prompt_tokens": 8}, "prompt_tokens= goes with memory= or memory_bytes="),
        ({"memory": 2.0, "prompt_tokens": 8}, r"memory must be in \(0, 1\]"),
        ({"memory_bytes": 0, "prompt_tokens": 8}, "memory_bytes must be an int >= 1"),
        ({"memory": 0.25, "prompt_tokens": 0}, "prompt_tokens must be an int >= 1"),
    ],
)
def test_memory_refuses_conflicts(kwargs: dict[str, Any], match: str) -> None:
    from tiny_llama import tiny

    model = tiny("sdpa")
    with pytest.raises((ValueError, TypeError), match=match):
        kh.compressed_cache(model, **kwargs)


def test_policy_and_budget_keep_their_defaults() -> None:
    from tiny_llama import tiny

    cache = kh.compressed_cache(tiny("sdpa"))
    assert cache.kv.policy.name == "snapkv"
    assert cache.kv.policy.budget == 1024
