"""docs/benchmarks.md quotes the committed allocator benchmark JSONs exactly: every row of the
whole-trace, per-kind, micro-benchmark and criterion tables of its allocator section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
HEADING = "## Allocator"


def table_rows(data: dict[str, Any], crit: dict[str, Any]) -> list[str]:
    """The markdown rows the section must hold, rendered from the JSON."""
    tr = data["trace_replay"]
    rows = [
        f"| whole trace, CPU time | {tr['cpu_ops_per_s']['kvcore']:,.0f} "
        f"| {tr['cpu_ops_per_s']['python']:,.0f} | {tr['ratio']:.1f}x |",
        f"| whole trace, wall time | {tr['ops_per_s']['kvcore']:,.0f} "
        f"| {tr['ops_per_s']['python']:,.0f} | {tr['ratio_wall']:.1f}x |",
    ]
    for name, k in data["breakdown"]["by_kind"].items():
        rows.append(
            f"| {name} | {k['events']:,} | {k['kvcore_us_per_event']:.2f} "
            f"| {k['python_us_per_event']:.2f} | {k['ratio']:.1f}x |"
        )
    micro = data["micro"]
    for key in micro["kvcore"]:
        rows.append(
            f"| {key} | {micro['kvcore'][key]:.3f} | {micro['python'][key]:.3f} "
            f"| {micro['ratio'][key]:.1f}x |"
        )
    for name, r in crit["results"].items():
        rows.append(f"| {name} | {r['median_ns'] / 1e3:.3f} |")
    return rows


def test_allocator_section_quotes_the_json() -> None:
    data = json.loads((RESULTS / "allocator.json").read_text())
    crit = json.loads((RESULTS / "allocator_criterion.json").read_text())
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    section = doc[doc.index(HEADING) :]
    nxt = section.find("\n## ", 1)
    section = section if nxt < 0 else section[:nxt]
    lines = {line.strip() for line in section.splitlines()}
    for row in table_rows(data, crit):
        assert row in lines, f"docs/benchmarks.md lacks the row {row!r}"
    # The prose quotes the headline ratio and whether the target was met.
    assert f"{data['trace_replay']['ratio']:.1f}x" in section
    met = data["targets_met"]["trace_ratio_min"]
    assert ("target met" if met else "target not met") in section
