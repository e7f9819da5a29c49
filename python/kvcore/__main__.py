"""``python -m kvcore demo``: a long document with a hidden fact, full cache vs compressed.

(``python -m kvcore serve``: transformers' OpenAI-compatible server over kvcore's cache,
:mod:`kvcore.serving.serve`.)

The document is real reference prose shipped with every CPython (``pydoc_data.topics``); one
sentence with a made-up fact is hidden in its middle. SmolLM2-135M-Instruct (the embedded
model) reads it and answers a question about the fact twice: with a full kvcore cache, and
with a compressed one (``--policy``, default SnapKV, any name of the ``kvcore.policies``
registry; ``--kv-format int4`` quantized pages; ``--merge ems``) that keeps ``--budget`` tokens
per (layer, kv-head) after the prefill, then gives the emptied pool memory back
(``KVCache.shrink``). For each run it prints the answer, the K/V memory held, the pool before
and after the shrink, and the speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

FACT = "The access code of the archive room in the Lisbon office is 4817."
QUESTION = "What is the access code of the archive room in the Lisbon office?"
ANSWER = "4817"


class Progress:
    """A one-line text progress bar on stderr."""

    def __init__(self, label: str, width: int = 30) -> None:
        self.label, self.width, self.t0 = label, width, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        filled = self.width * done // max(total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        secs = time.perf_counter() - self.t0
        end = "\n" if done >= total else ""
        print(f"\r  {self.label:<22} [{bar}] {done}/{total} {secs:5.1f}s", end=end, file=sys.stderr)
        sys.stderr.flush()


def document(tok: Any, num_tokens: int) -> str:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = tok(text[: num_tokens * 8])["input_ids"][:num_tokens]
    body = tok.decode(ids)
    paragraphs = body.split("\n\n")
    mid = len(paragraphs) // 2
    return "\n\n".join(paragraphs[:mid] + [FACT] + paragraphs[mid:])


def run(
    model: Any, tok: Any, prompt_ids: Any, cache: Any, label: str, max_new: int
) -> dict[str, Any]:
    import torch

    from kvcore.hf import cache_kwargs, prefill

    # One forward over the whole prompt (compression happens once, after it); the bar
    # advances per decoder layer.
    layers = list(model.model.layers)
    n = prompt_ids.shape[1]
    chunk = cache.kv.schedule.chunk or n
    total = len(layers) * -(-n // chunk)
    bar_p = Progress(f"{label}: prefill")
    done = [0]

    def tick(*_: Any) -> None:
        done[0] += 1
        bar_p(done[0], total)

    hooks = [layer.register_forward_hook(tick) for layer in layers]
    t0 = time.perf_counter()
    try:
        logits = prefill(model, prompt_ids, cache)  # chunks: the cache schedule's, if any
    finally:
        for h in hooks:
            h.remove()
    t_prefill = time.perf_counter() - t0
    held_after_prefill = cache.kv.used_bytes()
    pool_prefill = cache.kv.memory_bytes()
    if cache.kv.policy is not None:
        # The compression emptied blocks; give their memory back, keeping room for the answer.
        lens = cache.kv.stored_lengths()
        need = max(int(lens.max()), cache.kv.policy.max_budget())
        cache.kv.shrink(need + max_new)
    out = []
    bar = Progress(f"{label}: decode")
    t1 = time.perf_counter()
    with torch.no_grad():
        for i in range(max_new):
            nxt = logits.argmax(-1, keepdim=True)
            if int(nxt) == tok.eos_token_id:
                bar(max_new, max_new)
                break
            out.append(int(nxt))
            logits = model(input_ids=nxt, **cache_kwargs(model, cache), logits_to_keep=1).logits[
                :, -1
            ]
            bar(i + 1, max_new)
    t_decode = time.perf_counter() - t1
    return {
        "answer": tok.decode(out, skip_special_tokens=True).strip(),
        "prefill_tok_s": prompt_ids.shape[1] / t_prefill,
        "decode_tok_s": max(len(out), 1) / t_decode,
        "held": held_after_prefill,
        "pool_prefill": pool_prefill,
        "pool": cache.kv.memory_bytes(),
        "stored": int(cache.kv.stored_lengths().max()),
    }


def demo(args: argparse.Namespace) -> int:
    import torch

    from kvcore import policies
    from kvcore.cache import Schedule
    from kvcore.hf import compressed_cache
    from kvcore.models import load_smollm2

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print("loading SmolLM2-135M-Instruct (embedded GGUF, bf16 copy cached) ...", file=sys.stderr)
    model, tok = load_smollm2(attn_implementation="kvcore")
    print(f"  loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    doc = document(tok, args.tokens)
    messages = [{"role": "user", "content": f"{doc}\n\nAnswer briefly. {QUESTION}"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    n = ids.shape[1]
    print(f"document: pydoc_data.topics, {n} prompt tokens, fact hidden mid-text: {FACT!r}")
    print(f"question: {QUESTION}  (expected: {ANSWER})\n")

    full = compressed_cache(model, policy=None, budget=0, capacity=n + args.max_new_tokens)
    res_full = run(model, tok, ids, full, "full cache", args.max_new_tokens)
    if args.chunk:
        # Chunked prefill under the budget: the pool holds budget + chunk tokens per stream.
        schedule, capacity = Schedule.chunked(args.chunk), args.budget + args.chunk
    else:
        schedule, capacity = Schedule.prefill(), n + args.max_new_tokens
    params: dict[str, Any] = {}
    cls = policies.REGISTRY.get(args.policy)
    if cls is not None and "window" in cls.params:  # the observation window (SnapKV family)
        params["window"] = args.window
    try:
        comp = compressed_cache(
            model,
            args.policy,
            budget=args.budget,
            schedule=schedule,
            capacity=capacity,
            kv_format=args.kv_format,
            merge=None if args.merge == "none" else args.merge,
            **params,
        )
    except (TypeError, ValueError) as e:  # the registry's message for a bad policy setup
        print(f"error: {e}", file=sys.stderr)
        return 2
    label = f"{args.policy} {args.budget}"
    res_comp = run(model, tok, ids, comp, label, args.max_new_tokens)

    def line(name: str, r: dict[str, Any]) -> None:
        ok = "correct" if ANSWER in r["answer"] else "wrong"
        print(f"{name}")
        print(f"  answer:  {r['answer']!r} ({ok})")
        print(
            f"  memory:  {r['held'] / 2**20:.2f} MiB of K/V held after prefill "
            f"(longest stream at the end: {r['stored']} tokens)"
        )
        shrunk = (
            ""
            if r["pool"] == r["pool_prefill"]
            else (f" after shrink (prefill peak {r['pool_prefill'] / 2**20:.2f} MiB)")
        )
        print(f"  pool:    {r['pool'] / 2**20:.2f} MiB{shrunk}")
        print(
            f"  speed:   prefill {r['prefill_tok_s']:.0f} tok/s, "
            f"decode {r['decode_tok_s']:.1f} tok/s"
        )

    line("full cache", res_full)
    extra = "" if args.kv_format == "native" else f", {args.kv_format} pages"
    extra += "" if args.merge == "none" else f", {args.merge} merge"
    line(f"compressed ({args.policy}, {args.budget} tokens per layer and kv-head{extra})", res_comp)
    ratio = res_full["held"] / max(res_comp["held"], 1)
    print(f"\nthe compressed cache holds {ratio:.1f}x less K/V memory")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # its options go on to transformers serve: parsed there
        try:
            from kvcore.serving.serve import main as serve
        except ImportError as e:  # a transformers series it does not support, named
            print(f"python -m kvcore serve: {e}", file=sys.stderr)
            return 2
        return serve(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m kvcore")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="full vs compressed cache on a long document")
    sub.add_parser(
        "serve",
        help="transformers serve over kvcore's cache (python -m kvcore serve --help)",
        add_help=False,
    )
    d.add_argument("--tokens", type=int, default=1000, help="document length in tokens")
    d.add_argument("--budget", type=int, default=256, help="tokens kept per layer and kv-head")
    from kvcore.policies import names

    d.add_argument(
        "--policy", default="snapkv", choices=names(), help="compressed run: registry policy"
    )
    d.add_argument(
        "--window", type=int, default=32, help="observation window (snapkv, pyramidkv, adakv)"
    )
    d.add_argument(
        "--kv-format",
        default="native",
        choices=["native", "int8", "int4", "int2"],
        help="compressed run: K/V page format",
    )
    d.add_argument(
        "--merge", default="none", choices=["none", "ems"], help="compressed run: merge evictions"
    )
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.add_argument(
        "--chunk",
        type=int,
        default=0,
        help="compressed run: chunked prefill of this many tokens under the budget (0: one pass)",
    )
    d.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
