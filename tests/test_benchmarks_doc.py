"""docs/benchmarks.md quotes the committed quality JSON exactly (every row of its table)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quality_table_matches_the_json() -> None:
    data = json.loads((ROOT / "bench" / "results" / "quality.json").read_text())
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    section = doc[doc.index("## Quality on the embedded model") :]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] not in ("method", "---"):
            rows[(cells[0], float(cells[1]))] = cells
    assert len(rows) == len(data["summary"]), "the table must list every cell of the JSON"

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    for r in data["summary"]:
        cells = rows[(r["method"], r["keep"])]
        if "error" in r:
            assert cells[2].startswith("error"), r["method"]
            continue
        assert cells[2:] == [
            fmt(r["accuracy"], ".2f"),
            fmt(r["passkey_accuracy"], ".2f"),
            format(r["kl"], ".3f"),
            format(r["top1"], ".3f"),
            fmt(r.get("ppl"), ".2f"),
            format(r["kv_bytes"] / 2**20, ".2f"),
        ], r["method"]
