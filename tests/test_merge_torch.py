"""The torch merge references (kvcore.merge) against the Rust plans and MiniCache store.

torch is a test dependency: CI installs it, so this module imports it directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvcore
from kvcore import merge as tm


@pytest.mark.parametrize("seed", range(5))
def test_apply_plan_matches_rust(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, d = 64, 16
    keys = rng.standard_normal((n, d)).astype(np.float32)
    keys[1::2] = keys[::2] + 0.01 * rng.standard_normal((n // 2, d)).astype(np.float32)
    attn = rng.random(n).astype(np.float32)
    plans = [
        kvcore.kvmerger_plan(keys, attn, 0.9),
        kvcore.ems_plan(keys, attn, np.arange(0, n, 3), 0.2),
        kvcore.razor_plan(n, sink=2, local_capacity=20),
        kvcore.cam_plan(attn, np.arange(5, 40, 4), rng.random(9).astype(np.float32), 3),
    ]
    for p in plans:
        assert len(p) > 0
        want = p.apply(keys)
        got = tm.apply_plan(p, torch.from_numpy(keys)).numpy()
        # float32 sums in a different order: a few ulps apart
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        kept = p.kept_positions()
        assert got[kept].shape == (len(kept), d)


def test_minicache_matches_rust() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((100, 32)).astype(np.float32)
    b = (a + 0.5 * rng.standard_normal((100, 32))).astype(np.float32)
    a[3] = 0  # a zero row has no direction
    rust = kvcore.minicache_merge(a, b, t=0.6, retention_ratio=0.1)
    ref = tm.minicache_merge(torch.from_numpy(a), torch.from_numpy(b), 0.6, 0.1)
    np.testing.assert_allclose(ref.direction.numpy(), rust.direction, atol=1e-6)
    np.testing.assert_allclose(ref.angle.numpy(), rust.angle, atol=1e-6)
    assert ref.retained.tolist() == rust.retained.tolist()
    for which in (0, 1):
        np.testing.assert_allclose(
            tm.minicache_restore(ref, which).numpy(), rust.restore(which), atol=1e-5
        )
    with pytest.raises(ValueError, match="which must be 0"):
        tm.minicache_restore(ref, 3)


def test_log_count_bias_makes_a_merged_slot_weigh_like_its_tokens() -> None:
    """Razor's compensation token with the bias equals attention over N_d copies of it."""
    rng = np.random.default_rng(2)
    n, d = 40, 16
    k = rng.standard_normal((n, d)).astype(np.float32)
    v = rng.standard_normal((n, d)).astype(np.float32)
    q = torch.from_numpy(rng.standard_normal((3, d)).astype(np.float32))
    plan = kvcore.razor_plan(n, sink=2, local_capacity=10)
    book = kvcore.MergeBook(n)
    kept = book.apply(plan)
    k2, v2 = plan.apply(k)[kept], plan.apply(v)[kept]
    bias = torch.from_numpy(book.log_count_bias())
    got = tm.attention_with_bias(q, torch.from_numpy(k2), torch.from_numpy(v2), bias)
    m = int(round(float(book.mass[2])))  # the compensation token sits after the 2 sinks
    assert m == n - (10 - 2 - 1) - 2
    reps = np.ones(len(kept), dtype=np.int64)
    reps[2] = m
    k_rep = torch.from_numpy(np.repeat(k2, reps, axis=0))
    v_rep = torch.from_numpy(np.repeat(v2, reps, axis=0))
    want = tm.attention_with_bias(q, k_rep, v_rep, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # without the bias the merged slot is under-weighted: the outputs differ
    plain = tm.attention_with_bias(q, torch.from_numpy(k2), torch.from_numpy(v2), None)
    assert not torch.allclose(plain, want, atol=1e-3)
