"""Kernels 1-4 compiled for the CPU with g++ and cuda/emu/cuda_emu.h, against the references.

The emulation runs the exact kernel source (``kvcore.kernels.kernel_source``) with every
(block, thread) index visited serially (compaction, whose chunks need ``__syncthreads``,
with cuda/emu/cuda_emu_threads.h: a std::thread per CUDA thread), so indexing, packing and
rounding bugs show up here without a GPU. References: issue 4's ``kvcore.quant`` /
``kvcore.quantize`` (bytes), ``kvcore.MergePlan.apply`` / ``kvcore.MergeBook`` (merges), the
allocator's ``compact_batch`` (plans) and ``kvcore.kernels.rotate_reference`` (issue 5's
``rotate_keys`` rule).
"""

from __future__ import annotations

import ctypes
import shutil
from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the kernel references need torch")

from emu_launch import compile_emu, emu_header  # noqa: E402

import kvcore  # noqa: E402
from kvcore import kernels, quant  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the emulation")

# C wrappers: launch a kernel over a grid with the emulation's serial loops.
WRAPPERS = {
    ("compact", "kv_compact"): """
extern "C" void emu(unsigned gx, unsigned gy, const kv_u64* p, const kv_i64* geom, const int* u,
                    const int* g, const kv_i64* s, const kv_i64* d, const kv_i64* ip, int n) {
    KV_EMU_LAUNCH(kv_compact, gx, gy, 1, 32, 1, 1, p, geom, u, g, s, d, ip, n);
}""",
    ("quant", "kv_quantize"): """
extern "C" void emu(unsigned gx, const void* x, unsigned char* out, int* err, kv_i64 nb) {
    KV_EMU_LAUNCH(kv_quantize, gx, 1, 1, 32, 1, 1, x, out, err, nb);
}""",
    ("quant", "kv_dequantize"): """
extern "C" void emu(unsigned gx, const unsigned char* b, void* out, kv_i64 nb) {
    KV_EMU_LAUNCH(kv_dequantize, gx, 1, 1, 32, 1, 1, b, out, nb);
}""",
    ("merge", "kv_merge"): """
extern "C" void emu(unsigned gx, const void* x, void* out, const kv_i64* rows, const kv_i64* ip,
                    const kv_i64* src, const float* w, const float* frac, const float* c,
                    float* co, const kv_i64* rem, kv_i64 nd, kv_i64 dim, kv_i64 nr) {
    KV_EMU_LAUNCH(kv_merge, gx, 1, 1, 32, 1, 1, x, out, rows, ip, src, w, frac, c, co, rem, nd,
                  dim, nr);
}""",
    ("rope", "kv_rope_rotate"): """
extern "C" void emu(unsigned gx, void* pool, const kv_i64* slots, const kv_i64* delta,
                    const float* inv, kv_i64 n) {
    KV_EMU_LAUNCH(kv_rope_rotate, gx, 1, 1, 32, 1, 1, pool, slots, delta, inv, n);
}""",
}


@pytest.fixture(scope="session")
def emu_build() -> Callable[..., Callable[..., None]]:
    """``emu_build(file, kernel, defines)`` -> the C launcher of that kernel (built once)."""

    def build(name: str, kernel: str, defines: dict[str, int]) -> Callable[..., None]:
        src = (
            f'#include "{emu_header(name)}"\n'
            + kernels.kernel_source(name, defines)
            + WRAPPERS[(name, kernel)]
        )
        return compile_emu(src).emu  # type: ignore[no-any-return]

    return build


