"""CUDA kernels against their torch references on the GPU (skipped without CUDA and CuPy).

Matrix: dtypes (float16, bfloat16, float32) x head dims (64, 128, 256) x block sizes (8, 16,
32) x layouts, random data (never zeros), outputs poisoned before each launch so that an
element the kernel forgets to write fails the comparison.

Tolerances, with their reasons:
* compaction, quantize, dequantize (float32): exact. A copy is a copy; the quantization
  arithmetic is specified op for op (docs/layouts.md) and the kernel avoids fused
  multiply-adds, so its bytes equal the CPU reference's.
* merge: float32 sums in plan order like MergePlan.apply (exact against Rust); torch's
  ``index_add`` may sum in another order, so against it: torch's default tolerance of the dtype.
* RoPE: float64 math like the reference, but the GPU's cos/sin may differ from libm by an ulp
  of float64 and the kernel rounds float64 -> float32 -> 16 bits (two roundings): one unit in
  the last place of the element type.
* decode attention: ``__expf`` and a different summation order (split-K, 4 warps) than the
  reference's float32 softmax: rtol/atol 1e-4 for float32; for 16-bit outputs one ulp of the
  output dtype dominates (2e-3 float16, 1.6e-2 bfloat16). Quantized pages dequantize
  bit-identically, so they use the same tolerances against the reference on the same pages.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs a CUDA device and cupy (torch missing)")

from kvcore import kernels  # noqa: E402

if not (torch.cuda.is_available() and kernels.cupy_available()):
    pytest.skip("needs a CUDA device and cupy", allow_module_level=True)

import kvcore  # noqa: E402
from kvcore import quant  # noqa: E402
from kvcore.attention import paged_attention  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
HEAD_DIMS = [64, 128, 256]
BLOCK_SIZES = [8, 16, 32]
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _rand(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * 2 + 0.25).to(dtype)


def test_kernels_are_used_on_cuda() -> None:
    assert kernels.uses_kernel(torch.zeros(1, device=DEV))


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compaction(dtype: torch.dtype, head_dim: int, block_size: int) -> None:
    gen = torch.Generator().manual_seed(head_dim * block_size)
    num_blocks, heads, num_layers = 128, 4, 3
    num_slots = num_blocks * block_size
    cpu, plan_of, srcs, dsts, indptr = [], [], [], [], [0]
    for layer in range(num_layers):
        alloc = kvcore.BlockAllocator(num_blocks, block_size)
        tables = alloc.create_tables(heads)
        lens = torch.randint(block_size, 6 * block_size, (heads,), generator=gen).tolist()
        for t, n in zip(tables, lens, strict=True):
            alloc.append(int(t), n)
        ind, pos = [0], []
        for n in lens:
            pos += torch.sort(torch.randperm(n, generator=gen)[: n // 3]).values.tolist()
            ind.append(len(pos))
        src, dst, _ = alloc.compact_batch(tables, np.array(ind), np.array(pos))
        srcs.append(torch.from_numpy(src))
        dsts.append(torch.from_numpy(dst))
        indptr.append(indptr[-1] + len(src))
        cpu += [
            _rand(gen, num_blocks, block_size, head_dim, dtype=dtype),
            _rand(gen, num_blocks, block_size, head_dim, dtype=dtype),
            torch.randint(0, 10**9, (num_slots,), generator=gen),
            torch.rand(num_slots, generator=gen),
            torch.rand(num_slots, generator=gen) > 0.5,
        ]
        plan_of += [layer] * 5
    src, dst = torch.cat(srcs), torch.cat(dsts)
    ip = torch.tensor(indptr)
    gpu = [t.to(DEV) for t in cpu]
    kernels.compact_pools(cpu, plan_of, src, dst, ip, num_slots)
    kernels.compact_pools(gpu, plan_of, src.to(DEV), dst.to(DEV), ip.to(DEV), num_slots)
    for c, g in zip(cpu, gpu, strict=True):
        assert torch.equal(g.cpu(), c)


def _layouts(head_dim: int, block_size: int) -> list[kvcore.QuantLayout]:
    out = []
    for bits in (2, 4, 8):
        g_tok = block_size  # KIVI keys: per channel, groups along the block's tokens
        out.append(kvcore.QuantLayout(bits, g_tok, block_size, head_dim, "token", "float16"))
        out.append(kvcore.QuantLayout(bits, 32, block_size, head_dim, "channel", "float16"))
        out.append(kvcore.QuantLayout(bits, 16, block_size, head_dim, "channel", "float32"))
    return out


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_dequantize_bit_identical(
    dtype: torch.dtype, head_dim: int, block_size: int
) -> None:
    gen = torch.Generator().manual_seed(head_dim + block_size)
    x = _rand(gen, 5, 3, block_size, head_dim, dtype=dtype)
    for layout in _layouts(head_dim, block_size):
        ref = quant.quantize(x, layout)
        poisoned = torch.full(ref.shape, 0xA5, dtype=torch.uint8, device=DEV)
        got = kernels.quantize(x.to(DEV), layout, out=poisoned)
        assert torch.equal(got.cpu(), ref), layout
        back = torch.full((5, 3, block_size, head_dim), float("nan"), device=DEV)
        kernels.dequantize(got, layout, out=back)
        assert torch.equal(back.cpu(), quant.dequantize(ref, layout)), layout


def test_quantize_raises_like_the_reference() -> None:
    layout = kvcore.QuantLayout(4, 32, 16, 64)
    x = torch.rand(2, 16, 64, device=DEV)
    x[1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        kernels.quantize(x, layout)
    x[1, 3, 5] = 1e6
    with pytest.raises(ValueError, match="float16 metadata"):
        kernels.quantize(-x, layout)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge(dtype: torch.dtype, head_dim: int) -> None:
    rng = np.random.default_rng(head_dim)
    n = 300
    keys = rng.standard_normal((n, head_dim)).astype(np.float32)
    keys[40:90] = keys[40] + 0.05 * rng.standard_normal((50, head_dim)).astype(np.float32)
    attn = rng.random(n).astype(np.float32)
    plans = [
        kvcore.kvmerger_plan(keys, attn, 0.9),
        kvcore.razor_plan(n, 4, 64),
        kvcore.ems_plan(keys, attn, np.arange(0, n, 4), 0.05),
    ]
    for plan in plans:
        x = torch.from_numpy(rng.standard_normal((n, head_dim)).astype(np.float32)).to(dtype)
        counts = torch.from_numpy(rng.integers(1, 4, n).astype(np.float32))
        args = [torch.from_numpy(a) for a in (plan.src, plan.dst, plan.weight)]
        ev = torch.from_numpy(plan.evicted)
        ref, c_ref = kernels.merge_reference(x, *args, counts, ev)
        got, c_got = kernels.apply_merge(
            x.to(DEV), *[a.to(DEV) for a in args], counts.to(DEV), ev.to(DEV)
        )
        rust = torch.from_numpy(plan.apply(x.float().numpy())).to(dtype)
        assert torch.equal(got.cpu(), rust)
        torch.testing.assert_close(got.cpu(), ref)
        assert c_got is not None and c_ref is not None
        torch.testing.assert_close(c_got.cpu(), c_ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope(dtype: torch.dtype, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    pool = _rand(gen, 64, 16, head_dim, dtype=dtype)
    slots = torch.randperm(64 * 16, generator=gen)[:500]
    delta = torch.randint(-30000, 30000, (500,), generator=gen)
    for rot in (head_dim, head_dim // 2):
        inv = 1.0 / (500000.0 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
        ref = pool.clone()
        kernels.rotate_slots(ref, slots, delta, inv)
        got = pool.to(DEV)
        kernels.rotate_slots(got, slots.to(DEV), delta.to(DEV), inv.to(DEV))
        eps = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6
        torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=eps, atol=eps)


def _paged(gen, b, h, d, bs, lens, dtype):  # type: ignore[no-untyped-def]
    width = max(math.ceil(n / bs) for n in lens)
    num_blocks = 1 + sum(math.ceil(n / bs) for n in lens)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(b * h, width, dtype=torch.int64)
    for i, n in enumerate(lens):
        for j in range(math.ceil(n / bs)):
            table[i, j] = perm.pop()
    k = _rand(gen, num_blocks, bs, d, dtype=dtype)
    v = _rand(gen, num_blocks, bs, d, dtype=dtype)
    return k, v, table, torch.tensor(lens)


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention(dtype: torch.dtype, head_dim: int, block_size: int, q_len: int) -> None:
    gen = torch.Generator().manual_seed(head_dim * block_size + q_len)
    b, h = 2, 2
    group = 4 if head_dim * 4 * q_len <= 2048 else 2
    lens = [int(x) for x in torch.randint(q_len, 700, (b * h,), generator=gen)]  # ragged heads
    k, v, table, lengths = _paged(gen, b, h, head_dim, block_size, lens, dtype)
    query = _rand(gen, b, h * group, q_len, head_dim, dtype=dtype) * 0.3
    num_slots = k.shape[0] * block_size
    bias = torch.log(torch.randint(1, 6, (num_slots,), generator=gen).float())
    valid = torch.rand(num_slots, generator=gen) > 0.1
    ref = paged_attention(query, k, v, table, lengths, slot_bias=bias, slot_valid=valid)
    rtol, atol = TOL[dtype]
    for splits in (1, 3, None):
        out = torch.full((b, q_len, h * group, head_dim), float("nan"), dtype=dtype, device=DEV)
        got = kernels.decode_attention(
            query.to(DEV),
            k.to(DEV),
            v.to(DEV),
            table.to(DEV),
            lengths.to(DEV),
            slot_bias=bias.to(DEV),
            slot_valid=valid.to(DEV),
            num_splits=splits,
            out=out,
        )
        torch.testing.assert_close(got.cpu(), ref, rtol=rtol, atol=atol)
    # the row log-sum-exps (float32 both ways), used to merge KIVI's residual window
    _, ref_lse = paged_attention(
        query, k, v, table, lengths, slot_bias=bias, slot_valid=valid, return_lse=True
    )
    _, lse = kernels.decode_attention(
        query.to(DEV),
        k.to(DEV),
        v.to(DEV),
        table.to(DEV),
        lengths.to(DEV),
        slot_bias=bias.to(DEV),
        slot_valid=valid.to(DEV),
        return_lse=True,
    )
    torch.testing.assert_close(lse.cpu(), ref_lse, rtol=1e-4, atol=1e-4)


# (key bits, value bits): KIVI's uniform pages, and the mixed ones (kv_format="k4v2", ...)
@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (8, 8), (4, 2), (2, 4)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_quantized_pages(dtype: torch.dtype, bits: tuple[int, int]) -> None:
    k_bits, v_bits = bits
    gen = torch.Generator().manual_seed(k_bits * 10 + v_bits)
    b, h, group, d, bs = 1, 8, 4, 128, 32
    lens = [int(x) for x in torch.randint(1, 3000, (b * h,), generator=gen)]
    k, v, table, lengths = _paged(gen, b, h, d, bs, lens, dtype)
    k_lay = kvcore.QuantLayout(k_bits, 32, bs, d, "token")  # KIVI keys: per channel
    v_lay = kvcore.QuantLayout(v_bits, 32, bs, d, "channel")  # KIVI values: per token
    kq, vq = quant.quantize(k, k_lay), quant.quantize(v, v_lay)
    query = _rand(gen, b, h * group, 1, d, dtype=dtype) * 0.3
    ref = paged_attention(query, kq, vq, table, lengths, k_layout=k_lay, v_layout=v_lay)
    got = kernels.decode_attention(
        query.to(DEV),
        kq.to(DEV),
        vq.to(DEV),
        table.to(DEV),
        lengths.to(DEV),
        k_layout=k_lay,
        v_layout=v_lay,
    )
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.cpu(), ref, rtol=rtol, atol=atol)


def test_long_context_split_k() -> None:
    gen = torch.Generator().manual_seed(11)
    k, v, table, lengths = _paged(gen, 1, 8, 128, 16, [32768] * 8, torch.float16)
    query = _rand(gen, 1, 32, 1, 128, dtype=torch.float16) * 0.3
    ref = paged_attention(query, k, v, table, lengths)
    got = kernels.decode_attention(
        query.to(DEV), k.to(DEV), v.to(DEV), table.to(DEV), lengths.to(DEV)
    )
    torch.testing.assert_close(got.cpu(), ref, rtol=2e-3, atol=2e-3)


def test_launches_run_on_torchs_current_stream() -> None:
    x = torch.randn(64, 16, 128, device=DEV, dtype=torch.float16)
    y = torch.randn(64, 16, 128, device=DEV, dtype=torch.float16) + 3
    layout = kvcore.QuantLayout(4, 32, 16, 128)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # delays the copy: a kernel on another stream reads old x
        x.copy_(y)
        got = kernels.quantize(x, layout)
    side.synchronize()
    assert torch.equal(got.cpu(), quant.quantize(y.cpu(), layout))


def test_launch_checks_device_and_contiguity() -> None:
    layout = kvcore.QuantLayout(4, 32, 16, 128)
    x = torch.randn(4, 128, 16, device=DEV).transpose(1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.quantize(x, layout)
    out = torch.empty(4, layout.nbytes, dtype=torch.uint8)  # on the CPU
    with pytest.raises(ValueError, match="is on cpu"):
        kernels.quantize(x.contiguous(), layout, out=out)
