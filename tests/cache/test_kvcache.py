"""kvcore.KVCache, the torch paged attention and the torch scoring (tiny random shapes)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch cache needs torch (pip install .[torch])")

from cache_view import block_table, stored_kv, stream_slots  # noqa: E402

import kvcore  # noqa: E402
from kvcore.cache import KVCache, Schedule, rotate_keys  # noqa: E402
from kvcore.scoring import get, select, select_keep  # noqa: E402

L, H, D, BS = 2, 2, 8, 4


def kv(b: int, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, H, n, D, generator=g).to(dtype)


def dense_reference(q, k, v, mask=None):
    """Plain causal attention with GQA; q (B, Hq, n, D), k/v (B, H, n, D)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
    logits = q.float() @ k.transpose(2, 3) / math.sqrt(q.shape[-1])
    n = k.shape[2]
    causal = torch.ones(q.shape[2], n, dtype=torch.bool).tril(n - q.shape[2])
    if mask is not None:
        causal = causal & mask
    logits = logits.masked_fill(~causal, float("-inf"))
    return (torch.softmax(logits, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_update_and_paged_attention_match_dense(dtype, block_size):
    c = KVCache(L, H, D, capacity=64, block_size=block_size, dtype=dtype)
    k, v = kv(2, 11, 1, dtype), kv(2, 11, 2, dtype)
    keys, values = c.update(0, k, v)
    assert torch.equal(keys, k) and torch.equal(values, v)
    q = kv(2, 11, 3, dtype).repeat_interleave(2, 1)  # 4 query heads, GQA 2
    out = c.attend(0, q)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bf16 output rounding
    torch.testing.assert_close(out.float(), dense_reference(q, k, v), atol=tol, rtol=tol)
    # decode step: the prefix is read from the pages
    k1, v1 = kv(2, 1, 4, dtype), kv(2, 1, 5, dtype)
    keys, _ = c.update(0, k1, v1)
    assert torch.equal(keys, torch.cat([k, k1], 2))
    q1 = kv(2, 1, 6, dtype).repeat_interleave(2, 1)
    ref = dense_reference(q1, torch.cat([k, k1], 2), torch.cat([v, v1], 2))
    torch.testing.assert_close(c.attend(0, q1).float(), ref, atol=tol, rtol=tol)


def test_select_keep_forced_then_score_then_lower_position():
    scores = torch.tensor([[[1.0, 5.0, 5.0, 0.0, 5.0, 2.0]]])
    valid = torch.tensor([[[True, True, True, True, False, True]]])
    force = torch.tensor([[[False, False, False, True, False, False]]])
    keep = select_keep(scores, valid, force, torch.tensor([[2]]))
    # forced 3, then the tie at 5.0 goes to the lower position 1 (4 is invalid)
    assert keep.tolist() == [[[False, True, False, True, False, False]]]


def snap_cache(budget, **kw):
    return KVCache(L, H, D, block_size=BS, policy=get("snapkv", budget, window=2, kernel=3), **kw)


def prefill(c, k, v, seed=9):
    for layer in range(L):
        c.observe(layer, kv(k.shape[0], 2, seed + layer).repeat_interleave(2, 1))
        c.update(layer, k, v)


def test_prefill_compression_keeps_budget_and_frees_blocks():
    c = snap_cache(6, capacity=32)
    prefill(c, kv(1, 20), kv(1, 20, 1))
    assert (c.stored_lengths() == 6).all()
    assert c.get_seq_length() == 20  # logical length stays apart from the stored one
    assert c.get_stored_length() == 6
    assert c.allocator is not None
    assert c.allocator.num_used_blocks == L * H * 2  # ceil(6 / 4) blocks per stream
    c.allocator.check_invariants()


def test_memory_bytes_is_the_budget_within_one_block_per_stream():
    budget, streams = 10, L * H
    c = snap_cache(budget, capacity=budget)
    prefill(c, kv(1, budget), kv(1, budget, 1))
    per_token = 2 * D * 4  # K and V, float32
    pools = c.k_pool.numel() * 4 + c.v_pool.numel() * 4  # measured from the tensors
    assert c.memory_bytes() == pools
    extra = pools - streams * budget * per_token
    assert 0 <= extra <= streams * BS * per_token + BS * per_token  # + the null block
    c.update(0, kv(1, 1), kv(1, 1))
    c.update(1, kv(1, 1), kv(1, 1))
    assert c.used_bytes() <= c.memory_bytes()


def test_budget_in_bytes():
    c = KVCache(L, H, D, capacity_bytes=20_000, block_size=BS)
    c.update(0, kv(1, 3), kv(1, 3))
    assert c.memory_bytes() <= 20_000
    assert c.capacity == (20_000 // (2 * BS * D * 4) - 1) // (L * H) * BS


def test_chunked_prefill_never_exceeds_budget_plus_chunk():
    budget, chunk = 8, 4
    c = snap_cache(budget, capacity=budget + chunk, schedule=Schedule.chunked(chunk))
    for i in range(6):
        prefill(c, kv(1, chunk, 10 + i), kv(1, chunk, 20 + i))
        assert c.lengths.max() <= budget + chunk
    assert (c.stored_lengths() == budget).all()
    assert c.get_seq_length() == 6 * chunk


def test_decode_every_n_steps():
    policy = get("streaming", 6, sinks=2)
    c = KVCache(L, H, D, block_size=BS, policy=policy, schedule=Schedule.decode(3), capacity=9)
    c.update(0, kv(1, 6), kv(1, 6))
    seen = []
    for step in range(7):
        c.update(0, kv(1, 1, step), kv(1, 1, step))
        seen.append(int(c.stored_lengths(0).max()))
    assert seen == [7, 8, 6, 7, 8, 6, 7]
    # StreamingLLM keeps the sinks and the newest tokens, at their original positions
    idx = stream_slots(c, 0)
    assert c.slot_pos[idx[0]].tolist() == [0, 1, 8, 9, 10, 11, 12]


@pytest.mark.parametrize("multi_turn", ["rescore", "once"])
def test_multi_turn(multi_turn):
    c = snap_cache(6, capacity=40, schedule=Schedule.prefill(multi_turn))
    prefill(c, kv(1, 12), kv(1, 12))
    prefill(c, kv(1, 8, 3), kv(1, 8, 4), seed=30)  # the second turn
    expected = 6 if multi_turn == "rescore" else 14
    assert (c.stored_lengths() == expected).all()
    assert c.get_seq_length() == 20


def test_h2o_accumulates_and_moves_scores_with_the_slots():
    c = KVCache(1, H, D, block_size=BS, policy=get("h2o", 4), schedule=Schedule.decode(1))
    c.observe(0, kv(1, 5, 1).repeat_interleave(2, 1))
    c.update(0, kv(1, 5), kv(1, 5))
    for step in range(3):
        c.observe(0, kv(1, 1, 40 + step).repeat_interleave(2, 1))
        c.update(0, kv(1, 1, 50 + step), kv(1, 1, 50 + step))
    c.flush()
    assert (c.stored_lengths() == 4).all()
    idx = stream_slots(c, 0)
    scores = c.slot_score[idx]
    assert (scores > 0).all()  # every kept slot carries its accumulated attention


def test_ragged_per_head_budgets_shrink_storage():
    budgets = torch.tensor([[2, 8], [4, 6]])
    c = KVCache(L, H, D, block_size=BS, capacity=16, policy=get("knorm", budgets, skip_layers=()))
    k, v = kv(1, 12), kv(1, 12, 1)
    for layer in range(L):
        c.update(layer, k, v)
    assert c.stored_lengths()[0].tolist() == [[2, 8], [4, 6]]
    assert c.allocator is not None
    assert c.allocator.num_used_blocks == 1 + 2 + 1 + 2  # ceil(b / 4) per stream
    assert c.is_ragged(0)
    # attention of a new token over the ragged pages equals per-head dense attention
    k1, v1 = kv(1, 1, 7), kv(1, 1, 8)
    c.update(0, k1, v1)
    q = kv(1, 1, 9).repeat_interleave(2, 1)
    out = c.attend(0, q)
    norms = k.norm(dim=-1)
    for h, b in enumerate([2, 8]):
        kept = torch.sort(torch.topk(-norms[0, h], b).indices).values
        kh = torch.cat([k[:, h : h + 1, kept], k1[:, h : h + 1]], 2)
        vh = torch.cat([v[:, h : h + 1, kept], v1[:, h : h + 1]], 2)
        ref = dense_reference(q[:, 2 * h : 2 * h + 2], kh, vh)
        torch.testing.assert_close(out[:, :, 2 * h : 2 * h + 2], ref, atol=1e-5, rtol=1e-5)


def test_padding_tokens_are_masked_then_evicted():
    c = KVCache(1, H, D, block_size=BS, capacity=16, policy=get("knorm", 4, skip_layers=()))
    k, v = kv(2, 6), kv(2, 6, 1)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    c.update(0, k, v, valid=valid)
    q = kv(2, 6, 2).repeat_interleave(2, 1)
    out = c.attend(0, q)
    ref = dense_reference(q[1:, :, 3:], k[1:, :, 3:], v[1:, :, 3:])
    torch.testing.assert_close(out[1:, 3:], ref, atol=1e-5, rtol=1e-5)
    c.flush()
    assert c.stored_lengths(0).tolist() == [[4, 4], [3, 3]]  # padding never kept


def test_rotate_keys_equals_encoding_at_the_new_position():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))

    def rope(x, pos):
        f = pos[:, None].double() * inv_freq.double()[None]
        emb = torch.cat([f, f], -1)
        rot = torch.cat([-x[:, D // 2 :], x[:, : D // 2]], -1)
        return (x.double() * emb.cos() + rot.double() * emb.sin()).float()

    raw = torch.randn(5, D)
    old, new = torch.tensor([7, 30, 31, 100, 2]), torch.tensor([0, 1, 2, 3, 2])
    torch.testing.assert_close(rotate_keys(rope(raw, old), new - old, inv_freq), rope(raw, new))


def test_compact_positions_rerotate_and_renumber():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    c = KVCache(
        1,
        H,
        D,
        block_size=BS,
        capacity=16,
        policy=get("streaming", 4, sinks=1),
        positions="compact",
        rope=inv_freq,
    )
    k = kv(1, 8)
    c.update(0, k, k)
    c.flush()
    assert c.get_seq_length() == 4  # the next token is encoded at position 4
    idx = stream_slots(c, 0)
    assert c.slot_pos[idx[0]].tolist() == [0, 1, 2, 3]
    kept = torch.tensor([0, 5, 6, 7])
    want = rotate_keys(k[0, 0, kept], torch.arange(4) - kept, inv_freq)
    torch.testing.assert_close(c.k_pool.view(-1, D)[idx[0]], want)


def test_errors_leave_the_cache_unchanged():
    c = KVCache(L, H, D, capacity=8, block_size=BS)
    c.update(0, kv(1, 5), kv(1, 5))
    before = (c.stored_lengths().copy(), c.get_seq_length(0), c.k_pool.clone())
    with pytest.raises(IndexError, match=r"layer_idx must be an int in \[0, 2\)"):
        c.update(2, kv(1, 1), kv(1, 1))
    with pytest.raises(TypeError, match="key_states must have dtype torch.float32"):
        c.update(0, kv(1, 1).double(), kv(1, 1))
    with pytest.raises(ValueError, match=r"key_states must have shape \(batch, 2, seq_len, 8\)"):
        c.update(0, torch.zeros(1, 3, 1, D), kv(1, 1))
    with pytest.raises(ValueError, match="key_states must be on cpu"):
        c.update(0, torch.zeros(1, H, 1, D, device="meta"), kv(1, 1))
    with pytest.raises(ValueError, match="batch size 2 differs"):
        c.update(0, kv(2, 1), kv(2, 1))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        c.update(0, np.zeros((1, H, 1, D)), kv(1, 1))  # type: ignore[arg-type]
    with pytest.raises(kvcore.OutOfBlocksError):
        c.update(0, kv(1, 4), kv(1, 4))  # 5 + 4 > capacity 8
    after = (c.stored_lengths(), c.get_seq_length(0), c.k_pool)
    assert (before[0] == after[0]).all() and before[1] == after[1]
    assert torch.equal(before[2], after[2])
    c.update(0, kv(1, 3), kv(1, 3))  # still usable
    assert c.stored_lengths(0).tolist() == [[8, 8]]


def test_budget_errors():
    with pytest.raises(ValueError, match=r"snapkv: window \(8\) is larger than the budget \(4\)"):
        get("snapkv", 4, window=8)
    with pytest.raises(TypeError, match=r"snapkv: unknown parameter\(s\) foo"):
        get("snapkv", 4, foo=1)
    with pytest.raises(TypeError, match="retrieval= is not an input"):
        get("snapkv", 4, retrieval=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"budget \(40\) is above the capacity \(16 tokens\)"):
        KVCache(L, H, D, capacity=16, policy=get("knorm", 40))
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        get("nope", 4)
    with pytest.raises(ValueError, match="positions='compact' needs rope="):
        KVCache(L, H, D, positions="compact")
    c = KVCache(L, H, D, capacity=16, policy=get("snapkv", 4, window=2))
    with pytest.raises(ValueError, match="snapkv needs the observed queries"):
        c.update(0, kv(1, 8), kv(1, 8))  # refused before anything is stored
    assert c.stored_lengths().shape == (0, L, H)


def test_import_without_torch_is_lazy():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; import kvcore; "
        "assert kvcore.BlockAllocator(4, 2).capacity == 3"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_page_tables_are_exported_from_the_same_pools():
    c = KVCache(
        1,
        H,
        D,
        block_size=BS,
        capacity=16,
        policy=get("knorm", torch.tensor([[3, 6]]), skip_layers=()),
    )
    k = kv(1, 9)
    c.update(0, k, k)
    indptr, indices, last = c.page_table(0, "flashinfer")
    assert indptr.tolist() == [0, 1, 3] and last.tolist() == [3, 2]
    block_table, _, seq_lens = c.page_table(0, "vllm")
    assert seq_lens.tolist() == [3, 6]
    # head 1's pages hold its kept keys in position order
    pages = c.k_pool[torch.from_numpy(indices[1:3].astype("int64"))].reshape(-1, D)[:6]
    kept = torch.sort(torch.topk(-k[0, 1].norm(dim=-1), 6).indices).values
    assert torch.equal(pages, k[0, 1, kept])
    with pytest.raises(ValueError, match="layout must be 'flashinfer' or 'vllm'"):
        c.page_table(0, "paged")


def test_select_matches_the_reference_selection():
    """``select`` is the Rust top-k once the extension has it (issue 3), else the reference;
    either way it keeps what the reference keeps on tie-free scores."""
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(2, 3, 40, generator=g)
    valid = torch.rand(2, 3, 40, generator=g) > 0.2
    force = torch.zeros_like(valid)
    force[..., -4:] = True
    budgets = torch.tensor([[5, 10, 40], [0, 8, 12]])
    want = select_keep(scores, valid, force, budgets)
    assert torch.equal(select(scores, valid, force, budgets), want)
    assert (want.sum(-1) == torch.minimum(budgets, valid.sum(-1))).all()


def test_restore_drops_the_tokens_after_the_snapshot_and_frees_their_blocks():
    c = snap_cache(6, capacity=40, schedule=Schedule.prefill(multi_turn="once"))
    prefill(c, kv(1, 20), kv(1, 20, 1))
    assert c.allocator is not None
    snap = c.snapshot()  # runs the pending prefill compression first
    before_k = [stored_kv(c, layer)[0].clone() for layer in range(L)]
    used = c.allocator.num_used_blocks
    for step in range(3):  # a "question": a multi-token step then two decode steps
        n = 9 if step == 0 else 1
        for layer in range(L):
            c.update(layer, kv(1, n, 40 + step), kv(1, n, 50 + step))
    assert c.allocator.num_used_blocks > used
    assert c.get_seq_length() == 31
    c.restore(snap)
    assert c.allocator.num_used_blocks == used
    assert c.get_seq_length() == 20 and (c.stored_lengths() == 6).all()
    for layer in range(L):
        torch.testing.assert_close(stored_kv(c, layer)[0], before_k[layer], rtol=0, atol=0)
    c.allocator.check_invariants()
    # The restored cache keeps working: the next step lands where the dropped one did.
    for layer in range(L):
        c.update(layer, kv(1, 2, 60), kv(1, 2, 61))
    assert c.get_seq_length() == 22


def test_restore_refuses_after_a_compression():
    c = snap_cache(6, capacity=40)  # multi_turn="rescore": the next long step compresses
    prefill(c, kv(1, 20), kv(1, 20, 1))
    snap = c.snapshot()
    prefill(c, kv(1, 9, 3), kv(1, 9, 4))
    c.flush()
    lengths = c.stored_lengths()
    with pytest.raises(ValueError, match="compressed since the snapshot"):
        c.restore(snap)
    assert (c.stored_lengths() == lengths).all()
    with pytest.raises(TypeError, match="CacheSnapshot"):
        c.restore("not a snapshot")


def test_razor_compensation_slot_is_the_mean_of_the_dropped_tokens():
    """RazorAttention with compensation: sinks, one slot holding the mean of every dropped
    K and V (counting them), then the window; a second compression folds the earlier slot
    in by its count."""
    pol = get("razor", 6, sinks=1, local_capacity=4, compensation="mean_logcount")
    c = KVCache(1, H, D, block_size=BS, capacity=16, policy=pol, schedule=Schedule.decode(2))
    k, v = kv(1, 10, 1), kv(1, 10, 2)
    c.update(0, k, v)
    c.flush()
    assert (c.stored_lengths() == 4).all()
    idx = stream_slots(c, 0)
    assert c.slot_pos[idx[0]].tolist() == [0, 1, 8, 9]  # sink, compensation (first dropped), window
    assert c.slot_count[idx[0]].tolist() == [1.0, 7.0, 1.0, 1.0]
    for h in range(H):
        torch.testing.assert_close(c.k_pool.view(-1, D)[idx[h, 1]], k[0, h, 1:8].mean(0))
        torch.testing.assert_close(c.v_pool.view(-1, D)[idx[h, 1]], v[0, h, 1:8].mean(0))
    # attention applies the log-count bias: the slot weighs like its 7 tokens
    k1, v1 = kv(1, 1, 3), kv(1, 1, 4)
    c.update(0, k1, v1)
    q = kv(1, 1, 5).repeat_interleave(2, 1)
    out = c.attend(0, q)
    for h in range(H):
        kk = torch.cat([c.k_pool.view(-1, D)[idx[h]], k1[0, h]])
        vv = torch.cat([c.v_pool.view(-1, D)[idx[h]], v1[0, h]])
        bias = torch.tensor([0.0, math.log(7.0), 0.0, 0.0, 0.0])
        for j in (2 * h, 2 * h + 1):
            w = torch.softmax(q[0, j, 0] @ kk.T / math.sqrt(D) + bias, -1)
            torch.testing.assert_close(out[0, 0, j], w @ vv, atol=1e-5, rtol=1e-5)
    c.update(0, kv(1, 1, 6), kv(1, 1, 7))  # the second decode step compresses again
    c.flush()
    idx = stream_slots(c, 0)
    assert c.slot_count[idx[0]].tolist() == [1.0, 9.0, 1.0, 1.0]  # 7 + the two dropped
    ref = (k[0, 0, 1:8].sum(0) + k[0, 0, 8] + k[0, 0, 9]) / 9
    torch.testing.assert_close(c.k_pool.view(-1, D)[idx[0, 1]], ref, atol=1e-5, rtol=1e-5)


def test_registry_policies_equal_the_torch_references_on_tie_free_scores():
    """snapkv / h2o / knorm / streaming through the registry keep what the torch reference
    policies keep (same statistics, the registry's selection)."""
    from kvcore.scoring import H2OPolicy, KNormPolicy, SnapKVPolicy, StreamingPolicy

    cases = [
        (get("snapkv", 6, window=2, kernel=3), SnapKVPolicy(6, window=2, kernel=3)),
        (get("knorm", 6, skip_layers=()), KNormPolicy(6)),
        (get("streaming", 6, sinks=2), StreamingPolicy(6, sinks=2)),
        (get("h2o", 6), H2OPolicy(6)),
    ]
    for new, ref in cases:
        kept = []
        for pol in (new, ref):
            c = KVCache(L, H, D, block_size=BS, capacity=32, policy=pol)
            prefill(c, kv(1, 14), kv(1, 14, 1))
            c.flush()
            kept.append([stored_kv(c, layer)[0] for layer in range(L)])
        for a, b in zip(*kept, strict=True):
            assert torch.equal(a, b), new.name


@pytest.mark.parametrize("fmt,bits", [("int8", 8), ("int4", 4), ("int2", 2)])
def test_quantized_pages_round_trip_and_shrink_memory(fmt, bits):
    from kvcore.quant import dequantize, quantize

    layout = kvcore.QuantLayout(bits, D, 1, D, "channel", "float16")
    # the per-token page layout (int pages default to per-channel keys: test_int_keys.py)
    c = KVCache(L, H, D, capacity=16, block_size=BS, kv_format=fmt, key_quant="token")
    native = KVCache(L, H, D, capacity=16, block_size=BS)
    k, v = kv(2, 11, 1), kv(2, 11, 2)
    keys, values = c.update(0, k, v)
    native.update(0, k, v)
    # what is stored is issue 4's torch reference, bit for bit
    want_k = dequantize(quantize(k.reshape(-1, 1, D), layout), layout).reshape(k.shape)
    assert torch.equal(keys, want_k)
    page = kvcore.QuantLayout(bits, D, BS, D, "channel", "float16")
    assert c.k_pool.dtype == torch.uint8 and tuple(c.k_pool.shape) == (
        c.k_pool.shape[0],
        page.nbytes,
    )
    # error bound: half a quantization step per token (+ float16 metadata rounding)
    step = (k.amax(-1, keepdim=True) - k.amin(-1, keepdim=True)) / (2**bits - 1)
    assert ((keys - k).abs() <= step / 2 + 1e-3 * k.abs().amax()).all()
    assert ((values - v).abs() <= (v.amax(-1, True) - v.amin(-1, True)) / (2**bits - 1)).all()
    # the real bytes: slots of layout.nbytes instead of D float32 values
    assert c.memory_bytes() == c.k_pool.nbytes + c.v_pool.nbytes
    assert c.memory_bytes() * (BS * D * 4) == native.memory_bytes() * page.nbytes
    assert c.used_bytes() == c.allocator.num_used_blocks * 2 * page.nbytes
    # attention reads (dequantizes) the pages, the step's own token included: equal to
    # dense attention on the stored values, not on the step's unquantized K/V
    k1, v1 = kv(2, 1, 4), kv(2, 1, 5)
    keys, values = c.update(0, k1, v1)
    q = kv(2, 1, 6).repeat_interleave(2, 1)
    torch.testing.assert_close(
        c.attend(0, q), dense_reference(q, keys, values), atol=1e-5, rtol=1e-5
    )
    assert not torch.equal(keys[:, :, 11:], k1)


@pytest.mark.parametrize("bits,group", [(8, 8), (4, 4), (2, 4)])
def test_quantized_pages_are_one_layout_block_of_the_tokens(bits, group):
    """A page holds one QuantLayout(bits, G, block_size, D, "channel") block: a full page's
    bytes equal kvcore.quant.quantize of its tokens (and Rust's), a partial page's tokens
    have the same codes and metadata, and compaction moves a token's pieces."""
    from kvcore.quant import quantize

    fmt = {8: "int8", 4: "int4", 2: "int2"}[bits]
    page = kvcore.QuantLayout(bits, group, BS, D, "channel", "float16")
    tok = kvcore.QuantLayout(bits, group, 1, D, "channel", "float16")
    pol = get("streaming", 6, sinks=2)
    kw = dict(kv_format=fmt, quant_group=group, key_quant="token")  # the per-token layout
    c = KVCache(1, H, D, capacity=16, block_size=BS, policy=pol, **kw)
    k, v = kv(1, 10, 1), kv(1, 10, 2)
    c.update(0, k, v)  # 2 full pages and 2 tokens per stream, before the compression
    bt = c.allocator.vllm_layout(c.tables[:, 0].reshape(-1))[0].astype(np.int64)
    for h in range(H):
        for j in range(2):
            want = quantize(k[0, h, j * BS : (j + 1) * BS], page)
            assert torch.equal(c.k_pool[bt[h, j]], want)
            rust = kvcore.quantize(k[0, h, j * BS : (j + 1) * BS].numpy(), page)
            assert torch.equal(c.k_pool[bt[h, j]], torch.from_numpy(rust))
        # the partial page: each token's codes, scales and zeros are its one-token block's
        for o in range(2):
            one = quantize(v[0, h, 8 + o : 9 + o], tok)
            assert torch.equal(
                c.format.stored(c.store, "v", torch.tensor([bt[h, 2] * BS + o]))[0], one
            )
    c.flush()  # StreamingLLM keeps 0, 1, 6..9: four tokens move to other slots
    assert (c.stored_lengths() == 6).all()
    kept = torch.tensor([0, 1, 6, 7, 8, 9])
    keys, values = stored_kv(c, 0)
    for h in range(H):
        want_k = quantize(k[0, h, kept].reshape(6, 1, D), tok)
        idx = stream_slots(c, 0)
        assert torch.equal(c.format.stored(c.store, "k", idx[h]), want_k)
        bt = c.allocator.vllm_layout(c.tables[:, 0].reshape(-1))[0].astype(np.int64)
        # the first page is whole again: one block of tokens 0, 1, 6, 7
        assert torch.equal(c.k_pool[bt[h, 0]], quantize(k[0, h, kept[:4]], page))
    full = KVCache(1, H, D, capacity=16, block_size=BS, **kw)
    want_keys, want_values = full.update(0, k[:, :, kept], v[:, :, kept])
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)


def test_quantized_cache_compresses_and_folds_like_the_native_one():
    pol = get("razor", 6, sinks=1, local_capacity=4)
    c = KVCache(1, H, D, block_size=BS, capacity=16, policy=pol, kv_format="int8")
    k, v = kv(1, 10, 1), kv(1, 10, 2)
    c.update(0, k, v)
    c.flush()
    assert (c.stored_lengths() == 4).all() and c.allocator.num_used_blocks == H
    stored_k, _ = stored_kv(c, 0)
    # the compensation slot is the (re-quantized) mean of the dropped tokens
    torch.testing.assert_close(stored_k[0, :, 1], k[0, :, 1:8].mean(1), atol=0.05, rtol=0)


def test_quantized_format_errors_leave_the_cache_unchanged():
    with pytest.raises(ValueError, match="kv_format must be one of"):
        KVCache(L, H, D, kv_format="int3")
    with pytest.raises(ValueError, match="group"):
        KVCache(L, H, D, kv_format="int4", quant_group=3)
    with pytest.raises(ValueError, match="quant_group needs a quantized kv_format"):
        KVCache(L, H, D, quant_group=4)
    c = KVCache(L, H, D, capacity=16, block_size=BS, kv_format="int4")
    with pytest.raises(ValueError, match="non-finite"):
        c.update(0, torch.full((1, H, 2, D), float("nan")), kv(1, 2))
    assert not c.initialized
    c.update(0, kv(1, 3), kv(1, 3))
    before = c.k_pool.clone()
    bad = kv(1, 2)
    bad[0, 0, 1, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        c.update(0, bad, kv(1, 2))
    assert torch.equal(c.k_pool, before) and c.stored_lengths(0).tolist() == [[3, 3]]


@pytest.mark.parametrize("threshold", [-1.0, 0.2])
def test_ems_merge_matches_the_plan_and_the_merge_book(threshold):
    """merge="ems": the evicted tokens merge into the kept ones exactly as issue 4's
    ems_plan + MergePlan.apply say, slot counts follow MergeBook across two compressions,
    and attention adds log(count) to each slot's logit."""
    from kvcore.merge import attention_with_bias

    pol = get("knorm", 4, skip_layers=())
    c = KVCache(
        1,
        H,
        D,
        block_size=BS,
        capacity=16,
        policy=pol,
        schedule=Schedule.decode(3),
        merge="ems",
        merge_threshold=threshold,
    )
    k, v = kv(1, 12, 1), kv(1, 12, 2)
    c.update(0, k, v)
    books, ref_k, ref_v = [], [], []
    for h in range(H):
        keep = np.sort(torch.topk(-k[0, h].norm(dim=-1), 4).indices.numpy())
        plan = kvcore.ems_plan(k[0, h].numpy(), np.zeros(12, np.float32), keep, threshold)
        book = kvcore.MergeBook(12)
        assert np.array_equal(book.apply(plan), keep)
        books.append(book)
        ref_k.append(plan.apply(k[0, h].numpy())[keep])
        ref_v.append(plan.apply(v[0, h].numpy())[keep])
    c.flush()
    assert (c.stored_lengths() == 4).all() and c.allocator.num_used_blocks == H
    stored_k, stored_v = stored_kv(c, 0)
    idx = stream_slots(c, 0)
    for h in range(H):
        torch.testing.assert_close(stored_k[0, h], torch.from_numpy(ref_k[h]))
        torch.testing.assert_close(stored_v[0, h], torch.from_numpy(ref_v[h]))
        torch.testing.assert_close(c.slot_count[idx[h]].double(), torch.from_numpy(books[h].mass))
    if threshold == -1.0:  # every evicted token merged: the counts add up to all 12 tokens
        assert c.slot_count[idx].sum().item() == H * 12
    # a decode step attends with the log-count bias
    k1, v1 = kv(1, 1, 3), kv(1, 1, 4)
    c.update(0, k1, v1)
    q = kv(1, 1, 5).repeat_interleave(2, 1)
    out = c.attend(0, q)
    for h in range(H):
        kk, vv = torch.cat([stored_k[0, h], k1[0, h]]), torch.cat([stored_v[0, h], v1[0, h]])
        bias = torch.cat([c.slot_count[idx[h]].log(), torch.zeros(1)])
        ref = attention_with_bias(q[0, 2 * h : 2 * h + 2, 0], kk, vv, bias)
        torch.testing.assert_close(out[0, 0, 2 * h : 2 * h + 2], ref, atol=1e-5, rtol=1e-5)
    # two more steps: the second compression merges again, counts carried by compaction
    for step in range(2):
        c.update(0, kv(1, 1, 6 + step), kv(1, 1, 8 + step))
    stored = stored_kv(c, 0)[0]  # 7 tokens per head, before the pending compression
    c.flush()
    idx = stream_slots(c, 0)
    for h in range(H):
        keep = np.sort(torch.topk(-stored[0, h].norm(dim=-1), 4).indices.numpy())
        plan = kvcore.ems_plan(stored[0, h].numpy(), np.zeros(7, np.float32), keep, threshold)
        books[h].extend(3)
        books[h].apply(plan)
        torch.testing.assert_close(c.slot_count[idx[h]].double(), torch.from_numpy(books[h].mass))


def test_merge_option_errors():
    with pytest.raises(ValueError, match="merge must be None or one of .ems."):
        KVCache(L, H, D, merge="mean")
    with pytest.raises(ValueError, match=r"merge_threshold must be a float in \[-1, 1\]"):
        KVCache(L, H, D, merge="ems", merge_threshold=2.0)


def test_razor_compensation_and_ems_never_count_a_token_twice():
    retrieval = torch.tensor([[True, False]])
    pol = get("razor", 6, sinks=1, local_capacity=4, retrieval=retrieval)
    c = KVCache(1, H, D, block_size=BS, capacity=16, policy=pol, merge="ems", merge_threshold=-1.0)
    c.update(0, kv(1, 10), kv(1, 10, 1))
    c.flush()
    assert c.stored_lengths(0).tolist() == [[10, 4]]
    idx = stream_slots(c, 0)
    assert c.slot_count[idx[1, :4]].tolist() == [1.0, 7.0, 1.0, 1.0]  # folded once, not merged
    assert c.slot_count[idx[0]].sum().item() == 10.0


def test_cache_filled_under_inference_mode_works_outside_it():
    c = snap_cache(6, capacity=40)
    with torch.inference_mode():
        prefill(c, kv(1, 20), kv(1, 20, 1))
    c.flush()  # the prefill compression updates the pools in place, outside inference mode
    assert (c.stored_lengths() == 6).all()
    for layer in range(L):
        c.update(layer, kv(1, 1, 7), kv(1, 1, 8))
    assert c.get_seq_length() == 21


def test_quantized_merging_cache_filled_under_inference_mode_works_outside_it():
    pol = get("knorm", 6, skip_layers=())
    c = KVCache(L, H, D, block_size=BS, capacity=40, policy=pol, kv_format="int4", merge="ems")
    with torch.inference_mode():
        prefill(c, kv(1, 20), kv(1, 20, 1))
    c.flush()  # compaction, EMS merge and slot counts update the pools outside inference mode
    assert (c.stored_lengths() == 6).all()
    assert not c.slot_count.is_inference() and not c.k_pool.is_inference()
    for layer in range(L):
        c.update(layer, kv(1, 1, 7), kv(1, 1, 8))
    assert c.get_seq_length() == 21


# ---------------------------------------------------------------------------------------------
# KIVI storage (kv_format="kivi2" / "kivi4")

KBS, KD = 8, 32


def kivi_kv(b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, H, n, KD, generator=g)


def kivi_expected_bytes(c: KVCache, lens: np.ndarray) -> int:
    """kivi_nbytes' accounting with R = G = block_size, values paged like the keys: per
    stream n // bs key and value page blocks plus n % bs full-precision K and V tokens."""
    bits = c.format.k_layout.bits
    total = 0
    for n in lens.reshape(-1).tolist():
        kivi = kvcore.kivi_nbytes(n, KD, bits, KBS, KBS, "float16")  # fp16 windows: 2 bytes
        v_tok = kvcore.QuantLayout(bits, KBS, 1, KD, "channel").nbytes
        keys_only = kivi - max(n - KBS, 0) * v_tok - min(n, KBS) * KD * 2
        elt = c.k_pool.new_empty(0, dtype=c.dtype).element_size()
        total += keys_only - (n % KBS) * KD * 2 + (n % KBS) * KD * elt  # dtype residual keys
        total += (n // KBS) * c.format.v_layout.nbytes + (n % KBS) * KD * elt
    return total


@pytest.mark.parametrize("fmt,bits", [("kivi2", 2), ("kivi4", 4)])
def test_kivi_pages_are_sealed_per_channel_and_the_tail_stays_full_precision(fmt, bits):
    from kvcore.quant import dequantize, quantize

    c = KVCache(1, H, KD, capacity=64, block_size=KBS, kv_format=fmt, quant_group=16)
    k, v = kivi_kv(2, 13, 1), kivi_kv(2, 13, 2)
    keys, values = c.update(0, k, v)
    k_lay = kvcore.QuantLayout(bits, KBS, KBS, KD, "token", "float16")
    v_lay = kvcore.QuantLayout(bits, 16, KBS, KD, "channel", "float16")
    assert (c.format.k_layout.axis, c.format.v_layout.axis) == ("token", "channel")
    assert c.format.k_layout.nbytes == kvcore.KiviCache(KD, bits, KBS, KBS).key_layout.nbytes
    bt = block_table(c, 0)
    for s in range(2 * H):
        b, h = divmod(s, H)
        # the full page: bit-identical to kvcore.quant.quantize (and Rust) of its tokens
        assert torch.equal(c.k_pool[bt[s, 0]], quantize(k[b, h, :KBS], k_lay))
        assert torch.equal(c.v_pool[bt[s, 0]], quantize(v[b, h, :KBS], v_lay))
        rust = kvcore.quantize(k[b, h, :KBS].numpy(), k_lay)
        assert torch.equal(c.k_pool[bt[s, 0]], torch.from_numpy(rust))
    want = dequantize(quantize(k[:, :, :KBS], k_lay), k_lay)
    assert torch.equal(keys[:, :, :KBS], want)
    assert torch.equal(keys[:, :, KBS:], k[:, :, KBS:])  # the open page: exact
    assert torch.equal(values[:, :, KBS:], v[:, :, KBS:])
    assert c.used_bytes() == kivi_expected_bytes(c, c.lengths)
    res = c.store.res_k.nbytes + c.store.res_v.nbytes
    assert c.memory_bytes() == c.k_pool.nbytes + c.v_pool.nbytes + res
    assert res == 2 * H * 2 * KBS * KD * 4  # one page per stream, K and V, float32
    # three decode steps fill the second page: it is sealed from the exact tokens
    for step in range(3):
        c.update(0, kivi_kv(2, 1, 10 + step), kivi_kv(2, 1, 20 + step))
    assert c.used_bytes() == kivi_expected_bytes(c, c.lengths) == 2 * H * 2 * c.page_bytes
    full_k = torch.cat([k[:, :, KBS:]] + [kivi_kv(2, 1, 10 + i) for i in range(3)], 2)
    bt = block_table(c, 0)
    assert torch.equal(c.k_pool[bt[0, 1]], quantize(full_k[0, 0], k_lay))


@pytest.mark.parametrize("fmt", ["kivi2", "kivi4"])
def test_kivi_attention_is_dense_attention_on_the_stored_values_and_close_to_full(fmt):
    """A decode step's attend = sealed pages (fused dequantization path) + residual, merged by
    log-sum-exp: equal (float32 rounding) to dense attention on what the cache stores, and
    close to the full-precision cache; the prompt chunk attends itself in full precision.
    Tolerance vs full precision: random normal K/V, head_dim 32, pages
    of 8 tokens; measured max error 0.09 (kivi4) and 0.46 (kivi2) on outputs of magnitude ~1,
    bounds about 1.5x."""
    c = KVCache(1, H, KD, capacity=64, block_size=KBS, kv_format=fmt)
    ref = KVCache(1, H, KD, capacity=64, block_size=KBS)
    k, v = kivi_kv(2, 13, 1), kivi_kv(2, 13, 2)
    keys, values = c.update(0, k, v)
    ref.update(0, k, v)
    q = kivi_kv(2, 13, 3).repeat_interleave(2, 1)
    # the prompt chunk attends its own tokens in full precision (quantization changes what
    # later steps read): equal to the full-precision cache
    torch.testing.assert_close(c.attend(0, q), ref.attend(0, q), atol=1e-5, rtol=1e-5)
    assert not torch.equal(keys, k)  # while what the cache stores is quantized
    tol = {"kivi4": 0.15, "kivi2": 0.7}[fmt]
    for step in range(6):  # across the sealing of the second page
        k1, v1 = kivi_kv(2, 1, 10 + step), kivi_kv(2, 1, 20 + step)
        keys, values = c.update(0, k1, v1)
        ref.update(0, k1, v1)
        q1 = kivi_kv(2, 1, 30 + step).repeat_interleave(2, 1)
        out = c.attend(0, q1)
        torch.testing.assert_close(out, dense_reference(q1, keys, values), atol=1e-5, rtol=1e-5)
        err = (out - ref.attend(0, q1)).abs().max().item()
        assert 0 < err <= tol


@pytest.mark.parametrize("policy", ["snapkv", "streaming"])
def test_kivi_with_compression_reseals_changed_pages(policy):
    pol = get("snapkv", 10, window=2, kernel=3) if policy == "snapkv" else get("streaming", 10)
    c = KVCache(L, H, KD, block_size=KBS, capacity=40, policy=pol, kv_format="kivi4")
    k, v = kivi_kv(1, 21, 1), kivi_kv(1, 21, 2)
    stored_before = []  # what each layer stored before its compression (update's output)
    for layer in range(L):
        c.observe(layer, kivi_kv(1, 2, 9 + layer).repeat_interleave(2, 1))
        stored_before.append(c.update(layer, k, v))
    c.flush()
    assert (c.stored_lengths() == 10).all()
    c.allocator.check_invariants()
    for layer in range(L):
        keys, values = stored_kv(c, layer)
        pos = c.slot_pos[stream_slots(c, layer)]
        kept_k = torch.stack([stored_before[layer][0][0, h, pos[h]] for h in range(H)])
        kept_v = torch.stack([stored_before[layer][1][0, h, pos[h]] for h in range(H)])
        # re-sealing a changed page rounds its tokens once more: within a 4-bit step
        step = (kept_k.amax() - kept_k.amin()).item() / 15
        assert (keys[0] - kept_k).abs().max().item() <= step
        assert (values[0] - kept_v).abs().max().item() <= step
    # the next steps reopen the tail and keep attention exact on the stored values
    for layer in range(L):
        keys, values = c.update(layer, kivi_kv(1, 1, 40 + layer), kivi_kv(1, 1, 50 + layer))
        q = kivi_kv(1, 1, 60 + layer).repeat_interleave(2, 1)
        torch.testing.assert_close(
            c.attend(layer, q), dense_reference(q, keys, values), atol=1e-5, rtol=1e-5
        )
    assert c.used_bytes() == kivi_expected_bytes(c, c.lengths)


def test_kivi_errors():
    with pytest.raises(
        ValueError, match=r"kivi2: .*\(block_size a multiple of 4\), got block_size=6"
    ):
        KVCache(L, H, KD, block_size=6, kv_format="kivi2")
    with pytest.raises(ValueError, match="group"):
        KVCache(L, H, KD, block_size=KBS, kv_format="kivi4", quant_group=5)
    with pytest.raises(ValueError, match="kv_format must be one of .*'kivi2', 'kivi4'"):
        KVCache(L, H, KD, kv_format="kivi3")
    c = KVCache(L, H, KD, capacity=16, block_size=KBS, kv_format="kivi2")
    c.update(0, kivi_kv(1, 3, 1), kivi_kv(1, 3, 2))
    res = c.store.res_k.clone()
    bad = kivi_kv(1, 2, 3)
    bad[0, 1, 1, 0] = float("nan")  # would stay in the residual: rejected anyway
    with pytest.raises(ValueError, match="non-finite"):
        c.update(0, bad, kivi_kv(1, 2, 4))
    assert torch.equal(c.store.res_k, res) and c.stored_lengths(0).tolist() == [[3, 3]]
    with pytest.raises(kvcore.OutOfBlocksError):
        c.update(0, kivi_kv(1, 14, 5), kivi_kv(1, 14, 6))
    assert torch.equal(c.store.res_k, res) and c.stored_lengths(0).tolist() == [[3, 3]]


def test_append_stores_what_update_stores_without_gathering():
    """append() is update() minus the dense gather: the same pages, lengths and attention,
    and it returns nothing; a bad step leaves the cache unchanged."""
    a = KVCache(L, H, D, block_size=BS, policy=get("streaming", 5), capacity=40)
    b = KVCache(L, H, D, block_size=BS, policy=get("streaming", 5), capacity=40)
    for t, n in enumerate((9, 1, 1)):
        for layer in range(L):
            k, v, q = kv(2, n, 10 * t + layer), kv(2, n, 10 * t + 5 + layer), kv(2, n, 7 + t)
            assert a.append(layer, k, v) is None
            b.update(layer, k, v)
            q = q.repeat_interleave(2, 1)  # 4 query heads over 2 kv heads
            assert torch.equal(a.attend(layer, q), b.attend(layer, q))
    assert np.array_equal(a.stored_lengths(), b.stored_lengths())
    assert torch.equal(a.k_pool, b.k_pool) and torch.equal(a.v_pool, b.v_pool)
    with pytest.raises(ValueError, match="must have the same shape"):
        a.append(0, kv(2, 1), kv(2, 2))
    assert np.array_equal(a.stored_lengths(), b.stored_lengths())
