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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch

from kvcore import _args

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
    "quant_defines",
    "quantize",
    "rotate_reference",
    "rotate_slots",
    "uses_kernel",
]

SOURCE_DIR = Path(__file__).resolve().parent.parent / "cuda"
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


# Every public function checks its tensor arguments first (TypeError, not AttributeError).
_args.check_module(globals(), __name__)

# The kernels, one module per ``cuda/*.cu`` file. Imported last: each reads the loading helpers
# above from this (then partly initialised) package.
from kvcore.kernels._attention import attention_defines, decode_attention  # noqa: E402
from kvcore.kernels._compact import compact_geometry, compact_pools  # noqa: E402
from kvcore.kernels._merge import apply_merge, merge_reference  # noqa: E402
from kvcore.kernels._quant import dequantize, quant_defines, quantize  # noqa: E402
from kvcore.kernels._rope import rotate_reference, rotate_slots  # noqa: E402
