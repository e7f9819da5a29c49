"""The GPU section of docs/benchmarks.md, generated from the GPU checks in bench/results/.

``tools/gpu_check.py collect`` writes, per GPU (``<gpu>`` = its name in lower case with dashes,
e.g. ``nvidia-h200``): ``gpu_check_<gpu>.json`` (the steps, the sanitizer summaries, the test
count), ``kernels_<gpu>.json`` (bench/bench_kernels.py), ``e2e_<gpu>.json``
(bench/bench_e2e.py) and the logs. :func:`render` turns every ``gpu_check_*.json`` there into
one Markdown section; :func:`update_doc` puts it in place of the old one.
``tests/test_benchmarks_doc.py`` checks that the committed document is what :func:`render`
gives for the committed results, so the figures in the document are the JSONs' figures.

    python bench/gpu_report.py [--results bench/results] [--doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## CUDA kernels and end-to-end decode on a GPU"
E2E_TARGET_CONTEXT, E2E_TARGET_KEEP, E2E_TARGET_SPEEDUP = 32768, 0.125, 3.0

NOT_MEASURED = """\
**Not measured yet.** No GPU has been lent to this project's sessions so far, so no kernel has
run on a GPU and this section has no figure. The kernels (docs/kernels.md) pass their CPU
emulation and compile with NVRTC for sm_80 and sm_90. `tools/gpu_check.py` is the prepared
check for the next session that is lent one (docs/kernels.md, "The GPU check"): `tests/gpu`,
compute-sanitizer memcheck and racecheck on every kernel, `bench/bench_kernels.py --quick` and
`bench/bench_e2e.py --quick` in one command of under ten minutes; its dry run on the CPU is
part of the test suite (`tests/test_gpu_check.py`). This section is generated from what it
brings back (`make gpu-check-collect`).
"""

TARGETS = """\
Targets (issues 7 and 17): compaction and (de)quantization at >= 80 % of the device-to-device
copy bandwidth measured in the same run (and >= 1.5x the torch equivalent); decode attention
over int4 pages at 32k context (32 query heads, 8 KV heads, head_dim 128) >= 2x torch SDPA over
the fp16 full cache; end-to-end decode of a Llama-3.1-8B-shaped model at 32k context with 8x
compression (keep 0.125) >= 3x the full cache's tokens/s. compute-sanitizer memcheck and
racecheck clean.
"""


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


# memcheck ends its log with "ERROR SUMMARY: ...", racecheck with "RACECHECK SUMMARY: ..."
SANITIZER_SUMMARY = r"(?:ERROR|RACECHECK) SUMMARY: .*"


def sanitizer_summary(text: str) -> str | None:
    """The last summary line of a compute-sanitizer log's text, or None (also what
    ``tools/gpu_check.py run`` records as a sanitizer step's ``sanitizer``)."""
    found = re.findall(SANITIZER_SUMMARY, text)
    return found[-1].strip() if found else None


def _steps(summary: dict[str, Any], results: Path, tag: str) -> list[str]:
    """The steps' table. A sanitizer step shows its log's own summary line (read from the
    collected log, so a run whose summary.json missed it still shows what the tool said)."""
    lines = ["| step | status | seconds | summary |", "|---|---|---|---|"]
    for s in summary["steps"]:
        note = s.get("sanitizer")
        log = results / f"{s['step']}_{tag}.log"
        if not note and s["step"] in ("memcheck", "racecheck") and log.exists():
            note = sanitizer_summary(log.read_text(errors="replace"))
        note = note or s.get("summary") or s.get("reason") or ""
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {note} |")
    return lines


def _table(intro: str, columns: list[str], cells: list[list[str]]) -> list[str]:
    """An introduction line, then a Markdown table."""
    lines = [intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(c) + " |" for c in cells]


def _kernel_cells(r: dict[str, Any]) -> list[str]:
    if "error" in r:
        return [r["kernel"], f"error: {r['error'][:200]}"]
    return [
        r["kernel"],
        f"{r['ms']:.3f}",
        f"{r['torch_ms']:.3f}",
        f"{r['speedup_vs_torch']:.2f}x",
        f"{r['bandwidth_gbs']:.0f}",
        f"{100 * r['copy_fraction']:.1f} %",
    ]


