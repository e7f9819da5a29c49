"""Add the cells of a separate ``kvpress_side.py`` run to a quality JSON of ``quality.py``:

    .venv/bin/python bench/quality_merge.py bench/results/quality_qwen4k.json KVPRESS.json \\
        --command "the kvpress_side.py command line" [--plot bench/results/quality_qwen4k.png]

``quality.py`` runs kvpress's side after its own cells. On a machine too slow for both in a
row, kvpress's side can run beside it, on the ``tasks.json`` that ``quality.py`` wrote (same
token ids), and its cells be added afterwards. Refuses cells of other tasks, or of a
(method, kept fraction) the JSON already has. The summary is recomputed from the cells, the
plot redrawn, and the JSON records the kvpress command under ``kvpress_separate``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import quality_common as qc
import quality_report as qr


def merge(result: dict[str, Any], side: dict[str, Any], command: str) -> dict[str, Any]:
    """``result`` with ``side``'s cells added and its summary recomputed (a new dict)."""
    names = {t["name"] for t in result["tasks"]}
    have = {(c["method"], c["keep"]) for c in result["cells"]}
    for c in side["cells"]:
        if (c["method"], c["keep"]) in have:
            raise SystemExit(f"{c['method']} at keep {c['keep']} is in the JSON already")
        other = {r["task"] for r in c.get("rows", [])} - names
        if other:
            raise SystemExit(f"{c['method']} ran tasks the JSON does not have: {sorted(other)}")
    cells = result["cells"] + side["cells"]
    out = dict(result)
    out["cells"] = cells
    out["summary"] = qr.summaries(cells)
    out["kvpress_versions"] = side.get("versions")
    out["kvpress_separate"] = {
        "command": command,
        "note": __doc__.split("\n\n")[1].strip(),
        # why the run's own kvpress side gave no cells (e.g. stopped for want of time)
        "run_kvpress_error": result.get("kvpress_error"),
    }
    out["kvpress_error"] = None
    out["keep"] = sorted(set(result["keep"]) | {c["keep"] for c in side["cells"]}, reverse=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("json", type=Path, help="quality.py's JSON (rewritten in place)")
    ap.add_argument("kvpress", type=Path, help="kvpress_side.py's --out")
    ap.add_argument("--command", required=True, help="the kvpress_side.py command that ran")
    ap.add_argument("--plot", type=Path, default=None, help="redraw this Pareto plot")
    args = ap.parse_args()
    result = json.loads(args.json.read_text())
    if result.get("suite") != "long":
        raise SystemExit("only long-suite JSONs (equal-memory judging) are merged")
    out = merge(result, json.loads(args.kvpress.read_text()), args.command)
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
