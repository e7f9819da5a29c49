"""kvcore.serving.hf with quantized pages (``kv_format="int8" | "int4" | "int2"``): what the
engine's attention reads, the bytes, compaction, preemption, forks and prefix reuse (tiny
random Llama on the CPU, float32; docs/serving.md section 0)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="kvcore.serving needs torch")
pytest.importorskip("transformers", reason="kvcore.serving needs transformers")

from test_hf_serving import (  # noqa: E402
    cbc,
    check_prefix_reuse,
    crowd,
    finished,
    gen,
    kvs,
    model_bytes_per_token,
    needs_supported,
    prompts,
    run,
)
from tiny_llama import tiny  # noqa: E402

from kvcore._kvcore import QuantLayout  # noqa: E402

pytestmark = needs_supported
BITS = {"int8": 8, "int4": 4, "int2": 2}
G = 8  # the default group of the tiny model: min(32, head_dim=8)


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny("sdpa").float()


def round_trip(x: Any, bits: int) -> Any:
    """``x`` ``(..., D)`` quantized per token in groups of ``G`` channels (float16 scale and
    zero point) and back, with the plain-torch reference :mod:`kvcore.quant`, one head's
    vector at a time: what per-token pages should hold."""
    from kvcore import quant

    d = x.shape[-1]
    layout = QuantLayout(bits, G, 1, d, "channel", "float16")
    flat = x.reshape(-1, 1, d)
    return quant.dequantize(quant.quantize(flat, layout), layout).reshape(x.shape).to(x.dtype)


def reference(model: Any, ids: list[int], n: int, bits: int | None) -> tuple[list, list]:
    """Greedy tokens and log-probabilities of a plain ``DynamicCache`` run whose cache stores
    K/V through :func:`round_trip` (``bits=None``: as they are): attention reads the same
    quantized values as the serving pages, the step's own tokens included."""
    from transformers import DynamicCache

    from kvcore.hf import cache_kwargs

    class RoundTripCache(DynamicCache):
        def update(self, k: Any, v: Any, layer_idx: int, *a: Any, **kw: Any) -> Any:
            if bits is not None:
                k, v = round_trip(k, bits), round_trip(v, bits)
            return super().update(k, v, layer_idx, *a, **kw)

    cache = RoundTripCache()
    tokens: list[int] = []
    logprobs: list[float] = []
    x = torch.tensor([ids])
    with torch.no_grad():
        for step in range(n):
            pos = torch.arange(len(ids) + step - x.shape[1], len(ids) + step)[None]
            logits = model(input_ids=x, position_ids=pos, **cache_kwargs(model, cache)).logits
            last = logits[0, -1].float()
            tokens.append(int(last.argmax()))
            logprobs.append(float(last.log_softmax(-1)[tokens[-1]]))
            x = torch.tensor([[tokens[-1]]])
    return tokens, logprobs


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2"])
def test_engine_reads_the_quantized_values(model: Any, fmt: str) -> None:
    """Three requests batched, prefilled in chunks of 48 tokens (so the first step reads no past
    and later ones do): each one's tokens and log-probabilities are those of a plain run whose
    cache holds the same per-token quantized K/V, and differ from the full-precision ones (so
    the test sees whether attention reads quantized values at all, in every step)."""
    inputs = [prompts()[5], prompts()[7], prompts()[3]]  # 64, 48, 40 tokens
    with kvs.enable(model, kv_format=fmt):
        out, stats = run(model, inputs, gen(6), cbc())
    finished(out, 6)
    assert stats["peak_requests"] >= 2 and stats["num_used_blocks"] == 0
    for i, ids in enumerate(inputs):
        o = out[f"req_{i}"]
        tokens, logprobs = reference(model, ids, 6, BITS[fmt])
        assert o.generated_tokens == tokens, (fmt, i)
        # Equal up to the order of float sums (batched vs alone): 1e-6, where full-precision
        # K/V move every request's log-probabilities by more than 2e-5 (int8) to 7e-2 (int2).
        got, want = torch.tensor(o.logprobs), torch.tensor(logprobs)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        _, plain = reference(model, ids, 6, None)
        assert (got - torch.tensor(plain)).abs().max() > 2e-5, (fmt, i)


def page_bytes_by_hand(model: Any, bits: int) -> int:
    """Bytes of one block of every layer, K and V, in per-token pages: each token and kv head
    stores ``D * bits / 8`` bytes of codes and a float16 scale and zero point per group."""
    c = model.config
    d = c.hidden_size // c.num_attention_heads
    per_vector = d * bits // 8 + 2 * 2 * (d // G)
    return 2 * c.num_hidden_layers * 16 * c.num_key_value_heads * per_vector


def test_quantized_pages_admit_more_requests_at_the_same_bytes(model: Any) -> None:
    inputs, kv_bytes, cb = crowd(model)  # float32 pages hold 2 of the 6 requests at once
    with kvs.enable(model, kv_bytes=kv_bytes):
        _, native = run(model, inputs, gen(16), cb)
    with kvs.enable(model, kv_format="int4", kv_bytes=kv_bytes):
        out, int4 = run(model, inputs, gen(16), cb)
    finished(out, 16)
    assert native["bytes_per_block"] == 16 * model_bytes_per_token(model)
    assert int4["bytes_per_block"] == page_bytes_by_hand(model, 4)  # scales and zeros counted
    for s in (native, int4):
        # the pools: the usable blocks, within the budget, plus the null block
        assert s["kv_bytes"] <= kv_bytes
        assert s["pool_bytes"] == s["kv_bytes"] + s["bytes_per_block"]
        assert s["peak_kv_bytes"] <= s["kv_bytes"]
    assert native["capacity"] == 16 and int4["capacity"] == kv_bytes // int4["bytes_per_block"]
    assert native["peak_decoding"] <= 2
    assert int4["peak_decoding"] == 6 and int4["preemptions"] == 0  # all six at once


