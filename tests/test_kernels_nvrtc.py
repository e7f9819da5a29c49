"""Every .cu compiles with NVRTC for sm_80 and sm_90, no GPU needed (CI).

NVRTC comes from PyPI (``nvidia-cuda-nvrtc`` + ``cuda-bindings``, installed by ``make setup``).
The configurations cover every preamble branch: element dtypes, head dims 64/128/256, block
sizes, each quantized layout in the fused-dequant attention, bias and validity masks.
"""

from __future__ import annotations

import subprocess
import sys
from typing import NamedTuple

import pytest

torch = pytest.importorskip("torch", reason="kvcore.kernels needs torch")

from kvcore import kernels  # noqa: E402

nvrtc = pytest.importorskip(
    "cuda.bindings.nvrtc", reason="needs cuda-bindings and nvidia-cuda-nvrtc (make setup)"
)

ARCHS = ("sm_80", "sm_90")
DT = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}


class Lay(NamedTuple):
    """The fields of a QuantLayout that the attention preamble reads."""

    bits: int
    group_size: int
    num_tokens: int
    head_dim: int
    axis: str
    meta_dtype: str


def _configs() -> list[tuple[str, dict[str, int]]]:
    out: list[tuple[str, dict[str, int]]] = [("compact", {})]
    for dt in (0, 1, 2):
        out.append(("merge", {"KV_DT": dt}))
        for d in (64, 128, 256):
            out.append(("rope", {"KV_DT": dt, "KV_D": d, "KV_HALF": d // 2}))
    for bits, g in ((2, 32), (4, 32), (8, 16)):
        for axis in (0, 1):
            for meta in (0, 1):
                out.append(
                    (
                        "quant",
                        {
                            "KV_BITS": bits,
                            "KV_G": g,
                            "KV_T": 32,
                            "KV_D": 128,
                            "KV_AXIS_TOKEN": axis,
                            "KV_META_F16": meta,
                            "KV_IN_DT": 1,
                            "KV_OUT_DT": 2,
                        },
                    )
                )
    for dt, d, bs, group, qlen in (
        (1, 64, 8, 1, 1),
        (2, 128, 16, 4, 1),
        (0, 256, 32, 8, 1),
        (1, 128, 16, 4, 4),
    ):
        defines = kernels.attention_defines(
            DT[dt], d, bs, group, qlen, None, None, has_bias=False, has_valid=False
        )
        out.append(("decode_attention", defines))
    for bits in (2, 4, 8):  # KIVI: keys per channel (token axis), values per token
        k_lay = Lay(bits, 32, 32, 128, "token", "float16")
        v_lay = Lay(bits, 16, 32, 128, "channel", "float16")
        defines = kernels.attention_defines(DT[1], 128, 32, 4, 1, k_lay, v_lay, True, True)
        out.append(("decode_attention", defines))
    k8 = Lay(8, 32, 32, 128, "channel", "float32")
    out.append(
        ("decode_attention", kernels.attention_defines(DT[2], 128, 32, 4, 1, k8, None, False, True))
    )
    return out


def test_every_kernel_file_is_covered() -> None:
    on_disk = {p.stem for p in kernels.SOURCE_DIR.glob("*.cu")}
    assert on_disk == set(kernels.KERNEL_FILES)
    assert {name for name, _ in _configs()} == on_disk


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "name,defines", _configs(), ids=lambda v: v if isinstance(v, str) else str(len(v))
)
def test_nvrtc_compiles(name: str, defines: dict[str, int], arch: str) -> None:
    ptx = kernels.nvrtc_compile(name, defines, arch).decode()
    assert f".target {arch}" in ptx
    for fn in {
        "compact": ["kv_compact"],
        "quant": ["kv_quantize", "kv_dequantize"],
        "merge": ["kv_merge"],
        "rope": ["kv_rope_rotate"],
        "decode_attention": ["kv_decode_partial", "kv_decode_reduce"],
    }[name]:
        assert f".entry {fn}(" in ptx, f'{fn} missing (extern "C" keeps the name unmangled)'


def test_nvrtc_reports_errors() -> None:
    with pytest.raises(RuntimeError, match="NVRTC failed on quant.cu"):
        kernels.nvrtc_compile("quant", {}, "sm_80")  # no layout constants: cannot compile


def test_import_kvcore_and_kernels_does_not_import_cupy() -> None:
    code = "import sys, kvcore, kvcore.kernels; assert 'cupy' not in sys.modules, 'cupy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
