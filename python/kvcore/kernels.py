"""CUDA kernels through CuPy, with the torch reference as the CPU path.

Every public function here runs a kernel from ``kvcore/cuda/*.cu`` (the top-level ``cuda/`` of
the repository) when its tensors are on a CUDA device and CuPy is installed, and the torch
reference otherwise. ``import kvcore.kernels`` imports torch but never CuPy: CuPy is imported
on the first launch.

Loading (STYLE.md item 12): the source of a kernel is a ``#define`` preamble (its compile-time
constants), ``kvcore_common.cuh`` and the ``.cu`` file; :func:`_module` memoizes one
``cupy.RawModule`` per (device, file, defines). Every launch checks device and contiguity,
passes scalars as fixed-width numpy integers and runs on torch's current stream.

Kernels and their references:

========================  ==========================================  ==================
function                  kernel (``cuda/``)                          reference
========================  ==========================================  ==================
:func:`compact_pools`     ``compact.cu`` (all tensors, one launch)    ``rows[dst] = rows[src]``
:func:`quantize`          ``quant.cu`` ``kv_quantize``                ``kvcore.quant.quantize``
:func:`dequantize`        ``quant.cu`` ``kv_dequantize``              ``kvcore.quant.dequantize``
:func:`apply_merge`       ``merge.cu``                                :func:`merge_reference`
:func:`rotate_slots`      ``rope.cu``                                 :func:`rotate_reference`
:func:`decode_attention`  ``decode_attention.cu`` (split-K)           ``paged_attention``
========================  ==========================================  ==================

``paged_attention`` is :func:`kvcore.attention.paged_attention`, the one torch reference of the
attention (also the CPU path of ``KVCache.attend``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, cast, overload

import numpy as np
import torch

from kvcore import _args
from kvcore.attention import paged_attention

__all__ = [
    "KERNEL_FILES",
    "SOURCE_DIR",
    "apply_merge",
    "attention_defines",
    "compact_geometry",
    "compact_pools",
    "cupy_available",
    "decode_attention",
    "dequantize",
    "kernel_source",
    "merge_reference",
    "nvrtc_compile",
    "quantize",
    "rotate_reference",
    "rotate_slots",
    "uses_kernel",
]

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
KERNEL_FILES = ("compact", "quant", "merge", "rope", "decode_attention")

_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_THREADS = 256


class Layout(Protocol):
    """What the kernels read of a :class:`kvcore.QuantLayout` (docs/layouts.md)."""

    @property
    def bits(self) -> int: ...
    @property
    def group_size(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def axis(self) -> str: ...
    @property
    def meta_dtype(self) -> str: ...
    @property
    def nbytes(self) -> int: ...


# --------------------------------------------------------------------------------------------
# Loading


def kernel_source(name: str, defines: Mapping[str, int]) -> str:
    """The full source of ``cuda/<name>.cu``: the ``#define`` preamble, the common helpers,
    the kernel file. This exact text is what NVRTC (through CuPy) and the CPU emulation
    compile."""
    if name not in KERNEL_FILES:
        raise ValueError(f"unknown kernel file {name!r}; expected one of {KERNEL_FILES}")
    pre = "".join(f"#define {k} {int(v)}\n" for k, v in sorted(defines.items()))
    common = (SOURCE_DIR / "kvcore_common.cuh").read_text()
    return pre + common + (SOURCE_DIR / f"{name}.cu").read_text()


def nvrtc_compile(name: str, defines: Mapping[str, int], arch: str = "sm_80") -> bytes:
    """Compiles a kernel file to PTX with NVRTC (no GPU needed; ``cuda-bindings`` from PyPI).

    Raises:
        RuntimeError: the compilation failed; the message holds NVRTC's log.
    """
    from cuda.bindings import nvrtc  # optional: installed with torch's CUDA wheels

    src = kernel_source(name, defines).encode()
    err, prog = nvrtc.nvrtcCreateProgram(src, f"{name}.cu".encode(), 0, [], [])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"nvrtcCreateProgram failed: {err}")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
        (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        if res != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(
                f"NVRTC failed on {name}.cu for {arch}:\n{log.decode(errors='replace')}"
            )
        _, size = nvrtc.nvrtcGetPTXSize(prog)
        ptx = b" " * size
        nvrtc.nvrtcGetPTX(prog, ptx)
        return bytes(ptx)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


@functools.cache
def cupy_available() -> bool:
    """True when CuPy imports (checked once)."""
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def uses_kernel(*tensors: torch.Tensor) -> bool:
    """True when the CUDA kernels run for these tensors: all on CUDA, and CuPy present."""
    return all(t.is_cuda for t in tensors) and cupy_available()


@functools.cache
def _module(device: int, name: str, defines: tuple[tuple[str, int], ...]) -> Any:
    import cupy

    with cupy.cuda.Device(device):
        return cupy.RawModule(code=kernel_source(name, dict(defines)), options=("-std=c++17",))


def _launch(
    device: torch.device,
    name: str,
    defines: Mapping[str, int],
    kernel: str,
    grid: tuple[int, ...],
    block: tuple[int, ...],
    args: tuple[Any, ...],
) -> None:
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    fn = _module(index, name, tuple(sorted(defines.items()))).get_function(kernel)
    # CuPy would otherwise switch torch's current device and launch on its own stream.
    with cupy.cuda.Device(index):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
        with stream:
            fn(grid, block, args)


def _ptr(t: torch.Tensor | None) -> np.uint64:
    """A device address as the 8-byte scalar a kernel pointer parameter expects."""
    return cast(np.uint64, np.uint64(0 if t is None else t.data_ptr()))


def _check(device: torch.device, **tensors: torch.Tensor | None) -> None:
    """Every launch: same device, contiguous (a strided tensor would be read as dense)."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def _blocks(n: int) -> int:
    return max(1, (n + _THREADS - 1) // _THREADS)


# --------------------------------------------------------------------------------------------
# 1. Compaction


def _slot_pieces(t: torch.Tensor, num_slots: int, name: str) -> tuple[int, int, int, int, int]:
    """Where one tensor of :func:`compact_pools` keeps each slot's piece, in bytes:
    ``(base address, piece, page stride, slot stride, slots per page)``.

    A contiguous tensor has one dense row per slot (slots per page 1). A strided view
    ``(num_blocks, block_size, width)`` with a contiguous last dimension (one region of quantized
    pages, ``KVCache._slot_views``) has piece ``width`` at ``block * stride(0) + offset *
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
    if not uses_kernel(*tensors, src, dst, indptr):
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
    widest = max(g[0] for g in geom)
    _launch(
        device,
        "compact",
        {},
        "kv_compact",
        (_blocks(widest), len(tensors)),
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


# --------------------------------------------------------------------------------------------
# 2. Quantization


def quant_defines(layout: Layout, in_dtype: torch.dtype, out_dtype: torch.dtype) -> dict[str, int]:
    """The preamble of ``quant.cu`` for one layout."""
    return {
        "KV_BITS": layout.bits,
        "KV_G": layout.group_size,
        "KV_T": layout.num_tokens,
        "KV_D": layout.head_dim,
        "KV_AXIS_TOKEN": int(layout.axis == "token"),
        "KV_META_F16": int(layout.meta_dtype == "float16"),
        "KV_IN_DT": _DT[in_dtype],
        "KV_OUT_DT": _DT[out_dtype],
    }


_QUANT_ERRORS = (
    (1, "input contains a non-finite value (NaN or inf)"),
    (2, "a group minimum does not fit the {meta} metadata"),
    (4, "a group range overflows float32"),
    (8, "a group range gives a scale that does not fit the {meta} metadata"),
)


def quantize(x: torch.Tensor, layout: Layout, out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantizes blocks, bit-identical to :func:`kvcore.quant.quantize` (docs/layouts.md).

    Args:
        x: ``(..., num_tokens, head_dim)`` float32, float16 or bfloat16.
        layout: a :class:`kvcore.QuantLayout`.
        out: optional preallocated ``(..., layout.nbytes)`` uint8 result (CUDA path).

    Returns:
        ``(..., layout.nbytes)`` uint8 on ``x``'s device.

    Raises:
        ValueError: a non-finite value or metadata overflow (same messages as the reference).
    """
    if not uses_kernel(x):
        from kvcore import quant

        return quant.quantize(x, layout)  # type: ignore[arg-type]
    t, d = layout.num_tokens, layout.head_dim
    if x.dim() < 2 or tuple(x.shape[-2:]) != (t, d):
        raise ValueError(
            f"x must have shape (..., num_tokens={t}, head_dim={d}), got {tuple(x.shape)}"
        )
    if x.dtype not in _DT:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    _check(x.device, x=x)
    lead = tuple(x.shape[:-2])
    nb = math.prod(lead)
    if out is None:
        out = torch.empty(*lead, layout.nbytes, dtype=torch.uint8, device=x.device)
    elif out.shape != (*lead, layout.nbytes) or out.dtype != torch.uint8:
        raise ValueError(
            f"out must be uint8 {(*lead, layout.nbytes)}, got {out.dtype} {tuple(out.shape)}"
        )
    _check(x.device, out=out)
    err = torch.zeros(1, dtype=torch.int32, device=x.device)
    ng = nb * t * d // layout.group_size
    _launch(
        x.device,
        "quant",
        quant_defines(layout, x.dtype, torch.float32),
        "kv_quantize",
        (_blocks(ng),),
        (_THREADS,),
        (_ptr(x), _ptr(out), _ptr(err), np.int64(nb)),
    )
    code = int(err.item())
    for bit, msg in _QUANT_ERRORS:
        if code & bit:
            raise ValueError(msg.format(meta=layout.meta_dtype))
    return out


def dequantize(
    blocks: torch.Tensor,
    layout: Layout,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``code * scale + zero``, bit-identical to :func:`kvcore.quant.dequantize` in float32.

    Args:
        blocks: ``(..., layout.nbytes)`` uint8.
        dtype: of the result; float32 is exact, float16/bfloat16 round the float32 values.
        out: optional preallocated result (CUDA path).

    Returns:
        ``(..., num_tokens, head_dim)`` of ``dtype``.
    """
    if not uses_kernel(blocks):
        from kvcore import quant

        return quant.dequantize(blocks, layout).to(dtype)  # type: ignore[arg-type]
    if blocks.dtype != torch.uint8 or blocks.dim() < 1 or blocks.shape[-1] != layout.nbytes:
        raise ValueError(
            f"blocks must be uint8 with shape (..., nbytes={layout.nbytes}), got "
            f"{blocks.dtype} {tuple(blocks.shape)}"
        )
    _check(blocks.device, blocks=blocks)
    lead = tuple(blocks.shape[:-1])
    nb = math.prod(lead)
    shape = (*lead, layout.num_tokens, layout.head_dim)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=blocks.device)
    elif out.shape != shape or out.dtype != dtype:
        raise ValueError(f"out must be {dtype} {shape}, got {out.dtype} {tuple(out.shape)}")
    _check(blocks.device, out=out)
    ng = nb * layout.num_tokens * layout.head_dim // layout.group_size
    _launch(
        blocks.device,
        "quant",
        quant_defines(layout, torch.float32, dtype),
        "kv_dequantize",
        (_blocks(ng),),
        (_THREADS,),
        (_ptr(blocks), _ptr(out), np.int64(nb)),
    )
    return out


# --------------------------------------------------------------------------------------------
# 3. Merge plans


def _removed(
    num_rows: int, src: torch.Tensor, dst: torch.Tensor, evicted: torch.Tensor | None
) -> torch.Tensor:
    """Bool ``(num_rows,)``: sources that are no destination, and evicted slots."""
    is_dst = torch.zeros(num_rows, dtype=torch.bool, device=src.device)
    is_dst[dst] = True
    removed = torch.zeros(num_rows, dtype=torch.bool, device=src.device)
    removed[src] = True
    removed &= ~is_dst
    if evicted is not None:
        removed[evicted] = True
    return removed


def _mass_frac(
    num_rows: int, src: torch.Tensor, weight: torch.Tensor, removed: torch.Tensor
) -> torch.Tensor:
    """Per entry: the share ``w / (total weight leaving s)`` of a removed source's mass."""
    out_w = torch.zeros(num_rows, dtype=torch.float64, device=src.device)
    out_w.index_add_(0, src, weight.to(torch.float64))
    w = out_w[src]
    frac = torch.where(removed[src] & (w > 0), weight.to(torch.float64) / w.clamp_min(1e-300), 0.0)
    return frac.to(torch.float32)


def merge_reference(
    x: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    weight: torch.Tensor,
    counts: torch.Tensor | None = None,
    evicted: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Torch reference of :func:`apply_merge` (the rules of ``MergePlan.apply`` and
    ``MergeBook.apply``, before compaction)."""
    n = x.shape[0]
    out = x.to(torch.float32).clone()
    if len(src):
        out[torch.unique(dst)] = 0
        out.index_add_(0, dst, x[src].to(torch.float32) * weight.to(torch.float32).unsqueeze(1))
    if counts is None:
        return out.to(x.dtype), None
    removed = _removed(n, src, dst, evicted)
    frac = _mass_frac(n, src, weight, removed)
    c = counts.to(torch.float32).clone()
    c.index_add_(0, dst, frac * counts[src])
    c[removed] = 0
    return out.to(x.dtype), c


def apply_merge(
    x: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    weight: torch.Tensor,
    counts: torch.Tensor | None = None,
    evicted: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Applies a merge plan (docs/merging.md) to the rows of one stream.

    Args:
        x: ``(num_rows, dim)`` float32, float16 or bfloat16.
        src, dst: ``(num_entries,)`` int64, weight ``(num_entries,)`` float32: the plan's
            entries (``kvcore.MergePlan.src / dst / weight``).
        counts: optional ``(num_rows,)`` float32 mass per slot (1 for an unmerged token).
        evicted: optional ``(num_evicted,)`` int64, the plan's zero class.

    Returns:
        ``(rows, counts)``: ``rows[d] = sum w * x[s]`` over the entries of ``d`` (float32
        accumulation in plan order), other rows unchanged; ``counts`` as ``MergeBook.apply``
        before compaction (removed slots 0), or None without ``counts``.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (num_rows, dim), got {tuple(x.shape)}")
    if not uses_kernel(x, src, dst, weight):
        return merge_reference(x, src, dst, weight, counts, evicted)
    dev = x.device
    n, dim = x.shape
    _check(dev, x=x, counts=counts)
    order = torch.sort(dst, stable=True).indices
    s_src, s_dst = src[order].contiguous(), dst[order]
    s_w = weight[order].to(torch.float32).contiguous()
    dst_rows, per = torch.unique_consecutive(s_dst, return_counts=True)
    indptr = torch.zeros(len(dst_rows) + 1, dtype=torch.int64, device=dev)
    indptr[1:] = per.cumsum(0)
    out = x.clone()
    frac = c_out = removed_idx = None
    num_removed = 0
    if counts is not None:
        removed = _removed(n, src, dst, evicted)
        frac = _mass_frac(n, src, weight, removed)[order].contiguous()
        removed_idx = removed.nonzero().flatten().contiguous()
        num_removed = len(removed_idx)
        counts = counts.to(torch.float32).contiguous()
        c_out = counts.clone()
    total = len(dst_rows) * dim + num_removed
    if total:
        _launch(
            dev,
            "merge",
            {"KV_DT": _DT[x.dtype]},
            "kv_merge",
            (_blocks(total),),
            (_THREADS,),
            (
                _ptr(x),
                _ptr(out),
                _ptr(dst_rows.contiguous()),
                _ptr(indptr),
                _ptr(s_src),
                _ptr(s_w),
                _ptr(frac),
                _ptr(counts),
                _ptr(c_out),
                _ptr(removed_idx),
                np.int64(len(dst_rows)),
                np.int64(dim),
                np.int64(num_removed),
            ),
        )
    return out, c_out


# --------------------------------------------------------------------------------------------
# 4. RoPE re-rotation


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
    if not uses_kernel(pool, slots, delta):
        rows[slots] = rotate_reference(rows[slots], delta, inv_freq)
        return
    inv = inv_freq.to(pool.device, torch.float32).contiguous()
    _check(pool.device, pool=pool, slots=slots, delta=delta)
    half = inv.numel()
    n = slots.numel()
    if n and half:
        _launch(
            pool.device,
            "rope",
            {"KV_DT": _DT[pool.dtype], "KV_D": d, "KV_HALF": half},
            "kv_rope_rotate",
            (_blocks(n * half),),
            (_THREADS,),
            (_ptr(pool), _ptr(slots), _ptr(delta), _ptr(inv), np.int64(n)),
        )


# --------------------------------------------------------------------------------------------
# 5. Decode attention


def attention_defines(
    dtype: torch.dtype,
    head_dim: int,
    block_size: int,
    group: int,
    q_len: int,
    k_layout: Layout | None,
    v_layout: Layout | None,
    has_bias: bool,
    has_valid: bool,
) -> dict[str, int]:
    """The preamble of ``decode_attention.cu`` (quantized pages: one layout block per page)."""
    lay = k_layout if k_layout is not None else v_layout
    meta = lay.meta_dtype if lay is not None else "float16"
    out = {
        "KV_DT": _DT[dtype],
        "KV_D": head_dim,
        "KV_BS": block_size,
        "KV_GROUP": group,
        "KV_QLEN": q_len,
        "KV_META_F16": int(meta == "float16"),
        "KV_HAS_BIAS": int(has_bias),
        "KV_HAS_VALID": int(has_valid),
    }
    for side, lay in (("K", k_layout), ("V", v_layout)):
        out[f"KV_{side}_QUANT"] = int(lay is not None)
        out[f"KV_{side}_BITS"] = lay.bits if lay is not None else 8
        out[f"KV_{side}_G"] = lay.group_size if lay is not None else 1
        out[f"KV_{side}_AXIS_TOKEN"] = int(lay is not None and lay.axis == "token")
    return out


@overload
def decode_attention(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    slot_bias: torch.Tensor | None = ...,
    slot_valid: torch.Tensor | None = ...,
    scaling: float | None = ...,
    k_layout: Layout | None = ...,
    v_layout: Layout | None = ...,
    num_splits: int | None = ...,
    out: torch.Tensor | None = ...,
    return_lse: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def decode_attention(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    slot_bias: torch.Tensor | None = ...,
    slot_valid: torch.Tensor | None = ...,
    scaling: float | None = ...,
    k_layout: Layout | None = ...,
    v_layout: Layout | None = ...,
    num_splits: int | None = ...,
    out: torch.Tensor | None = ...,
    return_lse: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


def decode_attention(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    slot_bias: torch.Tensor | None = None,
    slot_valid: torch.Tensor | None = None,
    scaling: float | None = None,
    k_layout: Layout | None = None,
    v_layout: Layout | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of a few query tokens per sequence over the paged cache (split-K on CUDA).

    The torch path (CPU, no CuPy, or a shape the kernel does not take) is
    :func:`kvcore.attention.paged_attention`, the one reference of this kernel.

    The step's keys are already stored: token ``t`` of a chunk of ``q`` tokens sees stored
    tokens ``[0, len - q + t + 1)`` of its stream (``q = 1``: decode sees all of them)::

        stream b*H + h:  block_table[b*H + h, j // block_size] -> block; slot = block*bs + j%bs

    Args:
        query: ``(B, Hq, q, D)`` float16, bfloat16 or float32; ``Hq`` a multiple of ``H``.
        k_pool, v_pool: ``(num_blocks, block_size, D)`` of ``query``'s dtype, or
            ``(num_blocks, layout.nbytes)`` uint8 quantized pages (one block of
            ``layout.num_tokens = block_size`` tokens per page) with ``k_layout``/``v_layout``.
        block_table: ``(B * H, W)`` int64 block ids per stream (ragged: padded with block 0).
        lengths: ``(B * H,)`` int64 stored tokens per stream.
        slot_bias: optional ``(num_slots,)`` float32 logit bias (``log`` of a merged slot's count).
        slot_valid: optional ``(num_slots,)`` bool, False masks a slot.
        scaling: softmax scale, default ``D ** -0.5``.
        num_splits: key splits per stream (CUDA only); default from the longest stream.
        out: optional preallocated ``(B, q, Hq, D)`` result (CUDA path).
        return_lse: also return each row's log-sum-exp ``(B, q, Hq)`` float32 (``-inf``
            for a row with no visible key), to merge with attention over other keys.

    Returns:
        ``(B, q, Hq, D)`` in ``query``'s dtype; a row with no visible key is zeros. With
        ``return_lse``, the pair ``(out, lse)``.
    """
    b_sz, hq, q_len, d = query.shape
    n_streams, width = block_table.shape
    if n_streams % b_sz or hq % (n_streams // b_sz):
        raise ValueError(
            f"block_table rows ({n_streams}) and query heads ({hq}) do not match batch {b_sz}"
        )
    h = n_streams // b_sz
    group = hq // h
    kw: dict[str, Any] = dict(
        slot_bias=slot_bias,
        slot_valid=slot_valid,
        scaling=scaling,
        k_layout=k_layout,
        v_layout=v_layout,
        return_lse=return_lse,
    )
    rows = group * q_len
    if not uses_kernel(query, k_pool, v_pool, block_table, lengths) or d % 32 or rows * d > 2048:
        # rows * d > 2048 would overflow the kernel's static shared memory: torch path
        ref: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = paged_attention(
            query, k_pool, v_pool, block_table, lengths, **kw
        )
        return ref
    dev = query.device
    for name, a in (("block_table", block_table), ("lengths", lengths)):
        if a.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {a.dtype}")
    valid_u8 = None if slot_valid is None else slot_valid.to(torch.uint8).contiguous()
    bias = None if slot_bias is None else slot_bias.to(torch.float32).contiguous()
    _check(dev, query=query, k_pool=k_pool, v_pool=v_pool, block_table=block_table, lengths=lengths)
    lay = k_layout or v_layout
    bs = lay.num_tokens if lay is not None else k_pool.shape[1]
    max_len = int(lengths.max()) if n_streams else 0
    if num_splits is None:
        # enough CTAs to fill the device: about 4 per SM, at least 256 tokens per split
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        num_splits = max(1, min(math.ceil(max_len / 256), math.ceil(4 * sms / max(n_streams, 1))))
    split_len = max(1, math.ceil(max_len / num_splits))
    for name, lay_ in (("k_layout", k_layout), ("v_layout", v_layout)):
        if lay_ is not None and (lay_.num_tokens, lay_.head_dim) != (bs, d):
            raise ValueError(
                f"{name} must cover one page of (block_size={bs}, head_dim={d}) tokens, got "
                f"({lay_.num_tokens}, {lay_.head_dim})"
            )
    if k_layout and v_layout and k_layout.meta_dtype != v_layout.meta_dtype:
        raise ValueError("k_layout and v_layout must share meta_dtype")
    defines = attention_defines(
        query.dtype, d, bs, group, q_len, k_layout, v_layout, bias is not None, valid_u8 is not None
    )
    ws_acc = torch.empty(n_streams, num_splits, rows, d, dtype=torch.float32, device=dev)
    ws_ml = torch.empty(n_streams, num_splits, rows, 2, dtype=torch.float32, device=dev)
    if out is None:
        out = torch.empty(b_sz, q_len, hq, d, dtype=query.dtype, device=dev)
    elif out.shape != (b_sz, q_len, hq, d) or out.dtype != query.dtype:
        raise ValueError(
            f"out must be {query.dtype} {(b_sz, q_len, hq, d)}, got {tuple(out.shape)}"
        )
    _check(dev, out=out)
    lse = torch.empty(b_sz, q_len, hq, dtype=torch.float32, device=dev) if return_lse else None
    scale = d**-0.5 if scaling is None else scaling
    _launch(
        dev,
        "decode_attention",
        defines,
        "kv_decode_partial",
        (num_splits, n_streams),
        (128,),
        (
            _ptr(query),
            _ptr(k_pool),
            _ptr(v_pool),
            _ptr(block_table),
            _ptr(lengths),
            _ptr(bias),
            _ptr(valid_u8),
            _ptr(ws_acc),
            _ptr(ws_ml),
            np.int64(width),
            np.int64(split_len),
            np.float32(scale),
        ),
    )
    _launch(
        dev,
        "decode_attention",
        defines,
        "kv_decode_reduce",
        (n_streams * rows,),
        (min(d, 256),),
        (_ptr(ws_acc), _ptr(ws_ml), _ptr(out), _ptr(lse), np.int32(num_splits), np.int64(h)),
    )
    if lse is not None:
        return out, lse
    return out


# Every public function checks its tensor arguments first (TypeError, not AttributeError).
_args.check_module(globals(), __name__)
