"""Benchmark of the CUDA kernels against their torch equivalents (needs a GPU and CuPy).

Measures with CUDA events after a warm-up and reports medians. For each kernel: the bytes it
must move per second as a fraction of a device-to-device copy measured in the same run, and
the speedup over the torch equivalent (``index_select``/``index_copy`` for compaction, the
torch quantization reference ``kvcore.quant``, sdpa over the full fp16 cache for attention).
Writes ``bench/results/kernels.json`` with the device name.

Targets (issue 7): compaction and (de)quantization >= 80% of the copy bandwidth and >= 1.5x
torch; decode attention over int4 pages at 32k context on a Llama-3.1-8B-shaped layer (32
query heads, 8 KV heads, head_dim 128) >= 2x sdpa over the fp16 full cache.

    python bench/bench_kernels.py [--quick] [--out PATH]
    python bench/bench_kernels.py --emulate --out PATH   # tiny shapes, kernels emulated on
                                                         # the CPU: checks the code path only

``--quick`` keeps the shapes (the targets are stated for them) and takes fewer repetitions.
``--emulate`` (tools/gpu_check.py's dry run) runs the kernels' CUDA path through the g++
emulation of tests/emu_launch.py on tiny shapes with wall-clock timing; its JSON says
``"device": "cpu (emulated)"`` and its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"
# Llama-3.1-8B-shaped: 32 layers, 8 KV heads, head_dim 128, 16-token blocks; 2048 blocks per pool;
# 32 layers x 8 heads x 2048 tokens quantized; decode attention at 32k; a 256 MiB copy.
FULL = dict(
    layers=32, num_blocks=2048, block_size=16, head_dim=128, quant_blocks=32 * 8 * 128,
    context=32768, copy_bytes=1 << 28,
)  # fmt: skip
# --emulate: the same code on shapes the serial CPU emulation runs in seconds
EMULATED = dict(
    layers=2, num_blocks=8, block_size=16, head_dim=64, quant_blocks=4, context=256,
    copy_bytes=1 << 20,
)  # fmt: skip


def _refuse(msg: str) -> None:
    print(f"bench_kernels.py: {msg}; nothing was measured.", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--emulate", action="store_true", help="tiny shapes, emulated on the CPU")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    try:
        import torch
    except ImportError:
        _refuse("needs torch")
    import kvcore
    from kvcore import kernels

    if args.emulate:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from emu_launch import emulated_launch

        kernels._launch = emulated_launch  # type: ignore[assignment]
        kernels.uses_kernel = lambda *t: True  # type: ignore[assignment]
        dev = torch.device("cpu")
        shape = EMULATED
    else:
        if not torch.cuda.is_available():
            _refuse("needs a CUDA device (torch.cuda.is_available() is False)")
        if not kernels.cupy_available():
            _refuse("needs CuPy (pip install 'kvcore[cuda]')")
        dev = torch.device("cuda")
        shape = FULL
    if kvcore.build_profile != "release":
        _refuse(f"the extension is a {kvcore.build_profile} build; run `make dev` (release)")
    from kvcore import quant

    reps, warm = (5, 2) if args.quick or args.emulate else (30, 5)
    if args.emulate:
        reps, warm = 1, 0

    def timeit(fn: Callable[[], object]) -> float:
        """Median milliseconds of ``fn`` over ``reps`` runs after ``warm`` warm-up runs."""
        for _ in range(warm):
            fn()
        times = []
        for _ in range(reps):
            if dev.type == "cpu":
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
                continue
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    # device-to-device copy: the bandwidth reference (read + write)
    n_copy = shape["copy_bytes"]
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

    def guarded(section: str, fn: Callable[[], None]) -> None:
        """Runs one section; an error becomes a row, and the other sections still run."""
        try:
            fn()
        except Exception as e:  # recorded, never hidden: the JSON names the failing section
            traceback.print_exc()
            rows.append({"kernel": section, "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"{section}: ERROR {type(e).__name__}: {e}"[:300])

    # 1. compaction: Llama-3.1-8B-shaped step (32 layers x K, V), half of the slots move
    layers, num_blocks, bs, d = (
        shape[k] for k in ("layers", "num_blocks", "block_size", "head_dim")
    )
    comp_fp16 = f"compaction ({layers} layers, K+V, fp16)"
    comp_int4 = f"compaction ({layers} layers, K+V, int4 pages)"
    num_slots = num_blocks * bs
    moves = num_slots // 2
    perm = torch.randperm(num_slots, device=dev)
    src = torch.sort(perm[:moves]).values
    dst = torch.sort(perm[moves : 2 * moves]).values
    # the kernel runs moves in order per column; gather/scatter is the torch equivalent
    src_all = src.repeat(layers)
    dst_all = dst.repeat(layers)
    indptr = torch.arange(0, (layers + 1) * moves, moves, device=dev)

    def compaction_fp16() -> None:
        pools = [
            torch.randn(num_blocks, bs, d, device=dev, dtype=torch.float16)
            for _ in range(2 * layers)
        ]
        plan_of = [i // 2 for i in range(2 * layers)]

        def torch_compact() -> None:
            for p in pools:
                r = p.view(num_slots, d)
                r.index_copy_(0, dst, r.index_select(0, src))

        ms = timeit(
            lambda: kernels.compact_pools(pools, plan_of, src_all, dst_all, indptr, num_slots)
        )
        record(comp_fp16, ms, timeit(torch_compact), 2 * 2 * layers * moves * d * 2)

    def compaction_int4() -> None:
        # each token's codes, scales and zeros: three strided pieces of its page (layouts.md)
        page = kvcore.QuantLayout(4, 32, bs, d, "channel", "float16")
        tok = kvcore.QuantLayout(4, 32, 1, d, "channel", "float16")
        cb, sb = tok.codes_bytes, tok.zeros_offset - tok.scales_offset
        regions = [(0, cb), (page.scales_offset, sb), (page.zeros_offset, sb)]
        qpools = [
            torch.randint(0, 256, (num_blocks, page.nbytes), device=dev, dtype=torch.uint8)
            for _ in range(2 * layers)
        ]
        views = [q[:, o : o + bs * w].view(num_blocks, bs, w) for q in qpools for o, w in regions]
        plan_of = [i // 6 for i in range(len(views))]

        def torch_compact() -> None:
            for v in views:
                v[dst // bs, dst % bs] = v[src // bs, src % bs]

        ms = timeit(
            lambda: kernels.compact_pools(views, plan_of, src_all, dst_all, indptr, num_slots)
        )
        record(comp_int4, ms, timeit(torch_compact), 2 * 2 * layers * moves * tok.nbytes)

    guarded(comp_fp16, compaction_fp16)
    guarded(comp_int4, compaction_int4)

    # 2. quantize / dequantize: 32 layers x 8 heads x 2048 tokens, KIVI-style layouts
    x = torch.randn(shape["quant_blocks"], bs, d, device=dev, dtype=torch.float16)

    def quantization(bits: int, axis: str) -> None:
        lay = kvcore.QuantLayout(bits, 16 if axis == "token" else 32, bs, d, axis)
        q = kernels.quantize(x, lay)
        nbytes = x.numel() * 2 + q.numel()
        record(
            f"quantize int{bits} {axis}",
            timeit(lambda: kernels.quantize(x, lay)),
            timeit(lambda: quant.quantize(x, lay)),
            nbytes,
        )
        record(
            f"dequantize int{bits} {axis} -> fp16",
            timeit(lambda: kernels.dequantize(q, lay, torch.float16)),
            timeit(lambda: quant.dequantize(q, lay).half()),
            nbytes,
        )

    for bits in (8, 4, 2):
        for axis in ("channel", "token"):
            guarded(
                f"quantize int{bits} {axis}", lambda bits=bits, axis=axis: quantization(bits, axis)
            )

    # 5. decode attention, Llama-3.1-8B layer: 32 q heads, 8 kv heads, head_dim 128, 32k
    ctx, hq, h = shape["context"], 32, 8
    splits = None
    if args.emulate:
        hq, h, splits = 4, 2, 2
    at = f"{ctx // 1024}k" if ctx >= 1024 else str(ctx)
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

    def attention_fp16() -> None:
        ms = timeit(
            lambda: kernels.decode_attention(
                query, k_pool, v_pool, table, lengths, num_splits=splits
            )
        )
        record(f"decode attn fp16 pages {at}", ms, sdpa_ms, 2 * h * ctx * d * 2)

    def attention_quant(bits: int) -> None:
        kl = kvcore.QuantLayout(bits, bs, bs, d, "token")
        vl = kvcore.QuantLayout(bits, 32, bs, d, "channel")
        kq, vq = kernels.quantize(k_pool, kl), kernels.quantize(v_pool, vl)
        ms = timeit(
            lambda: kernels.decode_attention(
                query, kq, vq, table, lengths, k_layout=kl, v_layout=vl, num_splits=splits
            )
        )
        record(
            f"decode attn int{bits} pages {at}",
            ms,
            sdpa_ms,
            h * (ctx // bs) * (kl.nbytes + vl.nbytes),
        )

    guarded(f"decode attn fp16 pages {at}", attention_fp16)
    # emulated: int4 only (the other widths run the same host code; each emulated launch is slow)
    for bits in (4,) if args.emulate else (8, 4, 2):
        guarded(f"decode attn int{bits} pages {at}", lambda bits=bits: attention_quant(bits))

    def measured(name: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["kernel"] == name and "error" not in r), None)

    def met(names: list[str], copy: float | None, speedup: float) -> bool:
        """Every named row measured, at ``copy`` of the copy bandwidth and ``speedup``."""
        got = [measured(n) for n in names]
        return all(
            r is not None
            and (copy is None or r["copy_fraction"] >= copy)
            and r["speedup_vs_torch"] >= speedup
            for r in got
        )

    quants = [
        f"{kind} int{bits} {axis}{' -> fp16' if kind == 'dequantize' else ''}"
        for bits in (8, 4, 2)
        for axis in ("channel", "token")
        for kind in ("quantize", "dequantize")
    ]
    targets = {
        "compaction >= 80% copy and >= 1.5x torch (fp16 rows and int4 pieces)": met(
            [comp_fp16, comp_int4], 0.8, 1.5
        ),
        "(de)quantization >= 80% copy and >= 1.5x torch (every layout)": met(quants, 0.8, 1.5),
        f"int4 decode attention {at} >= 2x sdpa fp16": met(
            [f"decode attn int4 pages {at}"], None, 2.0
        ),
    }
    errors = [r["kernel"] for r in rows if "error" in r]
    for k, ok in targets.items():
        print(f"target {'met' if ok else 'MISSED'}: {k}")
    result = {
        "device": "cpu (emulated)" if args.emulate else torch.cuda.get_device_name(dev),
        "machine": platform.node(),
        "command": "python " + " ".join(sys.argv),
        "shape": shape,
        "torch": torch.__version__,
        "cupy": None if args.emulate else __import__("cupy").__version__,
        "kvcore_build": kvcore.build_profile,
        "copy_bandwidth_gbs": copy_bw / 1e9,
        "reps": reps,
        "warmup": warm,
        "rows": rows,
        "targets": targets,
        "errors": errors,
        "note": (
            "emulated on the CPU: checks the code path, measures nothing"
            if args.emulate
            else "medians of CUDA-event timings; bytes = the minimum a kernel must read and write"
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    assert math.isfinite(copy_bw)
    if errors:
        print(f"bench_kernels.py: {len(errors)} section(s) failed: {', '.join(errors)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
