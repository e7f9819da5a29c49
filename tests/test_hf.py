"""kvcore.hf: the transformers v5 Cache, hooks and the kvcore attention (tiny random Llama)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="kvcore.hf needs torch")
transformers = pytest.importorskip("transformers", reason="kvcore.hf needs transformers")

from cache_view import stream_slots  # noqa: E402
from tiny_llama import tiny  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import kvcore.hf as kh  # noqa: E402
from kvcore.cache import Schedule  # noqa: E402

IMPLS = ["sdpa", "eager", "kvcore"]


def batch(n: int = 24, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (2, n), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        ids[1, :pad] = 0
        mask[1, :pad] = 0
    return ids, mask


def generate(model, cache, ids, mask, n=8):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        do_sample=False,
        **kh.cache_kwargs(model, cache),
        pad_token_id=0,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pad", [0, 5])
def test_full_budget_generation_equals_dynamic_cache(impl, pad):
    model = tiny(impl)
    ids, mask = batch(pad=pad)
    ref = generate(model, DynamicCache(config=model.config), ids, mask)
    cache = kh.compressed_cache(model, policy=None, budget=0)
    out = generate(model, cache, ids, mask)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == out.shape[1] - 1  # the last token is not cached yet


def test_manual_loop_with_chunked_prefill_equals_dynamic_cache():
    model = tiny("sdpa")
    ids, _ = batch(n=20)
    full = model(input_ids=ids).logits[:, -1]
    cache = kh.compressed_cache(model, policy=None, budget=0, capacity=64)
    last = kh.prefill(model, ids, cache, chunk=6)
    torch.testing.assert_close(last, full, atol=1e-5, rtol=1e-5)
    nxt = last.argmax(-1, keepdim=True)
    step = model(input_ids=nxt, **kh.cache_kwargs(model, cache)).logits[:, -1]
    ref = model(input_ids=torch.cat([ids, nxt], 1)).logits[:, -1]
    torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_compressed_generation_is_the_same_for_every_attention(positions):
    outs = []
    for impl in IMPLS:
        model = tiny(impl)
        ids, mask = batch()
        cache = kh.compressed_cache(
            model,
            "streaming" if positions == "compact" else "snapkv",
            budget=8,
            positions=positions,
            **({"sinks": 2} if positions == "compact" else {"window": 4}),
        )
        outs.append(generate(model, cache, ids, mask))
        assert (cache.kv.stored_lengths() <= 8 + 8).all()
        assert cache.kv.num_compressions == 2  # once per layer, at prefill
        if positions == "compact":
            assert cache.get_seq_length() == 8 + 7  # renumbered after the prefill
        else:
            assert cache.get_seq_length() == 24 + 7
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize(
    "policy,schedule,params",
    [
        ("snapkv", Schedule.prefill(), {"window": 4}),
        ("snapkv", Schedule.chunked(8), {"window": 4}),
        ("h2o", Schedule.decode(4), {}),
        ("streaming", Schedule.decode(2), {"sinks": 2}),
        ("knorm", Schedule.decode(3, on_prefill=False), {"skip_layers": ()}),
    ],
)
def test_every_schedule_stays_in_its_capacity(policy, schedule, params):
    model = tiny("kvcore")
    ids, mask = batch(pad=3)
    budget = 8
    cache = kh.compressed_cache(
        model, policy, budget=budget, schedule=schedule, capacity=32, **params
    )
    if schedule.chunk:
        kh.prefill(model, ids, cache)
        assert (cache.kv.stored_lengths() <= budget).all()
    else:
        out = generate(model, cache, ids, mask, n=12)
        assert out.shape == (2, 24 + 12)
    assert cache.kv.num_compressions > 0
    # a prefill-only schedule appends the 11 decoded tokens uncompressed
    grow = 11 if schedule.decode_every is None and not schedule.chunk else 0
    assert (cache.kv.stored_lengths() <= budget + schedule.headroom() + grow).all()
    assert cache.memory_bytes() == cache.kv.k_pool.nbytes + cache.kv.v_pool.nbytes


def test_ragged_heads_need_the_kvcore_attention():
    budgets = torch.tensor([[4, 12], [8, 6]])
    model = tiny("kvcore")
    ids, mask = batch()
    cache = kh.compressed_cache(model, "snapkv", budget=budgets, window=4)
    out = generate(model, cache, ids, mask, n=4)
    assert out.shape == (2, 28)
    assert cache.kv.stored_lengths()[0].tolist() == [[4 + 3, 12 + 3], [8 + 3, 6 + 3]]
    model = tiny("sdpa")
    cache = kh.compressed_cache(model, "snapkv", budget=budgets, window=4)
    with pytest.raises(ValueError, match="attn_implementation='kvcore'"):
        generate(model, cache, ids, mask, n=4)


def test_padded_batch_after_eviction_matches_the_unpadded_rows():
    """Left padding is evicted first and masked by the kvcore attention: the padded row
    generates what it generates alone."""
    model = tiny("kvcore")
    ids, mask = batch(pad=6)
    cache = kh.compressed_cache(model, "snapkv", budget=8, window=4)
    out = generate(model, cache, ids, mask)
    alone = kh.compressed_cache(model, "snapkv", budget=8, window=4)
    ref = generate(model, alone, ids[1:, 6:], mask[1:, 6:])
    assert torch.equal(out[1, 6:], ref[0])


def test_snapkv_without_hooks_fails_clearly():
    from kvcore.cache import KVCache
    from kvcore.scoring import get

    model = tiny("sdpa", num_hidden_layers=1)  # kvcore.hf.install was not called on it
    ids, mask = batch()
    kv = KVCache(1, 2, 8, policy=get("snapkv", 8, window=4), capacity=64)
    with pytest.raises(ValueError, match="snapkv needs the observed queries"):
        generate(model, kh.KVCoreCache(kv), ids, mask, n=2)


def _cache_keywords(model) -> list[str]:
    """The keywords this transformers release's forward takes a cache by."""
    return ["past_key_values", "cache"] if kh.cache_kwarg(model) == "cache" else ["past_key_values"]


