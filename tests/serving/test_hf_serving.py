"""kvcore.serving.hf: kvcore's cache under transformers' continuous batching (tiny random
Llama on the CPU, float32; docs/serving.md section 10)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="kvcore.serving needs torch")
transformers = pytest.importorskip("transformers", reason="kvcore.serving needs transformers")

from packaging.version import Version  # noqa: E402
from tiny_llama import tiny  # noqa: E402
from transformers import ContinuousBatchingConfig, GenerationConfig  # noqa: E402

_SERIES = tuple(Version(transformers.__version__).release[:2])
try:
    import kvcore.serving.hf as kvs
except ImportError as err:  # another transformers series: only the refusal test runs
    kvs = None  # type: ignore[assignment]
    _REFUSAL = str(err)
else:
    _REFUSAL = ""

needs_supported = pytest.mark.skipif(kvs is None, reason=f"unsupported here: {_REFUSAL}")


def gen(n: int = 8, **over: Any) -> GenerationConfig:
    return GenerationConfig(
        **{
            "max_new_tokens": n,
            "do_sample": False,
            "eos_token_id": -1,
            "pad_token_id": 0,
            **over,
        }
    )


def cbc(**over: Any) -> ContinuousBatchingConfig:
    base = dict(num_blocks=64, page_size=16, max_batch_tokens=48, return_logprobs=True)
    return ContinuousBatchingConfig(**{**base, **over})


def prompts(n: int = 8, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 17, 33, 40, 9, 64, 21, 48][:n]
    return [torch.randint(1, 64, (k,), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny("sdpa").float()


def run(model: Any, inputs: list[list[int]], g: GenerationConfig, cb: Any) -> tuple[dict, dict]:
    """generate_batch with a kept manager, so the cache's stats can be read afterwards."""
    out = model.generate_batch(
        inputs, generation_config=g, continuous_batching_config=cb, persistent_manager=True
    )
    mgr = model._cached_continuous_batching_manager
    stats = mgr.kvcore_cache.stats() if isinstance(mgr, kvs.KVCoreBatchingManager) else {}
    model.destroy_cached_continuous_batching_manager()
    return out, stats


def engine(model: Any, inputs: list[list[int]], g: GenerationConfig, cb: Any) -> dict:
    kvs.disable(model)
    return run(model, inputs, g, cb)[0]


def finished(out: dict, n: int) -> None:
    for rid, o in out.items():
        assert o.error is None, (rid, o.error)
        assert len(o.generated_tokens) == n, rid


def test_unsupported_transformers_fail_with_a_clear_message() -> None:
    if kvs is None:
        with pytest.raises(ImportError, match=r"supports transformers 5\.24\.x, 5\.25\.x"):
            import kvcore.serving.hf  # noqa: F401
        return
    assert _SERIES in kvs.SUPPORTED_TRANSFORMERS
    supported = r"supports transformers 5\.24\.x, 5\.25\.x"
    with pytest.raises(ImportError, match=supported + r", found 5\.14\.0"):
        kvs.check_transformers("5.14.0")
    with pytest.raises(ImportError, match=r"found 5\.26\.0"):
        kvs.check_transformers("5.26.0")
    kvs.check_transformers("5.24.3")
    kvs.check_transformers("5.25.0")


@needs_supported
def test_no_compression_equals_engine_token_for_token(model: Any) -> None:
    inputs = prompts()
    ref = engine(model, inputs, gen(), cbc())
    with kvs.enable(model):
        out, stats = run(model, inputs, gen(), cbc())
    assert set(out) == set(ref)
    for rid in ref:
        assert out[rid].generated_tokens == ref[rid].generated_tokens, rid
        assert out[rid].logprobs == ref[rid].logprobs, rid  # bit for bit
    finished(out, 8)
    assert stats["compressions"] == 0 and stats["num_used_blocks"] == 0
    assert stats["peak_requests"] >= 2  # batched, not one by one


