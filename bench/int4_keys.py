"""How int4 keys should be grouped on a model with outlier key channels (issue 18).

    .venv/bin/python bench/int4_keys.py                 # Qwen2.5-Coder-0.5B, a 4k needle context
    .venv/bin/python bench/int4_keys.py --length 2048 --out /tmp/k.json

One prefill of a real needle context (``bench/quality_tasks.py``, seed 0: ``pydoc_data.topics``
prose) records, in every layer, the rotated keys and values of every token and the rotated
queries of the last ``--queries`` tokens (forward pre-hooks on the attention modules, the
same projections and RoPE as the model). Then, per layer, each key format quantizes the keys
with kvcore's torch reference (``kvcore.quant``, the bytes of docs/layouts.md) and reports:

* ``key_err``: ``||K - K'|| / ||K||`` over the layer's keys;
* ``attn_err``: the attention output's relative error ``||o - o'|| / ||o||`` for the last
  queries (causal, over every stored token), values exact, so it isolates the keys' format,
  averaged over query heads and queries;
* ``attn_err_kv``: the same with the values also quantized per token (group 32, the values
  of every int4 format);
* ``top1``: the fraction of (query head, query) pairs whose most attended token is the
  full-precision one's.

Key formats (4 bits, float16 scales and zero points):

* ``token-gG``: per token, groups of ``G`` channels (``QuantLayout(4, G, T, D, "channel")``):
  kvcore's int4 pages before issue 18 (``G = 32``);
* ``channel-tG``: per channel, groups of ``G`` tokens (``QuantLayout(4, G, T, D, "token")``,
  KIVI's keys); the last ``T mod G`` tokens stay in full precision (KIVI's residual);
* ``token-g32-asideN``: per token, group 32, but the ``N`` channels of each kv head with the
  largest ``max |K|`` over the context kept aside in full precision (and set to the group's
  other values before quantizing, so they do not widen its range).

Also reports, per layer and kv head, the largest channel maximum ``max_c max_t |K[t, c]|`` and
the median of the channel maxima.

End to end (``--answers``, the needle at each of ``--depths``): kvcore caches that keep every
token (no policy) in bf16, in int4 pages with per-token keys (``key_quant="token"``, the
format before issue 18) and in int4 pages with per-channel keys (the default now) answer the
needle question greedily after the context was stored (kvcore attention); each row gives the
answer, whether it contains the number, and ``used_bytes()``.

Writes ``bench/results/int4_keys.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import quality_common as qc
import quality_tasks as qt
import torch

import kvcore.hf as kh
from kvcore import QuantLayout
from kvcore import quant as kq
from kvcore.models import load_qwen

HERE = Path(__file__).resolve().parent
BITS = 4
VALUE_GROUP = 32


def _rot(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rh = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rh * sin


def capture(model: Any, ids: list[int], n_queries: int) -> list[dict[str, torch.Tensor]]:
    """Rotated ``k``/``v`` ``(H, T, D)`` of every token and ``q`` ``(Hq, W, D)`` of the last
    ``n_queries`` tokens, per layer, float32."""
    out: list[dict[str, torch.Tensor]] = []
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]

    def hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        b, t, d = h.shape[0], h.shape[1], mod.head_dim
        c, s = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
        k = mod.k_proj(h).view(b, t, -1, d).transpose(1, 2).float()
        v = mod.v_proj(h).view(b, t, -1, d).transpose(1, 2).float()
        w = min(n_queries, t)
        q = mod.q_proj(h[:, -w:]).view(b, w, -1, d).transpose(1, 2).float()
        out.append(
            {
                "k": _rot(k, c, s)[0],
                "v": v[0],
                "q": _rot(q, c[:, :, -w:], s[:, :, -w:])[0],
            }
        )

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in mods]
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]), logits_to_keep=1)
    finally:
        for hd in handles:
            hd.remove()
    return out


def fake_quant(x: torch.Tensor, group: int, axis: str) -> torch.Tensor:
    """``x`` ``(H, T, D)`` quantized at 4 bits and read back; axis ``"token"`` quantizes the
    first ``T - T mod group`` tokens and keeps the rest (the residual)."""
    h, t, d = x.shape
    n = t if axis == "channel" else t - t % group
    y = x.clone()
    if n:
        lay = QuantLayout(BITS, group, n, d, axis, "float16")
        y[:, :n] = kq.dequantize(kq.quantize(x[:, :n].contiguous(), lay), lay)
    return y


def aside(k: torch.Tensor, n: int) -> torch.Tensor:
    """Per token, group 32, the ``n`` largest channels of each head kept in full precision."""
    if n == 0:
        return fake_quant(k, 32, "channel")
    amax = k.abs().amax(dim=1)  # (H, D)
    top = amax.topk(n, dim=-1).indices  # (H, n)
    mask = torch.zeros_like(amax, dtype=torch.bool).scatter_(1, top, True)[:, None, :]
    # the kept-aside channels take the token's median so they do not widen their group's range
    med = k.median(dim=-1, keepdim=True).values.expand_as(k)
    q = fake_quant(torch.where(mask, med, k), 32, "channel")
    return torch.where(mask, k, q)


FORMATS = {
    "token-g32": lambda k: fake_quant(k, 32, "channel"),
    "token-g8": lambda k: fake_quant(k, 8, "channel"),
    "channel-t16": lambda k: fake_quant(k, 16, "token"),
    "channel-t32": lambda k: fake_quant(k, 32, "token"),
    "token-g32-aside2": lambda k: aside(k, 2),
    "token-g32-aside4": lambda k: aside(k, 4),
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last ``W`` positions: q ``(Hq, W, D)``, k/v ``(H, T, D)``."""
    hq, w, d = q.shape
    h, t = k.shape[0], k.shape[1]
    kk = k.repeat_interleave(hq // h, dim=0)
    vv = v.repeat_interleave(hq // h, dim=0)
    s = q @ kk.transpose(1, 2) / d**0.5  # (Hq, W, T)
    pos = torch.arange(t - w, t)[:, None]
    s = s.masked_fill(torch.arange(t)[None, :] > pos, float("-inf"))
    p = s.softmax(-1)
    return p @ vv, p.argmax(-1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def measure(layers: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    out: dict[str, Any] = {"layers": []}
    for li, lay in enumerate(layers):
        k, v, q = lay["k"], lay["v"], lay["q"]
        o, top = attention(q, k, v)
        vq = fake_quant(v, VALUE_GROUP, "channel")
        amax = k.abs().amax(dim=1)  # (H, D)
        row: dict[str, Any] = {
            "layer": li,
            "max_abs_key": [round(float(a.max()), 2) for a in amax],
            "median_channel_max": [round(float(a.median()), 2) for a in amax],
        }
        for name, fn in FORMATS.items():
            kq_ = fn(k)
            o1, t1 = attention(q, kq_, v)
            o2, _ = attention(q, kq_, vq)
            per_q = ((o1 - o).norm(dim=-1) / o.norm(dim=-1)).mean()
            per_q2 = ((o2 - o).norm(dim=-1) / o.norm(dim=-1)).mean()
            row[name] = {
                "key_err": round(rel(kq_, k), 4),
                "attn_err": round(float(per_q), 4),
                "attn_err_kv": round(float(per_q2), 4),
                "top1": round(float((t1 == top).float().mean()), 4),
            }
        out["layers"].append(row)
        print(
            f"layer {li:2d} max|K| {max(row['max_abs_key']):7.1f} "
            f"median {max(row['median_channel_max']):5.1f}  "
            + "  ".join(f"{n} {row[n]['attn_err']:.3f}" for n in FORMATS),
            flush=True,
        )
    summary = {}
    for name in FORMATS:
        errs = [r[name]["attn_err"] for r in out["layers"]]
        errs_kv = [r[name]["attn_err_kv"] for r in out["layers"]]
        keys = [r[name]["key_err"] for r in out["layers"]]
        summary[name] = {
            "attn_err_mean": round(sum(errs) / len(errs), 4),
            "attn_err_max": round(max(errs), 4),
            "attn_err_kv_mean": round(sum(errs_kv) / len(errs_kv), 4),
            "attn_err_kv_max": round(max(errs_kv), 4),
            "key_err_max": round(max(keys), 4),
            "top1_min": round(min(r[name]["top1"] for r in out["layers"]), 4),
        }
    out["summary"] = summary
    return out


CACHES: dict[str, dict[str, Any]] = {
    "bf16": {},
    "int4 keys per token": {"kv_format": "int4", "key_quant": "token"},
    "int4 keys per channel": {"kv_format": "int4"},
}


def answers(model: Any, tok: Any, task: Any) -> list[dict[str, Any]]:
    """The needle question answered greedily on each cache of :data:`CACHES`."""
    ctx = torch.tensor([task.context_ids])
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    rows = []
    for name, kw in CACHES.items():
        cache = kh.compressed_cache(model, None, **kw)
        with torch.inference_mode():
            model(input_ids=ctx, **kh.cache_kwargs(model, cache), logits_to_keep=1)
        held = int(cache.kv.used_bytes())
        q = task.questions[0]
        gen, _ = qc.greedy(model, cache, q.question_ids, len(task.context_ids), 12, eos)
        text = tok.decode(gen, skip_special_tokens=True)
        ok = qc.score(text, q.required()) == 1.0
        rows.append(
            {"task": task.name, "cache": name, "kv_bytes": held, "answer": text, "correct": ok}
        )
        print(f"{task.name} {name:22s} {held / 2**20:6.2f} MiB  {ok!s:5s} {text!r}", flush=True)
    return rows


def markdown(res: dict[str, Any]) -> str:
    """The tables docs/benchmarks.md quotes (tests/test_benchmarks_doc.py checks them)."""
    lines = [
        "| key format | attention error, mean / max over layers | with int4 values | "
        "top-1 agreement, worst layer |",
        "|---|---|---|---|",
    ]
    for name, s in res["summary"].items():
        lines.append(
            f"| `{name}` | {s['attn_err_mean']:.3f} / {s['attn_err_max']:.3f} | "
            f"{s['attn_err_kv_mean']:.3f} / {s['attn_err_kv_max']:.3f} | {s['top1_min']:.3f} |"
        )
    if res.get("answers"):
        lines += ["", "| task | cache | KV MiB | correct | answer |", "|---|---|---|---|---|"]
        for r in res["answers"]:
            ans = r["answer"].replace("\n", " ").replace("|", "/").strip()
            lines.append(
                f"| {r['task']} | {r['cache']} | {r['kv_bytes'] / 2**20:.2f} | "
                f"{'yes' if r['correct'] else 'no'} | `{ans}` |"
            )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--length", type=int, default=4096, help="context length in tokens")
    ap.add_argument("--queries", type=int, default=128, help="last queries attended")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--answers", action="store_true", help="also answer the needle questions")
    ap.add_argument("--depths", default="0.5", help="--answers: needle depths, e.g. 0.1,0.5,0.9")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "int4_keys.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_qwen()
    task = qt.needle_task(tok, args.length, 0.5, random.Random(0))
    res = measure(capture(model, task.context_ids, args.queries))
    print(f"{'format':20s} attn_err mean/max  with int4 values mean/max  key_err max  top1 min")
    for name, s in res["summary"].items():
        print(
            f"{name:20s} {s['attn_err_mean']:.4f} / {s['attn_err_max']:.4f}   "
            f"{s['attn_err_kv_mean']:.4f} / {s['attn_err_kv_max']:.4f}   "
            f"{s['key_err_max']:.4f}   {s['top1_min']:.4f}"
        )
    if args.answers:
        model.set_attn_implementation(kh.ATTN_NAME)
        res["answers"] = []
        for depth in [float(d) for d in args.depths.split(",")]:
            t = qt.needle_task(tok, args.length, depth, random.Random(0))
            res["answers"].extend(answers(model, tok, t))
    res.update(
        {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "model": "Qwen2.5-Coder-0.5B-Instruct (bf16)",
            "task": task.name,
            "context_tokens": len(task.context_ids),
            "queries": args.queries,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "seconds": round(time.time() - t0, 1),
            "machine": qc.machine(),
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(markdown(res))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