def test_cache_kwarg_names_what_the_forward_takes():
    import inspect

    model = tiny("sdpa")
    params = inspect.signature(model.forward).parameters
    assert kh.cache_kwarg(model) in params
    assert kh.cache_kwarg(model) == ("cache" if "cache" in params else "past_key_values")
    out = model(input_ids=batch()[0], **kh.cache_kwargs(model, DynamicCache(config=model.config)))
    assert isinstance(kh.cache_of(out), DynamicCache)
    assert kh.cache_of(object()) is None


@pytest.mark.parametrize("impl", IMPLS)
def test_hooks_see_the_cache_under_every_keyword(impl):
    """SnapKV needs the observation window the attention hooks record: under each keyword the
    forward accepts, the prefill compresses to the budget, and the outputs agree."""
    model = tiny(impl)
    ids, _ = batch(n=24)
    outs = []
    for key in _cache_keywords(model):
        cache = kh.compressed_cache(model, "snapkv", 8, window=4)
        logits = model(input_ids=ids, **{key: cache}).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        step = model(input_ids=nxt, **{key: cache}).logits[:, -1]
        assert int(cache.kv.stored_lengths().max()) <= 8 + 1
        outs.append(step)
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=0, rtol=0)


def test_generate_with_the_cache_keyword_compresses():
    model = tiny("kvcore")
    ids, mask = batch(n=24, pad=3)
    done = []
    for key in _cache_keywords(model):
        cache = kh.compressed_cache(model, "snapkv", 8, window=4)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            **{key: cache},
        )
        assert cache.kv.num_compressions >= 1
        assert int(cache.kv.stored_lengths().max()) <= 8 + 4
        done.append(out)
    for other in done[1:]:
        assert torch.equal(other, done[0])


def _pre_hooks(model) -> int:
    mods = [model.model] + [m for m in model.modules() if hasattr(m, "q_proj")]
    return sum(len(m._forward_pre_hooks) for m in mods)


