"""The wheel ships the typing files, and the installed package is the built extension."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

import kvcore

ROOT = Path(__file__).resolve().parents[1]


def _wheels() -> list[Path]:
    return sorted((ROOT / "dist").glob("kvcore-*.whl"))


@pytest.mark.skipif(
    not _wheels(), reason="no wheel in dist/: build one with `make wheel` (CI always does)"
)
def test_wheel_contains_typing_files_and_extension() -> None:
    names = zipfile.ZipFile(_wheels()[-1]).namelist()
    required_files = (
        "kvcore/__init__.py",
        "kvcore/py.typed",
        "kvcore/_kvcore.pyi",
        "kvcore/quant.py",  # torch references (issue 4)
        "kvcore/merge.py",
    )
    for required in required_files:
        assert required in names, f"{required} missing from the wheel: {names}"
    assert any(n.startswith("kvcore/_kvcore") and n.endswith(".so") for n in names), names
    # Every CUDA source under cuda/ (a link to python/kvcore/cuda) travels inside the wheel, at
    # the place kvcore.kernels loads it from (issue 7).
    sources = sorted((ROOT / "cuda").glob("*.cu")) + [ROOT / "cuda" / "kvcore_common.cuh"]
    assert len(sources) >= 6, sources
    for cu in sources:
        assert f"kvcore/cuda/{cu.name}" in names, f"{cu.name} missing from the wheel: {names}"


def test_installed_package_exposes_the_public_api() -> None:
    for name in kvcore.__all__:
        assert hasattr(kvcore, name), name
    assert kvcore.BlockAllocator.__module__ == "kvcore._kvcore"
    assert kvcore.KVCoreError.__module__ == "kvcore"


def test_kernel_sources_are_where_the_loader_looks() -> None:
    from kvcore import kernels

    assert (ROOT / "cuda").resolve() == (ROOT / "python" / "kvcore" / "cuda").resolve()
    for name in kernels.KERNEL_FILES:
        assert (kernels.SOURCE_DIR / f"{name}.cu").is_file(), name
    assert (kernels.SOURCE_DIR / "kvcore_common.cuh").is_file()
