"""Add the cells of a separate run to a quality JSON of ``quality.py``:

    .venv/bin/python bench/quality_merge.py bench/results/quality_qwen4k.json KVPRESS.json \\
        --command "the kvpress_side.py command line" [--plot bench/results/quality_qwen4k.png]
    .venv/bin/python bench/quality_merge.py bench/results/quality_qwen4k.json RUN.json \\
        --kvcore [--plot bench/results/quality_qwen4k.png]

``quality.py`` runs kvpress's side after its own cells. On a machine too slow for both in a
row, kvpress's side can run beside it, on the ``tasks.json`` that ``quality.py`` wrote (same
token ids), and its cells be added afterwards. Refuses cells of other tasks, or of a
(method, kept fraction) the JSON already has. The summary is recomputed from the cells, the
plot redrawn, and the JSON records the kvpress command under ``kvpress_separate``.

``--kvcore`` adds the kvcore cells of another ``quality.py`` run (more cells of a grid, run
later): it refuses a run of other tasks (name, kind, protocol, context tokens, generation
metadata) or whose full cache answered differently, and records the run's command, date and
machine under ``kvcore_runs``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import quality_common as qc
import quality_report as qr


def _with_cells(result: dict[str, Any], new: list[dict[str, Any]]) -> dict[str, Any]:
    """``result`` with the cells ``new`` added, its summary and kept fractions recomputed (a
    new dict). Refuses a (method, kept fraction) ``result`` already has."""
    have = {(c["method"], c["keep"]) for c in result["cells"]}
    for c in new:
        if (c["method"], c["keep"]) in have:
            raise SystemExit(f"{c['method']} at keep {c['keep']} is in the JSON already")
    cells = result["cells"] + new
    out = dict(result)
    out["cells"] = cells
    out["summary"] = qr.summaries(cells)
    out["keep"] = sorted(set(result["keep"]) | {c["keep"] for c in new}, reverse=True)
    return out


def merge(result: dict[str, Any], side: dict[str, Any], command: str) -> dict[str, Any]:
    """``result`` with ``side``'s cells added and its summary recomputed (a new dict)."""
    names = {t["name"] for t in result["tasks"]}
    for c in side["cells"]:
        other = {r["task"] for r in c.get("rows", [])} - names
        if other:
            raise SystemExit(f"{c['method']} ran tasks the JSON does not have: {sorted(other)}")
    out = _with_cells(result, side["cells"])
    out["kvpress_versions"] = side.get("versions")
    out["kvpress_separate"] = {
        "command": command,
        "note": __doc__.split("\n\n")[1].strip(),
        # why the run's own kvpress side gave no cells (e.g. stopped for want of time)
        "run_kvpress_error": result.get("kvpress_error"),
    }
    out["kvpress_error"] = None
    return out


def merge_kvcore(result: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """``result`` with the kvcore cells of another ``quality.py`` run added and its summary
    recomputed (a new dict). The run's full-cache cell is its own KL reference: it must have
    answered what ``result``'s did, with the same bytes (same model, same token ids)."""
    if run.get("tasks") != result["tasks"] or run.get("model") != result.get("model"):
        raise SystemExit("the run has other tasks or another model than the JSON")

    def full_row(x: dict[str, Any]) -> dict[str, Any]:
        return next(r for r in x["summary"] if r["method"] == qr.FULL)

    a, b = full_row(result), full_row(run)
    if (a["answered"], a["kv_bytes"]) != (b["answered"], b["kv_bytes"]):
        raise SystemExit("the run's full cache answered other questions or held other bytes")
    new = [c for c in run["cells"] if qr.side(c["method"]) == "kvcore"]
    out = _with_cells(result, new)
    record = {k: run.get(k) for k in ("command", "date_utc", "seconds", "machine")}
    record["cells"] = [[c["method"], c["keep"]] for c in new]
    out["kvcore_runs"] = [*result.get("kvcore_runs", []), record]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("json", type=Path, help="quality.py's JSON (rewritten in place)")
    ap.add_argument("other", type=Path, help="kvpress_side.py's --out (or quality.py's)")
    ap.add_argument("--command", default=None, help="the kvpress_side.py command that ran")
    ap.add_argument("--kvcore", action="store_true", help="other is a quality.py run's JSON")
    ap.add_argument("--plot", type=Path, default=None, help="redraw this Pareto plot")
    args = ap.parse_args()
    result = json.loads(args.json.read_text())
    if result.get("suite") != "long":
        raise SystemExit("only long-suite JSONs (equal-memory judging) are merged")
    other = json.loads(args.other.read_text())
    if args.kvcore:
        out = merge_kvcore(result, other)
    elif args.command is None:
        raise SystemExit("--command (the kvpress_side.py command that ran) is required")
    else:
        out = merge(result, other, args.command)
    args.json.write_text(json.dumps(out, indent=1))
    judged = qr.with_fractions(out["summary"])
    print(qr.equal_memory(judged))
    if args.plot:
        title = qc.MODEL_TITLES[out["model"]]
        qr.plot_pareto(
            judged,
            args.plot,
            f"{title}: accuracy against K/V bytes held (Pareto fronts: kvcore solid, "
            "kvpress dashed)",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
