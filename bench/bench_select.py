"""Selection benchmark: 32 layers x 8 KV heads x n tokens at budget n/16.

Three tasks, each producing the same CSR keep plan (ascending positions per (layer, head)):

* ``topk``: per-head top-k (uniform budgets), with a 32-token window force-kept;
* ``adakv``: Ada-KV budgets (global top-k across the heads of a layer, alpha = 0.2), then
  selection;
* ``pyramidkv``: PyramidKV per-layer budgets (beta = 20), then selection.

Compared in the same run against a numpy implementation (``argpartition`` + ``sort``) and,
when torch is importable, torch on the CPU written as kvpress writes it (``topk`` then
``sort``; Ada-KV as a safeguard top-k per head followed by a flattened top-k per layer).
Baselines and kvcore run single-threaded; kvcore is also run with 2 scoped threads over the
rows. Medians of several repetitions after a warm-up. Results: bench/results/select.json.

Run: ``make dev`` (release), then ``.venv/bin/python bench/bench_select.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import kvcore
from kvcore import _kvcore as k

L, H, WINDOW, ALPHA, BETA = 32, 8, 32, 0.2, 20
OUT = Path(__file__).resolve().parent / "results" / "select.json"

try:
    import torch

    torch.set_num_threads(1)
    HAVE_TORCH = True
except ImportError:  # recorded in the JSON
    torch = None
    HAVE_TORCH = False


def timeit(fn: Callable[..., Any], reps: int, *args: Any) -> tuple[float, float]:
    """(median, minimum) of ``reps`` runs after one warm-up. The machine may be shared: the
    minimum is the less noisy estimate of the cost itself, the median what a user sees."""
    fn(*args)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


# --- kvcore ---------------------------------------------------------------------------------


def kv_topk(s3: np.ndarray, budget: int, threads: int = 1) -> Any:
    return k.select_topk(s3.reshape(L * H, -1), budget, window=WINDOW, num_threads=threads)


def kv_adakv(s3: np.ndarray, budget: int, threads: int = 1) -> Any:
    # One pass (budgets and selection together); the layer-wide top-k is not threaded.
    return k.select_adakv(s3, budget, ALPHA, window=WINDOW)


def kv_pyramid(s3: np.ndarray, budget: int, threads: int = 1) -> Any:
    n = s3.shape[-1]
    b = np.repeat(k.budget_pyramid(L, n, budget, WINDOW, BETA), H)
    return k.select_topk(s3.reshape(L * H, -1), b, window=WINDOW, num_threads=threads)


# --- numpy ----------------------------------------------------------------------------------


def np_rows(s2: np.ndarray, budgets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = s2.shape[1]
    s = s2.copy()
    s[:, n - WINDOW :] = np.inf  # window force-kept
    out = []
    for r in range(s.shape[0]):
        kk = int(budgets[r])
        idx = np.argpartition(-s[r], kk - 1)[:kk]
        out.append(np.sort(idx))
    indptr = np.concatenate([[0], np.cumsum(budgets)])
    return indptr, np.concatenate(out)


def np_topk(s3: np.ndarray, budget: int) -> Any:
    n = s3.shape[-1]
    s = s3.reshape(L * H, n).copy()
    s[:, n - WINDOW :] = np.inf
    idx = np.argpartition(-s, budget - 1, axis=1)[:, :budget]
    idx.sort(axis=1)
    return np.arange(0, L * H * budget + 1, budget), idx.ravel()


def np_adakv(s3: np.ndarray, budget: int) -> Any:
    n = s3.shape[-1]
    s = s3.copy()
    s[..., n - WINDOW :] = np.inf
    floor = int(ALPHA * (budget - WINDOW))
    safe = np.argpartition(-s, WINDOW + floor - 1, axis=-1)[..., : WINDOW + floor]
    np.put_along_axis(s, safe, np.inf, axis=-1)
    flat = s.reshape(L, H * n)
    idx = np.argpartition(-flat, H * budget - 1, axis=1)[:, : H * budget]
    idx.sort(axis=1)
    counts = np.stack([np.bincount(row // n, minlength=H) for row in idx])
    return np.concatenate([[0], np.cumsum(counts)]), (idx % n).ravel()


def np_pyramid(s3: np.ndarray, budget: int) -> Any:
    n = s3.shape[-1]
    b = np.repeat(k.budget_pyramid(L, n, budget, WINDOW, BETA), H)
    return np_rows(s3.reshape(L * H, n), b)


# --- torch, kvpress style -------------------------------------------------------------------


def t_topk(t3: Any, budget: int) -> Any:
    n = t3.shape[-1]
    s = t3.clone()
    s[..., n - WINDOW :] = float("inf")
    idx = s.topk(budget, dim=-1).indices.sort(dim=-1).values
    return idx.reshape(-1)


def t_adakv(t3: Any, budget: int) -> Any:
    n = t3.shape[-1]
    s = t3.clone()
    s[..., n - WINDOW :] = float("inf")
    floor = int(ALPHA * (budget - WINDOW))
    safe = s.topk(WINDOW + floor, dim=-1).indices
    s.scatter_(-1, safe, float("inf"))
    flat = s.reshape(L, H * n)
    idx = flat.topk(H * budget, dim=-1).indices.sort(dim=-1).values
    counts = torch.stack([torch.bincount(row // n, minlength=H) for row in idx])
    return counts.cumsum(0), (idx % n).reshape(-1)


def t_pyramid(t3: Any, budget: int) -> Any:
    n = t3.shape[-1]
    caps = k.budget_pyramid(L, n, budget, WINDOW, BETA)
    s = t3.clone()
    s[..., n - WINDOW :] = float("inf")
    return [
        s[layer].topk(int(caps[layer]), dim=-1).indices.sort(dim=-1).values for layer in range(L)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n up to 16k, fewer repetitions")
    args = ap.parse_args()
    if kvcore.build_profile != "release":
        sys.exit("bench_select: refusing to run on a debug build (run `make dev` first)")

    sizes = [1024 * 2**i for i in range(8)]  # 1k .. 128k
    if args.quick:
        sizes = sizes[:5]
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    print(
        f"{'task':10s} {'n':>7s} {'kvcore':>9s} {'kv 2thr':>9s} {'numpy':>9s} {'torch':>9s} "
        f"{'np/kv':>6s} {'t/kv':>6s} {'ns/tok':>7s}"
    )
    tasks = [
        ("topk", kv_topk, np_topk, t_topk),
        ("adakv", kv_adakv, np_adakv, t_adakv),
        ("pyramidkv", kv_pyramid, np_pyramid, t_pyramid),
    ]
    for n in sizes:
        budget = n // 16
        s3 = rng.random((L, H, n), dtype=np.float32)
        t3 = torch.from_numpy(s3) if HAVE_TORCH else None
        reps = 7 if n <= 16384 else 3
        if args.quick:
            reps = 3
        for name, kvf, npf, tf in tasks:
            # Sanity: kvcore keeps exactly the promised number of tokens.
            indptr, _ = kvf(s3, budget)
            assert indptr[-1] == L * H * budget, (name, n, indptr[-1])
            t_kv, m_kv = timeit(kvf, reps, s3, budget)
            t_kv2, m_kv2 = timeit(kvf, reps, s3, budget, 2)
            t_np, m_np = timeit(npf, reps, s3, budget)
            t_t, m_t = timeit(tf, reps, t3, budget) if HAVE_TORCH else (None, None)
            row = {
                "task": name,
                "n": n,
                "budget": budget,
                "kvcore_s": t_kv,
                "kvcore_2threads_s": t_kv2,
                "numpy_s": t_np,
                "torch_s": t_t,
                "numpy_over_kvcore": t_np / t_kv,
                "torch_over_kvcore": (t_t / t_kv) if t_t else None,
                "min_s": {"kvcore": m_kv, "kvcore_2threads": m_kv2, "numpy": m_np, "torch": m_t},
                "torch_over_kvcore_min": (m_t / m_kv) if m_t else None,
                "kvcore_ns_per_token": t_kv / (L * H * n) * 1e9,
            }
            results.append(row)
            print(
                f"{name:10s} {n:7d} {t_kv * 1e3:8.2f}m {t_kv2 * 1e3:8.2f}m {t_np * 1e3:8.2f}m "
                f"{(t_t or 0) * 1e3:8.2f}m {t_np / t_kv:6.1f} "
                f"{(t_t / t_kv) if t_t else float('nan'):6.1f} {row['kvcore_ns_per_token']:7.2f}"
            )

    # Linear growth: log-log slope of time against n, per task (1.0 = linear).
    slopes = {}
    for name, *_ in tasks:
        rows = [r for r in results if r["task"] == name]
        x = np.log([r["n"] for r in rows])
        y = np.log([r["kvcore_s"] for r in rows])
        slopes[name] = float(np.polyfit(x, y, 1)[0])
    print("log-log slope of kvcore time vs n (1.0 = linear):", slopes)

    meta = {
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__ if HAVE_TORCH else None,
        "torch_note": None if HAVE_TORCH else "torch was not importable: no torch baseline",
        "torch_threads": 1 if HAVE_TORCH else None,
        "kvcore": kvcore.__version__,
        "build_profile": kvcore.build_profile,
        "shape": {"layers": L, "kv_heads": H, "budget": "n/16", "window": WINDOW},
        "note": "medians; baselines single-threaded; kvcore_2threads uses std scoped threads "
        "over rows (rayon is not a dependency); machine shared with other jobs",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "slopes": slopes, "results": results}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
