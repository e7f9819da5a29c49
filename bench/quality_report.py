"""Tables and the plot of the quality benchmark (``bench/quality.py`` writes the JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import quality_common as qc


def summaries(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (method, kept fraction), and per protocol when the rows name one
    (``"agnostic"`` first, then ``"aware"``)."""
    out = []
    for c in cells:
        base: dict[str, Any] = {"method": c["method"], "keep": c["keep"]}
        if "error" in c:
            out.append(base | {"error": c["error"]})
            continue
        protocols = sorted({r["protocol"] for r in c["rows"] if "protocol" in r})
        if not protocols:
            out.append(base | qc.summarize(c["rows"]))
        for p in protocols:
            rows = [r for r in c["rows"] if r.get("protocol") == p]
            out.append(base | {"protocol": p} | qc.summarize(rows))
    return out


FULL = "full (HF DynamicCache)"


def side(method: str) -> str | None:
    """``"kvpress"``, ``"kvcore"``, or None for the full-cache references."""
    if method.startswith("kvpress:"):
        return None if method == "kvpress:full" else "kvpress"
    return None if method in (FULL, "kvcore:full") else "kvcore"


def with_fractions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows (without errors) of the protocols that have a full-cache row, each with
    ``bytes_frac`` (K/V bytes held over the full cache's, same protocol and tasks),
    ``peak_frac`` (peak prefill bytes over the full cache's) and ``retained`` (the share of
    the questions the full cache answers that this method answers too)."""
    full = {r.get("protocol"): r for r in rows if r["method"] == FULL and "error" not in r}
    out = []
    for r in rows:
        ref = full.get(r.get("protocol"))
        if "error" in r or ref is None:
            continue
        x = dict(r)
        x["bytes_frac"] = r["kv_bytes"] / ref["kv_bytes"]
        peak, ref_peak = r.get("kv_prefill_peak_bytes"), ref.get("kv_prefill_peak_bytes")
        x["peak_frac"] = peak / ref_peak if peak and ref_peak else None
        if "answered" in r and ref.get("answered"):
            both = set(r["answered"]) & set(ref["answered"])
            x["retained"] = len(both) / len(ref["answered"])
        out.append(x)
    return out


def pareto(points: list[dict[str, Any]], y: str = "accuracy") -> list[dict[str, Any]]:
    """The rows no other row beats: none holds at most as many bytes with at least the same
    ``y``, better in one of the two. Sorted by bytes, ``y`` strictly rising."""
    front: list[dict[str, Any]] = []
    for r in sorted(points, key=lambda r: (r["bytes_frac"], -(r[y] or 0.0))):
        if not front or (r[y] or 0.0) > (front[-1][y] or 0.0):
            front.append(r)
    return front


TARGETS = (0.5, 0.25, 0.125)


def best_at(
    rows: list[dict[str, Any]], who: str, protocol: str, frac: float
) -> dict[str, Any] | None:
    """``who``'s most accurate row of ``protocol`` holding at most ``frac`` of the full cache's
    bytes (ties: fewer bytes)."""
    fits = [
        r
        for r in rows
        if side(r["method"]) == who and r.get("protocol") == protocol and r["bytes_frac"] <= frac
    ]
    return max(fits, key=lambda r: (r["accuracy"] or 0.0, -r["bytes_frac"]), default=None)


def equal_memory(rows: list[dict[str, Any]]) -> str:
    """The equal-memory table: per protocol and byte fraction, kvcore's and kvpress's most
    accurate method within that many bytes (``rows``: :func:`with_fractions`)."""
    lines = [
        "| protocol | bytes held <= | side | best method | keep | accuracy | full cache's "
        "answers kept | bytes held | peak prefill | peak / (held + 1 layer) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for protocol in sorted({r.get("protocol") for r in rows if r.get("protocol")}):
        for frac in TARGETS:
            for who in ("kvcore", "kvpress"):
                b = best_at(rows, who, protocol, frac)
                if b is None:
                    lines.append(f"| {protocol} | {frac:.1%} | {who} | - | | | | | | |")
                    continue
                kept = "-" if b.get("retained") is None else f"{b['retained']:.0%}"
                peak = "-" if b.get("peak_frac") is None else f"{b['peak_frac']:.1%}"
                bound = b.get("prefill_peak_over_bound")
                bound_s = "-" if bound is None else f"{bound:.2f}"
                lines.append(
                    f"| {protocol} | {frac:.1%} | {who} | {b['method']} | {b['keep']} | "
                    f"{b['accuracy']:.2f} | {kept} | {b['bytes_frac']:.1%} | {peak} | {bound_s} |"
                )
    return "\n".join(lines)


def plot_pareto(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy against K/V bytes held (fraction of the full cache), one panel per protocol:
    every method as a dot, the Pareto fronts of kvcore (solid) and kvpress (dashed) as steps
    (``rows``: :func:`with_fractions`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = sorted({r.get("protocol") for r in rows if r.get("protocol")}) or [None]
    fig, axes = plt.subplots(1, len(protocols), figsize=(7 * len(protocols), 5.5), squeeze=False)
    styles = {"kvcore": ("tab:blue", "-", "o"), "kvpress": ("tab:orange", "--", "x")}
    for ax, protocol in zip(axes[0], protocols, strict=True):
        mine = [r for r in rows if r.get("protocol") == protocol and r["accuracy"] is not None]
        for who, (color, ls, marker) in styles.items():
            pts = [r for r in mine if side(r["method"]) == who]
            if not pts:
                continue
            ax.scatter(
                [r["bytes_frac"] for r in pts],
                [r["accuracy"] for r in pts],
                color=color,
                marker=marker,
                alpha=0.35,
                s=22,
            )
            front = pareto(pts)
            ax.step(
                [r["bytes_frac"] for r in front],
                [r["accuracy"] for r in front],
                where="post",
                color=color,
                linestyle=ls,
                label=f"{who} Pareto front",
            )
            for r in front:
                ax.annotate(
                    f"{r['method'].split(':', 1)[1]} {r['keep']}",
                    (r["bytes_frac"], r["accuracy"]),
                    fontsize=6,
                    color=color,
                    xytext=(3, -8),
                    textcoords="offset points",
                )
        full = [r for r in mine if r["method"] == FULL]
        if full:
            ax.scatter([1.0], [full[0]["accuracy"]], marker="*", s=160, color="k", label=FULL)
        for frac in TARGETS:
            ax.axvline(frac, color="0.85", linewidth=0.8, zorder=0)
        ax.set_xscale("log")
        ax.set_xlabel("K/V bytes held / full cache's (scales, zero points, residuals included)")
        ax.set_ylabel("accuracy (questions answered)")
        ax.set_title(f"{protocol or ''}")
        ax.set_ylim(-0.03, 1.03)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def long_table(rows: list[dict[str, Any]]) -> str:
    """The printed table of a long-suite run (``rows``: :func:`with_fractions`)."""
    head = f"{'method':34s} {'protocol':8s} {'keep':>6s} {'acc':>5s} {'score':>5s} {'kept':>5s} "
    head += f"{'KL':>7s} {'KV MiB':>8s} {'bytes':>6s} {'peak MiB':>8s} {'prefill s':>9s}"
    lines = [head]
    for r in rows:
        kept = "-" if r.get("retained") is None else f"{r['retained']:5.2f}"
        peak = r.get("kv_prefill_peak_bytes") or 0
        lines.append(
            f"{r['method']:34s} {r.get('protocol', '-'):8s} {r['keep']:6.3f} "
            f"{r['accuracy'] or 0:5.2f} {r.get('score', 0):5.2f} {kept:>5s} {r['kl']:7.3f} "
            f"{r['kv_bytes'] / 2**20:8.2f} {r['bytes_frac']:6.1%} {peak / 2**20:8.2f} "
            f"{r['prefill_s']:9.1f}"
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
    ap.add_argument(
        "--equal-memory",
        action="store_true",
        help="instead: the long suite's equal-memory table (best per side within 50/25/12.5 %% "
        "of the full cache's bytes) and the table of every cell",
    )
    args = ap.parse_args()
    summary = [r for p in args.json for r in json.loads(p.read_text())["summary"]]
    if args.equal_memory:
        judged = with_fractions(summary)
        print(equal_memory(judged) + "\n\n" + long_table(judged))
    elif args.kl_pivot:
        print(kl_pivot(summary, args.kl_pivot.split(",")))
    else:
        print(markdown(summary))
