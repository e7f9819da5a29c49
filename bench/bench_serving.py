"""Serving benchmark: transformers' continuous batching with its own cache and with kvcore's.

One process, one KV memory budget for every run, the same stream of requests: long real-text
prompts (``quality_tasks.needle_task``: a magic number hidden in CPython's reference prose, a
question whose answer is in the text), all submitted at once so that they arrive faster than
the engine serves them. Runs, side by side:

* ``engine``: transformers' ``PagedAttentionCache`` (``num_blocks`` of ``page_size`` tokens);
* ``kvcore``: ``kvcore.serving.hf`` without compression, same bytes;
* ``kvcore-snapkv-<r>x``: SnapKV at ``prompt / r`` tokens per request (r = 2, 4, 8), same bytes;
* ``kvcore-<fmt>``: per-token quantized pages (``--formats``, default int4) keeping every token,
  same bytes (so more blocks: an int4 block costs ~1/3.2 of a bf16 one on SmolLM2);
* ``kvcore-<fmt>-snapkv-<r>x``: the same pages with SnapKV at ``prompt / r`` (``--quant-ratios``,
  default 2).

Reported per run: requests in flight (the most requests decoding at the same moment, from the
token timestamps, the same measure for every cache), tokens per second (all generated tokens
over the wall time), decode tokens per second (tokens after each request's first, over the
span from the first first-token to the last token), time to first token (mean and max, from
submission), peak KV bytes (kvcore: blocks used at the peak; the engine: its cache tensor,
which it allocates whole), K/V bytes per request (the blocks one request holds at the end of
its decode: its kept prompt tokens plus its new tokens, at the format's bytes per block; the
engine: its prompt and new tokens in the model's dtype) and the compression this is against
the engine, answer accuracy (RULER's string match) and preemptions. The ratios to ``engine``
are the issue's targets: at 4x, at least 3x the requests in flight and 2x the decode tokens per
second (``targets_at_4x`` for SnapKV at 4x, ``targets_int4`` for int4 pages keeping every
token, ~3.2x, with the accuracy of the engine's cache).

    python bench/bench_serving.py                         # SmolLM2, 8 requests of 1k tokens
    python bench/bench_serving.py --tokens 4096 --requests 8
    python bench/bench_serving.py --smoke                 # tiny random model, writes nothing
    python bench/bench_serving.py --formats int4,int8 --quant-ratios 2,4
    python bench/bench_serving.py --model qwen --tokens 4096   # Qwen2.5-Coder-0.5B

Writes ``bench/results/serving.json`` and ``bench/results/serving.png`` (``--model qwen``:
``serving_qwen.json`` / ``.png``).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"


def requests(tok: Any, n: int, tokens: int, seed: int) -> list[tuple[list[int], list[str]]]:
    """``n`` needle prompts of about ``tokens`` tokens (context + question), with the strings a
    correct answer contains."""
    import quality_tasks as qt

    rng = random.Random(seed)
    out = []
    for i in range(n):
        depth = (0.1, 0.5, 0.9)[i % 3]
        task = qt.needle_task(tok, tokens, depth, rng)
        q = task.questions[0]
        out.append((task.context_ids + q.question_ids, q.required()))
    return out


def in_flight(spans: list[tuple[float, float]]) -> int:
    """The most intervals ``[first token, last token]`` that overlap at one moment."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def one_run(
    model: Any,
    tok: Any,
    reqs: list[tuple[list[int], list[str]]],
    name: str,
    kv_tokens: int,
    page: int,
    new_tokens: int,
    max_batch_tokens: int,
    policy: str | None = None,
    budget: int | None = None,
    kv_format: str = "native",
) -> dict[str, Any]:
    from quality_common import score
    from transformers import ContinuousBatchingConfig, GenerationConfig

    import kvcore.serving.hf as kvs
    from kvcore.hf import kv_bytes_per_token

    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1)
    gen.pad_token_id = tok.pad_token_id if tok is not None else 0
    cb = ContinuousBatchingConfig(
        num_blocks=kv_tokens // page, page_size=page, max_batch_tokens=max_batch_tokens
    )
    handle = None
    if name != "engine":
        kw: dict[str, Any] = {} if budget is None else {"window": min(16, budget)}
        handle = kvs.enable(model, policy, budget, block_size=page, kv_format=kv_format, **kw)
    try:
        mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        clock = CpuClock()
        mgr.start()
        t0 = time.perf_counter()
        ids = [
            mgr.add_request(p, max_new_tokens=new_tokens, record_timestamps=True) for p, _ in reqs
        ]
        submitted = time.perf_counter()
        got: dict[str, Any] = {}
        while len(got) < len(ids):
            r = mgr.get_result(timeout=600)
            if r is None:
                raise RuntimeError(f"{name}: no result within 600 s")
            got[r.request_id] = r
        wall = time.perf_counter() - t0
        clock.stop()
        cache = getattr(mgr, "kvcore_cache", None)
        stats = cache.stats() if cache is not None else {}
        if cache is None:  # the engine allocates its whole tensor (uint8) up front
            kv_bytes = int(mgr.batch_processor.cache.cache_tensor.numel())
        mgr.stop(block=True, timeout=30)
        model.destroy_cached_continuous_batching_manager()
    finally:
        if handle is not None:
            handle.remove()
    outs = [got[i] for i in ids]
    errors = [o.error for o in outs if o.error is not None]
    if errors:
        raise RuntimeError(f"{name}: {errors[0]}")
    spans = [(o.timestamps[0], o.timestamps[-1]) for o in outs]
    ttft = [o.timestamps[0] - t0 for o in outs]
    generated = sum(len(o.generated_tokens) for o in outs)
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    decode_span = last - first
    decode_cpu = clock.cpu_at(last) - clock.cpu_at(first)
    acc = [
        score(tok.decode(o.generated_tokens), req)
        for o, (_, req) in zip(outs, reqs, strict=True)
        if req  # the smoke run's random prompts ask nothing
    ]
    row: dict[str, Any] = {
        "run": name,
        "policy": policy,
        "budget": budget,
        "kv_format": None if name == "engine" else kv_format,
        "requests_in_flight": in_flight(spans),
        "tokens_per_s": generated / wall,
        "decode_tokens_per_s": (generated - len(outs)) / decode_span if decode_span > 0 else None,
        # the same tokens over the process's CPU time in that span (one torch thread: what a
        # core gives, whatever else the machine runs)
        "decode_tokens_per_cpu_s": (generated - len(outs)) / decode_cpu if decode_cpu > 0 else None,
        "ttft_mean_s": sum(ttft) / len(ttft),
        "ttft_max_s": max(ttft),
        "wall_s": wall,
        "submit_s": submitted - t0,
        "accuracy": sum(acc) / len(acc) if acc else None,
        "answers": [tok.decode(o.generated_tokens) for o in outs],
    }
    kept = [len(p) if budget is None else min(len(p), budget) for p, _ in reqs]
    stored = [-(-(k + new_tokens) // page) for k in kept]  # blocks held at the end
    if stats:
        keys = ("peak_kv_bytes", "preemptions", "compressions", "tokens_evicted", "blocks_freed")
        row.update({k: stats[k] for k in keys}, kv_bytes_budget=stats["kv_bytes"])
        per_block = stats["bytes_per_block"]
        row.update(blocks=stats["capacity"], bytes_per_block=per_block)
    else:
        per_block = page * kv_bytes_per_token(model)
        row.update(peak_kv_bytes=kv_bytes, kv_bytes_budget=kv_bytes, preemptions=None)
    row["kv_bytes_per_request"] = sum(stored) * per_block / len(stored)
    print(
        f"{name:>20}: in flight {row['requests_in_flight']}, {row['tokens_per_s']:.1f} tok/s, "
        f"decode {row['decode_tokens_per_s'] or 0:.1f} tok/s "
        f"({row['decode_tokens_per_cpu_s'] or 0:.1f} per CPU s), TTFT {row['ttft_mean_s']:.1f} s, "
        f"peak KV {row['peak_kv_bytes'] / 2**20:.2f} MiB, "
        f"{row['kv_bytes_per_request'] / 2**20:.2f} MiB per request, accuracy {row['accuracy']}",
        flush=True,
    )
    return row


class CpuClock:
    """Samples (wall, process CPU time) every 10 ms in a thread while a run serves, so the CPU
    time the process spent between two of the engine's token timestamps (``perf_counter``) can
    be read back. On a shared machine wall time measures the wait for a core as much as the
    work; with one torch thread, CPU time measures the work."""

    def __init__(self) -> None:
        import threading

        self.samples = [(time.perf_counter(), time.process_time())]
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.01):
            self.samples.append((time.perf_counter(), time.process_time()))

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), time.process_time()))

    def cpu_at(self, t: float) -> float:
        """Process CPU seconds at wall time ``t``, interpolated between samples."""
        s = self.samples
        if t <= s[0][0]:
            return s[0][1]
        for (w0, c0), (w1, c1) in itertools.pairwise(s):
            if w0 <= t <= w1:
                return c0 + (c1 - c0) * ((t - w0) / (w1 - w0) if w1 > w0 else 0.0)
        return s[-1][1]


