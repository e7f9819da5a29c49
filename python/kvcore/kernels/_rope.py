"""RoPE re-rotation of kept keys after eviction (``rope.cu``).

Part of :mod:`kvcore.kernels`, which re-exports its public functions; the kernel path is
taken when ``kvcore.kernels.uses_kernel`` says so and launches through ``kvcore.kernels._launch``
(looked up at call time, so the CPU emulation can replace both).
"""

from __future__ import annotations

import numpy as np
import torch

from kvcore import _args
from kvcore import kernels as _k
from kvcore.kernels import _DT, _THREADS, _blocks, _check, _ptr


def rotate_reference(
    keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """Keys ``(n, D)`` rotated by ``delta`` positions (rotate_half convention, float64), the
    rule of ``kvcore.cache.rotate_keys``."""
    rot = inv_freq.numel() * 2
    freqs = delta.to(torch.float64)[:, None] * inv_freq.to(keys.device, torch.float64)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    k = keys[:, :rot].to(torch.float64)
    half = rot // 2
    rotated_half = torch.cat([-k[:, half:], k[:, :half]], dim=-1)
    out = keys.clone()
    out[:, :rot] = (k * emb.cos() + rotated_half * emb.sin()).to(keys.dtype)
    return out


def rotate_slots(
    pool: torch.Tensor, slots: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor
) -> None:
    """Re-rotates the keys at ``slots`` of a paged pool in place by ``delta`` positions.

    Args:
        pool: ``(num_blocks, block_size, head_dim)`` float32, float16 or bfloat16.
        slots: ``(n,)`` int64 distinct slots; delta: ``(n,)`` int64 new minus old position.
        inv_freq: ``(R / 2,)`` float32, this layer's RoPE frequencies (scaling folded in).
    """
    d = pool.shape[-1]
    rows = pool.view(-1, d)
    if 2 * inv_freq.numel() > d:
        raise ValueError(f"inv_freq has {inv_freq.numel()} entries; at most head_dim/2 = {d // 2}")
    if not _k.uses_kernel(pool, slots, delta):
        rows[slots] = rotate_reference(rows[slots], delta, inv_freq)
        return
    inv = inv_freq.to(pool.device, torch.float32).contiguous()
    _check(pool.device, pool=pool, slots=slots, delta=delta)
    half = inv.numel()
    n = slots.numel()
    if n and half:
        _k._launch(
            pool.device,
            "rope",
            {"KV_DT": _DT[pool.dtype], "KV_D": d, "KV_HALF": half},
            "kv_rope_rotate",
            (_blocks(n * half),),
            (_THREADS,),
            (_ptr(pool), _ptr(slots), _ptr(delta), _ptr(inv), np.int64(n)),
        )


# Every public function checks its tensor arguments first (TypeError, not AttributeError).
_args.check_module(globals(), __name__)
