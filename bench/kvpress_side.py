"""The kvpress half of the quality benchmark. Runs inside kvpress's own virtual environment
(kvpress pins its transformers version), driven by ``bench/quality.py`` through a subprocess:

    .venv-kvpress/bin/python bench/kvpress_side.py --tasks T.json --model-cache DIR --out O.json
        [--refs REFS.pt]

Same model, same tasks (token ids, so tokenizer versions cannot differ), same protocol and
metrics (``quality_common.py``). Every press runs through kvpress's documented entry point,
``with press(model): model.model(context_ids, past_key_values=cache)``, exactly as kvpress's
pipeline prefills (``quality_common.dynamic_prefill``, which also records the peak K/V bytes of
the prefill: one uncompressed layer on top of the compressed ones); presses kvpress cannot run
on this model are recorded with their error. Query-aware tasks (``quality_common.query_aware``)
carry the question at the end of their context, as kvpress's ``query_aware: true`` does.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import quality_common as qc
import torch

# the names of press_factories' presses (bench/quality.py checks --presses against them
# without kvpress installed)
PRESSES = (
    "kvpress:streaming_llm",
    "kvpress:knorm",
    "kvpress:snapkv",
    "kvpress:pyramidkv",
    "kvpress:tova",
    "kvpress:expected_attention",
    "kvpress:adakv_snapkv",
)


def press_factories(ratio: float) -> dict[str, Any]:
    """kvpress presses at ``compression_ratio`` (the fraction of the KV cache removed), one
    per name of :data:`PRESSES`."""
    import kvpress as kp

    out: dict[str, Any] = {
        "kvpress:streaming_llm": lambda: kp.StreamingLLMPress(compression_ratio=ratio),
        "kvpress:knorm": lambda: kp.KnormPress(compression_ratio=ratio),
        "kvpress:snapkv": lambda: kp.SnapKVPress(compression_ratio=ratio),
        "kvpress:pyramidkv": lambda: kp.PyramidKVPress(compression_ratio=ratio),
        "kvpress:tova": lambda: kp.TOVAPress(compression_ratio=ratio),
        "kvpress:expected_attention": lambda: kp.ExpectedAttentionPress(compression_ratio=ratio),
        "kvpress:adakv_snapkv": lambda: kp.AdaKVPress(kp.SnapKVPress(compression_ratio=ratio)),
    }
    if tuple(out) != PRESSES:
        raise RuntimeError(f"PRESSES lists {PRESSES}, press_factories builds {tuple(out)}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=Path, required=True)
    ap.add_argument("--model-cache", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keep", type=str, default="0.5,0.25,0.125", help="budgets (kept fraction)")
    ap.add_argument("--presses", type=str, default="", help="comma list; empty: all")
    ap.add_argument(
        "--refs",
        type=Path,
        default=None,
        help="torch.save'd {task name: [log-probs per question]} of the full cache (the KL "
        "reference); without it, this side runs its own full cache first (kvpress:full)",
    )
    args = ap.parse_args()

    import transformers

    torch.manual_seed(0)
    model, tok = qc.load_model(args.model_cache)
    tasks = [qc.Task.from_json(t) for t in json.loads(args.tasks.read_text())]

    def press_prefill(make: Any) -> qc.Prefill:
        return lambda m, ctx: qc.dynamic_prefill(m, ctx, make())

    ops = (qc.dynamic_snapshot, qc.dynamic_restore, qc.dynamic_kv_bytes)
    results: dict[str, Any] = {
        "versions": {
            "kvpress": importlib.metadata.version("kvpress"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "cells": [],
    }
    t0 = time.perf_counter()
    if args.refs is not None:
        # the full cache's log-probabilities from bench/quality.py's side, same token ids:
        # saves a prefill per task (the full cache is then measured once, on our side)
        refs = torch.load(args.refs)
    else:
        rows, refs = qc.full_reference(model, tok, tasks, qc.dynamic_prefill, ops)
        results["cells"].append({"method": "kvpress:full", "keep": 1.0, "rows": rows})
        print(f"[kvpress side] full cache done ({time.perf_counter() - t0:.0f} s)", flush=True)

    wanted = set(filter(None, args.presses.split(",")))
    for keep in [float(x) for x in args.keep.split(",")]:
        for name, make in press_factories(1.0 - keep).items():
            if wanted and name not in wanted:
                continue
            t1 = time.perf_counter()
            try:
                rows = [
                    qc.evaluate(model, tok, t, refs[t.name], press_prefill(make), *ops)
                    for t in tasks
                ]
                results["cells"].append({"method": name, "keep": keep, "rows": rows})
                status = "ok"
            except Exception as e:  # recorded, not hidden: the JSON says why
                results["cells"].append(
                    {
                        "method": name,
                        "keep": keep,
                        "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(limit=3),
                    }
                )
                status = f"error {type(e).__name__}"
            dt = time.perf_counter() - t1
            print(f"[kvpress side] {name} keep={keep}: {status} ({dt:.0f} s)", flush=True)
    args.out.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