def table(result: dict[str, Any]) -> str:
    """The markdown table and target lines docs/benchmarks.md quotes (``--table``). Results
    written before quantized pages were served have no per-request bytes: their table has no
    such columns."""
    per_request = all("kv_bytes_per_request" in r for r in result["runs"])
    cpu = all("decode_tokens_per_cpu_s" in r for r in result["runs"])
    head = (
        "| run | in flight | vs engine | tok/s | decode tok/s | decode vs engine | "
        "mean TTFT s | peak KV MiB | accuracy |"
    )
    rule = "|---|---|---|---|---|---|---|---|---|"
    if per_request:
        head += " KV MiB per request | compression |"
        rule += "---|---|"
    if cpu:
        head += " decode tok per CPU s | vs engine (CPU) |"
        rule += "---|---|"
    lines = [head + "\n" + rule]
    for r in result["runs"]:
        dec, vs = r["decode_tokens_per_s"], r["decode_tok_s_vs_engine"]
        cells = [
            r["run"],
            str(r["requests_in_flight"]),
            f"{r['in_flight_vs_engine']:.2f}",
            f"{r['tokens_per_s']:.2f}",
            "-" if dec is None else f"{dec:.2f}",
            "-" if vs is None else f"{vs:.2f}",
            f"{r['ttft_mean_s']:.1f}",
            f"{r['peak_kv_bytes'] / 2**20:.2f}",
            "-" if r["accuracy"] is None else f"{r['accuracy']:.2f}",
        ]
        if per_request:
            cells += [f"{r['kv_bytes_per_request'] / 2**20:.2f}", f"{r['compression']:.2f}x"]
        if cpu:
            c, cv = r["decode_tokens_per_cpu_s"], r["decode_cpu_vs_engine"]
            cells += ["-" if c is None else f"{c:.2f}", "-" if cv is None else f"{cv:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for group in ("targets_at_4x", "targets_int4"):
        for key, t in (result.get(group) or {}).items():
            word = "met" if t["met"] else "missed"
            where = "" if group == "targets_at_4x" else f" ({group})"
            how = f" in CPU time (wall time {t['wall_ratio']:.2f}x)" if "wall_ratio" in t else ""
            lines.append(f"- `{key}`{where}: {t['ratio']:.2f}x{how}, **{word}**")
    return "\n".join(lines)


def targets(row: dict[str, Any] | None, base: dict[str, Any]) -> dict[str, Any] | None:
    """The issue's targets for one run against the engine's: 3x the requests in flight, 2x
    the decode tokens per second, and (``accuracy_kept``) the engine's accuracy."""
    if row is None:
        return None
    dec = row["decode_tok_s_vs_engine"]
    decode: dict[str, Any] = {"ratio": dec, "met": bool(dec and dec >= 2)}
    cpu = row.get("decode_cpu_vs_engine")
    if cpu is not None:  # CPU time is the headline; wall time waits for a shared core too
        decode = {"ratio": cpu, "met": cpu >= 2, "wall_ratio": dec}
    out = {
        "in_flight_3x": {
            "ratio": row["in_flight_vs_engine"],
            "met": row["in_flight_vs_engine"] >= 3,
        },
        "decode_2x": decode,
    }
    if row["accuracy"] is not None and base["accuracy"]:
        ratio = row["accuracy"] / base["accuracy"]
        out["accuracy_kept"] = {"ratio": ratio, "met": ratio >= 1}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["runs"]
    names = [r["run"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, key, title in zip(
        axes,
        ["requests_in_flight", "decode_tokens_per_s", "ttft_mean_s", "accuracy"],
        ["requests in flight", "decode tokens/s", "mean TTFT (s)", "accuracy"],
        strict=True,
    ):
        ax.bar(names, [r[key] or 0 for r in rows], color="tab:blue")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
    cfg = result["config"]
    fig.suptitle(
        f"{cfg['model']}: {cfg['requests']} requests of {cfg['tokens']} tokens, KV budget "
        f"{cfg['kv_tokens']} tokens ({cfg['kv_bytes'] / 2**20:.1f} MiB), same for every run"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024, help="prompt tokens per request")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument(
        "--kv-requests",
        type=float,
        default=2.0,
        help="the KV budget, in uncompressed requests (prompt + new tokens)",
    )
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--max-batch-tokens", type=int, default=512)
    ap.add_argument("--ratios", default="2,4,8")
    ap.add_argument("--formats", default="int4", help="quantized page formats to run ('' for none)")
    ap.add_argument(
        "--quant-ratios", default="2", help="SnapKV ratios also run over each quantized format"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--smoke", action="store_true", help="tiny random model; prints the table, writes nothing"
    )
    ap.add_argument(
        "--model",
        choices=("smollm2", "qwen"),
        default="smollm2",
        help="SmolLM2-135M (embedded) or Qwen2.5-Coder-0.5B (`make model-qwen`)",
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="default: bench/results/serving[_qwen].json"
    )
    ap.add_argument(
        "--table", action="store_true", help="print the docs table of --out, run nothing"
    )
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / ("serving.json" if args.model == "smollm2" else "serving_qwen.json")
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return 0

    import torch

    from kvcore.hf import kv_bytes_per_token

    torch.manual_seed(0)
    if args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_llama import tiny

        model, tok, model_name = tiny("sdpa").float(), None, "tiny random Llama"
        rng = random.Random(args.seed)
        reqs = [([rng.randrange(1, 64) for _ in range(96)], []) for _ in range(4)]
        args.tokens, args.new_tokens = 96, 4

        class _Tok:
            pad_token_id = 0

            @staticmethod
            def decode(ids: list[int]) -> str:
                return " ".join(map(str, ids))

        tok = _Tok()
    else:
        from kvcore.models import load_qwen, load_smollm2

        load, model_name = {
            "qwen": (load_qwen, "Qwen2.5-Coder-0.5B-Instruct (bf16, CPU)"),
            "smollm2": (load_smollm2, "SmolLM2-135M-Instruct (bf16, CPU)"),
        }[args.model]
        model, tok = load(attn_implementation="sdpa")
        reqs = requests(tok, args.requests, args.tokens, args.seed)
    longest = max(len(p) for p, _ in reqs)
    per_request = longest + args.new_tokens
    kv_tokens = int(args.kv_requests * per_request) // args.page * args.page
    bytes_per_token = kv_bytes_per_token(model)
    common = dict(
        kv_tokens=kv_tokens,
        page=args.page,
        new_tokens=args.new_tokens,
        max_batch_tokens=args.max_batch_tokens,
    )
    # Untimed warm-up of both paths on one request (lazy imports, first kernels, thread
    # pools): without it the first timed run, the engine's, paid them alone.
    for name in ("engine", "kvcore"):
        one_run(model, tok, reqs[:1], name, **(common | {"new_tokens": 2}))
    rows = [
        one_run(model, tok, reqs, "engine", **common),
        one_run(model, tok, reqs, "kvcore", **common),
    ]
    prompt = min(len(p) for p, _ in reqs)
    for r in [int(x) for x in args.ratios.split(",")]:
        rows.append(
            one_run(
                model,
                tok,
                reqs,
                f"kvcore-snapkv-{r}x",
                policy="snapkv",
                budget=prompt // r,
                **common,
            )
        )
    for fmt in [f for f in args.formats.split(",") if f]:
        rows.append(one_run(model, tok, reqs, f"kvcore-{fmt}", kv_format=fmt, **common))
        for r in [int(x) for x in args.quant_ratios.split(",") if x]:
            rows.append(
                one_run(
                    model,
                    tok,
                    reqs,
                    f"kvcore-{fmt}-snapkv-{r}x",
                    policy="snapkv",
                    budget=prompt // r,
                    kv_format=fmt,
                    **common,
                )
            )
    # The engine again, last: a drift of the machine's load during the run shows as a gap
    # between the two engine rows. Ratios are taken against the faster of the two.
    rows.append(one_run(model, tok, reqs, "engine", **common) | {"run": "engine (repeat)"})
    base = max(rows[0], rows[-1], key=lambda r: r["decode_tokens_per_cpu_s"] or 0.0)
    fastest = max(rows[0], rows[-1], key=lambda r: r["decode_tokens_per_s"] or 0.0)
    for row in rows:
        row["in_flight_vs_engine"] = row["requests_in_flight"] / base["requests_in_flight"]
        bd, rd = fastest["decode_tokens_per_s"], row["decode_tokens_per_s"]
        row["decode_tok_s_vs_engine"] = rd / bd if bd and rd else None
        bc, rc = base["decode_tokens_per_cpu_s"], row["decode_tokens_per_cpu_s"]
        row["decode_cpu_vs_engine"] = rc / bc if bc and rc else None
        row["compression"] = base["kv_bytes_per_request"] / row["kv_bytes_per_request"]
    at4 = next((r for r in rows if r["run"] == "kvcore-snapkv-4x"), None)
    int4 = next((r for r in rows if r["run"] == "kvcore-int4"), None)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "config": {
            "model": model_name,
            "requests": len(reqs),
            "tokens": args.tokens,
            "prompt_tokens": [len(p) for p, _ in reqs],
            "new_tokens": args.new_tokens,
            "kv_tokens": kv_tokens,
            "kv_bytes": kv_tokens * bytes_per_token,
            "page": args.page,
            "max_batch_tokens": args.max_batch_tokens,
            "arrival": "all requests submitted at once (faster than served)",
            "baseline": "untimed warm-up of both paths on one request first; the engine runs "
            "first and again last, and every ratio is against the faster of its two runs "
            "(in CPU time for the CPU-time ratios, in wall time for the wall-time ones)",
            "threads": torch.get_num_threads(),
            "quantized": "per-token pages (keys and values per token, groups of "
            "min(32, head_dim) channels, float16 scale and zero point), read dequantized by "
            "the engine's attention (docs/serving.md section 0)",
        },
        "runs": rows,
        "targets_at_4x": targets(at4, base),
        "targets_int4": targets(int4, base),
    }
    if args.smoke:
        print(table(result))
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
