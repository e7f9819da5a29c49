"""docs/benchmarks.md quotes the committed quality JSONs exactly (every row of each table)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# section heading prefix in docs/benchmarks.md -> the JSON its table quotes
SECTIONS = {
    "## Quality on the embedded model": "quality.json",
    "## Quality at 2k and 4k tokens": "quality_long.json",
    "## Quality at 1k: every policy with every storage variant": "quality_grid.json",
    "## Storage variants at 2k and 4k tokens": "quality_long_variants.json",
}


def _table(section: str) -> dict[tuple[str, float], list[str]]:
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0] not in ("method",) and not cells[0].startswith("---"):
            rows[(cells[0], float(cells[1]))] = cells
    return rows


@pytest.mark.parametrize("heading", list(SECTIONS))
def test_quality_table_matches_the_json(heading: str) -> None:
    data = json.loads((ROOT / "bench" / "results" / SECTIONS[heading]).read_text())
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    section = doc[doc.index(heading) :]
    nxt = section.find("\n## ", 1)
    rows = _table(section if nxt < 0 else section[:nxt])
    assert len(rows) == len(data["summary"]), "the table must list every cell of the JSON"

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    for r in data["summary"]:
        cells = rows[(r["method"], r["keep"])]
        if "error" in r:
            assert cells[2].startswith("error"), r["method"]
            continue
        peak = r.get("kv_peak_bytes")
        assert cells[2:] == [
            fmt(r["accuracy"], ".2f"),
            fmt(r["passkey_accuracy"], ".2f"),
            format(r["kl"], ".3f"),
            format(r["top1"], ".3f"),
            fmt(r.get("ppl"), ".2f"),
            format(r["kv_bytes"] / 2**20, ".2f"),
            fmt(peak / 2**20 if peak else None, ".2f"),
        ], r["method"]


def test_speed_table_matches_the_json() -> None:
    data = json.loads((ROOT / "bench" / "results" / "quality_speed.json").read_text())
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    section = doc[doc.index("## Decode speed at 4k tokens") :]
    section = section[: section.find("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] != "method" and not cells[0].startswith("---"):
            rows[cells[0]] = cells[1:]
    assert len(rows) == len(data["cells"])
    for c in data["cells"]:
        assert rows[c["method"]] == [
            format(c["prefill_s_median"], ".2f"),
            format(c["decode_tokens_per_s_median"], ".2f"),
            format(c["decode_speed_vs_full_hf"], ".2f"),
            format(c["kv_bytes"] / 2**20, ".2f"),
        ], c["method"]


def _quality_report() -> Any:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import quality_report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return quality_report


def _section(heading: str) -> str:
    """The section of docs/benchmarks.md under ``heading``, up to the next one."""
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    section = doc[doc.index(heading) :]
    nxt = section.find("\n## ", 1)
    return section if nxt < 0 else section[:nxt]


def test_storage_variant_pivot_matches_the_jsons() -> None:
    """The KL (MiB) pivot of the storage-variant section is what quality_report prints from the
    two committed 1k JSONs."""
    quality_report = _quality_report()
    section = _section("## Quality at 1k: every policy with every storage variant")
    m = re.search(r"--kl-pivot ([a-z0-9,]+)`", section)
    assert m, "the section names the policies of its pivot"
    rows = [
        r
        for name in ("quality.json", "quality_grid.json")
        for r in json.loads((ROOT / "bench" / "results" / name).read_text())["summary"]
    ]
    pivot = quality_report.kl_pivot(rows, m.group(1).split(","))
    assert pivot in section
    assert pivot.count("\n") == 2 + 3 * len(m.group(1).split(",")) - 1


@pytest.mark.parametrize(
    "name", ["quality_qwen4k.json", "quality_qwen4k_aware.json", "quality_qwen4k_tasks.json"]
)
def test_qwen_4k_equal_memory_table_matches_the_json(name: str) -> None:
    """Once a 4k run on Qwen is committed (the grid, its query-aware side, the tasks the grid
    leaves out), the section quotes the equal-memory table that quality_report prints from
    its JSON, verbatim."""
    path = ROOT / "bench" / "results" / name
    if not path.exists():
        pytest.skip(f"bench/results/{name} is not committed yet (its run has not happened)")
    quality_report = _quality_report()
    section = _section("## Quality at 4k on Qwen2.5-Coder-0.5B")
    summary = json.loads(path.read_text())["summary"]
    assert quality_report.equal_memory(quality_report.with_fractions(summary)) in section


def test_int4_keys_section_quotes_the_json() -> None:
    """The int4 key-format section quotes the tables bench/int4_keys.py renders from its
    committed JSON (per-layer errors on Qwen at 4k, and the needle answers)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import int4_keys
    finally:
        sys.path.pop(0)
    res = json.loads((ROOT / "bench" / "results" / "int4_keys.json").read_text())
    assert res["answers"], "the committed run answered the needle questions (--answers)"
    assert int4_keys.markdown(res) in _section("## int4 keys on a model with outlier key channels")


def test_gpu_section_is_generated_from_the_gpu_checks() -> None:
    """The GPU section is exactly what bench/gpu_report.py renders from the committed
    gpu_check_*.json / kernels_*.json / e2e_*.json (tools/gpu_check.py collect)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    start, end = gpu_report.section(doc)
    assert doc[start:end] == gpu_report.render(ROOT / "bench" / "results"), (
        "regenerate it: python bench/gpu_report.py"
    )
    measured = sorted((ROOT / "bench" / "results").glob("gpu_check_*.json"))
    assert ("Not measured yet" in doc[start:end]) == (not measured)