@needs_supported
def test_enable_is_one_line_and_remove_gives_the_engine_back(model: Any) -> None:
    h = kvs.enable(model, "snapkv", budget=16, window=8)
    assert isinstance(model.init_continuous_batching(gen(), cbc()), kvs.KVCoreBatchingManager)
    model.destroy_cached_continuous_batching_manager()
    h.remove()
    assert "init_continuous_batching" not in model.__dict__
    mgr = model.init_continuous_batching(gen(), cbc())
    assert not isinstance(mgr, kvs.KVCoreBatchingManager)
    assert kvs.disable(model) is False


def crowd(model: Any) -> tuple[list[list[int]], int, ContinuousBatchingConfig]:
    """6 prompts of 96 tokens (+ 16 generated: 7 blocks each uncompressed), a K/V budget of 16
    blocks in the model's dtype (2 such requests at once) and the batching config."""
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randint(1, 64, (96,), generator=g).tolist() for _ in range(6)]
    return inputs, 16 * 16 * model_bytes_per_token(model), cbc(max_batch_tokens=128)


@needs_supported
def test_compression_frees_blocks_that_other_requests_use(model: Any) -> None:
    inputs, kv_bytes, cb = crowd(model)
    with kvs.enable(model, kv_bytes=kv_bytes):
        plain, s0 = run(model, inputs, gen(16), cb)
    with kvs.enable(model, "snapkv", budget=16, window=8, kv_bytes=kv_bytes):
        comp, s1 = run(model, inputs, gen(16), cb)
    finished(plain, 16)
    finished(comp, 16)
    assert s1["compressions"] == 6 and s1["tokens_evicted"] == 6 * (96 - 16)
    assert s1["blocks_freed"] >= 6 * 4  # 6 blocks of prompt become 1 (+ the growing tail)
    assert s0["peak_decoding"] <= 2 < s1["peak_decoding"]
    assert s1["num_used_blocks"] == 0 and s1["num_tables"] == 0
    # The tiny random model has no answer to keep; what must hold is that the compressed run
    # decodes from its own kept tokens: the first token (computed before any eviction) agrees.
    for rid in plain:
        assert comp[rid].generated_tokens[0] == plain[rid].generated_tokens[0]


def model_bytes_per_token(model: Any) -> int:
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4


@needs_supported
def test_requests_finishing_free_everything_and_keep_invariants(model: Any, monkeypatch) -> None:
    checks: list[int] = []
    orig = kvs.KVCoreBatchProcessor.update_batch

    def checked(self: Any) -> None:
        orig(self)
        self.cache.check_invariants()
        checks.append(self.cache.allocator.num_tables)

    monkeypatch.setattr(kvs.KVCoreBatchProcessor, "update_batch", checked)
    inputs = prompts()
    lengths = [3, 9, 5, 12, 7, 4, 10, 6]  # requests finish at different steps
    with kvs.enable(model, "streaming", budget=12, decode_every=4):
        mgr = model.init_continuous_batching(gen(12), cbc())
        mgr.start()
        try:
            ids = [
                mgr.add_request(p, max_new_tokens=n) for p, n in zip(inputs, lengths, strict=True)
            ]
            got = {}
            while len(got) < len(ids):
                r = mgr.get_result(timeout=30)
                assert r is not None, "timed out"
                got[r.request_id] = r
        finally:
            mgr.stop(block=True, timeout=10)
        stats = mgr.kvcore_cache.stats()
        model.destroy_cached_continuous_batching_manager()
    for rid, n in zip(ids, lengths, strict=True):
        assert got[rid].error is None and len(got[rid].generated_tokens) == n
    assert checks and max(checks) >= 2 and checks[-1] == 0
    assert stats["num_used_blocks"] == 0 and stats["compressions"] > len(ids)  # decode too


@needs_supported
def test_preemption_and_requeue(model: Any) -> None:
    inputs = [list(range(1 + i, 41 + i)) for i in range(4)]
    ref = engine(model, inputs, gen(40), cbc())
    with kvs.enable(model):
        out, stats = run(model, inputs, gen(40), cbc(num_blocks=12))  # 4 x 5 blocks wanted
    assert stats["preemptions"] > 0
    finished(out, 40)
    for rid in ref:
        assert out[rid].generated_tokens == ref[rid].generated_tokens, rid
    assert stats["num_used_blocks"] == 0
    with kvs.enable(model, "knorm", budget=16):
        out, stats = run(model, inputs, gen(40), cbc(num_blocks=6))
    finished(out, 40)
    assert stats["compressions"] >= 4 and stats["num_used_blocks"] == 0


