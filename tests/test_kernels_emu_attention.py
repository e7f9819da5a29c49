"""The decode-attention kernel (kernel 5) run on the CPU through cuda/emu/cuda_emu_threads.h
(one std::thread per CUDA thread, barriers for __syncthreads and warp shuffles), against
kvcore.attention.paged_attention: fp16/bf16/fp32 pages, quantized pages with fused
dequantization, ragged heads, GQA, query chunks, log-count bias, masks, split-K."""

from __future__ import annotations

import ctypes
import math
import shutil

import pytest

torch = pytest.importorskip("torch", reason="the kernel references need torch")

from emu_launch import compile_emu  # noqa: E402

import kvcore  # noqa: E402
from kvcore import kernels, quant  # noqa: E402
from kvcore.attention import paged_attention  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the emulation")

WRAPPER = """
extern "C" void emu_partial(unsigned gx, unsigned gy, const void* q, const void* k, const void* v,
                            const kv_i64* table, const kv_i64* lengths, const float* bias,
                            const unsigned char* valid, float* acc, float* ml, kv_i64 width,
                            kv_i64 split_len, float scale) {
    KV_EMU_LAUNCH(kv_decode_partial, gx, gy, 1, KV_WARPS * 32, 1, 1, q, k, v, table, lengths,
                  bias, valid, acc, ml, width, split_len, scale);
}
extern "C" void emu_reduce(unsigned gx, unsigned bx, const float* acc, const float* ml, void* out,
                           float* lse, int splits, kv_i64 h) {
    KV_EMU_LAUNCH(kv_decode_reduce, gx, 1, 1, bx, 1, 1, acc, ml, out, lse, splits, h);
}
"""


@pytest.fixture(scope="module")
def build():  # type: ignore[no-untyped-def]
    def get(defines: dict[str, int]) -> ctypes.CDLL:
        return compile_emu(
            '#include "cuda_emu_threads.h"\n'
            + kernels.kernel_source("decode_attention", defines)
            + WRAPPER
        )

    return get


def p(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def run_emulated(
    build,
    query,
    k_pool,
    v_pool,
    table,
    lengths,
    *,
    bias=None,
    valid=None,  # type: ignore[no-untyped-def]
    k_layout=None,
    v_layout=None,
    num_splits=1,
    lse=None,
):
    """The host side of kernels.decode_attention, with the launches emulated (``lse``: an
    optional ``(B, q, Hq)`` float32 output of the row log-sum-exps)."""
    b, hq, q_len, d = query.shape
    n_streams, width = table.shape
    h = n_streams // b
    group = hq // h
    lay = k_layout or v_layout
    bs = lay.num_tokens if lay is not None else k_pool.shape[1]
    defines = kernels.attention_defines(
        query.dtype, d, bs, group, q_len, k_layout, v_layout, bias is not None, valid is not None
    )
    lib = build(defines)
    rows = group * q_len
    split_len = max(1, math.ceil(int(lengths.max()) / num_splits))
    acc = torch.full((n_streams, num_splits, rows, d), float("nan"))
    ml = torch.full((n_streams, num_splits, rows, 2), float("nan"))
    out = torch.full((b, q_len, hq, d), float("nan")).to(query.dtype)  # poisoned
    valid_u8 = None if valid is None else valid.to(torch.uint8)
    lib.emu_partial(
        ctypes.c_uint(num_splits),
        ctypes.c_uint(n_streams),
        p(query),
        p(k_pool),
        p(v_pool),
        p(table),
        p(lengths),
        p(bias),
        p(valid_u8),
        p(acc),
        p(ml),
        ctypes.c_longlong(width),
        ctypes.c_longlong(split_len),
        ctypes.c_float(d**-0.5),
    )
    lib.emu_reduce(
        ctypes.c_uint(n_streams * rows),
        ctypes.c_uint(min(d, 256)),
        p(acc),
        p(ml),
        p(out),
        p(lse),
        ctypes.c_int(num_splits),
        ctypes.c_longlong(h),
    )
    return out


def _paged(gen, b, h, d, bs, lens, dtype):  # type: ignore[no-untyped-def]
    width = max(math.ceil(n / bs) for n in lens)
    num_blocks = 1 + sum(math.ceil(n / bs) for n in lens)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(b * h, width, dtype=torch.int64)
    for i, n in enumerate(lens):
        for j in range(math.ceil(n / bs)):
            table[i, j] = perm.pop()
    k = (torch.randn(num_blocks, bs, d, generator=gen) + 0.1).to(dtype)
    v = (torch.randn(num_blocks, bs, d, generator=gen) + 0.1).to(dtype)
    return k, v, table, torch.tensor(lens)


# float32: exp vs __expf and another summation order; 16-bit outputs: one ulp of the output
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize(
    "dtype,d,bs,group,q_len,splits",
    [
        (torch.float32, 64, 8, 2, 1, 1),
        (torch.float16, 128, 16, 4, 1, 3),
        (torch.bfloat16, 64, 32, 1, 1, 2),
        (torch.float32, 32, 16, 2, 3, 2),
        (torch.float16, 256, 8, 2, 1, 4),
    ],
)
def test_emulated_decode_attention_matches_the_reference(
    build, dtype, d, bs, group, q_len, splits
) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(d + bs + group)
    b, h = 2, 2
    lens = [int(x) for x in torch.randint(q_len, 90, (b * h,), generator=gen)]
    lens[0] = q_len  # a stream with nothing but the chunk
    k, v, table, lengths = _paged(gen, b, h, d, bs, lens, dtype)
    query = (torch.randn(b, h * group, q_len, d, generator=gen) * 0.5).to(dtype)
    num_slots = k.shape[0] * bs
    bias = torch.log(torch.randint(1, 5, (num_slots,), generator=gen).float())
    valid = torch.rand(num_slots, generator=gen) > 0.2
    lse = torch.full((b, q_len, h * group), float("nan"))  # poisoned
    got = run_emulated(
        build, query, k, v, table, lengths, bias=bias, valid=valid, num_splits=splits, lse=lse
    )
    ref, ref_lse = paged_attention(
        query, k, v, table, lengths, slot_bias=bias, slot_valid=valid, return_lse=True
    )
    tol = TOL[dtype]
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    # the row log-sum-exps (float32 in both; __expf vs exp, another summation order)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


# (key bits, value bits): KIVI's uniform pages, and the mixed ones (kv_format="k4v2", ...)
@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (8, 8), (4, 2), (2, 4)])
def test_emulated_attention_over_quantized_pages(build, bits: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    k_bits, v_bits = bits
    gen = torch.Generator().manual_seed(k_bits * 10 + v_bits)
    bs, d = 16, 64
    k, v, table, lengths = _paged(gen, 1, 2, d, bs, [50, 33], torch.float16)
    k_lay = kvcore.QuantLayout(k_bits, 16, bs, d, "token")  # KIVI keys: per channel
    v_lay = kvcore.QuantLayout(v_bits, 32, bs, d, "channel")  # KIVI values: per token
    kq, vq = quant.quantize(k, k_lay), quant.quantize(v, v_lay)
    query = (torch.randn(1, 4, 1, d, generator=gen) * 0.5).half()
    got = run_emulated(
        build, query, kq, vq, table, lengths, k_layout=k_lay, v_layout=v_lay, num_splits=2
    )
    ref = paged_attention(query, kq, vq, table, lengths, k_layout=k_lay, v_layout=v_lay)
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
