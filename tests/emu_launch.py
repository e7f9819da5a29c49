"""Runs kvcore.kernels' CUDA path on the CPU: ``_launch`` compiled with g++ and the emulation
headers (cuda/emu/). Tests monkeypatch ``kernels._launch`` with :func:`emulated_launch` and
``kernels.uses_kernel`` with True, so the wrappers' host logic (argument checks, CSR sorting,
copy units, workspaces, error flags) runs exactly as on a GPU, with CPU tensors as "device"
memory."""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kvcore import kernels

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "cuda" / "emu"
# KVCORE_EMU_CACHE: a folder that keeps the built libraries across processes (the dry run of
# tools/gpu_check.py runs several); a library is named by the hash of its source and flags.
_OUT = Path(os.environ.get("KVCORE_EMU_CACHE") or tempfile.mkdtemp(prefix="kvcore_emu_"))
_LIBS: dict[str, ctypes.CDLL] = {}

# Every argument travels as one 8-byte slot; kv_arg<P> turns it into the kernel's parameter type.
_INVOKE = """
#include <cstdint>
#include <utility>
template <class P> static P kv_arg(unsigned long long v) {
    if constexpr (std::is_pointer_v<P>) return reinterpret_cast<P>(v);
    else if constexpr (std::is_same_v<P, float>) { float f; unsigned u = (unsigned)v;
        std::memcpy(&f, &u, 4); return f; }
    else return static_cast<P>(static_cast<long long>(v));
}
template <class... P, std::size_t... I>
static void kv_call(void (*k)(P...), const unsigned long long* a, std::index_sequence<I...>) {
    k(kv_arg<P>(a[I])...);
}
template <class... P>
static void kv_invoke(void (*k)(P...), const unsigned long long* a) {
    kv_call(k, a, std::index_sequence_for<P...>{});
}
extern "C" void emu(unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                    const unsigned long long* a) {
    KV_EMU_LAUNCH(kv_invoke, gx, gy, gz, bx, 1, 1, &KERNEL, a);
}
"""


def compile_emu(src: str) -> ctypes.CDLL:
    """Builds C++ source that includes a cuda/emu header into a shared library (once per
    source text). -ffp-contract=off: no fused multiply-add, as __fmul_rn/__fadd_rn on the GPU."""
    cmd = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", "-ffp-contract=off"]
    cmd += ["-fno-fast-math", f"-I{EMU}"]
    headers = "".join(h.read_text() for h in sorted(EMU.glob("*.h")))
    key = hashlib.sha256((src + " ".join(cmd) + headers).encode()).hexdigest()[:16]
    if key not in _LIBS:
        so = _OUT / f"{key}.so"
        if not so.exists():
            _OUT.mkdir(parents=True, exist_ok=True)
            cpp, tmp = _OUT / f"{key}.{os.getpid()}.cpp", _OUT / f"{key}.{os.getpid()}.tmp.so"
            cpp.write_text(src)
            res = subprocess.run([*cmd, str(cpp), "-o", str(tmp)], capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(res.stderr)
            tmp.replace(so)  # atomic: a concurrent process sees the whole library or none
        _LIBS[key] = ctypes.CDLL(str(so))
    return _LIBS[key]


def emu_header(name: str) -> str:
    """The emulation header a kernel file compiles under: the threaded one for the kernels
    with barriers and shuffles (compaction, decode attention), else the serial loops."""
    return "cuda_emu_threads.h" if name in ("decode_attention", "compact") else "cuda_emu.h"


def _lib(name: str, defines: Mapping[str, int], kernel: str) -> ctypes.CDLL:
    return compile_emu(
        f'#include "{emu_header(name)}"\n#include <type_traits>\n'
        + kernels.kernel_source(name, defines)
        + f"\n#define KERNEL {kernel}\n"
        + _INVOKE
    )


def _slot(v: Any) -> int:
    if isinstance(v, np.float32):
        return int(np.float32(v).view(np.uint32))
    return int(np.int64(v).view(np.uint64)) if isinstance(v, np.signedinteger) else int(v)


def emulated_launch(
    device: Any,
    name: str,
    defines: Mapping[str, int],
    kernel: str,
    grid: tuple[int, ...],
    block: tuple[int, ...],
    args: tuple[Any, ...],
) -> None:
    """Drop-in for ``kernels._launch``."""
    g = (*grid, 1, 1)[:3]
    slots = (ctypes.c_ulonglong * max(1, len(args)))(*[_slot(a) for a in args])
    _lib(name, defines, kernel).emu(
        ctypes.c_uint(g[0]),
        ctypes.c_uint(g[1]),
        ctypes.c_uint(g[2]),
        ctypes.c_uint(block[0]),
        slots,
    )
