"""Peak pool memory of a compress-at-prefill cache against its bound (issue 18, item 6).

    .venv/bin/python bench/prefill_peak.py                       # SmolLM2-135M, 4096 tokens
    .venv/bin/python bench/prefill_peak.py --tokens 1024 --out /tmp/p.json

One prefill of SmolLM2-135M-Instruct (bf16, CPU) over ``--tokens`` tokens of
``pydoc_data.topics`` prose records, in every layer, the rotated keys and values the model
hands its cache and the rotated queries of every token (the same projections and RoPE as
``kvcore.hf``'s observation hook). Each method then replays that prefill into a fresh
:class:`kvcore.KVCache` built as ``kvcore.hf.compressed_cache`` builds it, layer by layer
in the model's order (``observe`` with the policy's window, then ``update``; ``append`` for
a MiKV tier, as the ``kvcore`` attention does), so every method sees the same tensors
without running the model again. ``tests/cache/test_prefill_peak.py`` checks on a tiny
Llama that the replay and the model's own forward leave the same peak and stored lengths
(and with native pages the same K/V: with quantized pages the model's later layers would read
dequantized pages where the recording read full-precision ones, which changes which tokens a
layer keeps, not how many under a per-head budget, so not the pools).

Per method it reports, all in bytes:

* ``peak``: ``peak_memory_bytes()`` after the prefill (the pool tensors, both generations
  while a resize copies);
* ``held``: what the streams hold after the prefill, from their stored lengths and the page
  sizes alone (``ceil(n / block_size)`` pages a stream, a page's bytes from the pool
  tensors' row shape and dtype; MiKV's low tier likewise; KIVI's open pages' residual rows);
* ``layer_prompt``: one layer's prompt as pages (``B * H * ceil(T / block_size)`` pages);
* ``bound``: ``held + layer_prompt`` (issue 18: "peak prefill memory is at most the budget
  plus one layer's prompt"), and ``full``: the same prompt's pages in every layer in ``dtype``.

Writes ``bench/results/prefill_peak.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import kvcore
import kvcore.hf as kh
from kvcore import KVCache
from kvcore.cache import CacheConfig
from kvcore.scoring import get

ROOT = Path(__file__).resolve().parent.parent

# (name, policy, cache keywords): 25 % of a 4096-token prompt kept (budget 1024)
METHODS: list[tuple[str, str | None, dict[str, Any]]] = [
    ("full", None, {}),
    ("snapkv", "snapkv", {}),
    ("tova", "tova", {}),
    ("knorm", "knorm", {}),
    ("pyramidkv", "pyramidkv", {}),
    ("adakv", "adakv", {}),
    ("snapkv+int4", "snapkv", {"kv_format": "int4"}),
    ("snapkv+kivi2", "snapkv", {"kv_format": "kivi2"}),
    ("snapkv+mikv-int4", "snapkv", {"evicted_format": "int4"}),
]


def capture(model: Any, ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer: ``k``, ``v`` ``(1, H, T, D)`` as the cache receives them and ``q``
    ``(1, Hq, T, D)`` the rotated queries of every token."""
    n = model.config.num_hidden_layers
    kv = KVCache(
        n,
        model.config.num_key_value_heads,
        model.config.hidden_size // model.config.num_attention_heads,
        dtype=model.dtype,
    )
    cache = kh.KVCoreCache(kv)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    plain_update = kv.update

    def update(layer: int, k: torch.Tensor, v: torch.Tensor, valid: Any = None) -> Any:
        out[layer]["k"], out[layer]["v"] = k.clone(), v.clone()
        return plain_update(layer, k, v, valid)

    class Everything:
        observe_window = None

    class Recorder:
        def __init__(self) -> None:
            self.kv = self

        dtype = model.dtype

        def observe(self, layer: int, q: torch.Tensor) -> None:
            out[layer]["q"] = q.clone()

    rec = Recorder()

    def hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kh._observe(mod, rec, Everything(), args, kwargs)  # type: ignore[arg-type]

    kv.update = update  # type: ignore[method-assign]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in kh._attn_modules(model)]
    try:
        with kh.install(model), torch.no_grad():
            model(input_ids=ids, use_cache=True, logits_to_keep=1, **kh.cache_kwargs(model, cache))
    finally:
        for h in handles:
            h.remove()
    return out


