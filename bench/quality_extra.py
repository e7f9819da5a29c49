"""Two measurements the quality grid does not make, on the same model and tasks.

    .venv/bin/python bench/quality_extra.py multiturn   # re-score each turn vs compress once
    .venv/bin/python bench/quality_extra.py multiturn --model qwen --length 4096
    .venv/bin/python bench/quality_extra.py speed       # 4k context: decode speed on the CPU

``multiturn``: a real conversation over one cached document (the 4-fact task of
``quality_common.py``, four questions). Turn 1 prefills the document and the first question
together; each later turn appends the previous answer and the next question. With
``Schedule.prefill(multi_turn="once")`` the cache is compressed once, with the first question's
queries in the observation window (SCBench's "compress once" setting); with ``"rescore"`` every
turn's prefill compresses the cache back to the budget with that turn's question in the
window. Both keep the same budget; the full cache (HF ``DynamicCache``) is the reference.
``--length N`` uses the long suite's multi-turn task at N tokens instead (four facts spread
over real text, ``quality_tasks.multiturn_task``); ``--model qwen`` runs Qwen2.5-Coder-0.5B.
Writes ``bench/results/quality_multiturn.json``.

``speed``: the 4k passkey context. Prefill (with its compression) and then 64 greedy decode
steps (no early stop), for the full HF cache with SDPA, kvcore without a policy, and kvcore
compressed; the methods alternate over ``--rounds`` rounds and the medians are reported, with
the ratio of each method's decode tokens/s to the full HF cache's from the same run.
Writes ``bench/results/quality_speed.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import quality_common as qc
import quality_tasks as qt
import torch

import kvcore
import kvcore.hf as kh
from kvcore.cache import Schedule

HERE = Path(__file__).resolve().parent


def kv_bytes(cache: Any) -> int:
    if isinstance(cache, kh.KVCoreCache):
        return int(cache.kv.used_bytes())
    return qc.dynamic_kv_bytes(cache)


@torch.inference_mode()
def step(model: Any, cache: Any, ids: list[int], pos: int) -> int:
    """Feeds ``ids`` at positions ``pos, pos + 1, ...``; returns the greedy next token."""
    out = model(
        input_ids=torch.tensor([ids]),
        **kh.cache_kwargs(model, cache),
        position_ids=torch.arange(pos, pos + len(ids)).unsqueeze(0),
        logits_to_keep=1,
    )
    return int(out.logits[0, -1].argmax())


def conversation(
    model: Any, tok: Any, task: qc.Task, cache: Any, max_new_tokens: int = 12
) -> dict[str, Any]:
    """Runs the task's questions as consecutive turns on one cache."""
    eos = model.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    pos = 0
    pending = list(task.context_ids)  # tokens to feed at the start of the next turn
    turns = []
    for q in task.questions:
        ids = pending + q.question_ids
        nxt = step(model, cache, ids, pos)
        pos += len(ids)
        gen = [nxt]
        while len(gen) < max_new_tokens and nxt not in eos:
            nxt = step(model, cache, [nxt], pos)
            pos += 1
            gen.append(nxt)
        pending = [gen[-1]]  # the last answer token has not been fed yet
        text = tok.decode(gen, skip_special_tokens=True)
        turns.append(
            {
                "question": tok.decode(q.question_ids, skip_special_tokens=True).strip(),
                "generated": text,
                "correct": qc.score(text, q.required()) == 1.0,
                "kv_bytes": kv_bytes(cache),
            }
        )
    return {
        "accuracy": sum(t["correct"] for t in turns) / len(turns),
        "kv_bytes_end": turns[-1]["kv_bytes"],
        "turns": turns,
    }


def run_multiturn(args: argparse.Namespace, model: Any, tok: Any) -> dict[str, Any]:
    from transformers import DynamicCache

    if args.length:
        task = qt.multiturn_task(tok, args.length, 4, random.Random(args.seed))
    else:
        task = next(t for t in qc.build_tasks(tok, quick=True) if t.kind == "multiturn")
    n = len(task.context_ids)
    print(f"{task.name}: {n} context tokens, {len(task.questions)} questions", flush=True)
    cells = []
    model.set_attn_implementation("sdpa")
    cells.append(
        {"method": "full (HF DynamicCache)", "mode": "-", "keep": 1.0}
        | conversation(model, tok, task, DynamicCache())
    )
    model.set_attn_implementation(kh.ATTN_NAME)
    for policy in args.policies.split(","):
        for keep in [float(x) for x in args.keep.split(",")]:
            for mode in ("once", "rescore"):
                cache = kh.compressed_cache(
                    model,
                    policy=policy,
                    budget=max(1, round(keep * n)),
                    schedule=Schedule.prefill(multi_turn=mode),
                )
                t0 = time.perf_counter()
                res = conversation(model, tok, task, cache)
                res["seconds"] = round(time.perf_counter() - t0, 2)
                res["compressions"] = cache.kv.num_compressions
                cells.append({"method": f"kvcore:{policy}", "mode": mode, "keep": keep} | res)
                print(
                    f"kvcore:{policy} keep={keep} {mode}: accuracy {res['accuracy']:.2f}, "
                    f"{res['kv_bytes_end'] / 2**20:.2f} MiB held at the end",
                    flush=True,
                )
    model.set_attn_implementation("sdpa")
    return {
        "benchmark": "multi-turn: re-score every turn vs compress once "
        f"({qc.MODEL_TITLES[args.model]})",
        "task": {"name": task.name, "context_tokens": n, "questions": len(task.questions)},
        "cells": cells,
    }


