"""The cache on the real embedded model (marked ``model``; the load is cached on disk)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="needs torch")
pytest.importorskip("transformers", reason="needs transformers")

from transformers import DynamicCache  # noqa: E402

import kvcore.hf as kh  # noqa: E402

pytestmark = pytest.mark.model


def prompt(tok, n_words: int = 120):
    import pydoc_data.topics as topics

    text = " ".join(topics.topics["if"].split()[:n_words])
    text += " The access code of the archive room is 4817. " + " ".join(
        topics.topics["while"].split()[:n_words]
    )
    msgs = [{"role": "user", "content": text + "\nWhat is the access code of the archive room?"}]
    s = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return tok(s, return_tensors="pt", add_special_tokens=False)["input_ids"]


def greedy(model, ids, cache, n=6):
    return model.generate(
        input_ids=ids, max_new_tokens=n, do_sample=False, **kh.cache_kwargs(model, cache)
    )


def test_full_budget_equals_dynamic_cache_on_the_real_model(smollm2):
    model, tok = smollm2
    ids = prompt(tok)
    ref = greedy(model, ids, DynamicCache(config=model.config))
    out = greedy(model, ids, kh.compressed_cache(model, policy=None, budget=0))
    assert torch.equal(out, ref)


def test_snapkv_on_the_real_model_holds_less_and_answers_the_same(smollm2):
    model, tok = smollm2
    ids = prompt(tok)
    n = ids.shape[1]
    full = kh.compressed_cache(model, policy=None, budget=0, capacity=n + 8)
    ref = greedy(model, ids, full)
    comp = kh.compressed_cache(model, "snapkv", budget=128, capacity=n + 8)
    out = greedy(model, ids, comp)
    assert n > 200
    assert (comp.kv.stored_lengths() <= 128 + 5).all()
    assert comp.kv.used_bytes() < full.kv.used_bytes() / 1.5
    assert torch.equal(out[:, n : n + 4], ref[:, n : n + 4])


def test_the_demo_runs_and_prints_both_answers(smollm2, capsys):
    from kvcore.__main__ import main

    assert main(["demo", "--tokens", "200", "--budget", "64", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("answer:") == 2 and out.count("speed:") == 2
    assert "less K/V memory" in out
    # the compressed run's pools shrank after the prefill; the full cache's did not
    assert out.count("pool:") == 2 and out.count("after shrink (prefill peak") == 1


@pytest.mark.parametrize(
    "name,params",
    [
        ("pyramidkv", {}),
        ("adakv", {}),
        ("razor", {"local_capacity": 64, "compensation": "mean_logcount"}),
        ("longgen", {"sinks": 16}),
    ],
)
def test_registry_policies_on_int4_pages_on_the_real_model(smollm2, name, params):
    """bf16 model, registry policies with their defaults, int4 pages: exact budgets after
    the prefill compression (+ the 2 decoded tokens), and generation runs."""
    model, tok = smollm2
    ids = prompt(tok)
    n = ids.shape[1]
    comp = kh.compressed_cache(model, name, 64, kv_format="int4", **params)
    out = greedy(model, ids, comp, n=3)
    assert out.shape == (1, n + 3)
    lengths = comp.kv.stored_lengths()[0]  # (L, H)
    num_layers, heads = lengths.shape
    if name == "pyramidkv":  # per-layer budgets summing to L * budget
        assert (lengths.sum(0) == (64 + 2) * num_layers).all()
        assert lengths[0, 0] > lengths[-1, 0]
    elif name == "adakv":  # ragged heads, each layer holding H * budget
        assert (lengths.sum(-1) == (64 + 2) * heads).all()
    elif name == "razor":  # no retrieval head given: every head keeps local_capacity
        assert (lengths == 64 + 2).all()
        assert float(comp.kv.slot_count.max()) == n - 63
    else:  # longgen: the middle third of the layers is full, the others sinks + window
        lo, hi = num_layers // 3, num_layers - num_layers // 3
        full = torch.zeros(num_layers, dtype=torch.bool)
        full[lo:hi] = True
        want = torch.where(full, n + 2, 64 + 2)[:, None].expand(num_layers, heads)
        assert torch.equal(torch.from_numpy(lengths), want)
    # int4 pages keep keys per channel: the pools plus each stream's open page in bf16
    kv = comp.kv
    pools = kv.k_pool.nbytes + kv.v_pool.nbytes
    assert kv.memory_bytes() == pools + kv.store.res_k.nbytes + kv.store.res_v.nbytes


def test_the_demo_takes_a_registry_policy_and_a_page_format(smollm2, capsys):
    from kvcore.__main__ import main

    argv = ["demo", "--tokens", "200", "--budget", "64", "--max-new-tokens", "2"]
    assert main([*argv, "--policy", "pyramidkv", "--kv-format", "int4", "--merge", "ems"]) == 0
    out = capsys.readouterr().out
    assert "compressed (pyramidkv, 64 tokens per layer and kv-head, int4 pages, ems merge)" in out
    assert main([*argv, "--policy", "locret"]) == 2  # stabilizers (2500) > budget
    assert "locret: stabilizers (2500) is larger than the budget (64)" in capsys.readouterr().err


def _first_decode_logprobs(model, ids, cache):
    with torch.inference_mode():
        out = model(input_ids=ids, **kh.cache_kwargs(model, cache))
        nxt = out.logits[:, -1:].argmax(-1)
        step = model(input_ids=nxt, **kh.cache_kwargs(model, cache))
    return step.logits[0, -1].float().log_softmax(-1)


def test_mikv_tier_brings_the_compressed_cache_closer_to_the_full_one(smollm2):
    """SnapKV at a tight budget, with the evicted tokens dropped or kept in an int8 / int2
    tier (MiKV): the first decode step's next-token distribution is closer to the full
    cache's with the tier (KL), and the tier's tokens are really stored."""
    model, tok = smollm2
    ids = prompt(tok)
    n = ids.shape[1]
    assert model.config._attn_implementation == kh.ATTN_NAME  # the fixture's; the tier needs it
    ref = _first_decode_logprobs(model, ids, DynamicCache(config=model.config))

    def kl(**kw):
        cache = kh.compressed_cache(model, "snapkv", budget=32, **kw)
        lp = _first_decode_logprobs(model, ids, cache)
        return float((ref.exp() * (ref - lp)).sum()), cache

    kl_drop, _ = kl()
    kl_int8, c8 = kl(evicted_format="int8")
    kl_int2, c2 = kl(evicted_format="int2")
    assert (c8.kv.stored_lengths() == 32 + 1).all()
    assert (c8.kv.evicted_lengths() == n - 32).all()
    assert c2.kv.used_bytes() < c8.kv.used_bytes()
    assert kl_int8 < 0.25 * kl_drop, (kl_int8, kl_drop)  # measured 0.0004 vs 0.195
    assert kl_int2 < 0.5 * kl_drop, (kl_int2, kl_drop)  # with the key balancer (0.055 vs 0.195)
