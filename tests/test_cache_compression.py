"""KVCache compression internals: the kernel dispatch of compaction, re-rotation and merges,
the merge methods (EMS, KVMerger, CaM) and per-head budgets for every registry policy
(tiny random shapes; the rest of the cache is in tests/test_cache.py)."""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch cache needs torch (pip install .[torch])")

from kvcore import kernels  # noqa: E402
from kvcore.cache import KVCache, Schedule, rotate_keys  # noqa: E402
from kvcore.scoring import get  # noqa: E402

L, H, D, BS = 2, 2, 8, 4
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))


def kv(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, H, n, D, generator=g)


def stream_slots(c: KVCache, layer: int) -> torch.Tensor:
    idx, _ = c._slots(c.tables[:, layer].reshape(-1), c.lengths[:, layer].reshape(-1))
    return idx


class Spy:
    """Wraps a kernels function, records its arguments and calls through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.fn = getattr(kernels, name)
        self.calls: list[tuple[Any, ...]] = []
        monkeypatch.setattr(kernels, name, self)

    def __call__(self, *args: Any, **kw: Any) -> Any:
        self.calls.append(args)
        return self.fn(*args, **kw)


# ------------------------------------------------------------------ 1. kernel dispatch


def test_compaction_moves_pools_and_slot_state_in_one_compact_pools_call(monkeypatch):
    spy = Spy(monkeypatch, "compact_pools")
    c = KVCache(L, H, D, block_size=BS, capacity=16, policy=get("knorm", 3, skip_layers=()))
    k, v = kv(1, 10), kv(1, 10, 1)
    for layer in range(L):
        c.update(layer, k, v)
    c.flush()
    assert c.num_compressions == L
    assert len(spy.calls) == L  # one call per compression, everything in it
    for tensors, plan_of, src, _dst, indptr, num_slots in spy.calls:
        want = [c.k_pool, c.v_pool, c.slot_pos, c.slot_valid, c.slot_score, c.slot_count]
        assert len(tensors) == len(want) and all(a is b for a, b in zip(tensors, want, strict=True))
        assert list(plan_of) == [0] * 6 and indptr.tolist() == [0, len(src)]
        assert num_slots == c.slot_pos.numel() and len(src) > 0
    # and the moves are right: the kept keys (lowest norms) with their positions
    for layer in range(L):
        idx = stream_slots(c, layer)
        for h in range(H):
            kept = torch.sort(torch.topk(-k[0, h].norm(dim=-1), 3).indices).values
            torch.testing.assert_close(c.k_pool.view(-1, D)[idx[h]], k[0, h, kept])
            torch.testing.assert_close(c.v_pool.view(-1, D)[idx[h]], v[0, h, kept])
            assert c.slot_pos[idx[h]].tolist() == kept.tolist()
            assert c.slot_valid[idx[h]].all() and (c.slot_count[idx[h]] == 1).all()


def test_compact_positions_rerotate_through_rotate_slots(monkeypatch):
    spy = Spy(monkeypatch, "rotate_slots")
    c = KVCache(
        1,
        H,
        D,
        block_size=BS,
        capacity=16,
        policy=get("streaming", 4, sinks=1),
        positions="compact",
        rope=INV_FREQ,
    )
    k = kv(1, 8)
    c.update(0, k, k)
    c.flush()
    assert len(spy.calls) == 1
    pool, slots, delta, _ = spy.calls[0]
    assert pool is c.k_pool and slots.numel() == H * 4
    kept = torch.tensor([0, 5, 6, 7])
    assert delta.tolist() == (torch.arange(4) - kept).repeat(H).tolist()
    idx = stream_slots(c, 0)
    for h in range(H):
        want = rotate_keys(k[0, h, kept], torch.arange(4) - kept, INV_FREQ)
        torch.testing.assert_close(c.k_pool.view(-1, D)[idx[h]], want)


def test_quantized_compact_positions_rotate_then_reencode(monkeypatch):
    spy = Spy(monkeypatch, "rotate_slots")
    kw: dict[str, Any] = dict(
        block_size=BS,
        capacity=16,
        policy=get("streaming", 4, sinks=1),
        positions="compact",
        rope=INV_FREQ,
    )
    c = KVCache(1, H, D, kv_format="int8", **kw)
    k = kv(1, 8)
    c.update(0, k, k)
    c.flush()
    assert spy.calls == []  # uint8 pages: read, rotate, write back
    idx = stream_slots(c, 0)
    kept = torch.tensor([0, 5, 6, 7])
    for h in range(H):
        want = rotate_keys(k[0, h, kept], torch.arange(4) - kept, INV_FREQ)
        torch.testing.assert_close(c._read(c.k_pool, idx[h]), want, atol=0.05, rtol=0.05)


def test_rope_must_fit_the_head_dim():
    with pytest.raises(ValueError, match=r"rope\[0\] must be a 1-d inv_freq tensor of at most"):
        KVCache(1, H, D, positions="compact", rope=torch.ones(D))


def test_ems_merge_goes_through_apply_merge(monkeypatch):
    spy = Spy(monkeypatch, "apply_merge")
    c = KVCache(
        1,
        H,
        D,
        block_size=BS,
        capacity=16,
        policy=get("knorm", 4, skip_layers=()),
        merge="ems",
        merge_threshold=-1.0,
    )
    c.update(0, kv(1, 12, 1), kv(1, 12, 2))
    c.flush()
    # per stream: values with counts, keys without
    assert len(spy.calls) == 2 * H
    assert sum(1 for a in spy.calls if len(a) > 4 and a[4] is not None) == H
    assert c.slot_count[stream_slots(c, 0)].sum().item() == H * 12


@pytest.mark.skipif(shutil.which("g++") is None, reason="the kernel emulation needs g++")
def test_cache_through_the_emulated_cuda_kernels_equals_the_torch_path(monkeypatch):
    """The CUDA path of compact_pools, rotate_slots and apply_merge (host logic included),
    emulated on the CPU (tests/emu_launch.py), gives the cache the torch path gives."""

    def run() -> KVCache:
        c = KVCache(
            L,
            H,
            D,
            block_size=BS,
            capacity=24,
            policy=get("knorm", 5, skip_layers=()),
            schedule=Schedule.decode(2),
            positions="compact",
            rope=INV_FREQ,
            merge="ems",
            merge_threshold=0.0,
        )
        for layer in range(L):
            c.update(layer, kv(1, 11, layer), kv(1, 11, 5 + layer))
        for step in range(4):
            for layer in range(L):
                c.update(layer, kv(1, 1, 20 + step), kv(1, 1, 30 + step))
        c.flush()
        return c

    ref = run()
    from emu_launch import emulated_launch

    launches: list[str] = []

    def counted(device, name, *a, **kw):  # noqa: ANN001
        launches.append(name)
        return emulated_launch(device, name, *a, **kw)

    monkeypatch.setattr(kernels, "_launch", counted)
    monkeypatch.setattr(kernels, "uses_kernel", lambda *t: True)
    got = run()
    assert {"compact", "rope", "merge"} <= set(launches)
    assert np.array_equal(got.lengths, ref.lengths)
    for layer in range(L):
        a, b = stream_slots(got, layer), stream_slots(ref, layer)
        torch.testing.assert_close(got.k_pool.view(-1, D)[a], ref.k_pool.view(-1, D)[b])
        torch.testing.assert_close(got.v_pool.view(-1, D)[a], ref.v_pool.view(-1, D)[b])
        assert torch.equal(got.slot_pos[a], ref.slot_pos[b])
        torch.testing.assert_close(got.slot_count[a], ref.slot_count[b])