def test_compaction_moves_quantized_tokens(model: Any, monkeypatch) -> None:
    """SnapKV at a budget of 16 over int4 pages: after each compaction, the kept tokens read
    back (dequantized, and as stored bytes) exactly what they held before it, in every layer;
    the compressed run decodes to the end and frees everything."""
    from kvcore.serving import paged

    checked: list[str] = []
    compress = paged.KVCorePagedCache._compress
    keeps: list[Any] = []

    def spy(self: Any, r: Any, state: Any) -> None:
        slots = torch.as_tensor(self.allocator.slot_mapping(r.table))
        before = [(self.read(i, "k", slots), self.read(i, "v", slots)) for i in range(2)]
        raw = self.format.stored(self.stores[1], "k", slots)
        keeps.clear()
        compress(self, r, state)
        keep = torch.as_tensor(keeps[-1], dtype=torch.long)
        after_slots = torch.as_tensor(self.allocator.slot_mapping(r.table))
        assert len(after_slots) == 16 and len(keep) == 16
        assert not torch.equal(after_slots, slots[keep])  # the plan moved tokens
        for layer, (k, v) in enumerate(before):
            assert torch.equal(self.read(layer, "k", after_slots), k[keep])
            assert torch.equal(self.read(layer, "v", after_slots), v[keep])
        assert torch.equal(self.format.stored(self.stores[1], "k", after_slots), raw[keep])
        checked.append(state.request_id)

    from kvcore.policies import get

    policy = get("snapkv", window=4)
    select = policy.select

    def recording_select(scores: Any, budget: int | None = None) -> Any:
        sel = select(scores, budget=budget)
        keeps.append(sel.positions.copy())
        return sel

    monkeypatch.setattr(policy, "select", recording_select)
    monkeypatch.setattr(paged.KVCorePagedCache, "_compress", spy)
    inputs = [prompts()[5], prompts()[7]]
    with kvs.enable(model, policy, budget=16, kv_format="int4"):
        out, stats = run(model, inputs, gen(6), cbc())
    finished(out, 6)
    assert sorted(checked) == ["req_0", "req_1"]
    assert stats["compressions"] == 2 and stats["num_used_blocks"] == 0


def test_preemption_with_quantized_pages(model: Any) -> None:
    """Re-prefilled requests quantize their tokens again to the same bytes: a pool that holds
    12 int4 blocks (4 requests want 5 each) gives the tokens of one with room for all."""
    inputs = [list(range(1 + i, 41 + i)) for i in range(4)]
    roomy, _ = run_int4(model, inputs, 64)
    out, stats = run_int4(model, inputs, 12)
    assert stats["preemptions"] > 0 and stats["num_used_blocks"] == 0
    finished(out, 40)
    for rid in roomy:
        assert out[rid].generated_tokens == roomy[rid].generated_tokens, rid


def run_int4(model: Any, inputs: list[list[int]], blocks: int) -> tuple[dict, dict]:
    kv_bytes = blocks * page_bytes_by_hand(model, 4)
    with kvs.enable(model, kv_format="int4", kv_bytes=kv_bytes):
        return run(model, inputs, gen(40), cbc())


def test_fork_and_prefix_reuse_with_quantized_pages(model: Any) -> None:
    """Parallel sampling forks share int4 blocks and copy the partial one on write (a move of
    quantized tokens): with top_k=1 every child decodes what one request alone decodes. A
    prompt adopted from the prefix cache decodes as it does without sharing."""
    ids = prompts()[5]  # 64 tokens: the fork parent holds 63, 3 full blocks and a partial one
    forked = gen(6, do_sample=True, top_k=1, num_return_sequences=3)
    with kvs.enable(model, kv_format="int4"):
        alone, _ = run(model, [ids], gen(6), cbc())
        out, stats = run(model, [ids], forked, cbc())
    assert len(out) == 3 and stats["num_used_blocks"] == 0
    for o in out.values():
        assert o.generated_tokens == alone["req_0"].generated_tokens
    check_prefix_reuse(model, kv_format="int4")


def test_format_refusals(model: Any) -> None:
    accepted = r"kv_format must be one of 'native', 'int8', 'int4', 'int2' under continuous"
    for bad in ("kivi4", "kivi2", "int3", "fp8"):
        with pytest.raises(ValueError, match=accepted + rf" batching, got '{bad}'"):
            kvs.enable(model, kv_format=bad)
    with pytest.raises(ValueError, match="KIVI pages"):
        kvs.enable(model, kv_format="kivi4")
    with pytest.raises(ValueError, match=r"quant_group=3 must divide the head size 8"):
        kvs.enable(model, kv_format="int4", quant_group=3)
    with pytest.raises(ValueError, match="quant_group applies to int pages"):
        kvs.enable(model, quant_group=4)
    with pytest.raises(ValueError, match="quant_group must be an int >= 1"):
        kvs.enable(model, kv_format="int4", quant_group=0)
    assert "init_continuous_batching" not in model.__dict__  # nothing was bound