def test_install_twice_hooks_once_and_handles_remove_them():
    model = tiny("sdpa")
    assert _pre_hooks(model) == 0
    first = kh.install(model)
    second = kh.install(model)
    per_set = 1 + model.config.num_hidden_layers  # the model's pre-hook and one per attention
    assert _pre_hooks(model) == per_set
    first.remove()
    first.remove()  # removing a handle twice does nothing
    assert not first.active and second.active
    assert _pre_hooks(model) == per_set  # another handle still holds them
    second.remove()
    assert _pre_hooks(model) == 0
    # without hooks, SnapKV cannot see its window: the clear error, not a silent zero score
    kv_model = kh.compressed_cache(model, "snapkv", 8, window=4)
    kh.uninstall(model)
    ids, _ = batch()
    with pytest.raises(ValueError, match="snapkv needs the observed queries"):
        model(input_ids=ids, **kh.cache_kwargs(model, kv_model))
    assert kh.uninstall(model) is False


def test_install_as_a_context_manager():
    model = tiny("sdpa")
    ids, _ = batch()
    with kh.install(model) as hooks:
        assert hooks.active and _pre_hooks(model) == 1 + model.config.num_hidden_layers
        cache = kh.KVCoreCache(
            kh.compressed_cache(model, "snapkv", 8, window=4).kv  # same hooks, one more handle
        )
        model(input_ids=ids, **kh.cache_kwargs(model, cache))
        assert int(cache.kv.stored_lengths().max()) <= 8
    # compressed_cache's own handle keeps the hooks after the block
    assert _pre_hooks(model) == 1 + model.config.num_hidden_layers
    kh.uninstall(model)
    assert _pre_hooks(model) == 0
    with kh.install(model):
        pass
    assert _pre_hooks(model) == 0


def test_install_refuses_a_model_without_attention_and_hooks_nothing():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no attention module"):
        kh.install(net)
    assert len(net._forward_pre_hooks) == 0 and not hasattr(net, "_kvcore_hooks")


def test_crop_is_refused_clearly():
    model = tiny("sdpa")
    cache = kh.compressed_cache(model, None, 0)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)


def test_release_parsing_and_the_floor():
    from kvcore._hf_versions import _release

    assert _release("5.24.0") == (5, 24, 0)
    assert _release("5.14.0.dev0") == (5, 14, 0)
    assert _release("5.15.0rc1") == (5, 15, 0)
    assert _release(transformers.__version__) >= kh.MIN_TRANSFORMERS


def test_snapshot_restore_answers_two_questions_on_one_compressed_context():
    """One compressed context, two questions: each answer equals the one obtained by
    compressing the context afresh for that question alone."""
    model = tiny("kvcore")
    ids, _ = batch(n=40)
    ctx, q1, q2 = ids[:1, :30], ids[:1, 30:35], ids[1:, 30:38]

    def fresh() -> kh.KVCoreCache:
        cache = kh.compressed_cache(
            model, "snapkv", 12, window=4, schedule=Schedule.prefill(multi_turn="once")
        )
        with torch.no_grad():
            model(input_ids=ctx, **kh.cache_kwargs(model, cache))
        return cache

    def ask(cache, q):
        pos = torch.arange(30, 30 + q.shape[1]).unsqueeze(0)
        with torch.no_grad():
            return model(input_ids=q, **kh.cache_kwargs(model, cache), position_ids=pos).logits

    shared = fresh()
    snap = shared.snapshot()
    a1 = ask(shared, q1)
    shared.restore(snap)
    a2 = ask(shared, q2)
    torch.testing.assert_close(a1, ask(fresh(), q1), rtol=0, atol=0)
    torch.testing.assert_close(a2, ask(fresh(), q2), rtol=0, atol=0)


