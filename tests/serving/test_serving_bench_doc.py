"""docs/benchmarks.md quotes bench/results/serving.json, serving_4k.json and serving_qwen.json
exactly (every run, and the targets)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JSON = ROOT / "bench" / "results" / "serving.json"
HEADING = "## Serving under continuous batching"


def section() -> str:
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    start = doc.index(HEADING)
    end = doc.find("\n## ", start + len(HEADING))
    return doc[start : end if end >= 0 else len(doc)]


@pytest.mark.parametrize("name", ["serving.json", "serving_4k.json", "serving_qwen.json"])
def test_serving_table_matches_the_json(name: str) -> None:
    path = JSON.with_name(name)
    if not path.exists():
        pytest.skip(f"bench/results/{name} is not committed yet (python bench/bench_serving.py)")
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_serving import table

    text = section()
    lines = [line for line in table(json.loads(path.read_text())).splitlines() if line]
    assert len(lines) >= 4
    for line in lines:
        assert line in text, line


def test_the_benchmark_runs_end_to_end_on_a_tiny_model(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch", reason="the benchmark needs torch")
    pytest.importorskip("transformers", reason="the benchmark needs transformers")
    try:
        import kvcore.serving.hf  # noqa: F401
    except ImportError as err:
        pytest.skip(str(err))
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_serving import main

    assert main(["--smoke", "--ratios", "4"]) == 0  # writes nothing, prints the table
    out = capsys.readouterr().out
    for run in ("engine", "kvcore", "kvcore-snapkv-4x", "kvcore-int4", "kvcore-int4-snapkv-2x"):
        assert f"{run}: in flight" in out
        assert f"| {run} |" in out
    assert "| KV MiB per request | compression |" in out
    # float32 pages of head size 8 against int4 ones in groups of 8: 32 bytes per vector
    # against 4 of codes + 4 of float16 scale and zero point, so 4x smaller per block
    row = next(line for line in out.splitlines() if line.startswith("| kvcore-int4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[10] == "4.00x", row
    # decode speed per CPU second beside wall time, and the engine measured twice
    assert "| decode tok per CPU s | vs engine (CPU) |" in out
    assert "| engine (repeat) |" in out
    assert "in CPU time (wall time" in out
    assert "`in_flight_3x` (targets_int4)" in out
