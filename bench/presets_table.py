"""Print ``kvcore.presets.MEASURED`` from a committed long-suite quality JSON:

    .venv/bin/python bench/presets_table.py bench/results/quality_qwen4k.json

The table is kvcore's Pareto front (query-agnostic protocol): the kvcore methods that no other
kvcore method beats at equal or fewer bytes held (``quality_report.pareto`` over
``quality_report.with_fractions``), with the ``compressed_cache`` keywords of each
(``quality.kvcore_methods``). Paste the output over ``MEASURED`` in python/kvcore/presets.py;
tests/test_presets.py fails while the two disagree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import quality
import quality_report as qr

PROTOCOL = "agnostic"


def front(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """kvcore's Pareto front of the ``PROTOCOL`` rows of a quality JSON's summary."""
    rows = qr.with_fractions(summary)
    return qr.pareto(
        [r for r in rows if qr.side(r["method"]) == "kvcore" and r.get("protocol") == PROTOCOL]
    )


def render(summary: list[dict[str, Any]]) -> str:
    """The Python source of ``MEASURED``."""
    lines = ["MEASURED: tuple[Preset, ...] = ("]
    for r in front(summary):
        name = r["method"].removeprefix("kvcore:")
        spec = quality.kvcore_methods([name])[r["method"]]
        lines += [
            "    Preset(",
            f"        method={name!r},",
            f"        keep={r['keep']!r},",
            f"        policy={spec['policy']!r},",
            f"        kv_format={spec.get('kv_format')!r},",
            f"        merge={spec.get('merge')!r},",
            f"        evicted_format={spec.get('evicted_format')!r},",
            f"        bytes_frac={r['bytes_frac']!r},",
            f"        accuracy={r['accuracy']!r},",
            "    ),",
        ]
    return "\n".join([*lines, ")"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("json", type=Path)
    args = ap.parse_args()
    print(render(json.loads(args.json.read_text())["summary"]))
