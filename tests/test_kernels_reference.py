"""The torch paths of kvcore.kernels (the CPU path and the GPU tests' oracle) against the
references of issue 4 (kvcore.merge.attention_with_bias, MergePlan), and
kvcore.attention.paged_attention (the one attention reference) on quantized pages and with
``return_lse``."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the kernel references need torch")

import kvcore  # noqa: E402
from kvcore import kernels  # noqa: E402
from kvcore.attention import paged_attention  # noqa: E402
from kvcore.merge import attention_with_bias  # noqa: E402


def _paged(
    gen: torch.Generator, b: int, h: int, d: int, bs: int, lens: list[int], dtype=torch.float32
):  # type: ignore[no-untyped-def]
    """Random pools and a ragged block table: stream i holds lens[i] tokens in shuffled blocks."""
    width = max(math.ceil(n / bs) for n in lens)
    num_blocks = 1 + sum(math.ceil(n / bs) for n in lens)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(b * h, width, dtype=torch.int64)  # padded with the null block 0
    for i, n in enumerate(lens):
        for j in range(math.ceil(n / bs)):
            table[i, j] = perm.pop()
    k = torch.randn(num_blocks, bs, d, generator=gen).to(dtype)
    v = torch.randn(num_blocks, bs, d, generator=gen).to(dtype)
    return k, v, table, torch.tensor(lens, dtype=torch.int64)


def _stream_kv(k, v, table, lens, i, bs):  # type: ignore[no-untyped-def]
    slots = (table[i][:, None] * bs + torch.arange(bs)).flatten()[: lens[i]]
    return k.view(-1, k.shape[-1])[slots], v.view(-1, v.shape[-1])[slots], slots


@pytest.mark.parametrize("q_len", [1, 3])
def test_decode_attention_reference_matches_attention_with_bias(q_len: int) -> None:
    gen = torch.Generator().manual_seed(q_len)
    b, h, group, d, bs = 2, 2, 4, 64, 8
    lens = [37, 5, 64, 20]
    k, v, table, lengths = _paged(gen, b, h, d, bs, lens)
    bias = torch.log(torch.randint(1, 5, (k.shape[0] * bs,), generator=gen).float())
    query = torch.randn(b, h * group, q_len, d, generator=gen)
    out = kernels.decode_attention(query, k, v, table, lengths, slot_bias=bias)
    assert out.shape == (b, q_len, h * group, d)
    for i in range(b * h):
        kk, vv, slots = _stream_kv(k, v, table, lens, i, bs)
        bb, hh = divmod(i, h)
        for g in range(group):
            for t in range(q_len):
                n = lens[i] - q_len + t + 1  # causal inside the chunk
                ref = attention_with_bias(
                    query[bb, hh * group + g, t : t + 1], kk[:n], vv[:n], bias[slots[:n]]
                )
                torch.testing.assert_close(out[bb, t, hh * group + g], ref[0])


def test_decode_attention_masks_invalid_slots_and_empty_streams() -> None:
    gen = torch.Generator().manual_seed(3)
    k, v, table, lengths = _paged(gen, 1, 2, 32, 16, [20, 16])
    valid = torch.ones(k.shape[0] * 16, dtype=torch.bool)
    _, _, slots = _stream_kv(k, v, table, [20, 16], 1, 16)
    valid[slots] = False  # stream 1: every slot invalid -> zeros
    query = torch.randn(1, 2, 1, 32, generator=gen)
    out = kernels.decode_attention(query, k, v, table, lengths, slot_valid=valid)
    assert torch.equal(out[0, 0, 1], torch.zeros(32))
    assert out[0, 0, 0].abs().sum() > 0


def test_quantized_pages_attend_like_their_dequantized_values() -> None:
    gen = torch.Generator().manual_seed(5)
    bs, d = 16, 64
    k, v, table, lengths = _paged(gen, 1, 1, d, bs, [40])
    k_lay = kvcore.QuantLayout(4, 16, bs, d, "token")
    v_lay = kvcore.QuantLayout(4, 16, bs, d, "channel")
    from kvcore import quant

    kq, vq = quant.quantize(k, k_lay), quant.quantize(v, v_lay)
    query = torch.randn(1, 2, 1, d, generator=gen)
    got = kernels.decode_attention(query, kq, vq, table, lengths, k_layout=k_lay, v_layout=v_lay)
    want = kernels.decode_attention(
        query, quant.dequantize(kq, k_lay), quant.dequantize(vq, v_lay), table, lengths
    )
    torch.testing.assert_close(got, want)
    full = kernels.decode_attention(query, k, v, table, lengths)
    # 4-bit pages: close to the unquantized attention, but not equal
    assert not torch.equal(got, full)
    torch.testing.assert_close(got, full, rtol=0.1, atol=0.1)


def test_merge_reference_equals_mergeplan_apply() -> None:
    rng = np.random.default_rng(0)
    plan = kvcore.razor_plan(64, sink=4, local_capacity=16)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    out, counts = kernels.apply_merge(
        torch.from_numpy(x),
        torch.from_numpy(plan.src),
        torch.from_numpy(plan.dst),
        torch.from_numpy(plan.weight),
        torch.ones(64),
        torch.from_numpy(plan.evicted),
    )
    np.testing.assert_allclose(out.numpy(), plan.apply(x), rtol=1e-6, atol=1e-6)
    book = kvcore.MergeBook(64)
    kept = book.apply(plan)
    assert counts is not None
    np.testing.assert_allclose(counts.numpy()[kept], book.mass, rtol=1e-6)
    assert counts.sum().item() == pytest.approx(64.0)


def test_rotate_reference_matches_issue5_rotate_keys() -> None:
    cache = pytest.importorskip("kvcore.cache", reason="issue 5's kvcore.cache is not merged yet")
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(20, 128, generator=gen).half()
    delta = torch.randint(-100, 100, (20,), generator=gen)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 96, 2, dtype=torch.float32) / 96))
    assert torch.equal(
        kernels.rotate_reference(keys, delta, inv), cache.rotate_keys(keys, delta, inv)
    )


def test_rotation_by_delta_then_minus_delta_is_the_identity() -> None:
    gen = torch.Generator().manual_seed(2)
    pool = torch.randn(4, 8, 64, generator=gen, dtype=torch.float64).float()
    slots = torch.arange(32)
    delta = torch.randint(-1000, 1000, (32,), generator=gen)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    x = pool.clone()
    kernels.rotate_slots(x, slots, delta, inv)
    assert not torch.allclose(x, pool)
    kernels.rotate_slots(x, slots, -delta, inv)
    torch.testing.assert_close(x, pool, rtol=1e-5, atol=1e-5)


def test_paged_attention_reads_quantized_pages_as_their_dequantized_values() -> None:
    from kvcore import quant

    gen = torch.Generator().manual_seed(4)
    k, v, table, lengths = _paged(gen, 2, 2, 64, 16, [30, 3, 47, 16])
    k_lay = kvcore.QuantLayout(4, 16, 16, 64, "token")
    v_lay = kvcore.QuantLayout(2, 32, 16, 64, "channel")
    kq, vq = quant.quantize(k, k_lay), quant.quantize(v, v_lay)
    query = torch.randn(2, 8, 2, 64, generator=gen)
    got = paged_attention(query, kq, vq, table, lengths, k_layout=k_lay, v_layout=v_lay)
    kd, vd = quant.dequantize(kq, k_lay), quant.dequantize(vq, v_lay)
    torch.testing.assert_close(got, paged_attention(query, kd, vd, table, lengths))
    assert not torch.allclose(got, paged_attention(query, k, v, table, lengths), atol=1e-3)


def test_lse_merges_two_parts_of_the_keys_into_the_whole() -> None:
    """``return_lse``: attention over two disjoint slot sets, merged by their log-sum-exps,
    equals attention over all slots (how KVCache.attend adds KIVI's residual window)."""
    gen = torch.Generator().manual_seed(5)
    k, v, table, lengths = _paged(gen, 2, 2, 32, 8, [21, 9, 40, 1])
    query = torch.randn(2, 4, 1, 32, generator=gen)
    bias = torch.rand(k.shape[0] * 8, generator=gen)
    part = torch.rand(k.shape[0] * 8, generator=gen) > 0.5
    whole = paged_attention(query, k, v, table, lengths, slot_bias=bias)
    o1, l1 = paged_attention(
        query, k, v, table, lengths, slot_bias=bias, slot_valid=part, return_lse=True
    )
    o2, l2 = paged_attention(
        query, k, v, table, lengths, slot_bias=bias, slot_valid=~part, return_lse=True
    )
    lse = torch.logaddexp(l1, l2)
    merged = (l1 - lse).exp()[..., None] * o1 + (l2 - lse).exp()[..., None] * o2
    torch.testing.assert_close(merged, whole)
    _, full_lse = paged_attention(query, k, v, table, lengths, slot_bias=bias, return_lse=True)
    torch.testing.assert_close(lse, full_lse)
    # a row with no visible key: zeros and -inf
    none = torch.zeros_like(part)
    o, lse0 = paged_attention(query, k, v, table, lengths, slot_valid=none, return_lse=True)
    assert (o == 0).all() and (lse0 == float("-inf")).all()


@pytest.mark.parametrize(
    "lens, q_len, biased",
    [
        ([24, 24, 24, 24], 24, False),  # a first prefill chunk: plain causal, no mask
        ([40, 40, 40, 40], 9, False),  # a chunk after a prefix: lower-right causal window
        ([40, 40, 40, 40], 1, False),  # a decode step over equal streams
        ([37, 5, 64, 20], 3, False),  # ragged streams: explicit mask
        ([40, 40, 40, 40], 9, True),  # a slot bias: explicit float mask
    ],
)
def test_sdpa_path_equals_the_explicit_softmax(lens: list[int], q_len: int, biased: bool) -> None:
    """Without ``return_lse`` the reference runs torch's scaled_dot_product_attention (a
    mask-free causal call when it can); it equals the explicit softmax path that
    ``return_lse=True`` takes, for every shape of visibility."""
    gen = torch.Generator().manual_seed(q_len + len(set(lens)))
    b, h, group, d, bs = 2, 2, 3, 32, 8
    k, v, table, lengths = _paged(gen, b, h, d, bs, lens)
    query = torch.randn(b, h * group, q_len, d, generator=gen)
    bias = torch.log(torch.randint(1, 5, (k.shape[0] * bs,), generator=gen).float())
    kw = {"slot_bias": bias} if biased else {}
    fast = paged_attention(query, k, v, table, lengths, **kw)
    explicit, _ = paged_attention(query, k, v, table, lengths, return_lse=True, **kw)
    torch.testing.assert_close(fast, explicit, atol=2e-6, rtol=1e-5)
    # and a stream with every slot masked still gives zeros on the fast path
    valid = torch.ones(k.shape[0] * bs, dtype=torch.bool)
    valid[_stream_kv(k, v, table, lens, 1, bs)[2]] = False
    out = paged_attention(query, k, v, table, lengths, slot_valid=valid, **kw)
    assert torch.equal(out[0, :, group : 2 * group], torch.zeros(q_len, group, d))
    assert out[0, :, :group].abs().sum() > 0


def test_compact_pools_refuses_bad_arguments_before_moving_anything() -> None:
    pool = torch.arange(4 * 8 * 6, dtype=torch.uint8).reshape(4, 8 * 6)
    rows = torch.arange(32.0)
    before = (pool.clone(), rows.clone())
    src, dst = torch.tensor([5, 9]), torch.tensor([1, 2])
    ip = torch.tensor([0, 2])
    pieces = pool[:, 8:32].view(4, 8, 3)  # the strided form: (num_blocks, block_size, width)
    bad = [
        ([rows, pool[:, 8:32:2]], ValueError, r"tensors\[1\] must be contiguous or a "),
        ([rows, pieces.transpose(1, 2)], ValueError, r"contiguous last dimension over 32"),
        ([rows, torch.arange(33.0)], ValueError, r"tensors\[1\] has 33 elements"),
    ]
    for tensors, err, msg in bad:
        with pytest.raises(err, match=msg):
            kernels.compact_pools(tensors, [0, 0], src, dst, ip, 32)
    with pytest.raises(ValueError, match="plan_of entry 1 is not a plan of indptr"):
        kernels.compact_pools([rows, pieces], [0, 1], src, dst, ip, 32)
    with pytest.raises(ValueError, match="num_slots must be positive"):
        kernels.compact_pools([rows], [0], src, dst, ip, 0)
    with pytest.raises(TypeError, match="src must be a 1-d int64 tensor"):
        kernels.compact_pools([rows], [0], src.int(), dst, ip, 32)
    assert torch.equal(pool, before[0]) and torch.equal(rows, before[1])  # nothing moved
    kernels.compact_pools([rows, pieces], [0, 0], src, dst, ip, 32)
    assert rows[1] == 5 and rows[2] == 9
    # slot 1 <- slot 5 (block 0, offset 5); slot 2 <- slot 9 (block 1, offset 1); 3-byte pieces
    assert torch.equal(pieces[0, 1], before[0][0, 8 + 15 : 8 + 18])
    assert torch.equal(pieces[0, 2], before[0][1, 8 + 3 : 8 + 6])
    assert torch.equal(pool[:, :8], before[0][:, :8]) and torch.equal(
        pool[:, 32:], before[0][:, 32:]
    )
