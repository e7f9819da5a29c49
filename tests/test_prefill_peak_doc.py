"""docs/benchmarks.md's prefill-peak table quotes bench/results/prefill_peak*.json exactly."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Peak memory at prefill"
MIB = 2**20


def _rows(path: str) -> dict[str, dict[str, object]]:
    data = json.loads((ROOT / "bench" / "results" / path).read_text())
    return {r["method"]: r for r in data["rows"]}


def test_the_prefill_peak_table_matches_the_json() -> None:
    before, after = _rows("prefill_peak_before.json"), _rows("prefill_peak.json")
    assert before.keys() == after.keys()
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    section = doc[doc.index(HEADING) :]
    section = section[: section.find("\n## ", 1)]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in after:
            table[cells[0]] = cells[1:]
    assert table.keys() == after.keys(), "the table must list every method of the JSON"
    for name, cells in table.items():
        a, b = after[name], before[name]
        want = [
            f"{b['peak'] / MIB:.2f}",
            f"{a['peak'] / MIB:.2f}",
            f"{a['held'] / MIB:.2f}",
            f"{a['bound'] / MIB:.2f}",
            f"{a['full'] / MIB:.2f}",
            "yes" if a["meets_bound"] else "no",
        ]
        assert cells == want, name