def replay(
    layers: list[dict[str, torch.Tensor]],
    policy: str | None,
    budget: int,
    keywords: dict[str, Any],
    rope: torch.Tensor | None,
) -> KVCache:
    """A cache built as ``compressed_cache`` builds it, fed the recorded prefill."""
    k0 = layers[0]["k"]
    pol = get(policy, budget) if policy is not None else None
    kv = KVCache(
        len(layers),
        k0.shape[1],
        k0.shape[3],
        dtype=k0.dtype,
        policy=pol,
        rope=rope if pol is not None and pol.needs_rope else None,
        config=CacheConfig.from_keywords(**keywords),
    )
    paged = kv.lo_format is not None  # MiKV: the kvcore attention appends, reads the pages
    for i, layer in enumerate(layers):
        if pol is not None and pol.needs_queries:
            w = pol.observe_window or layer["q"].shape[2]
            kv.observe(i, layer["q"][:, :, -w:])
        if paged:
            kv.append(i, layer["k"], layer["v"])
        else:
            kv.update(i, layer["k"], layer["v"])
    kv.flush()
    return kv


def page_bytes(pool: torch.Tensor, block_size: int) -> int:
    """Bytes of one page of a pool tensor: ``(num_blocks, block_size, D)`` values or
    ``(num_blocks, nbytes)`` quantized blocks."""
    row = pool[0]
    return (
        int(row.numel() * row.element_size())
        if pool.ndim == 2
        else int(block_size * pool.shape[2] * pool.element_size())
    )


def held_bytes(kv: KVCache) -> int:
    """What the streams hold, from their stored lengths and the page shapes alone."""
    bs = kv.block_size
    pages = int((-(-kv.stored_lengths() // bs)).sum())
    total = pages * (page_bytes(kv.k_pool, bs) + page_bytes(kv.v_pool, bs))
    if kv.config.kivi:  # one open page a stream, in full precision
        total += kv.store.res_k.numel() * kv.store.res_k.element_size() * 2
    if kv.lo_allocator is not None:
        lo_pages = int((-(-kv.evicted_lengths() // bs)).sum())
        total += lo_pages * (page_bytes(kv.lo_k_pool, bs) + page_bytes(kv.lo_v_pool, bs))
    return total


def measure(layers: list[dict[str, torch.Tensor]], budget: int, rope: Any) -> list[dict[str, Any]]:
    k0 = layers[0]["k"]
    b, h, t, d = k0.shape
    elt = k0.element_size()
    rows = []
    for name, policy, keywords in METHODS:
        kv = replay(layers, policy, budget, keywords, rope)
        bs = kv.block_size
        prompt_pages = b * h * -(-t // bs)
        # one layer's prompt as the cache stores it: pages of the page format
        layer_prompt = prompt_pages * (page_bytes(kv.k_pool, bs) + page_bytes(kv.v_pool, bs))
        held = held_bytes(kv)
        row = {
            "method": name,
            "policy": policy,
            "keywords": keywords,
            "peak": kv.peak_memory_bytes(),
            "memory_after": kv.memory_bytes(),
            "held": held,
            "layer_prompt": layer_prompt,
            "bound": held + layer_prompt,
            "full": len(layers) * b * h * -(-t // bs) * bs * d * elt * 2,
        }
        row["meets_bound"] = row["peak"] <= row["bound"]
        rows.append(row)
        mib = 2**20
        print(
            f"{name:18s} peak {row['peak'] / mib:7.2f} MiB  held {held / mib:7.2f}  "
            f"bound {row['bound'] / mib:7.2f}  full {row['full'] / mib:7.2f}  "
            f"{'meets' if row['meets_bound'] else 'MISSES'}"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=None, help="default: a quarter of --tokens")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/prefill_peak.json")
    args = ap.parse_args()
    if kvcore.build_profile != "release":
        sys.exit(f"refusing to benchmark a {kvcore.build_profile} build: run `make dev`")
    from pydoc_data.topics import topics

    from kvcore.models import load_smollm2

    model, tok = load_smollm2()
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = torch.tensor([tok(text).input_ids[: args.tokens]])
    if ids.shape[1] < args.tokens:
        sys.exit(f"the text has only {ids.shape[1]} tokens")
    budget = args.budget or args.tokens // 4
    layers = capture(model, ids)
    rope = kh._rope(model)
    rows = measure(layers, budget, rope)
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    result = {
        "benchmark": "prefill_peak",
        "model": "SmolLM2-135M-Instruct (bf16)",
        "tokens": args.tokens,
        "budget": budget,
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
