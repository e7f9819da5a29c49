"""Tables and the plot of the quality benchmark (``bench/quality.py`` writes the JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import quality_common as qc


def summaries(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for c in cells:
        row: dict[str, Any] = {"method": c["method"], "keep": c["keep"]}
        if "error" in c:
            row["error"] = c["error"]
        else:
            row.update(qc.summarize(c["rows"]))
        out.append(row)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'method':34s} {'keep':>6s} {'acc':>5s} {'pass':>5s} {'KL':>8s} {'top1':>6s} "
    head += f"{'ppl':>7s} {'KV MiB':>8s} {'prefill s':>9s}"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method']:34s} {r['keep']:6.3f}  error: {r['error'][:60]}")
            continue

        def f(x: Any, fmt: str) -> str:
            return format(x, fmt) if x is not None else "-"

        lines.append(
            f"{r['method']:34s} {r['keep']:6.3f} {f(r['accuracy'], '5.2f')} "
            f"{f(r['passkey_accuracy'], '5.2f')} {r['kl']:8.4f} {r['top1']:6.3f} "
            f"{f(r.get('ppl'), '7.3f')} {r['kv_bytes'] / 2**20:8.2f} {r['prefill_s']:9.2f}"
        )
    return "\n".join(lines)


def mib(x: int | None) -> float | None:
    """Bytes -> MiB; None (a run from before the peak was recorded) stays None."""
    return None if not x else x / 2**20


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table of docs/benchmarks.md (tests/test_benchmarks_doc.py checks it against the
    JSON)."""
    lines = [
        "| method | keep | accuracy | passkey | KL | top-1 | ppl | KV MiB held | KV MiB peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    for r in rows:
        if "error" in r:
            err = r["error"].replace("|", "/")[:80]
            lines.append(f"| {r['method']} | {r['keep']} | error: {err} | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['keep']} | {f(r['accuracy'], '.2f')} | "
            f"{f(r['passkey_accuracy'], '.2f')} | {r['kl']:.3f} | {r['top1']:.3f} | "
            f"{f(r.get('ppl'), '.2f')} | {r['kv_bytes'] / 2**20:.2f} | "
            f"{f(mib(r.get('kv_peak_bytes')), '.2f')} |"
        )
    return "\n".join(lines)


VARIANTS = ("", "+int4", "+kivi2", "+mikv2", "+ems")


def kl_pivot(rows: list[dict[str, Any]], policies: list[str]) -> str:
    """KL and KV MiB held of each policy with each storage variant, one row per (policy, kept
    fraction): the grid of docs/benchmarks.md (``rows``: the summaries of one or more runs)."""
    by = {(r["method"], r["keep"]): r for r in rows if "error" not in r}
    keeps = sorted({r["keep"] for r in rows if r["keep"] < 1.0}, reverse=True)
    names = ["native" if v == "" else v[1:] for v in VARIANTS]
    lines = ["| policy | keep | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]
    for pol in policies:
        for keep in keeps:
            cells = []
            for v in VARIANTS:
                r = by.get((f"kvcore:{pol}{v}", keep))
                cells.append("-" if r is None else f"{r['kl']:.3f} ({r['kv_bytes'] / 2**20:.1f})")
            lines.append(f"| {pol} | {keep} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(16, 6))
    methods = sorted({r["method"] for r in rows if "error" not in r})
    # enough distinct colours for a full grid: tab20 then tab20b, ours and theirs apart
    ours = [m for m in methods if not m.startswith("kvpress:")]
    theirs_m = [m for m in methods if m.startswith("kvpress:")]
    palette = [*plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors]
    color = {m: palette[i % len(palette)] for i, m in enumerate(ours)}
    dark = plt.get_cmap("Dark2").colors
    color.update({m: dark[i % len(dark)] for i, m in enumerate(theirs_m)})
    for m in methods:
        pts = sorted(
            (r for r in rows if r["method"] == m and "error" not in r), key=lambda r: r["kv_bytes"]
        )
        xs = [r["kv_bytes"] / 2**20 for r in pts]
        theirs = m.startswith("kvpress:")
        style = {"linestyle": "--", "marker": "x"} if theirs else {"linestyle": "-", "marker": "o"}
        if len(pts) == 1:
            style["marker"] = "*"
            style["markersize"] = 12
        style["color"] = color[m]
        axes[0].plot(xs, [r["accuracy"] or 0.0 for r in pts], label=m, **style)
        axes[1].plot(xs, [max(r["kl"], 1e-5) for r in pts], label=m, **style)
    axes[0].set_xlabel("KV bytes held over all tasks (MiB)")
    axes[0].set_ylabel("accuracy (passkey, facts, multi-turn)")
    axes[1].set_xlabel("KV bytes held over all tasks (MiB)")
    axes[1].set_ylabel("KL(full || compressed), mean per position")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="print the markdown table of a quality JSON")
    ap.add_argument("json", type=Path, nargs="+")
    ap.add_argument(
        "--kl-pivot",
        metavar="POLICIES",
        help="instead: KL (KV MiB) of these policies (comma list) x storage variants, "
        "over every given JSON",
    )
    args = ap.parse_args()
    summary = [r for p in args.json for r in json.loads(p.read_text())["summary"]]
    if args.kl_pivot:
        print(kl_pivot(summary, args.kl_pivot.split(",")))
    else:
        print(markdown(summary))