# Every policy of issue 3's registry through compressed_cache on the tiny model (2 layers,
# 2 kv heads, 24-token prompt, budget 8): the registry's own budgets, exactly.
REG_BUDGET = 8
RETRIEVAL = torch.tensor([[True, False], [False, False]])
REG_CASES = {
    "streaming": ({"sinks": 2}, None),
    "h2o": ({}, None),
    "snapkv": ({"window": 4}, None),
    "pyramidkv": ({"window": 4}, None),
    "adakv": ({"window": 4}, None),
    "tova": ({}, None),
    "knorm": ({"skip_layers": (0,)}, None),
    "infinipot": ({}, 8),
    "razor": ({"sinks": 2, "local_capacity": 8, "retrieval": RETRIEVAL}, None),
    "locret": ({"stabilizers": 2}, 8),
    "longgen": ({"layer_kinds": ("sink", "full"), "sinks": 2}, None),
    "expected_attention": ({"n_future_positions": 16, "n_sink": 2}, None),
}


def expected_lengths(name: str, n: int) -> torch.Tensor:
    """(L, H) stored tokens per stream after compressing an n-token prompt."""
    from kvcore import _kvcore

    b = REG_BUDGET
    if name == "pyramidkv":
        per_layer = _kvcore.budget_pyramid(2, n, b, 4, 20)
        return torch.tensor(per_layer)[:, None].expand(2, 2)
    if name == "knorm":
        return torch.tensor([[n, n], [b, b]])
    if name == "razor":
        return torch.where(RETRIEVAL, n, 8)
    if name == "longgen":
        return torch.tensor([[b, b], [n, n]])
    return torch.full((2, 2), b)


def test_the_registry_cases_cover_every_policy():
    from kvcore import policies

    assert sorted(REG_CASES) == sorted(policies.names())


def kept_positions(kv) -> list[list[list[int]]]:
    """Stored positions per layer and stream (row ``b * H + h``), read through the public
    page table."""
    out = []
    for layer in range(kv.num_layers):
        _, slots, lens = kv.page_table(layer, "vllm")
        pos = kv.slot_pos[torch.from_numpy(slots.astype("int64"))].tolist()
        ends = torch.tensor(lens).cumsum(0).tolist()
        out.append([pos[e - n : e] for e, n in zip(ends, lens.tolist(), strict=True)])
    return out


def static_expected(kv, n: int) -> list[list[list[int]]]:
    """What a static pattern keeps of an n-token prompt (every sequence alike), from the
    registry's selection; a row that drops tokens folds them into its first dropped slot
    (Razor's compensation token)."""
    pol, L, H = kv.policy, kv.num_layers, kv.num_kv_heads
    sel = pol.select(np.zeros((L, H, n), np.float32), REG_BUDGET, **select_inputs(pol))
    out = []
    for layer in range(L):
        rows = []
        for h in range(H):
            r = layer * H + h
            keep = sel.positions[sel.indptr[r] : sel.indptr[r + 1]].tolist()
            if sel.num_dropped is not None and sel.num_dropped[r] > 0:
                keep = sorted([*keep, min(set(range(n)) - set(keep))])
            rows.append(keep)
        out.append(rows * 2)  # two sequences
    return out


def select_inputs(pol) -> dict:
    retrieval = pol.config.get("retrieval")
    return {} if retrieval is None else {"retrieval": retrieval.reshape(-1).numpy()}


