"""Compaction: one launch moves the kept rows of every pool tensor (``compact.cu``).

Part of :mod:`kvcore.kernels`, which re-exports its public functions; the kernel path is
taken when ``kvcore.kernels.uses_kernel`` says so and launches through ``kvcore.kernels._launch``
(looked up at call time, so the CPU emulation can replace both).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvcore import _args
from kvcore import kernels as _k
from kvcore.kernels import _THREADS, _check, _ptr


def _slot_pieces(t: torch.Tensor, num_slots: int, name: str) -> tuple[int, int, int, int, int]:
    """Where one tensor of :func:`compact_pools` keeps each slot's piece, in bytes:
    ``(base address, piece, page stride, slot stride, slots per page)``.

    A contiguous tensor has one dense row per slot (slots per page 1). A strided view
    ``(num_blocks, block_size, width)`` with a contiguous last dimension (one region of quantized
    pages, ``QuantizedFormat.slot_views``) has piece ``width`` at ``block * stride(0) + offset *
    stride(1)``.

    Raises:
        ValueError: a contiguous tensor whose size is not a multiple of ``num_slots``, or a
            strided one of another form.
    """
    elt = t.element_size()
    if t.is_contiguous():
        if t.numel() % num_slots:
            raise ValueError(f"{name} has {t.numel()} elements, not a multiple of {num_slots}")
        row = t.numel() * elt // num_slots
        return t.data_ptr(), row, row, 0, 1
    if t.dim() != 3 or t.stride(2) != 1 or t.shape[0] * t.shape[1] != num_slots:
        raise ValueError(
            f"{name} must be contiguous or a (num_blocks, block_size, width) view with a "
            f"contiguous last dimension over {num_slots} slots, got shape {tuple(t.shape)} "
            f"strides {t.stride()}"
        )
    width = t.shape[2] * elt
    return t.data_ptr(), width, t.stride(0) * elt, t.stride(1) * elt, t.shape[1]


def compact_geometry(
    tensors: Sequence[torch.Tensor], num_slots: int
) -> tuple[list[int], list[list[int]], list[int]]:
    """The per-tensor arguments of ``kv_compact``: base addresses, ``[piece, page, step,
    slots per page]`` in units, and the unit (the widest of 16, 8, 4, 2, 1 bytes dividing the
    piece, the address and both strides, so every access is aligned)."""
    ptrs, geom, units = [], [], []
    for i, t in enumerate(tensors):
        base, piece, page, step, per_page = _slot_pieces(t, num_slots, f"tensors[{i}]")
        u = 16
        while piece % u or base % u or page % u or step % u:
            u //= 2
        ptrs.append(base)
        geom.append([piece // u, page // u, step // u, per_page])
        units.append(u)
    return ptrs, geom, units


def compact_pools(
    tensors: Sequence[torch.Tensor],
    plan_of: Sequence[int],
    src: torch.Tensor,
    dst: torch.Tensor,
    indptr: torch.Tensor,
    num_slots: int,
) -> None:
    """Applies compaction plans in place: ``piece[dst[i]] = piece[src[i]]`` for every tensor.

    Each tensor holds one piece per slot (``slot = block_id * block_size + offset``): a row of
    a contiguous tensor, such as a K/V pool ``(num_blocks, block_size, head_dim)`` or per-slot
    state (positions ``(num_slots,)`` int64, scores float32, valid bool, merge counts), or one
    region of quantized pages as a strided view ``(num_blocks, block_size, width)`` uint8
    (a token's codes, scales or zero points, docs/layouts.md). All tensors of a step move in
    one launch.

    Args:
        tensors: contiguous tensors whose sizes are multiples of ``num_slots`` slots, or
            strided ``(num_blocks, block_size, width)`` views with a contiguous last dimension
            and ``num_blocks * block_size = num_slots``.
        plan_of: for each tensor, the plan (e.g. its layer) whose moves apply to it.
        src, dst: ``(num_moves,)`` int64 slots, the concatenated plans (allocator contract,
            docs/allocator.md: no move reads a slot an earlier move wrote).
        indptr: ``(num_plans + 1,)`` int64, plan ``p`` is moves ``indptr[p]:indptr[p+1]``.
        num_slots: slots per tensor.

    Raises:
        TypeError: ``src``, ``dst`` or ``indptr`` is not a 1-d int64 tensor.
        ValueError: a tensor of another form, a plan index out of range, or a count mismatch.
    """
    num_slots = _args.count(num_slots, "num_slots")
    if len(tensors) != len(plan_of):
        raise ValueError(f"{len(tensors)} tensors but {len(plan_of)} plan_of entries")
    if num_slots <= 0:
        raise ValueError(f"num_slots must be positive, got {num_slots}")
    if not tensors:
        return
    for name, a in (("src", src), ("dst", dst), ("indptr", indptr)):
        if a.dtype != torch.int64 or a.dim() != 1:
            raise TypeError(f"{name} must be a 1-d int64 tensor, got {a.dtype} {tuple(a.shape)}")
    bad = [p for p in plan_of if not 0 <= p < len(indptr) - 1]
    if bad:
        raise ValueError(f"plan_of entry {bad[0]} is not a plan of indptr (0..{len(indptr) - 2})")
    ptrs, geom, units = compact_geometry(tensors, num_slots)  # validates every tensor
    if not _k.uses_kernel(*tensors, src, dst, indptr):
        for t, p, (_, _, _, per_page) in zip(tensors, plan_of, geom, strict=True):
            lo, hi = int(indptr[p]), int(indptr[p + 1])
            s, d = src[lo:hi], dst[lo:hi]
            if per_page == 1:
                rows = t.view(num_slots, -1)
                rows[d] = rows[s]
            else:  # a strided region of quantized pages: (block, offset) indexing
                t[d // per_page, d % per_page] = t[s // per_page, s % per_page]
        return
    device = tensors[0].device
    _check(device, src=src, dst=dst, indptr=indptr)
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"tensors[{i}] is on {t.device}, expected {device}")
    dev_ptrs = torch.tensor(ptrs, dtype=torch.int64).to(device)
    dev_geom = torch.tensor(geom, dtype=torch.int64).to(device)  # (num_tensors, 4)
    small = torch.tensor([units, list(plan_of)], dtype=torch.int32).to(device)
    _k._launch(
        device,
        "compact",
        {},
        "kv_compact",
        (1, len(tensors)),  # one CTA per tensor walks its plan in chunks (compact.cu)
        (_THREADS,),
        (
            _ptr(dev_ptrs),
            _ptr(dev_geom),
            _ptr(small[0]),
            _ptr(small[1]),
            _ptr(src),
            _ptr(dst),
            _ptr(indptr),
            np.int32(len(tensors)),
        ),
    )


# Every public function checks its tensor arguments first (TypeError, not AttributeError).
_args.check_module(globals(), __name__)