def _kernels(k: dict[str, Any]) -> list[str]:
    lines = _table(
        f"Device-to-device copy: {k['copy_bandwidth_gbs']:.0f} GB/s (read + write); medians of "
        f"{k['reps']} runs after {k['warmup']} warm-ups.",
        ["kernel", "ms", "torch ms", "vs torch", "GB/s", "of copy"],
        [_kernel_cells(r) for r in k["rows"]],
    )
    lines.append("")
    for name, ok in k["targets"].items():
        lines.append(f"- target {'met' if ok else 'MISSED'}: {name}")
    return lines


def _e2e_cells(c: dict[str, Any]) -> list[str]:
    head = [c["method"], str(c["context"]), str(c["batch"])]
    if "error" in c:
        return [*head, c["error"]]
    peak = c.get("peak_memory_bytes")
    return [
        *head,
        f"{c['prefill_s']:.2f}",
        f"{c['decode_tokens_per_s']:.2f}",
        f"{c.get('decode_speedup_vs_full', 0):.2f}x",
        "-" if peak is None else f"{peak / 2**30:.2f}",
        f"{c['kv_bytes'] / 2**20:.2f}",
    ]


def _e2e(e: dict[str, Any]) -> list[str]:
    shape = e["model_shape"]
    lines = _table(
        f"Model: {shape.get('num_hidden_layers')} layers, hidden {shape.get('hidden_size')}, "
        f"{e['dtype']}, random weights; {e['new_tokens']} decode steps after a warm-up step; "
        f"prefill chunk {e['prefill_chunk']}; `{e['command']}`.",
        ["method", "context", "batch", "prefill s", "decode tok/s", "vs full", "peak GiB"]
        + ["KV MiB"],
        [_e2e_cells(c) for c in e["cells"]],
    )
    hits = [
        c
        for c in e["cells"]
        if c["context"] == E2E_TARGET_CONTEXT
        and c["method"].partition("@")[2].partition("+")[0] == str(E2E_TARGET_KEEP)
        and "decode_speedup_vs_full" in c
    ]
    lines.append("")
    if not hits:
        lines.append(
            f"- target not measured: no cell at {E2E_TARGET_CONTEXT} tokens with keep "
            f"{E2E_TARGET_KEEP}"
        )
    for c in hits:
        ok = c["decode_speedup_vs_full"] >= E2E_TARGET_SPEEDUP
        lines.append(
            f"- target {'met' if ok else 'MISSED'}: {c['method']} at {c['context']} tokens "
            f"decodes {c['decode_speedup_vs_full']:.2f}x the full cache's tokens/s "
            f"(target {E2E_TARGET_SPEEDUP:.0f}x)"
        )
    return lines


def render(results: Path) -> str:
    """The whole section (heading included) for the GPU checks in ``results``."""
    out = [
        f"{HEADING} (`tools/gpu_check.py`, results in `bench/results/*_<gpu>.json`)",
        "",
        "<!-- generated by bench/gpu_report.py from the gpu_check_*.json in bench/results; "
        "do not edit by hand -->",
        "",
        TARGETS,
    ]
    summaries = sorted(results.glob("gpu_check_*.json"))
    if not summaries:
        out.append(NOT_MEASURED)
    for path in summaries:
        tag = path.stem.removeprefix("gpu_check_")
        s = json.loads(path.read_text())
        build = s.get("build") or {}
        out += [
            f"### {s['device']} (run of {s['started_utc']}, commit "
            f"{str(build.get('commit'))[:10]}, wheel {s['wheel']})",
            "",
            *_steps(s, results, tag),
            "",
        ]
        k = _load(results / f"kernels_{tag}.json")
        out += [*_kernels(k), ""] if k else ["No kernel benchmark results.", ""]
        e = _load(results / f"e2e_{tag}.json")
        out += [*_e2e(e), ""] if e else ["No end-to-end results.", ""]
    return "\n".join(out).rstrip("\n") + "\n\n"  # a blank line before the next section


def section(doc: str) -> tuple[int, int]:
    """Start and end offsets of the GPU section in the document's text."""
    start = doc.index(HEADING)
    nxt = doc.find("\n## ", start + 1)
    return start, len(doc) if nxt < 0 else nxt + 1


def update_doc(doc: Path, results: Path) -> None:
    text = doc.read_text()
    start, end = section(text)
    doc.write_text(text[:start] + render(results) + text[end:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    update_doc(args.doc, args.results)
    print(f"regenerated the GPU section of {args.doc}")


if __name__ == "__main__":
    main()
