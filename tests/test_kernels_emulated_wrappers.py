"""The CUDA path of every kvcore.kernels function, host logic included, run on the CPU:
``_launch`` is replaced by the g++ emulation (tests/emu_launch.py) and ``uses_kernel`` by
True. Compared with the torch references like tests/gpu does on a GPU."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the kernel references need torch")

import kvcore  # noqa: E402
from kvcore import kernels, quant  # noqa: E402
from kvcore.attention import paged_attention  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the emulation")


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    from emu_launch import emulated_launch

    monkeypatch.setattr(kernels, "_launch", emulated_launch)
    monkeypatch.setattr(kernels, "uses_kernel", lambda *t: True)


def test_compact_pools_kernel_path(emulated: None) -> None:
    gen = torch.Generator().manual_seed(0)
    bs, num_blocks = 16, 32
    num_slots = bs * num_blocks
    alloc = kvcore.BlockAllocator(num_blocks, bs)
    tables = alloc.create_tables(3)
    for t in tables:
        alloc.append(int(t), 70)
    keep = [sorted(torch.randperm(70, generator=gen)[:30].tolist()) for _ in range(3)]
    src, dst, _ = alloc.compact_batch(
        tables, np.array([0, 30, 60, 90]), np.array(sum(keep, []), dtype=np.int64)
    )
    src_t, dst_t = torch.from_numpy(src), torch.from_numpy(dst)
    tensors = [
        torch.randn(num_blocks, bs, 64, generator=gen).half(),
        torch.randn(num_blocks, bs, 24, generator=gen).bfloat16(),  # 48-byte rows: 16-byte units
        torch.randint(0, 99, (num_slots,), generator=gen),
        torch.rand(num_slots, generator=gen) > 0.5,  # 1-byte rows
    ]
    expected = [t.clone() for t in tensors]
    for e in expected:
        rows = e.view(num_slots, -1)
        rows[dst_t] = rows[src_t]
    kernels.compact_pools(tensors, [0] * 4, src_t, dst_t, torch.tensor([0, len(src)]), num_slots)
    for t, e in zip(tensors, expected, strict=True):
        assert torch.equal(t, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_dequantize_kernel_path(emulated: None, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 3, 16, 64, generator=gen) * 4).to(dtype)
    for layout in (
        kvcore.QuantLayout(2, 16, 16, 64, "token"),
        kvcore.QuantLayout(4, 32, 16, 64, "channel", "float32"),
        kvcore.QuantLayout(8, 8, 16, 64, "channel"),
    ):
        out = torch.full((2, 3, layout.nbytes), 0xA5, dtype=torch.uint8)
        got = kernels.quantize(x, layout, out=out)
        assert got is out and torch.equal(got, quant.quantize(x, layout))
        back = kernels.dequantize(got, layout)
        assert torch.equal(back, quant.dequantize(got, layout))
        half = kernels.dequantize(got, layout, torch.float16)
        assert torch.equal(half, quant.dequantize(got, layout).half())


def test_quantize_kernel_path_raises_the_reference_errors(emulated: None) -> None:
    layout = kvcore.QuantLayout(4, 16, 2, 32)
    x = torch.rand(2, 32)
    x[0, 3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        kernels.quantize(x, layout)
    x[0, 3] = -1e5
    with pytest.raises(ValueError, match="group minimum does not fit the float16 metadata"):
        kernels.quantize(x, layout)
    with pytest.raises(ValueError, match="must be contiguous"):
        kernels.quantize(torch.rand(32, 2).T, layout)


def test_apply_merge_kernel_path(emulated: None) -> None:
    rng = np.random.default_rng(2)
    n = 80
    keys = rng.standard_normal((n, 32)).astype(np.float32)
    attn = rng.random(n).astype(np.float32)
    for plan in (
        kvcore.ems_plan(keys, attn, np.arange(0, n, 5), 0.1),
        kvcore.razor_plan(n, 4, 24),
    ):
        x = torch.from_numpy(rng.standard_normal((n, 32)).astype(np.float32)).bfloat16()
        args = [torch.from_numpy(a) for a in (plan.src, plan.dst, plan.weight)]
        counts = torch.from_numpy(rng.integers(1, 5, n).astype(np.float32))
        ev = torch.from_numpy(plan.evicted)
        got, c_got = kernels.apply_merge(x, *args, counts, ev)
        ref, c_ref = kernels.merge_reference(x, *args, counts, ev)
        torch.testing.assert_close(got, ref)
        assert c_got is not None and c_ref is not None
        torch.testing.assert_close(c_got, c_ref, rtol=1e-6, atol=0)
        assert torch.equal(got, torch.from_numpy(plan.apply(x.float().numpy())).bfloat16())


def test_rotate_slots_kernel_path(emulated: None) -> None:
    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(8, 16, 128, generator=gen)
    slots = torch.randperm(128, generator=gen)[:40]
    delta = torch.randint(-999, 999, (40,), generator=gen)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    expected = pool.clone()
    expected.view(-1, 128)[slots] = kernels.rotate_reference(pool.view(-1, 128)[slots], delta, inv)
    kernels.rotate_slots(pool, slots, delta, inv)
    torch.testing.assert_close(pool, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("quantized", [False, True])
def test_decode_attention_kernel_path(emulated: None, quantized: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    b, h, group, d, bs = 1, 2, 2, 64, 16
    lens = [45, 18]
    num_blocks = 1 + 3 + 2
    table = torch.tensor([[1, 2, 3], [4, 5, 0]])
    k = torch.randn(num_blocks, bs, d, generator=gen).half()
    v = torch.randn(num_blocks, bs, d, generator=gen).half()
    kl = vl = None
    if quantized:
        kl = kvcore.QuantLayout(4, 16, bs, d, "token")
        vl = kvcore.QuantLayout(2, 32, bs, d, "channel")
        k, v = quant.quantize(k, kl), quant.quantize(v, vl)
    query = (torch.randn(b, h * group, 2, d, generator=gen) * 0.5).half()
    lengths = torch.tensor(lens)
    bias = torch.log(torch.randint(1, 4, (num_blocks * bs,), generator=gen).float())
    kw = dict(slot_bias=bias, k_layout=kl, v_layout=vl)
    got, lse = kernels.decode_attention(
        query, k, v, table, lengths, num_splits=2, return_lse=True, **kw
    )  # type: ignore[arg-type]
    ref, ref_lse = paged_attention(query, k, v, table, lengths, return_lse=True, **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    plain = kernels.decode_attention(query, k, v, table, lengths, num_splits=2, **kw)  # type: ignore[arg-type]
    assert torch.equal(plain, got)


@pytest.mark.parametrize(
    "kw",
    # per-token pages (key_quant="token"): their pieces are what the launch moves
    [
        dict(kv_format="int4", key_quant="token"),
        dict(kv_format="int8", key_quant="token", evicted_format="int2"),
    ],
    ids=["int4-pages", "int8-pages-mikv2-tier"],
)
def test_quantized_cache_compaction_kernel_path(
    monkeypatch: pytest.MonkeyPatch, kw: dict[str, str]
) -> None:
    """A cache of quantized pages (and a MiKV low tier) compacts through the kv_compact launch:
    its pieces travel as strided views, and the pools end byte-equal to the torch path's."""
    from emu_launch import emulated_launch

    from kvcore.cache import KVCache, Schedule
    from kvcore.scoring import get

    def run() -> KVCache:
        c = KVCache(
            2,
            2,
            32,
            block_size=8,
            policy=get("streaming", 16, sinks=4),
            schedule=Schedule.decode(4),
            **kw,  # type: ignore[arg-type]
        )
        g = torch.Generator().manual_seed(7)
        for layer in range(2):
            c.update(layer, torch.randn(2, 2, 40, 32, generator=g), torch.randn(2, 2, 40, 32))
        for _ in range(6):
            for layer in range(2):
                c.update(layer, torch.randn(2, 2, 1, 32, generator=g), torch.randn(2, 2, 1, 32))
        c.flush()
        return c

    torch.manual_seed(0)
    ref = run()
    strided: list[int] = []

    def launch(device, name, defines, kernel, grid, block, args):  # type: ignore[no-untyped-def]
        if name == "compact":
            strided.append(grid[1])
        return emulated_launch(device, name, defines, kernel, grid, block, args)

    monkeypatch.setattr(kernels, "_launch", launch)
    monkeypatch.setattr(kernels, "uses_kernel", lambda *t: True)
    torch.manual_seed(0)
    got = run()
    assert 6 in strided, "K and V pages, three pieces each, in one launch"
    assert got.num_compressions == ref.num_compressions > 0
    pools = ["k_pool", "v_pool", "slot_pos", "slot_valid"]
    if "evicted_format" in kw:
        pools += ["lo_k_pool", "lo_v_pool", "lo_slot_pos", "lo_slot_valid"]
    for name in pools:
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