@needs_supported
def test_fork_parallel_sampling(model: Any, monkeypatch) -> None:
    g = gen(6, do_sample=True, top_k=1, num_return_sequences=3)
    inputs = [prompts()[5]]  # 64 tokens
    ref = engine(model, inputs, g, cbc())
    shared: list[int] = []
    orig = kvs.KVCorePagedCache.prepare_fork_request

    def spy(self: Any, *a: Any) -> list[str]:
        ids = orig(self, *a)
        shared.append(self.allocator.num_shared_blocks)
        return ids

    monkeypatch.setattr(kvs.KVCorePagedCache, "prepare_fork_request", spy)
    with kvs.enable(model):
        out, stats = run(model, inputs, g, cbc())
    assert sorted(out) == sorted(ref) and len(out) == 3
    for rid in ref:
        assert out[rid].generated_tokens == ref[rid].generated_tokens, rid
    assert shared == [4]  # 63 tokens: 3 full blocks + 1 partial, shared by parent and 2 children
    with kvs.enable(model, "snapkv", budget=20, window=8):
        out, stats = run(model, inputs, g, cbc())
    assert shared[-1] == 2  # the parent was compressed to 20 tokens before its children forked
    assert stats["compressions"] == 1 and stats["tokens_evicted"] == 63 - 20
    assert len({tuple(o.generated_tokens) for o in out.values()}) == 1  # top_k=1: same tokens
    finished(out, 6)
    assert stats["num_used_blocks"] == 0


def _one_by_one(model: Any, inputs: list[list[int]], n: int, cb: Any) -> tuple[list, dict]:
    mgr = model.init_continuous_batching(gen(n), cb)
    mgr.start()
    outs = []
    try:
        for p in inputs:
            rid = mgr.add_request(p, max_new_tokens=n)
            r = mgr.get_result(request_id=rid, timeout=30)
            assert r is not None and r.error is None
            outs.append(r)
    finally:
        mgr.stop(block=True, timeout=10)
    stats = mgr.kvcore_cache.stats() if isinstance(mgr, kvs.KVCoreBatchingManager) else {}
    model.destroy_cached_continuous_batching_manager()
    return outs, stats


def check_prefix_reuse(model: Any, **enable_kwargs: Any) -> None:
    """Two prompts sharing 40 tokens, one after the other: the second adopts the first's 2
    full blocks and decodes what it decodes without sharing."""
    common = prompts()[5][:40]  # 2 full blocks + 8 tokens
    inputs = [common + [5, 6, 7], common + [9, 10, 11, 12]]
    with kvs.enable(model, **enable_kwargs):
        shared, s1 = _one_by_one(model, inputs, 6, cbc())
        alone, s0 = _one_by_one(model, inputs, 6, cbc(allow_block_sharing=False))
    assert s1["prefix_hit_tokens"] == 32 and s0["prefix_hit_tokens"] == 0
    for a, b in zip(shared, alone, strict=True):
        assert a.generated_tokens == b.generated_tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


@needs_supported
def test_prefix_reuse(model: Any, monkeypatch) -> None:
    check_prefix_reuse(model)
    common = prompts()[5][:40]

    seen: list[tuple[int, int]] = []
    orig = kvs.KVCorePagedCache._compress

    def spy(self: Any, r: Any, state: Any) -> None:
        orig(self, r, state)
        seen.append((r.adopted, self.allocator.num_tokens(r.table)))

    monkeypatch.setattr(kvs.KVCorePagedCache, "_compress", spy)
    # The first prompt fits the budget, so its raw blocks stay in the prefix cache (a compaction
    # rewrites blocks, which drops their hashes). The second adopts them and is compressed:
    # the adopted 32 tokens are kept on top of the budget.
    longer = [common + [5, 6, 7], common + prompts(seed=2)[5][:70]]
    with kvs.enable(model, "snapkv", budget=48, window=4):
        outs, s = _one_by_one(model, longer, 6, cbc())
    assert seen == [(0, 43), (32, 32 + 48)]
    assert s["prefix_hit_tokens"] == 32 and s["tokens_evicted"] == len(longer[1]) - 80
    assert s["num_used_blocks"] == 0


