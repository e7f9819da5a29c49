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
    """The Python source of ``MEASURED``: one positional ``Preset`` per line, in the field order
    method, keep, policy, kv_format, merge, evicted_format, bytes_frac, accuracy, then
    ``block_size=`` / ``quant_group=`` where the method sets them."""
    lines = [
        "# Preset(method, keep, policy, kv_format, merge, evicted_format, bytes_frac, accuracy)",
        "MEASURED: tuple[Preset, ...] = (",
    ]
    for r in front(summary):
        name = r["method"].removeprefix("kvcore:")
        spec = quality.kvcore_methods([name])[r["method"]]
        fields = (
            name,
            r["keep"],
            spec["policy"],
            spec.get("kv_format"),
            spec.get("merge"),
            spec.get("evicted_format"),
            r["bytes_frac"],
            r["accuracy"],
        )
        # the page sizes the method sets, as keywords (most recipes keep the defaults)
        sizes = [f"{k}={spec[k]}" for k in ("block_size", "quant_group") if k in spec]
        lines.append("    Preset(" + ", ".join([*(_py(v) for v in fields), *sizes]) + "),")
    return "\n".join([*lines, ")"])


def _py(value: Any) -> str:
    """A Python literal in ruff's style (double quotes)."""
    return f'"{value}"' if isinstance(value, str) else repr(value)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("json", type=Path)
    args = ap.parse_args()
    print(render(json.loads(args.json.read_text())["summary"]))
