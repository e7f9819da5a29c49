"""End-to-end decode throughput: kvcore's compressed cache against the full HF cache.

A Llama-3.1-8B-shaped model (32 layers, hidden 4096, 32 query heads, 8 KV heads, head_dim
128, intermediate 14336, vocab 128256, RoPE theta 500000) with random bf16 weights reads a
random prompt of 8k and 32k tokens, then decodes ``--new-tokens`` tokens greedily. For each
context length and batch size, in the same run:

* ``full``: transformers' ``DynamicCache`` with SDPA (the baseline);
* ``kvcore:<policy>@<keep>``: ``kvcore.hf.compressed_cache`` with the kvcore attention,
  prefilled in chunks under ``Schedule.chunked`` so that K/V memory never exceeds the budget
  plus one chunk (int4 pages with ``+int4``).

Reported per cell: decode tokens/s (CUDA-event timed, after a warm-up step), prefill seconds,
peak GPU memory (``torch.cuda.max_memory_allocated``) and the K/V bytes the cache holds, plus
the decode speed-up over ``full`` at the same context. Writes ``bench/results/e2e.json`` with
the device name.

    python bench/bench_e2e.py                 # needs a CUDA device (an H100 or H200)
    python bench/bench_e2e.py --quick         # 32k only, 8x compression, 32 decode steps
    python bench/bench_e2e.py --smoke         # tiny config on the CPU: checks the code path,
                                              # writes nothing unless --out is given

``--quick`` is the size tools/gpu_check.py runs (a few minutes on an H200): the 32k context,
the full cache against three kvcore caches at 8x compression (StreamingLLM, SnapKV, SnapKV
with int4 pages), 32 decode steps. The JSON is rewritten after every cell, so a run stopped
by a time limit keeps the cells it finished.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "e2e.json"

LLAMA31_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
}
# The smoke configuration: same architecture, tiny sizes (runs in seconds on a CPU).
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
}


# --quick: 8x compression (keep 1/8), the issue 17 target's setting
QUICK_METHODS = "kvcore:streaming@0.125,kvcore:snapkv@0.125,kvcore:snapkv@0.125+int4"


def _refuse(msg: str) -> None:
    print(f"bench_e2e.py: {msg}; nothing was measured.", file=sys.stderr)
    raise SystemExit(2)


def build_model(shape: dict[str, Any], device: Any, dtype: Any, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    # Random weights scaled so that activations stay finite through 32 layers.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model.eval()


def run_cell(
    model: Any,
    prompt: Any,
    method: str,
    new_tokens: int,
    chunk: int,
    sync: Any,
    peak: Any,
) -> dict[str, Any]:
    """Prefill ``prompt`` (B, n) in chunks, then ``new_tokens`` greedy decode steps."""
    import quality_common as qc
    import torch
    from transformers import DynamicCache

    import kvcore.hf as kh
    from kvcore.cache import Schedule

    b, n = prompt.shape
    if method == "full":
        model.set_attn_implementation("sdpa")
        cache: Any = DynamicCache()
    else:
        name, _, rest = method.removeprefix("kvcore:").partition("@")
        keep_s, _, fmt = rest.partition("+")
        budget = max(1, round(float(keep_s) * n))
        model.set_attn_implementation(kh.ATTN_NAME)
        cache = kh.compressed_cache(
            model,
            policy=name,
            budget=budget,
            schedule=Schedule.chunked(chunk),
            kv_format=fmt or "native",
        )
    peak.reset()
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = None
        for s in range(0, n, chunk):
            ids = prompt[:, s : s + chunk]
            pos = torch.arange(s, s + ids.shape[1], device=prompt.device).expand(b, -1)
            logits = model(
                input_ids=ids, **kh.cache_kwargs(model, cache), position_ids=pos, logits_to_keep=1
            ).logits
        assert logits is not None
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        # One warm-up decode step (first-use compilation, allocator growth), not timed.
        logits = model(
            input_ids=nxt,
            **kh.cache_kwargs(model, cache),
            position_ids=torch.full((b, 1), n, device=prompt.device),
        ).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t1 = time.perf_counter()
        for i in range(new_tokens):
            logits = model(
                input_ids=nxt,
                **kh.cache_kwargs(model, cache),
                position_ids=torch.full((b, 1), n + 1 + i, device=prompt.device),
            ).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t2 = time.perf_counter()
    if method == "full":
        kv = qc.dynamic_kv_bytes(cache)
    else:
        kv = int(cache.kv.used_bytes())
    model.set_attn_implementation("sdpa")
    return {
        "method": method,
        "batch": b,
        "context": n,
        "prefill_s": round(t1 - t0, 4),
        "decode_tokens_per_s": round(b * new_tokens / (t2 - t1), 3),
        "peak_memory_bytes": peak.get(),
        "kv_bytes": kv,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU")
    ap.add_argument("--quick", action="store_true", help="32k, 8x compression, 32 steps")
    ap.add_argument("--contexts", default=None, help="prompt lengths (default 8192,32768)")
    ap.add_argument("--batches", default="1", help="batch sizes, e.g. 1,4")
    ap.add_argument(
        "--methods",
        default="kvcore:snapkv@0.25,kvcore:snapkv@0.25+int4,kvcore:streaming@0.125",
        help="kvcore methods: kvcore:<policy>@<keep>[+int8|+int4|+int2]",
    )
    ap.add_argument("--new-tokens", type=int, default=None, help="decode steps (default 128)")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (default 2048)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.contexts = args.contexts or "32768"
        args.new_tokens = args.new_tokens or 32
        if args.methods == ap.get_default("methods"):
            args.methods = QUICK_METHODS
    try:
        import torch
    except ImportError:
        _refuse("needs torch")
    import kvcore

    if args.smoke:
        device, dtype, shape = torch.device("cpu"), torch.float32, TINY
        contexts = [int(x) for x in (args.contexts or "256,320").split(",")]
        new_tokens, chunk = args.new_tokens or 4, args.chunk or 64

        def sync() -> None:
            return None

        class Peak:
            def reset(self) -> None:
                return None

            def get(self) -> None:
                return None  # no allocator statistics on the CPU

    else:
        if not torch.cuda.is_available():
            _refuse(
                "needs a CUDA device (torch.cuda.is_available() is False); --smoke runs "
                "a tiny CPU check"
            )
        if kvcore.build_profile != "release":
            _refuse(f"the extension is a {kvcore.build_profile} build; run `make dev`")
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, LLAMA31_8B
        contexts = [int(x) for x in (args.contexts or "8192,32768").split(",")]
        new_tokens, chunk = args.new_tokens or 128, args.chunk or 2048

        def sync() -> None:
            torch.cuda.synchronize()

        class Peak:  # type: ignore[no-redef]
            def reset(self) -> None:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

            def get(self) -> int:
                return int(torch.cuda.max_memory_allocated())

    model = build_model(shape, device, dtype)
    methods = ["full", *filter(None, args.methods.split(","))]
    cells: list[dict[str, Any]] = []
    result = {
        "benchmark": "end-to-end decode throughput, kvcore compressed cache vs full HF cache",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "model_shape": shape,
        "dtype": str(dtype),
        "new_tokens": new_tokens,
        "prefill_chunk": chunk,
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "cells": cells,
    }
    out = args.out if args.smoke else (args.out or RESULTS)
    gen = torch.Generator().manual_seed(0)
    for n in contexts:
        for b in [int(x) for x in args.batches.split(",")]:
            prompt = torch.randint(0, shape["vocab_size"], (b, n), generator=gen).to(device)
            base = None
            for m in methods:
                try:
                    cell = run_cell(model, prompt, m, new_tokens, chunk, sync, Peak())
                except torch.OutOfMemoryError as e:  # recorded, never hidden
                    cell = {"method": m, "batch": b, "context": n, "error": f"OOM: {e}"[:300]}
                    torch.cuda.empty_cache()
                if m == "full" and "error" not in cell:
                    base = cell["decode_tokens_per_s"]
                if base and "error" not in cell:
                    cell["decode_speedup_vs_full"] = round(cell["decode_tokens_per_s"] / base, 3)
                cells.append(cell)
                print(json.dumps(cell), flush=True)
                if out is not None:  # after every cell: a run stopped early keeps what it has
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(result, indent=1))
    if out is not None:
        print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
