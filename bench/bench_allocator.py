"""Benchmark of kvcore's block allocator against a pure-Python allocator with the same
semantics (``pyalloc.py``, written in vLLM's style), measured in the same run.

1. Equivalence: a short trace and random operations go through both allocators in lock step
   and must give identical slots, copy-on-write pairs, plans, hits and table ids
   (``--check`` runs a longer version of this and exits).
2. Trace replay: a recorded realistic serving trace (``alloc_trace.py``; 100k requests) is
   replayed through both, each in the engine's shape: an admission wave is one
   ``admit_batch`` over the wave's prompts (new tables, their cached prefixes, the
   prefill's slots, registering the full prompt blocks; the trace records it as three
   events, replayed as one call); a decode step is one ``append_batch`` with the sampled
   ids, which registers every block that fills. One *operation* is one replayed event, i.e.
   one allocator call. Warm-up on a prefix, then ``--repeats`` full replays per side,
   alternating sides; the median is reported. Token arrays the engine already holds (the
   prompt CSR, the sampled ids) are built outside the timed region.
3. Per-kind breakdown: one instrumented replay of a prefix of the trace per side.
4. Micro-benchmarks from Python: single-table ``append(t, 1)``, a decode step
   ``append_batch`` of 256 tables (without and with token ids), fork + free, compaction,
   prefix register / adopt.

Prints a table and writes ``bench/results/allocator.json``. Refuses to run on a debug build.

    .venv/bin/python bench/bench_allocator.py            # full benchmark (~3-4 min, 2 cores)
    .venv/bin/python bench/bench_allocator.py --check    # equivalence checks only
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import alloc_trace as tr
import equivalence
import numpy as np
import pyalloc

import kvcore

HERE = Path(__file__).resolve().parent
DEFAULT_TRACE = HERE / "traces" / "allocator_trace.npz"
DEFAULT_OUT = HERE / "results" / "allocator.json"

TARGETS = {
    "trace_ratio_min": 25.0,
    "append_batch_256_us_max": 20.0,
    "append_single_us_max": 1.0,
}

# The short trace of the equivalence check: a pool small enough that OutOfBlocks,
# preemption, copy-on-write and compaction of shared blocks all happen within seconds.
CHECK_PARAMS = dataclasses.replace(
    tr.TraceParams(),
    num_requests=1500,
    num_blocks=512,
    max_batch=64,
    compress_prob=0.5,
    budget=512,
    keep=256,
    window=64,
    watermark=8,
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- environment


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "numpy": np.__version__,
        "kvcore": kvcore.__version__,
        "kvcore_build_profile": kvcore.build_profile,
    }


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------- equivalence


def run_checks(num_fuzz_seeds: int, fuzz_ops: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    trace, content, digest, _ = tr.load_or_generate(None, CHECK_PARAMS)
    events = equivalence.check_trace(trace, content)
    for seed in range(num_fuzz_seeds):
        equivalence.check_fuzz(seed, fuzz_ops)
    return {
        "passed": True,
        "trace_events_checked": events,
        "trace_params": CHECK_PARAMS.to_json(),
        "trace_sha256": digest,
        "trace_events_by_kind": trace.stats["events_by_kind"],
        "fuzz_seeds": num_fuzz_seeds,
        "fuzz_ops_per_seed": fuzz_ops,
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ----------------------------------------------------------------------------- trace replay

SIDES: dict[str, tuple[Callable[[int, int], Any], type[BaseException], bool]] = {
    # name: (constructor, OutOfBlocks exception, running batch as a numpy array)
    "kvcore": (kvcore.BlockAllocator, kvcore.OutOfBlocksError, True),
    "python": (pyalloc.PyBlockAllocator, pyalloc.OutOfBlocks, False),
}


def timed_replay(side: str, p: tr.TraceParams, inp: tr.ReplayInputs) -> tuple[float, float]:
    """(wall, CPU) seconds of one replay on a fresh allocator."""
    make, oob, numpy_batch = SIDES[side]
    alloc = make(p.num_blocks, p.block_size)
    gc.collect()
    return tr.replay(alloc, inp, oob, numpy_batch)


def breakdown(side: str, p: tr.TraceParams, inp: tr.ReplayInputs) -> list[int]:
    make, oob, numpy_batch = SIDES[side]
    ns = [0] * (max(tr.KIND_NAMES) + 1)
    gc.collect()
    tr.replay(make(p.num_blocks, p.block_size), inp, oob, numpy_batch, ns)
    return ns


def clock_overhead_ns(samples: int = 20_000) -> int:
    """What the per-event clock of the breakdown adds to every event: the median CPU time
    between two back-to-back ``time.thread_time_ns`` reads, as ``Replayer.run_chunk`` reads
    them around an event. On a VM this clock is a system call of a microsecond or more, as
    much as a whole kvcore event, so the breakdown subtracts it (the same amount on both
    sides)."""
    clock = time.thread_time_ns
    deltas = []
    for _ in range(samples):
        t0 = clock()
        deltas.append(clock() - t0)
    return int(statistics.median(deltas))


# ----------------------------------------------------------------------------- micro


def median_us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 4)


def micro_append_single(make: Any, number: int, repeats: int) -> list[float]:
    """Per-call seconds of ``append(t, 1)`` on one growing table (amortises 1 pop per
    block_size calls), one fresh allocator per repeat."""
    out = []
    for _ in range(repeats):
        alloc = make(number // 16 + 2, 16)
        t = alloc.create_table()
        timer = timeit.Timer("append(t, 1)", globals={"append": alloc.append, "t": t})
        gc.collect()
        out.append(timer.timeit(number) / number)
    return out


def micro_append_batch(
    make: Any, as_numpy: bool, number: int, repeats: int, with_ids: bool = False
) -> list[float]:
    """Per-call seconds of a decode step: ``append_batch(256 tables, 1)``, the tables holding
    random lengths (so their last blocks are filled to different points). ``with_ids``: the
    engine's step, which passes the sampled ids and so registers every block that fills (the
    tables' prompts were registered first, so their chains are known)."""
    rng = np.random.default_rng(7)
    init = rng.integers(1, 2048, 256)
    out = []
    for _ in range(repeats):
        alloc = make(256 * (2048 // 16 + number // 16 + 2) + 1, 16)
        tables = [alloc.create_table() for _ in range(256)]
        for t, n in zip(tables, init.tolist(), strict=True):
            alloc.append(t, n)
            alloc.register_prefix(t, rng.integers(0, 32_000, n))
        batch: Any = np.array(tables, dtype=np.int64) if as_numpy else tables
        ids = rng.integers(0, 32_000, 256)
        timer = timeit.Timer(
            "append_batch(batch, 1, token_ids=ids)" if with_ids else "append_batch(batch, 1)",
            globals={
                "append_batch": alloc.append_batch,
                "batch": batch,
                "ids": ids if as_numpy else ids.tolist(),
            },
        )
        gc.collect()
        out.append(timer.timeit(number) / number)
    return out


def micro_fork_free(make: Any, number: int, repeats: int) -> list[float]:
    """Per-call seconds of ``free(fork(t))`` on a 2048-token table (128 blocks)."""
    out = []
    for _ in range(repeats):
        alloc = make(256, 16)
        t = alloc.create_table()
        alloc.append(t, 2048)
        timer = timeit.Timer(
            "free(fork(t))", globals={"free": alloc.free, "fork": alloc.fork, "t": t}
        )
        gc.collect()
        out.append(timer.timeit(number) / number)
    return out


def micro_compact(make: Any, iters: int) -> list[float]:
    """Seconds per ``compact`` of a 4096-token table keeping 50% (sinks + recent window +
    random middle); the table is rebuilt untimed before every call."""
    p = dataclasses.replace(tr.TraceParams(), keep=2048, window=512)
    keep = tr.keep_positions(np.random.default_rng(11), 4096, p)
    alloc = make(4096 // 16 * 2 + 2, 16)
    out = []
    gc.collect()
    for _ in range(iters):
        t = alloc.create_table()
        alloc.append(t, 4096)
        t0 = time.perf_counter()
        alloc.compact(t, keep)
        out.append(time.perf_counter() - t0)
        alloc.free(t)
    return out


def micro_prefix(make: Any, iters: int) -> tuple[list[float], list[float]]:
    """Seconds per ``register_prefix`` and per ``adopt_prefix`` (full hit) of a 2048-token
    prompt; the cache is reset untimed between iterations so every registration is new."""
    tokens = np.random.default_rng(13).integers(0, 32_000, 2048, dtype=np.int64)
    alloc = make(2048 // 16 * 2 + 2, 16)
    reg, adopt = [], []
    gc.collect()
    for _ in range(iters):
        t = alloc.create_table()
        alloc.append(t, 2048)
        t0 = time.perf_counter()
        alloc.register_prefix(t, tokens)
        t1 = time.perf_counter()
        u = alloc.create_table()
        t2 = time.perf_counter()
        hit = alloc.adopt_prefix(u, tokens)
        t3 = time.perf_counter()
        assert hit == 2048
        reg.append(t1 - t0)
        adopt.append(t3 - t2)
        alloc.free(u)
        alloc.free(t)
        alloc.reset_prefix_cache()
    return reg, adopt


def run_micro(quick: bool) -> dict[str, Any]:
    s = 4 if quick else 1  # --quick divides the call counts
    reps = 7
    res: dict[str, Any] = {}
    for side, (make, _, as_numpy) in SIDES.items():
        slow = side == "python"
        m: dict[str, Any] = {}
        m["append_single_us"] = median_us(micro_append_single(make, 200_000 // s, reps))
        m["append_batch_256_us"] = median_us(
            micro_append_batch(make, as_numpy, (500 if slow else 5000) // s, reps)
        )
        m["decode_step_256_with_ids_us"] = median_us(
            micro_append_batch(make, as_numpy, (500 if slow else 5000) // s, reps, with_ids=True)
        )
        m["fork_free_2048_tokens_us"] = median_us(
            micro_fork_free(make, (2000 if slow else 50_000) // s, reps)
        )
        m["compact_4096_keep_50pct_us"] = median_us(micro_compact(make, (60 if slow else 600) // s))
        reg, adopt = micro_prefix(make, (100 if slow else 1000) // s)
        m["register_prefix_2048_tokens_us"] = median_us(reg)
        m["adopt_prefix_2048_tokens_us"] = median_us(adopt)
        res[side] = m
    res["ratio"] = {k: round(res["python"][k] / res["kvcore"][k], 2) for k in res["kvcore"]}
    res["method"] = (
        "timeit loops (append, append_batch, fork+free) or per-call perf_counter around one "
        f"call with untimed setup (compact, prefix); median of {reps} repeats / of all calls; "
        "block_size 16"
    )
    return res


# ----------------------------------------------------------------------------- main


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--check", action="store_true", help="run the equivalence checks and exit")
    ap.add_argument("--repeats", type=int, default=7, help="timed replays per side (median)")
    ap.add_argument(
        "--breakdown-fraction",
        type=float,
        default=0.25,
        help="fraction of the trace replayed instrumented for the per-kind table",
    )
    ap.add_argument(
        "--baseline-events",
        type=int,
        default=0,
        help="replay only this many leading recorded events on the pure-Python side "
        "(0: the whole trace; ops/s is a rate, so it stays comparable)",
    )
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="recorded trace (.npz)")
    ap.add_argument("--regenerate", action="store_true", help="regenerate the recorded trace")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUT, help="JSON results")
    ap.add_argument("--quick", action="store_true", help="fewer micro-benchmark calls")
    args = ap.parse_args()

    if kvcore.build_profile != "release":
        log(
            f"refusing to benchmark: kvcore was built in {kvcore.build_profile!r} mode; "
            "rebuild in release mode (make dev or make wheel) first"
        )
        return 2

    started = time.perf_counter()
    load_before = loadavg()

    if args.check:
        log("equivalence checks (kvcore vs pure Python, lock step) ...")
        res = run_checks(num_fuzz_seeds=200, fuzz_ops=400)
        log(json.dumps(res, indent=1))
        log("OK: identical results")
        return 0

    log("equivalence check (short trace + random operations) ...")
    check = run_checks(num_fuzz_seeds=20, fuzz_ops=300)
    log(f"  identical results ({check['seconds']} s)")

    p = tr.TraceParams()
    if args.regenerate and args.trace.exists():
        args.trace.unlink()
    log(f"trace: loading or generating {args.trace} ...")
    t0 = time.perf_counter()
    trace, content, digest, fresh = tr.load_or_generate(args.trace, p, log)
    gen_s = time.perf_counter() - t0
    inp = tr.prepare(trace, content)
    # Events of the replay: one per allocator call (a wave's three recorded calls are one).
    n_events = len(inp.kinds)
    n_recorded = len(trace.kinds)
    base_inp = (
        tr.prepare(trace.prefix(args.baseline_events), content)
        if 0 < args.baseline_events < n_recorded
        else inp
    )
    base_events = len(base_inp.kinds)
    log(f"  {n_events:,} events, {'generated' if fresh else 'loaded'} in {gen_s:.1f} s")

    # Warm-up: a prefix of the trace on each side (fills caches, numpy paths, allocators).
    warm = tr.prepare(trace.prefix(n_recorded // 20), content)
    for side in SIDES:
        timed_replay(side, p, warm)

    times: dict[str, list[float]] = {"kvcore": [], "python": []}
    cpu_times: dict[str, list[float]] = {"kvcore": [], "python": []}
    for r in range(args.repeats):
        for side, side_inp in (("kvcore", inp), ("python", base_inp)):
            wall, cpu = timed_replay(side, p, side_inp)
            times[side].append(wall)
            cpu_times[side].append(cpu)
            log(f"  replay {r + 1}/{args.repeats} {side:7s}: {wall:7.2f} s wall, {cpu:7.2f} s CPU")
    med = {side: statistics.median(v) for side, v in times.items()}
    cpu_med = {side: statistics.median(v) for side, v in cpu_times.items()}
    ops = {"kvcore": n_events / med["kvcore"], "python": base_events / med["python"]}
    ratio_wall = ops["kvcore"] / ops["python"]
    cpu_ops = {"kvcore": n_events / cpu_med["kvcore"], "python": base_events / cpu_med["python"]}
    # The headline: CPU time, robust to the time a shared machine keeps the process waiting.
    ratio = cpu_ops["kvcore"] / cpu_ops["python"]

    part = tr.prepare(trace.prefix(max(1, int(n_recorded * args.breakdown_fraction))), content)
    frac_events = len(part.kinds)
    counts = np.bincount(part.kinds, minlength=max(tr.KIND_NAMES) + 1).tolist()
    ns = {side: breakdown(side, p, part) for side in SIDES}
    clock_ns = clock_overhead_ns()
    # Each kind's time less the clock's cost of its events.
    ns = {
        side: [max(0, t - c * clock_ns) for t, c in zip(v, counts, strict=True)]
        for side, v in ns.items()
    }
    by_kind = {}
    for k, name in tr.REPLAY_KIND_NAMES.items():
        if counts[k]:
            kv_us = ns["kvcore"][k] / counts[k] / 1e3
            py_us = ns["python"][k] / counts[k] / 1e3
            by_kind[name] = {
                "events": counts[k],
                "kvcore_us_per_event": round(kv_us, 3),
                "python_us_per_event": round(py_us, 3),
                "ratio": round(py_us / kv_us, 2),
                "kvcore_share_of_time": round(ns["kvcore"][k] / sum(ns["kvcore"]), 4),
                "python_share_of_time": round(ns["python"][k] / sum(ns["python"]), 4),
            }

    log("micro-benchmarks ...")
    micro = run_micro(args.quick)

    met = {
        "trace_ratio_min": ratio >= TARGETS["trace_ratio_min"],
        "append_batch_256_us_max": micro["kvcore"]["append_batch_256_us"]
        < TARGETS["append_batch_256_us_max"],
        "append_single_us_max": micro["kvcore"]["append_single_us"]
        < TARGETS["append_single_us_max"],
    }
    st = trace.stats
    results = {
        "benchmark": "kvcore BlockAllocator vs pure-Python allocator (same semantics)",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "load_average_before_after": [load_before, loadavg()],
        "equivalence_check": check,
        "trace": {
            "file": str(args.trace.relative_to(HERE.parent))
            if args.trace.is_relative_to(HERE.parent)
            else str(args.trace),
            "file_bytes": args.trace.stat().st_size if args.trace.exists() else None,
            "sha256": digest,
            "params": p.to_json(),
            "stats": st,
        },
        "trace_replay": {
            "operation": "one trace event = one allocator call from Python (a decode step is "
            "one append_batch with the sampled ids over the running batch; an admission wave "
            "is one admit_batch over the wave's prompt CSR)",
            "timed": "the allocator calls and the engine's bookkeeping; token arrays the engine "
            "already holds are built per chunk of 4096 events outside the timed region",
            "events": n_events,
            "baseline_events": base_events,
            "repeats": args.repeats,
            "warmup": "one replay of the first 5% of the events per side",
            "gc": "enabled; gc.collect() before each replay",
            "seconds": {side: [round(x, 4) for x in v] for side, v in times.items()},
            "median_seconds": {side: round(v, 4) for side, v in med.items()},
            "ops_per_s": {side: round(v, 1) for side, v in ops.items()},
            "ratio_wall": round(ratio_wall, 2),
            "cpu_seconds": {side: [round(x, 4) for x in v] for side, v in cpu_times.items()},
            "median_cpu_seconds": {side: round(v, 4) for side, v in cpu_med.items()},
            "cpu_ops_per_s": {side: round(v, 1) for side, v in cpu_ops.items()},
            "ratio": round(ratio, 2),
            "ratio_basis": "median CPU seconds (time.process_time) of the timed chunks",
            # Tokens handed out by decode steps, per second of whole-trace replay.
            "decode_tokens_per_s": {
                side: round(st["decode_tokens"] / med[side], 1)
                for side in med
                if side == "kvcore" or base_events == n_events
            },
        },
        "breakdown": {
            "events": frac_events,
            "note": "one instrumented replay of the first events; CPU time of the thread per "
            "event (time.thread_time_ns around each event), less the clock's own cost per event "
            "(clock_overhead_ns, calibrated in the same run); rates per kind",
            "clock_overhead_ns": clock_ns,
            "by_kind": by_kind,
        },
        "micro": micro,
        "targets": TARGETS,
        "targets_met": met,
        "total_seconds": None,
    }
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")

    # ------------------------------------------------------------------ table
    def yes(ok: bool) -> str:
        return "met" if ok else "NOT met"

    w = 36
    print()
    print(f"kvcore {kvcore.__version__} ({kvcore.build_profile}) on {machine_info()['cpu_model']}")
    print(
        f"trace: {p.num_requests:,} requests, {n_events:,} events, "
        f"usage {st['mean_usage']:.1%}, prefix hit rate {st['prefix_hit_rate']:.1%}, "
        f"{st['preemptions']} preemptions"
    )
    print(f"{'':{w}s} {'kvcore':>14s} {'pure Python':>14s} {'ratio':>8s}")
    print(
        f"{'trace replay, events/CPU-s':{w}s} {fmt_rate(cpu_ops['kvcore']):>14s} "
        f"{fmt_rate(cpu_ops['python']):>14s} {ratio:7.1f}x"
    )
    print(
        f"{'trace replay, events/wall-s':{w}s} {fmt_rate(ops['kvcore']):>14s} "
        f"{fmt_rate(ops['python']):>14s} {ratio_wall:7.1f}x"
    )
    print(
        f"{'trace replay, median s':{w}s} {med['kvcore']:14.3f} {med['python']:14.3f}"
        + ("" if base_events == n_events else f"   (baseline: first {base_events:,} events)")
    )
    for name, row in by_kind.items():
        print(
            f"{'  ' + name + ', us/event':{w}s} {row['kvcore_us_per_event']:14.2f} "
            f"{row['python_us_per_event']:14.2f} {row['ratio']:7.1f}x"
        )
    for key in micro["kvcore"]:
        print(
            f"{key:{w}s} {micro['kvcore'][key]:14.3f} {micro['python'][key]:14.3f} "
            f"{micro['ratio'][key]:7.1f}x"
        )
    print(f"target trace ratio >= {TARGETS['trace_ratio_min']:.0f}x: {yes(met['trace_ratio_min'])}")
    print(
        f"target append_batch(256) < {TARGETS['append_batch_256_us_max']:.0f} us: "
        f"{yes(met['append_batch_256_us_max'])}"
    )
    print(
        f"target append(t, 1) < {TARGETS['append_single_us_max']:.0f} us: "
        f"{yes(met['append_single_us_max'])}"
    )
    print(f"saved {args.output} ({results['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