@pytest.mark.parametrize("name", sorted(REG_CASES))
def test_every_registry_policy_through_the_cache(name, monkeypatch):
    params, chunk = REG_CASES[name]
    model = tiny("kvcore")
    ids, mask = batch()
    schedule = Schedule.chunked(chunk) if chunk else Schedule.prefill()
    cache = kh.compressed_cache(model, name, REG_BUDGET, schedule=schedule, **params)
    kv = cache.kv
    pol = kv.policy
    seen: dict[int, np.ndarray] = {}  # layer -> the scores of its last compression
    scores_from = type(pol).scores_from

    def spy(self, stats):
        out = scores_from(self, stats)
        seen[stats.inputs.layer_idx] = out.copy()
        return out

    monkeypatch.setattr(type(pol), "scores_from", spy)
    kh.prefill(model, ids, cache)
    kv.flush()  # the last layer's compression runs at the next step otherwise
    monkeypatch.undo()
    kept = kept_positions(kv)
    n, L, H = ids.shape[1], kv.num_layers, kv.num_kv_heads
    assert sorted(seen) == list(range(L))
    if not pol.needs:  # a static pattern: exactly the registry's positions
        assert kept == static_expected(kv, n)
    else:
        # The statistics reach the scores (a zero-scored policy has no spread and fails),
        # and what the cache keeps is the registry's selection on those scores.
        for layer, s in seen.items():
            assert s.shape[:2] == (2, H) and (np.ptp(s, axis=-1) > 0).all(), (layer, s)
        if chunk is None:
            for layer, s in seen.items():
                for b in range(2):
                    rows = np.zeros((L, H, n), np.float32)
                    rows[layer] = s[b]
                    sel = pol.select(rows, REG_BUDGET)
                    want = [
                        sel.positions[sel.indptr[r] : sel.indptr[r + 1]].tolist()
                        for r in range(layer * H, layer * H + H)
                    ]
                    assert kept[layer][b * H : b * H + H] == want, (layer, b)
    lengths = torch.from_numpy(kv.stored_lengths())  # (B, L, H)
    want = expected_lengths(name, ids.shape[1])
    if name == "adakv":
        # Ada-KV: ragged heads, each layer's heads share exactly H * budget tokens
        assert (lengths.sum(-1) == 2 * REG_BUDGET).all()
        assert (lengths <= ids.shape[1]).all()
    else:
        assert torch.equal(lengths, want.expand_as(lengths)), lengths.tolist()
    assert kv.num_compressions > 0
    # storage really shrinks: each stream holds ceil(len / block) blocks, nothing more
    blocks = int((-(-lengths // kv.block_size)).sum())
    assert kv.allocator is not None and kv.allocator.num_used_blocks == blocks
    kv.allocator.check_invariants()
    per_block = 2 * kv.block_size * kv.head_dim * kv.k_pool.element_size()
    assert kv.used_bytes() == blocks * per_block
    assert kv.memory_bytes() == kv.k_pool.nbytes + kv.v_pool.nbytes
    # the compressed cache keeps generating
    out = generate(model, cache, ids, mask, n=3)
    assert out.shape == (2, ids.shape[1] + 3)


@pytest.mark.parametrize("name", sorted(REG_CASES))
def test_every_registry_policy_drops_padding_first(name):
    params, chunk = REG_CASES[name]
    if name in ("razor", "longgen", "knorm"):
        params = {**params}  # their full rows keep every valid token, padding excluded
    model = tiny("kvcore")
    ids, mask = batch(pad=5)
    schedule = Schedule.chunked(chunk) if chunk else Schedule.prefill()
    cache = kh.compressed_cache(model, name, REG_BUDGET, schedule=schedule, **params)
    out = generate(model, cache, ids, mask, n=2)
    assert out.shape == (2, ids.shape[1] + 2)
    kv = cache.kv
    for layer in range(2):
        slots = stream_slots(kv, layer)  # padding never survives a compression
        assert not bool((~kv.slot_valid[slots] & (slots >= 0)).any())


def test_registry_errors_through_compressed_cache():
    model = tiny("kvcore")
    with pytest.raises(ValueError, match=r"unknown policy 'nope'; valid policies: streaming"):
        kh.compressed_cache(model, "nope", 8)
    with pytest.raises(TypeError, match=r"h2o: unknown parameter\(s\) sinks"):
        kh.compressed_cache(model, "h2o", 8, sinks=2)
    with pytest.raises(ValueError, match=r"locret: stabilizers \(2500\) is larger"):
        kh.compressed_cache(model, "locret", 8)
    with pytest.raises(ValueError, match=r"razor: retrieval has shape \(3, 2\), expected \(2, 2\)"):
        kh.compressed_cache(
            model, "razor", 8, sinks=2, local_capacity=8, retrieval=torch.zeros(3, 2).bool()
        )
    with pytest.raises(ValueError, match="longgen: layer_kinds has 3 entries for 2 layers"):
        kh.compressed_cache(model, "longgen", 8, sinks=2, layer_kinds=("sink",) * 3)
    with pytest.raises(ValueError, match=r"per-head budget has shape \(1, 2\)"):
        kh.compressed_cache(model, "knorm", torch.tensor([[4, 4]]))


def test_razor_mean_logcount_needs_the_kvcore_attention():
    ids, mask = batch()
    params = {"sinks": 2, "local_capacity": 8, "compensation": "mean_logcount"}
    model = tiny("kvcore")
    cache = kh.compressed_cache(model, "razor", 8, **params)
    assert generate(model, cache, ids, mask, n=2).shape == (2, 26)
    assert float(cache.kv.slot_count.max()) == ids.shape[1] - 7  # 17 folded tokens
    model = tiny("sdpa")
    cache = kh.compressed_cache(model, "razor", 8, **params)
    with pytest.raises(ValueError, match="log\\(count\\) logit bias"):
        generate(model, cache, ids, mask, n=2)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2"])
def test_quantized_cache_generates_on_the_tiny_model(fmt):
    model = tiny("kvcore")
    ids, mask = batch(pad=3)
    ref = kh.compressed_cache(model, None, 0)
    cache = kh.compressed_cache(model, None, 0, kv_format=fmt, quant_group=8)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, **kh.cache_kwargs(model, ref)).logits[
            :, -1
        ]
        q = model(input_ids=ids, attention_mask=mask, **kh.cache_kwargs(model, cache)).logits[:, -1]
    # the prompt attends its own tokens in full precision: quantization changes only what
    # later steps read, so the prompt's logits are the full-precision cache's exactly
    assert torch.equal(q, full)
    nxt = full.argmax(-1, keepdim=True)
    mask2 = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    with torch.no_grad():
        full2 = model(input_ids=nxt, attention_mask=mask2, **kh.cache_kwargs(model, ref)).logits[
            :, -1
        ]
        q2 = model(input_ids=nxt, attention_mask=mask2, **kh.cache_kwargs(model, cache)).logits[
            :, -1
        ]
    # the decode step reads the prompt's quantized pages: its logits move by the quantization
    # error only (bounds ~5x the error measured before, on logits of magnitude ~0.3)
    err = (q2 - full2).abs().max().item()
    assert 0 < err <= {"int8": 1e-3, "int4": 2e-2, "int2": 6e-2}[fmt], err
    out = generate(
        model, kh.compressed_cache(model, "snapkv", 8, window=4, kv_format=fmt), ids, mask, n=4
    )
    assert out.shape == (2, 28)
    # every finished page costs under half a native one; the pools are sized by the pages
    # held, and each stream's last, partly filled page stays in full precision until it
    # fills (per-channel keys), so on this 24-token prompt the total is smaller, not halved
    assert cache.kv.page_bytes < ref.kv.page_bytes / 2
    assert cache.memory_bytes() < ref.memory_bytes()
    if fmt == "int8":  # 8-bit pages: the next steps follow the full-precision ones
        a = generate(model, kh.compressed_cache(model, None, 0), ids, mask, n=4)
        b = generate(model, kh.compressed_cache(model, None, 0, kv_format=fmt), ids, mask, n=4)
        assert torch.equal(a, b)


def test_ems_merged_cache_generates_with_the_kvcore_attention():
    model = tiny("kvcore")
    ids, mask = batch(pad=3)
    cache = kh.compressed_cache(model, "snapkv", 8, window=4, merge="ems", merge_threshold=-1.0)
    out = generate(model, cache, ids, mask, n=3)
    assert out.shape == (2, 27)
    kv = cache.kv
    idx = stream_slots(kv, 0)[: kv.num_kv_heads]  # batch row 0
    # row 0 (no padding): every evicted prompt token was merged into a kept slot
    assert kv.slot_count[idx[:, :8]].sum(-1).tolist() == [24.0, 24.0]
    model = tiny("sdpa")
    cache = kh.compressed_cache(model, "snapkv", 8, window=4, merge="ems")
    with pytest.raises(ValueError, match="log\\(count\\) logit bias"):
        generate(model, cache, ids, mask, n=2)


@pytest.mark.parametrize("fmt", ["kivi2", "kivi4", "k4v2", "k2v4"])
def test_kivi_cache_generates_on_the_tiny_model(fmt):
    """KIVI pages (keys per channel, values per token, the open page in full precision) with
    and without SnapKV: generation runs, takes less memory than float32 pages, the prompt's
    logits equal the full-precision cache's, and the first decode step's stay close
    (quantization error only, on logits of magnitude ~0.3; bound 0.1)."""
    model = tiny("kvcore")
    ids, mask = batch(pad=3)
    ref = kh.compressed_cache(model, None, 0, block_size=8)
    cache = kh.compressed_cache(model, None, 0, kv_format=fmt, quant_group=8, block_size=8)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, **kh.cache_kwargs(model, ref)).logits[
            :, -1
        ]
        q = model(input_ids=ids, attention_mask=mask, **kh.cache_kwargs(model, cache)).logits[:, -1]
    assert torch.equal(q, full)  # the prompt attends itself in full precision
    nxt = full.argmax(-1, keepdim=True)
    mask2 = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    with torch.no_grad():
        full2 = model(input_ids=nxt, attention_mask=mask2, **kh.cache_kwargs(model, ref)).logits[
            :, -1
        ]
        q2 = model(input_ids=nxt, attention_mask=mask2, **kh.cache_kwargs(model, cache)).logits[
            :, -1
        ]
    err = (q2 - full2).abs().max().item()  # the decode step reads the sealed pages
    assert 0 < err <= 0.1, err
    assert cache.memory_bytes() < ref.memory_bytes()
    out = generate(
        model,
        kh.compressed_cache(model, "snapkv", 8, window=4, kv_format=fmt, block_size=8),
        ids,
        mask,
        n=4,
    )
    assert out.shape == (2, 28)


def test_compressed_cache_takes_a_cache_config_or_its_keywords():
    from kvcore.cache import CacheConfig

    model = tiny("kvcore")
    ids, mask = batch(pad=3)
    kw = {"schedule": Schedule.decode(3), "kv_format": "int8", "block_size": 8}
    by_keywords = kh.compressed_cache(model, "snapkv", budget=8, window=4, **kw)
    config = CacheConfig.from_keywords(**kw)
    by_config = kh.compressed_cache(model, "snapkv", budget=8, window=4, config=config)
    assert by_config.kv.config == by_keywords.kv.config == config
    a = generate(model, by_keywords, ids, mask, n=6)
    b = generate(model, by_config, ids, mask, n=6)
    assert torch.equal(a, b) and by_config.kv.num_compressions > 0
    with pytest.raises(ValueError, match=r"give config= or the keywords .* \(got kv_format\)"):
        kh.compressed_cache(model, "snapkv", 8, config=config, kv_format="int4")
    with pytest.raises(TypeError, match="schedule must be a kvcore.cache.Schedule"):
        kh.compressed_cache(model, "snapkv", 8, schedule="x")


def test_compressed_cache_refuses_keywords_it_would_drop():
    """A misspelt cache keyword with a policy object (or no policy) is a TypeError naming it,
    not silently ignored; with a policy name it reaches the policy, which refuses it too."""
    from kvcore.scoring import get

    model = tiny("sdpa")
    with pytest.raises(TypeError, match="unknown keyword.*capcity"):
        kh.compressed_cache(model, None, 0, capcity=64)
    with pytest.raises(TypeError, match="unknown keyword.*capcity"):
        kh.compressed_cache(model, get("snapkv", 8, window=4), 8, capcity=64)
    with pytest.raises(TypeError, match="capcity"):
        kh.compressed_cache(model, "snapkv", 8, capcity=64)