@torch.inference_mode()
def timed_generation(model: Any, cache: Any, ctx: list[int], new_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    nxt = step(model, cache, ctx, 0)
    if isinstance(cache, kh.KVCoreCache):
        cache.kv.flush()  # the prefill compression runs now, inside prefill_s
    t1 = time.perf_counter()
    pos = len(ctx)
    for _ in range(new_tokens):
        nxt = step(model, cache, [nxt], pos)
        pos += 1
    t2 = time.perf_counter()
    return {
        "prefill_s": t1 - t0,
        "decode_tokens_per_s": new_tokens / (t2 - t1),
        "kv_bytes": kv_bytes(cache),
    }


def run_speed(args: argparse.Namespace, model: Any, tok: Any) -> dict[str, Any]:
    from transformers import DynamicCache

    task = qc.build_tasks(tok, lengths=[4096], depths=[0.5])[0]
    ctx = task.context_ids
    n = len(ctx)
    print(f"{task.name}: {n} context tokens, {args.new_tokens} decode steps", flush=True)
    methods: dict[str, tuple[str, Any]] = {
        "full (HF DynamicCache, sdpa)": ("sdpa", lambda: DynamicCache()),
        "kvcore:full": (kh.ATTN_NAME, lambda: kh.compressed_cache(model, policy=None)),
    }
    for spec in args.policies.split(","):
        policy, _, keep_s = spec.partition("@")
        keep = float(keep_s or 0.25)

        def make(policy: str = policy, keep: float = keep) -> Any:
            return kh.compressed_cache(model, policy=policy, budget=max(1, round(keep * n)))

        methods[f"kvcore:{policy} keep={keep}"] = (kh.ATTN_NAME, make)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for name, (attn, make) in methods.items():
            model.set_attn_implementation(attn)
            res = timed_generation(model, make(), ctx, args.new_tokens)
            runs[name].append(res)
            print(
                f"round {r}: {name}: prefill {res['prefill_s']:.2f} s, "
                f"decode {res['decode_tokens_per_s']:.2f} tok/s",
                flush=True,
            )
    model.set_attn_implementation("sdpa")
    base = statistics.median(x["decode_tokens_per_s"] for x in runs[next(iter(methods))])
    cells = []
    for name, rs in runs.items():
        tps = statistics.median(x["decode_tokens_per_s"] for x in rs)
        cells.append(
            {
                "method": name,
                "prefill_s_median": round(statistics.median(x["prefill_s"] for x in rs), 3),
                "decode_tokens_per_s_median": round(tps, 3),
                "decode_speed_vs_full_hf": round(tps / base, 3),
                "kv_bytes": rs[0]["kv_bytes"],
                "runs": rs,
            }
        )
    return {
        "benchmark": f"decode speed at 4k context on the CPU ({qc.MODEL_TITLES[args.model]})",
        "task": {"name": task.name, "context_tokens": n, "decode_steps": args.new_tokens},
        "rounds": args.rounds,
        "cells": cells,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("what", choices=["multiturn", "speed"])
    ap.add_argument("--model", choices=["smollm2", "qwen"], default="smollm2")
    ap.add_argument(
        "--length",
        type=int,
        default=0,
        help="multiturn: the long suite's task at this many "
        "tokens (0: the 1k task of the legacy suite)",
    )
    ap.add_argument("--seed", type=int, default=0, help="multiturn --length: task seed")
    ap.add_argument("--policies", default=None, help="multiturn: names; speed: name@keep,...")
    ap.add_argument("--keep", default="0.25,0.125", help="multiturn: kept fractions")
    ap.add_argument("--rounds", type=int, default=3, help="speed: alternating rounds")
    ap.add_argument("--new-tokens", type=int, default=64, help="speed: decode steps")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if kvcore.build_profile != "release":
        print("refusing to benchmark a debug build of kvcore", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    model, tok = qc.load_model(qc.model_dir(args.model))
    if args.what == "multiturn":
        args.policies = args.policies or "snapkv,tova"
        result = run_multiturn(args, model, tok)
    else:
        args.policies = args.policies or "snapkv@0.25,snapkv@0.125"
        result = run_speed(args, model, tok)
    result.update(
        {
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(sys.argv),
            "machine": qc.machine(),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    out = args.out or HERE / "results" / f"quality_{args.what}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
