"""Collects the criterion results of the core allocator into ``bench/results/``.

    cargo bench -p kvcore-core --bench allocator      # writes target/criterion/
    .venv/bin/python bench/allocator_criterion.py     # -> bench/results/allocator_criterion.json

Criterion keeps one ``new/estimates.json`` per benchmark; this keeps the median (and its 95 %
confidence interval) of each, with the machine it ran on.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

from bench_allocator import loadavg, machine_info

ROOT = Path(__file__).resolve().parents[1]
CRITERION = ROOT / "target" / "criterion"
OUT = ROOT / "bench" / "results" / "allocator_criterion.json"


def main() -> int:
    rows = {}
    for est in sorted(CRITERION.glob("**/new/estimates.json")):
        bench = json.loads((est.parent / "benchmark.json").read_text())
        median = json.loads(est.read_text())["median"]
        rows[bench["full_id"]] = {
            "median_ns": round(median["point_estimate"], 1),
            "ci95_ns": [
                round(median["confidence_interval"]["lower_bound"], 1),
                round(median["confidence_interval"]["upper_bound"], 1),
            ],
        }
    if not rows:
        print(f"no criterion results under {CRITERION}: run cargo bench first", file=sys.stderr)
        return 1
    res = {
        "benchmark": "criterion, rust/kvcore-core/benches/allocator.rs (no Python in the way)",
        "command": "cargo bench -p kvcore-core --bench allocator",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {k: v for k, v in machine_info().items() if not k.startswith("kvcore")},
        "load_average": loadavg(),
        "results": rows,
    }
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    for name, r in rows.items():
        print(f"{name:45s} {r['median_ns'] / 1e3:10.3f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