@needs_supported
def test_positions_continue_after_eviction(model: Any) -> None:
    seen: list[list[int]] = []
    lock = threading.Lock()

    def pre(mod: Any, args: Any, kwargs: dict) -> None:
        with lock:
            seen.append(kwargs["position_ids"][0].tolist())

    h = model.model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        inputs = [prompts()[5]]
        with kvs.enable(model):
            run(model, inputs, gen(5), cbc())
        plain, seen[:] = list(seen), []
        with kvs.enable(model, "snapkv", budget=8, window=4):
            _, stats = run(model, inputs, gen(5), cbc())
    finally:
        h.remove()
    assert stats["tokens_evicted"] == 64 - 8
    assert seen == plain  # logical positions, although only 8 + t tokens are stored
    assert [p[0] for p in seen[-4:]] == [64, 65, 66, 67]


@needs_supported
def test_refusals_name_the_option(model: Any) -> None:
    with pytest.raises(ValueError, match="kv_format must be one of 'native', 'int8'"):
        kvs.enable(model, kv_format="kivi4")
    with pytest.raises(ValueError, match="budget"):
        kvs.enable(model, "snapkv")
    with pytest.raises(ValueError, match="window"):
        kvs.enable(model, "snapkv", budget=8, window=16)
    with pytest.raises(ValueError, match="budget= given without a policy"):
        kvs.enable(model, budget=8)
    with pytest.raises(ValueError, match="'h2o' cannot run under continuous batching"):
        kvs.enable(model, "h2o", budget=8)
    with pytest.raises(TypeError, match="policy parameters"):
        kvs.enable(model, window=8)
    with pytest.raises(ValueError, match="block_size"):
        kvs.enable(model, block_size=0)
    # sizes follow kvcore's id/count rule: a non-int is a TypeError, below 1 a ValueError
    for kwargs, exc, match in (
        ({"block_size": "16"}, TypeError, "block_size must be an int, got str"),
        ({"kv_bytes": True}, TypeError, "kv_bytes must be an int, got bool"),
        ({"kv_bytes": 0}, ValueError, "kv_bytes must be an int >= 1, got 0"),
        ({"decode_every": 0}, ValueError, "decode_every must be an int >= 1, got 0"),
        ({"decode_every": 2.0}, TypeError, "decode_every must be an int, got float"),
        ({"policy": "snapkv", "budget": 8.5}, TypeError, "budget must be an int, got float"),
        ({"policy": "snapkv", "budget": -8}, ValueError, "budget must be non-negative"),
    ):
        with pytest.raises(exc, match=match):
            kvs.enable(model, **kwargs)
    assert "init_continuous_batching" not in model.__dict__  # nothing was bound
    with kvs.enable(model):
        with pytest.raises(ValueError, match="cpu_offload_space"):
            model.init_continuous_batching(gen(), cbc(cpu_offload_space=1.0))
        with pytest.raises(ValueError, match="use_async_batching"):
            model.init_continuous_batching(gen(), cbc(use_async_batching=True))
        with pytest.raises(ValueError, match="needs a KV memory budget"):
            model.init_continuous_batching(gen(), cbc(num_blocks=None))
    sliding = tiny("sdpa")
    sliding.config.sliding_window = 8
    with pytest.raises(ValueError, match="full-attention models only"):
        kvs.enable(sliding)


