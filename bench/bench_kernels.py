"""Benchmark of the CUDA kernels against their torch equivalents (needs a GPU and CuPy).

Measures with CUDA events after a warm-up and reports medians. For each kernel: the bytes it
must move per second as a fraction of a device-to-device copy measured in the same run, and
the speedup over the torch equivalent (``index_select``/``index_copy`` for compaction, the
torch quantization reference ``kvcore.quant``, sdpa over the full fp16 cache for attention).
Writes ``bench/results/kernels.json`` with the device name.

Targets (issue 7): compaction and (de)quantization >= 80% of the copy bandwidth and >= 1.5x
torch; decode attention over int4 pages at 32k context on a Llama-3.1-8B-shaped layer (32
query heads, 8 KV heads, head_dim 128) >= 2x sdpa over the fp16 full cache.

    python bench/bench_kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"


def _refuse(msg: str) -> None:
    print(f"bench_kernels.py: {msg}; nothing was measured.", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    try:
        import torch
    except ImportError:
        _refuse("needs torch")
    import kvcore
    from kvcore import kernels

    if not torch.cuda.is_available():
        _refuse("needs a CUDA device (torch.cuda.is_available() is False)")
    if not kernels.cupy_available():
        _refuse("needs CuPy (pip install 'kvcore[cuda]')")
    if kvcore.build_profile != "release":
        _refuse(f"the extension is a {kvcore.build_profile} build; run `make dev` (release)")
    from kvcore import quant

    dev = torch.device("cuda")
    reps, warm = (5, 2) if args.quick else (30, 5)

    def timeit(fn: Callable[[], object]) -> float:
        """Median milliseconds of ``fn`` over ``reps`` runs after ``warm`` warm-up runs."""
        for _ in range(warm):
            fn()
        times = []
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    # device-to-device copy: the bandwidth reference (read + write)
    n_copy = 1 << 28
    a = torch.empty(n_copy, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    copy_ms = timeit(lambda: b.copy_(a))
    copy_bw = 2 * n_copy / (copy_ms * 1e-3)
    rows: list[dict[str, Any]] = []

    def record(name: str, ms: float, torch_ms: float, nbytes: int, **extra: Any) -> None:
        bw = nbytes / (ms * 1e-3)
        rows.append(
            {
                "kernel": name,
                "ms": ms,
                "torch_ms": torch_ms,
                "bytes": nbytes,
                "bandwidth_gbs": bw / 1e9,
                "copy_fraction": bw / copy_bw,
                "speedup_vs_torch": torch_ms / ms,
                **extra,
            }
        )
        print(
            f"{name:34s} {ms:9.3f} ms  torch {torch_ms:9.3f} ms  x{torch_ms / ms:5.2f}  "
            f"{bw / 1e9:7.1f} GB/s ({bw / copy_bw:5.1%} of copy)"
        )

    # 1. compaction: Llama-3.1-8B-shaped step (32 layers x K, V), half of the slots move
    layers, num_blocks, bs, d = 32, 2048, 16, 128
    num_slots = num_blocks * bs
    pools = [
        torch.randn(num_blocks, bs, d, device=dev, dtype=torch.float16) for _ in range(2 * layers)
    ]
    moves = num_slots // 2
    perm = torch.randperm(num_slots, device=dev)
    src = torch.sort(perm[:moves]).values
    dst = torch.sort(perm[moves : 2 * moves]).values
    # the kernel runs moves in order per column; gather/scatter is the torch equivalent
    src_all = src.repeat(layers)
    dst_all = dst.repeat(layers)
    indptr = torch.arange(0, (layers + 1) * moves, moves, device=dev)
    plan_of = [i // 2 for i in range(2 * layers)]

    def torch_compact() -> None:
        for p in pools:
            r = p.view(num_slots, d)
            r.index_copy_(0, dst, r.index_select(0, src))

    ms = timeit(lambda: kernels.compact_pools(pools, plan_of, src_all, dst_all, indptr, num_slots))
    record(
        "compaction (32 layers, K+V, fp16)",
        ms,
        timeit(torch_compact),
        2 * 2 * layers * moves * d * 2,
    )

    # 2. quantize / dequantize: 32 layers x 8 heads x 2048 tokens, KIVI-style layouts
    x = torch.randn(layers * 8 * 128, bs, d, device=dev, dtype=torch.float16)
    for bits in (8, 4, 2):
        for axis in ("channel", "token"):
            lay = kvcore.QuantLayout(bits, 16 if axis == "token" else 32, bs, d, axis)
            q = kernels.quantize(x, lay)
            nbytes = x.numel() * 2 + q.numel()
            record(
                f"quantize int{bits} {axis}",
                timeit(lambda lay=lay: kernels.quantize(x, lay)),
                timeit(lambda lay=lay: quant.quantize(x, lay)),
                nbytes,
            )
            record(
                f"dequantize int{bits} {axis} -> fp16",
                timeit(lambda q=q, lay=lay: kernels.dequantize(q, lay, torch.float16)),
                timeit(lambda q=q, lay=lay: quant.dequantize(q, lay).half()),
                nbytes,
            )

    # 5. decode attention, Llama-3.1-8B layer: 32 q heads, 8 kv heads, head_dim 128, 32k
    ctx, hq, h = 32768, 32, 8
    nb = h * ctx // bs
    table = (torch.arange(nb, device=dev) + 1).reshape(h, ctx // bs)
    lengths = torch.full((h,), ctx, device=dev, dtype=torch.int64)
    query = torch.randn(1, hq, 1, d, device=dev, dtype=torch.float16)
    k_full = torch.randn(1, h, ctx, d, device=dev, dtype=torch.float16)
    v_full = torch.randn(1, h, ctx, d, device=dev, dtype=torch.float16)
    pad = torch.zeros(1, bs, d, device=dev, dtype=torch.float16)
    k_pool = torch.cat([pad, k_full.reshape(nb, bs, d)])
    v_pool = torch.cat([pad, v_full.reshape(nb, bs, d)])

    def sdpa() -> object:
        return torch.nn.functional.scaled_dot_product_attention(
            query, k_full, v_full, enable_gqa=True
        )

    sdpa_ms = timeit(sdpa)
    ms = timeit(lambda: kernels.decode_attention(query, k_pool, v_pool, table, lengths))
    record("decode attn fp16 pages 32k", ms, sdpa_ms, 2 * h * ctx * d * 2)
    for bits in (8, 4, 2):
        kl = kvcore.QuantLayout(bits, bs, bs, d, "token")
        vl = kvcore.QuantLayout(bits, 32, bs, d, "channel")
        kq, vq = kernels.quantize(k_pool, kl), kernels.quantize(v_pool, vl)
        ms = timeit(
            lambda kq=kq, vq=vq, kl=kl, vl=vl: kernels.decode_attention(
                query, kq, vq, table, lengths, k_layout=kl, v_layout=vl
            )
        )
        record(
            f"decode attn int{bits} pages 32k",
            ms,
            sdpa_ms,
            h * (ctx // bs) * (kl.nbytes + vl.nbytes),
        )

    def row(name: str) -> dict[str, Any]:
        return next(r for r in rows if r["kernel"] == name)

    comp = row("compaction (32 layers, K+V, fp16)")
    quants = [r for r in rows if "quantize" in r["kernel"]]
    targets = {
        "compaction >= 80% copy and >= 1.5x torch": comp["copy_fraction"] >= 0.8
        and comp["speedup_vs_torch"] >= 1.5,
        "(de)quantization >= 80% copy and >= 1.5x torch (every layout)": all(
            r["copy_fraction"] >= 0.8 and r["speedup_vs_torch"] >= 1.5 for r in quants
        ),
        "int4 decode attention 32k >= 2x sdpa fp16": row("decode attn int4 pages 32k")[
            "speedup_vs_torch"
        ]
        >= 2.0,
    }
    for k, ok in targets.items():
        print(f"target {'met' if ok else 'MISSED'}: {k}")
    result = {
        "device": torch.cuda.get_device_name(dev),
        "machine": platform.node(),
        "torch": torch.__version__,
        "cupy": __import__("cupy").__version__,
        "kvcore_build": kvcore.build_profile,
        "copy_bandwidth_gbs": copy_bw / 1e9,
        "reps": reps,
        "warmup": warm,
        "rows": rows,
        "targets": targets,
        "note": "medians of CUDA-event timings; bytes = the minimum a kernel must read and write",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    assert math.isfinite(copy_bw)


if __name__ == "__main__":
    main()
