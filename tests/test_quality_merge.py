"""bench/quality_merge.py --kvcore: the kvcore cells of a later quality.py run join a grid's
JSON as if they had run with it, and a run of other tasks or another reference is refused."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import quality_merge as qm  # noqa: E402
import quality_report as qr  # noqa: E402

GRID = ROOT / "bench" / "results" / "quality_qwen4k.json"


def _split() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(the committed grid, the grid without its last two kvcore cells, a run of those two
    with its own full-cache cell)."""
    if not GRID.exists():
        pytest.skip(f"{GRID.name} is not committed")
    grid = json.loads(GRID.read_text())
    full = next(c for c in grid["cells"] if c["method"] == qr.FULL)
    later = [c for c in grid["cells"] if qr.side(c["method"]) == "kvcore"][-2:]
    base = dict(grid)
    base["cells"] = [c for c in grid["cells"] if c not in later]
    base["summary"] = qr.summaries(base["cells"])
    cells = [full, *later]
    run = {"model": grid["model"], "tasks": grid["tasks"], "command": "python bench/quality.py"}
    run |= {"cells": cells, "summary": qr.summaries(cells), "date_utc": "d", "seconds": 1.0}
    return grid, base, run


def _key(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


def test_a_later_runs_kvcore_cells_merge_into_the_grid() -> None:
    grid, base, run = _split()
    out = qm.merge_kvcore(base, run)
    assert _key(out["summary"]) == _key(grid["summary"])
    assert len(out["cells"]) == len(grid["cells"])  # the run's full cell is not added
    *earlier, record = out["kvcore_runs"]
    assert earlier == base.get("kvcore_runs", [])
    assert record["command"] == "python bench/quality.py"
    assert record["cells"] == [[c["method"], c["keep"]] for c in run["cells"][1:]]
    with pytest.raises(SystemExit, match="is in the JSON already"):
        qm.merge_kvcore(out, run)


def test_a_run_of_other_tasks_or_another_reference_is_refused() -> None:
    _, base, run = _split()
    other = copy.deepcopy(run)
    other["tasks"][0]["context_tokens"] += 1
    with pytest.raises(SystemExit, match="other tasks or another model"):
        qm.merge_kvcore(base, other)
    other = copy.deepcopy(run)
    next(r for r in other["summary"] if r["method"] == qr.FULL)["answered"].pop()
    with pytest.raises(SystemExit, match="full cache answered other questions"):
        qm.merge_kvcore(base, other)


def test_a_separate_kvpress_sides_cells_merge_into_the_grid() -> None:
    grid, _, _ = _split()
    presses = [c for c in grid["cells"] if qr.side(c["method"]) == "kvpress"]
    assert presses, "the committed grid has kvpress cells"
    base = dict(grid)
    base["cells"] = [c for c in grid["cells"] if c not in presses]
    base["summary"] = qr.summaries(base["cells"])
    out = qm.merge(base, {"cells": presses, "versions": {"kvpress": "x"}}, "kvpress_side.py")
    assert _key(out["summary"]) == _key(grid["summary"])
    assert out["keep"] == grid["keep"]
    assert out["kvpress_separate"]["command"] == "kvpress_side.py"
    assert out["kvpress_versions"] == {"kvpress": "x"}
    with pytest.raises(SystemExit, match="is in the JSON already"):
        qm.merge(out, {"cells": presses}, "kvpress_side.py")
    stray = copy.deepcopy(presses[:1])
    stray[0]["keep"] = -1.0
    stray[0]["rows"][0]["task"] = "no such task"
    with pytest.raises(SystemExit, match="ran tasks the JSON does not have"):
        qm.merge(base, {"cells": stray}, "kvpress_side.py")