def p(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def i64(v: int) -> ctypes.c_longlong:
    return ctypes.c_longlong(v)


def grid(n: int) -> ctypes.c_uint:
    return ctypes.c_uint(max(1, (n + 31) // 32))


# ---------------------------------------------------------------------------------- compaction


def emu_compact(build, tensors, plan_of, src, dst, indptr, num_slots) -> None:  # type: ignore[no-untyped-def]
    ptrs, geom, units = kernels.compact_geometry(tensors, num_slots)
    fn = build("compact", "kv_compact", {})
    # held in locals: the launch reads them through raw pointers
    g = torch.tensor(geom, dtype=torch.int64)
    pt = torch.tensor(ptrs, dtype=torch.int64)
    un, grp = torch.tensor(units, dtype=torch.int32), torch.tensor(plan_of, dtype=torch.int32)
    fn(
        ctypes.c_uint(1),
        ctypes.c_uint(len(tensors)),
        p(pt),
        p(g),
        p(un),
        p(grp),
        p(src),
        p(dst),
        p(indptr),
        ctypes.c_int(len(tensors)),
    )


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compaction_matches_gather_scatter_on_allocator_plans(emu_build, block_size, dtype) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(block_size)
    num_layers, heads, head_dim, num_blocks = 2, 3, 64, 64
    num_slots = num_blocks * block_size
    tensors, plan_of, srcs, dsts, indptr = [], [], [], [], [0]
    for layer in range(num_layers):
        alloc = kvcore.BlockAllocator(num_blocks, block_size)
        tables = alloc.create_tables(heads)
        lens = torch.randint(block_size, 4 * block_size, (heads,), generator=g)
        for t, n in zip(tables, lens.tolist(), strict=True):
            alloc.append(int(t), n)
        keep_ind, keep_pos = [0], []
        for n in lens.tolist():
            kept = torch.sort(torch.randperm(n, generator=g)[: n // 2]).values
            keep_pos += kept.tolist()
            keep_ind.append(len(keep_pos))
        src, dst, _ = alloc.compact_batch(
            tables, np.array(keep_ind, dtype=np.int64), np.array(keep_pos, dtype=np.int64)
        )
        srcs.append(torch.from_numpy(src))
        dsts.append(torch.from_numpy(dst))
        indptr.append(indptr[-1] + len(src))
        k = torch.randn(num_blocks, block_size, head_dim, generator=g).to(dtype)
        v = torch.randn(num_blocks, block_size, head_dim, generator=g).to(dtype)
        pos = torch.randint(0, 10**6, (num_slots,), generator=g)
        score = torch.rand(num_slots, generator=g)
        valid = torch.rand(num_slots, generator=g) > 0.3
        tensors += [k, v, pos, score, valid]
        plan_of += [layer] * 5
    src, dst = torch.cat(srcs), torch.cat(dsts)
    ip = torch.tensor(indptr, dtype=torch.int64)
    assert len(src) > 0, "the plans must move something for the test to mean anything"
    expected = [t.clone() for t in tensors]
    kernels.compact_pools(expected, plan_of, src, dst, ip, num_slots)  # CPU: the reference
    got = [t.clone() for t in tensors]
    emu_compact(emu_build, got, plan_of, src, dst, ip, num_slots)
    for e, o, before in zip(expected, got, tensors, strict=True):
        assert not torch.equal(e, before) or len(src) == 0
        torch.testing.assert_close(o, e, rtol=0, atol=0)  # a copy is exact


def test_compaction_runs_moves_in_order_when_ranges_overlap(emu_build) -> None:  # type: ignore[no-untyped-def]
    # a shift left by one: move i reads the slot move i+1 overwrites (allowed by the contract)
    x = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    src = torch.arange(1, 10, dtype=torch.int64)
    dst = torch.arange(0, 9, dtype=torch.int64)
    ip = torch.tensor([0, 9], dtype=torch.int64)
    emu_compact(emu_build, [x], [0], src, dst, ip, 10)
    assert torch.equal(x[:9], torch.arange(4, 40, dtype=torch.float32).reshape(9, 4))
    assert torch.equal(x[9], torch.arange(36, 40, dtype=torch.float32))


@pytest.mark.parametrize("shift", [1, 37, 300])
def test_compaction_chunks_keep_plan_order_across_chunk_boundaries(emu_build, shift) -> None:  # type: ignore[no-untyped-def]
    """Rows of 3 units (12 bytes: unit 4), so pieces straddle the kernel's chunks of
    8 * 32 elements; move i reads row i + shift, which move i + shift overwrites later, in the
    same chunk or in a later one. Against the moves applied one by one, in order."""
    rows, moves = 700, 700 - shift
    x = torch.randn(rows, 3, generator=torch.Generator().manual_seed(shift))
    src = torch.arange(shift, rows, dtype=torch.int64)
    dst = torch.arange(0, moves, dtype=torch.int64)
    want = x.clone()
    for s, d in zip(src.tolist(), dst.tolist(), strict=True):
        want[d] = want[s]
    emu_compact(emu_build, [x], [0], src, dst, torch.tensor([0, moves]), rows)
    assert torch.equal(x, want)


def page_pieces(pool: torch.Tensor, page: kvcore.QuantLayout, tok: kvcore.QuantLayout):  # type: ignore[no-untyped-def]
    """The three strided ``(num_blocks, block_size, width)`` views of a pool of quantized pages
    (docs/layouts.md, axis "channel"): codes, scales and zero points of each token, each
    ``offset * width`` into its region of the page. Returned with each piece's offset in the
    token's own one-token block."""
    bs, nb = page.num_tokens, pool.shape[0]
    cb, sb = tok.codes_bytes, tok.zeros_offset - tok.scales_offset
    regions = [(0, 0, cb), (page.scales_offset, tok.scales_offset, sb)]
    regions.append((page.zeros_offset, tok.zeros_offset, sb))
    return [(pool[:, po : po + bs * w].view(nb, bs, w), to, w) for po, to, w in regions]


@pytest.mark.parametrize(
    "bits,group,head_dim,meta",
    [
        (4, 32, 64, "float16"),
        (2, 32, 64, "float16"),
        (8, 16, 128, "float32"),
        (2, 8, 24, "float16"),
    ],
)
def test_compaction_moves_the_pieces_of_quantized_pages(
    emu_build, bits, group, head_dim, meta
) -> None:  # type: ignore[no-untyped-def]
    """Quantized pages move as each token's three pieces (strided views), in the same launch as
    dense per-slot state: equal to the torch reference, and each kept token's one-token block
    afterwards is the block it had before (the independent oracle)."""
    bs, num_blocks, heads = 8, 40, 3
    num_slots = bs * num_blocks
    page = kvcore.QuantLayout(bits, group, bs, head_dim, "channel", meta)
    tok = kvcore.QuantLayout(bits, group, 1, head_dim, "channel", meta)
    g = torch.Generator().manual_seed(bits * head_dim)
    k_pool = quant.quantize(torch.randn(num_blocks, bs, head_dim, generator=g) * 3, page)
    v_pool = quant.quantize(torch.randn(num_blocks, bs, head_dim, generator=g), page)
    pos = torch.randint(0, 10**6, (num_slots,), generator=g)
    alloc = kvcore.BlockAllocator(num_blocks, bs)
    tables = alloc.create_tables(heads)
    lens = [29, 17, 40]
    before = []
    for t, n in zip(tables, lens, strict=True):
        before.append(torch.from_numpy(alloc.append(int(t), n)[0]))
    ind, kept = [0], []
    for n in lens:
        kept.append(torch.sort(torch.randperm(n, generator=g)[: n // 3]).values)
        ind.append(ind[-1] + len(kept[-1]))
    src, dst, _ = alloc.compact_batch(
        tables, np.array(ind), torch.cat(kept).numpy().astype(np.int64)
    )
    src, dst = torch.from_numpy(src), torch.from_numpy(dst)
    assert len(src) > 0
    ip = torch.tensor([0, len(src)], dtype=torch.int64)

    def pieces(pools: list[torch.Tensor]) -> list[torch.Tensor]:
        return [v for pl in pools for v, _, _ in page_pieces(pl, page, tok)]

    def token_blocks(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(slots), tok.nbytes, dtype=torch.uint8)
        for view, to, w in page_pieces(pool, page, tok):
            out[:, to : to + w] = view[slots // bs, slots % bs]
        return out

    old = [
        token_blocks(pl, torch.cat([b[k] for b, k in zip(before, kept, strict=True)]))
        for pl in (k_pool, v_pool)
    ]
    ref = [k_pool.clone(), v_pool.clone(), pos.clone()]
    kernels.compact_pools([*pieces(ref[:2]), ref[2]], [0] * 7, src, dst, ip, num_slots)
    got = [k_pool.clone(), v_pool.clone(), pos.clone()]
    views = pieces(got[:2])
    assert not any(v.is_contiguous() for v in views)
    emu_compact(emu_build, [*views, got[2]], [0] * 7, src, dst, ip, num_slots)
    for r, o in zip(ref, got, strict=True):
        assert torch.equal(o, r)
    after = torch.cat([torch.from_numpy(alloc.slot_mapping(int(t))) for t in tables])
    for pl, want in zip(got[:2], old, strict=True):
        assert torch.equal(token_blocks(pl, after), want)
        back = quant.dequantize(token_blocks(pl, after).reshape(-1, tok.nbytes), tok)
        assert torch.equal(back, quant.dequantize(want, tok))
    # the dense state moved in the same launch
    src_pos = torch.cat([b[k] for b, k in zip(before, kept, strict=True)])
    assert torch.equal(got[2][after], pos[src_pos])


# -------------------------------------------------------------------------------- quantization

LAYOUTS = [
    (bits, g, t, axis, meta)
    for bits, g in ((2, 16), (4, 8), (8, 32))
    for axis, t in (("channel", 4), ("token", 32))
    for meta in ("float16", "float32")
] + [
    # one token per block: KIVI values leaving the window, MiKV tiers
    (bits, 32, 1, "channel", "float16")
    for bits in (2, 4, 8)
]


def emu_quantize(build, x: torch.Tensor, layout: kvcore.QuantLayout) -> tuple[torch.Tensor, int]:  # type: ignore[no-untyped-def]
    lead = x.shape[:-2]
    nb = int(np.prod(lead))
    out = torch.full((*lead, layout.nbytes), 0xA5, dtype=torch.uint8)  # poisoned
    err = torch.zeros(1, dtype=torch.int32)
    fn = build("quant", "kv_quantize", kernels.quant_defines(layout, x.dtype, torch.float32))
    fn(grid(nb * layout.num_groups), p(x), p(out), p(err), i64(nb))
    return out, int(err.item())


def emu_dequantize(build, blocks: torch.Tensor, layout: kvcore.QuantLayout) -> torch.Tensor:  # type: ignore[no-untyped-def]
    lead = blocks.shape[:-1]
    nb = int(np.prod(lead))
    out = torch.full((*lead, layout.num_tokens, layout.head_dim), float("nan"))
    fn = build(
        "quant", "kv_dequantize", kernels.quant_defines(layout, torch.float32, torch.float32)
    )
    fn(grid(nb * layout.num_groups), p(blocks), p(out), i64(nb))
    return out


@pytest.mark.parametrize("bits,g,t,axis,meta", LAYOUTS)
def test_quantize_is_bit_identical_to_the_references(emu_build, bits, g, t, axis, meta) -> None:  # type: ignore[no-untyped-def]
    layout = kvcore.QuantLayout(bits, g, t, 64, axis, meta)
    gen = torch.Generator().manual_seed(bits * 100 + g)
    x = torch.randn(3, 2, t, 64, generator=gen) * 3 + 0.5
    x[0, 0, 0, :16] = 1.25  # a constant group: scale 0, codes 0
    x[0, 1, -1, :8] = -0.0  # signed zeros: metadata must be +0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dtype).contiguous()
        got, err = emu_quantize(emu_build, xd, layout)
        assert err == 0
        ref = quant.quantize(xd, layout)
        assert torch.equal(got, ref), f"{dtype}: bytes differ from kvcore.quant"
        if dtype == torch.float32:
            rust = kvcore.quantize(xd.numpy(), layout)
            assert np.array_equal(got.numpy().reshape(-1), np.asarray(rust).reshape(-1))
        deq = emu_dequantize(emu_build, got, layout)
        assert torch.equal(deq, quant.dequantize(ref, layout)), "dequantize not bit-identical"


def test_quantize_reproduces_the_worked_example_of_layouts_md(emu_build) -> None:  # type: ignore[no-untyped-def]
    layout = kvcore.QuantLayout(2, 4, 2, 4, "channel", "float16")
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.5, 0.5, 2.0]])
    got, err = emu_quantize(emu_build, x, layout)
    assert err == 0
    assert bytes(got.tolist()).hex(" ") == "e4 e8 00 3c 00 3c 00 00 00 bc"


@pytest.mark.parametrize(
    "value,meta,code",
    [(float("nan"), "float16", 1), (float("inf"), "float32", 1), (-1e6, "float16", 2)],
)
def test_quantize_reports_the_same_errors(emu_build, value, meta, code) -> None:  # type: ignore[no-untyped-def]
    layout = kvcore.QuantLayout(4, 8, 2, 16, "channel", meta)
    x = torch.rand(2, 16)
    x[1, 3] = value
    _, err = emu_quantize(emu_build, x, layout)
    assert err == code
    with pytest.raises(ValueError):
        quant.quantize(x, layout)


# ------------------------------------------------------------------------------------- merges


def emu_merge(build, x, src, dst, weight, counts, evicted):  # type: ignore[no-untyped-def]
    n, dim = x.shape
    order = torch.sort(dst, stable=True).indices
    s_src, s_w = src[order].contiguous(), weight[order].float().contiguous()
    rows, per = torch.unique_consecutive(dst[order], return_counts=True)
    ip = torch.zeros(len(rows) + 1, dtype=torch.int64)
    ip[1:] = per.cumsum(0)
    removed = kernels._merge._removed(n, src, dst, evicted)
    frac = kernels._merge._mass_frac(n, src, weight, removed)[order].contiguous()
    rem = removed.nonzero().flatten().contiguous()
    out = x.clone()
    c_out = counts.clone()
    fn = build("merge", "kv_merge", {"KV_DT": kernels._DT[x.dtype]})
    total = len(rows) * dim + len(rem)
    fn(
        grid(total),
        p(x),
        p(out),
        p(rows.contiguous()),
        p(ip),
        p(s_src),
        p(s_w),
        p(frac),
        p(counts),
        p(c_out),
        p(rem),
        i64(len(rows)),
        i64(dim),
        i64(len(rem)),
    )
    return out, c_out


def _plans(n: int, gen: np.random.Generator) -> list[kvcore.MergePlan]:
    keys = gen.standard_normal((n, 64)).astype(np.float32)
    keys[10:30] = keys[10] + 0.05 * gen.standard_normal((20, 64)).astype(np.float32)
    attn = gen.random(n).astype(np.float32)
    retained = np.arange(0, n, 3, dtype=np.int64)
    return [
        kvcore.kvmerger_plan(keys, attn, 0.9),
        kvcore.ems_plan(keys, attn, retained, 0.1),
        kvcore.razor_plan(n, sink=4, local_capacity=32),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_matches_mergeplan_and_mergebook(emu_build, dtype) -> None:  # type: ignore[no-untyped-def]
    gen = np.random.default_rng(7)
    n = 96
    for plan in _plans(n, gen):
        assert len(plan.src) > 0
        x = torch.from_numpy(gen.standard_normal((n, 64)).astype(np.float32)).to(dtype)
        src, dst = torch.from_numpy(plan.src), torch.from_numpy(plan.dst)
        w, ev = torch.from_numpy(plan.weight), torch.from_numpy(plan.evicted)
        counts = torch.ones(n)
        out, c_out = emu_merge(emu_build, x, src, dst, w, counts, ev)
        ref, c_ref = kernels.merge_reference(x, src, dst, w, counts, ev)
        # same products and plan-order sums as MergePlan.apply (Rust, float32): exact
        rust = torch.from_numpy(plan.apply(x.float().numpy())).to(dtype)
        torch.testing.assert_close(out, rust, rtol=0, atol=0)
        # torch's index_add may sum in another order: float32 rounding, one ulp of dtype
        torch.testing.assert_close(out, ref)
        book = kvcore.MergeBook(n)
        kept = book.apply(plan)
        assert c_ref is not None
        torch.testing.assert_close(c_out, c_ref, rtol=1e-6, atol=0)
        # MergeBook sums in float64; the kernel's float32 counts agree to float32 rounding
        torch.testing.assert_close(
            c_out[torch.from_numpy(kept)].double(), torch.from_numpy(book.mass), rtol=1e-6, atol=0
        )


# --------------------------------------------------------------------------------------- rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rot", [(64, 64), (128, 64), (256, 256)])
def test_rope_rotation_matches_the_reference(emu_build, dtype, head_dim, rot) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(head_dim + rot)
    pool = torch.randn(16, 8, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(128, generator=gen)[:50]
    delta = torch.randint(-5000, 5000, (50,), generator=gen)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    expected = pool.clone()
    kernels.rotate_slots(expected, slots, delta, inv_freq)  # CPU: the reference
    got = pool.clone()
    fn = emu_build(
        "rope",
        "kv_rope_rotate",
        {"KV_DT": kernels._DT[dtype], "KV_D": head_dim, "KV_HALF": rot // 2},
    )
    fn(grid(50 * rot // 2), p(got), p(slots), p(delta), p(inv_freq.contiguous()), i64(50))
    assert not torch.equal(got, pool)
    if dtype == torch.float32:
        # float64 math rounded once to float32 in both: exact up to libm's cos/sin
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    else:
        # the kernel rounds float64 -> float32 -> 16 bits (two roundings), the reference once:
        # at most one unit in the last place of the 16-bit type
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got.float(), expected.float(), rtol=eps, atol=1e-3)