def _window_probs(model: Any, ids: list[int], w: int) -> tuple[Any, Any]:
    """A plain full-prompt forward into a DynamicCache: its cache, and the softmax
    probabilities ``(layers, q_heads, w, n)`` of the last ``w`` rotated queries over every
    key, causally masked (what SnapKV's observation window sees)."""
    from transformers import DynamicCache

    from kvcore.hf import _rotate_half, cache_kwargs

    queries: dict[int, Any] = {}

    def pre(mod: Any, args: Any, kwargs: dict) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        q = mod.q_proj(hidden).view(1, hidden.shape[1], -1, mod.head_dim).transpose(1, 2)
        queries[mod.layer_idx] = q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)

    mods = [m for m in model.modules() if hasattr(m, "q_proj")]
    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in mods]
    cache = DynamicCache()
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), **cache_kwargs(model, cache))
    finally:
        for h in hooks:
            h.remove()
    n = len(ids)
    out = []
    for layer, mod in enumerate(mods):
        keys = cache.layers[layer].keys[0]
        keys = keys.repeat_interleave(queries[layer].shape[1] // keys.shape[0], 0)
        logits = queries[layer][0, :, n - w :] @ keys.transpose(1, 2) * mod.scaling
        future = torch.arange(n)[None, :] > torch.arange(n - w, n)[:, None]
        out.append(logits.masked_fill(future, float("-inf")).softmax(-1))
    return cache, torch.stack(out)


@needs_supported
def test_compressed_requests_equal_a_pruned_dynamic_cache(model: Any, monkeypatch) -> None:
    """The serving path's keep set is SnapKV's scores averaged over layers and heads, from the
    prompt's last ``window`` queries (chunked prefill, two requests in flight); decoding over
    the compacted blocks gives the tokens and log-probabilities of a plain DynamicCache that
    keeps the same tokens at their original positions."""
    from kvcore.hf import cache_kwargs
    from kvcore.policies import get
    from kvcore.serving import paged

    inputs = [prompts()[5], prompts()[7]]  # 64 and 48 tokens, prefilled in chunks of 48
    policy, budget, w = get("snapkv", window=4), 16, 4
    seen: dict[str, tuple[Any, Any]] = {}
    current: list[str] = []
    select = policy.select

    def recording_select(scores: Any, budget: int | None = None) -> Any:
        sel = select(scores, budget=budget)
        seen[current[-1]] = (scores.reshape(-1).copy(), sel.positions.copy())
        return sel

    compress = paged.KVCorePagedCache._compress

    def recording_compress(self: Any, r: Any, state: Any) -> None:
        current.append(state.request_id)
        compress(self, r, state)

    monkeypatch.setattr(policy, "select", recording_select)
    monkeypatch.setattr(paged.KVCorePagedCache, "_compress", recording_compress)
    with kvs.enable(model, policy, budget=budget):
        out, stats = run(model, inputs, gen(6), cbc())
    finished(out, 6)
    assert stats["compressions"] == 2 and sorted(seen) == ["req_0", "req_1"]

    for i, ids in enumerate(inputs):
        scores, keep = seen[f"req_{i}"]
        cache, probs = _window_probs(model, ids, w)
        per_head = policy.score(probs.numpy(), model.config.num_key_value_heads)
        expected = torch.as_tensor(per_head).mean((0, 1))  # one keep set: layers and heads
        torch.testing.assert_close(torch.as_tensor(scores), expected, rtol=1e-4, atol=1e-6)
        assert len(keep) == budget and set(range(len(ids) - w, len(ids))) <= set(keep.tolist())

        index = torch.as_tensor(keep, dtype=torch.long)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, index], layer.values[:, :, index]
        o = out[f"req_{i}"]
        first = o.generated_tokens[0]
        logprobs, tokens = [], [first]
        with torch.no_grad():
            for step in range(5):
                pos = torch.tensor([[len(ids) + step]])
                x = torch.tensor([[tokens[-1]]])
                logits = model(input_ids=x, **cache_kwargs(model, cache), position_ids=pos)
                logits = logits.logits[0, -1]
                tokens.append(int(logits.argmax()))
                logprobs.append(float(logits.log_softmax(-1)[tokens[-1]]))
        assert o.generated_tokens == tokens
        torch.testing.assert_close(torch.tensor(o.logprobs[1:]), torch.tensor(logprobs))
