"""Why the serving benchmark's answers go at 4x: per-head keep sets against one keep set per
request, on the serving benchmark's own requests.

``kvcore.serving.hf`` keeps one set of tokens per request for all layers and kv heads (the
engine's block tables are shared, docs/serving.md 5.1). This script separates "the shared
keep set is too coarse" from "the serving path is wrong" and from "SnapKV itself loses the
answer here". Each request (``bench_serving.requests``: a 7-digit magic number in ~500 tokens of
prose, the question at the end of the prompt) is prefilled once into a ``DynamicCache``; the
last ``window`` rotated queries give SnapKV's window probabilities; kvcore's SnapKV
(``policy.score`` then ``policy.select``) turns them into keep sets:

* ``per-head``: one selection per (layer, kv head), as kvcore's own cache and kvpress do;
* ``shared-mean``: the scores averaged over layers and heads, one selection (what
  ``kvcore.serving._compress`` does);
* ``shared-vote``: every (layer, head) votes for its own top ``budget`` tokens, the most voted
  tokens are kept (ties: the higher mean score).

Each keep set is applied to a copy of the cache (the kept K/V at their original positions) and
the answer is decoded greedily, positions continuing from the prompt's length. ``serving``
runs the same requests through ``kvcore.serving.hf`` (``shared-mean`` inside the engine, with
memory for all of them at once): it must agree with ``shared-mean``. ``distinct_kept`` is the
number of different prompt positions a method keeps in at least one (layer, head), the mean
over requests: every method holds the same bytes, ``budget`` tokens per (layer, kv head).

    python bench/serving_keepsets.py            # writes bench/results/serving_keepsets.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
NEW_TOKENS = 12


def prefill(model: Any, ids: list[int], w: int) -> tuple[Any, np.ndarray, int]:
    """The prompt through ``model`` into a DynamicCache: the cache, the window probabilities
    ``(layers, q_heads, w, n)`` float32 of the last ``w`` rotated queries (causal), and the
    greedy first token."""
    import torch
    from transformers import DynamicCache

    from kvcore.hf import _rotate_half, cache_kwargs

    queries: dict[int, torch.Tensor] = {}

    def pre(mod: Any, args: Any, kwargs: dict[str, Any]) -> None:
        hidden = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])[:, -w:]
        cos, sin = (x[:, -w:].unsqueeze(1) for x in kwargs["position_embeddings"])
        q = mod.q_proj(hidden).view(1, w, -1, mod.head_dim).transpose(1, 2)
        queries[mod.layer_idx] = (q * cos + _rotate_half(q) * sin).float()

    mods = [m for m in model.modules() if hasattr(m, "q_proj")]
    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in mods]
    cache = DynamicCache()
    try:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), **cache_kwargs(model, cache))
    finally:
        for h in hooks:
            h.remove()
    n = len(ids)
    future = torch.arange(n)[None, :] > torch.arange(n - w, n)[:, None]
    probs = []
    for layer, mod in enumerate(mods):
        keys = cache.layers[layer].keys[0].float()
        keys = keys.repeat_interleave(queries[layer].shape[1] // keys.shape[0], 0)
        logits = queries[layer][0] @ keys.transpose(1, 2) * mod.scaling
        probs.append(logits.masked_fill(future, float("-inf")).softmax(-1))
    return cache, torch.stack(probs).numpy(), int(out.logits[0, -1].argmax())


def keep_rows(policy: Any, scores: np.ndarray, budget: int, method: str) -> np.ndarray:
    """``(layers, kv_heads, budget)`` kept positions of ``method`` from SnapKV's per-head
    ``scores`` ``(layers, kv_heads, n)``."""
    L, H, n = scores.shape
    if method == "per-head":
        sel = policy.select(scores, budget=budget)
        return np.asarray(sel.positions, dtype=np.int64).reshape(L, H, budget)
    mean = scores.mean((0, 1))
    if method == "shared-mean":
        row = mean
    elif method == "shared-vote":
        own = policy.select(scores, budget=budget).positions
        votes = np.bincount(np.asarray(own), minlength=n).astype(np.float32)
        row = votes + 0.5 * mean / max(float(mean.max()), 1e-30)
    else:
        raise ValueError(f"unknown method {method!r}")
    keep = np.asarray(policy.select(row.reshape(1, 1, -1), budget=budget).positions)
    return np.broadcast_to(keep, (L, H, budget))


def decode(model: Any, cache: Any, keep: np.ndarray, first: int, n: int) -> list[int]:
    """Greedy tokens after the prompt on a copy of ``cache`` that keeps ``keep``."""
    import torch

    from kvcore.hf import cache_kwargs

    pruned = copy.deepcopy(cache)
    idx = torch.as_tensor(np.ascontiguousarray(keep))
    for layer, dst in enumerate(pruned.layers):
        ix = idx[layer][None, :, :, None].expand(1, -1, -1, dst.keys.shape[-1])
        dst.keys, dst.values = dst.keys.gather(2, ix), dst.values.gather(2, ix)
    tokens = [first]
    with torch.inference_mode():
        for step in range(NEW_TOKENS - 1):
            out = model(
                input_ids=torch.tensor([[tokens[-1]]]),
                position_ids=torch.tensor([[n + step]]),
                **cache_kwargs(model, pruned),
            )
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def serving(model: Any, tok: Any, reqs: list[Any], budget: int, kernel: int, w: int) -> list[str]:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    import kvcore.serving.hf as kvs

    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1)
    gen.pad_token_id = tok.pad_token_id
    blocks = sum(-(-(len(p) + NEW_TOKENS) // 16) for p, _ in reqs)
    cb = ContinuousBatchingConfig(num_blocks=blocks, page_size=16, max_batch_tokens=512)
    with kvs.enable(model, "snapkv", budget, window=w, kernel=kernel):
        outs = model.generate_batch(
            [p for p, _ in reqs],
            generation_config=gen,
            continuous_batching_config=cb,
            progress_bar=False,
        )
    return [tok.decode(outs[f"req_{i}"].generated_tokens) for i in range(len(reqs))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--ratios", default="2,4")
    ap.add_argument("--kernels", default="7,15")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: shared cores)")
    ap.add_argument("--out", type=Path, default=RESULTS / "serving_keepsets.json")
    args = ap.parse_args(argv)

    import torch
    from bench_serving import requests
    from quality_common import score

    from kvcore.models import load_smollm2
    from kvcore.policies import get

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_smollm2(attn_implementation="sdpa")
    reqs = requests(tok, args.requests, args.tokens, 0)
    w = args.window
    kv_heads = model.config.num_key_value_heads
    pre = [prefill(model, ids, w) for ids, _ in reqs]
    shortest = min(len(p) for p, _ in reqs)
    rows = []
    for kernel in [int(k) for k in args.kernels.split(",")]:
        policy = get("snapkv", window=w, kernel=kernel)
        scores = [policy.score(probs, kv_heads) for _, probs, _ in pre]
        for ratio in [int(r) for r in args.ratios.split(",")]:
            budget = shortest // ratio  # bench_serving's budget at this ratio
            for method in ("per-head", "shared-mean", "shared-vote"):
                answers, distinct = [], []
                for (ids, _), (cache, _, first), s in zip(reqs, pre, scores, strict=True):
                    keep = keep_rows(policy, s, budget, method)
                    distinct.append(len(np.unique(keep)))
                    answers.append(tok.decode(decode(model, cache, keep, first, len(ids))))
                rows.append((kernel, ratio, budget, method, answers, distinct))
                print(f"kernel {kernel} {ratio}x {method}: done", flush=True)
            answers = serving(model, tok, reqs, budget, kernel, w)
            rows.append((kernel, ratio, budget, "serving", answers, None))
    runs = []
    for kernel, ratio, budget, method, answers, distinct in rows:
        acc = [score(a, req) for a, (_, req) in zip(answers, reqs, strict=True)]
        run = {
            "method": method,
            "kernel": kernel,
            "ratio": ratio,
            "budget": budget,
            "accuracy": sum(acc) / len(acc),
            "distinct_kept": None if distinct is None else float(np.mean(distinct)),
            "answers": answers,
        }
        runs.append(run)
        dk = "-" if distinct is None else f"{run['distinct_kept']:.0f}"
        print(
            f"kernel {kernel:>2} {ratio}x budget {budget:>3} {method:>12}: accuracy "
            f"{run['accuracy']:.2f}, distinct kept {dk}",
            flush=True,
        )
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "config": {
            "model": "SmolLM2-135M-Instruct (bf16, CPU)",
            "requests": len(reqs),
            "prompt_tokens": [len(p) for p, _ in reqs],
            "window": w,
            "new_tokens": NEW_TOKENS,
            "policy": "snapkv (max pooling)",
        },
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
