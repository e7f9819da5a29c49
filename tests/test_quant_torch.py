"""The torch reference (kvcore.quant) and the Rust codec agree bit for bit.

torch is a test dependency: CI installs it, so this module imports it directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_quant_layout_doc import EXAMPLE_LAYOUT, EXAMPLE_X, doc_example_bytes

import kvcore
from kvcore import QuantLayout
from kvcore import quant as tq


def both(x: np.ndarray, layout: QuantLayout, torch_x: torch.Tensor | None = None) -> None:
    rust = kvcore.quantize(x, layout)
    ref = tq.quantize(torch.from_numpy(x) if torch_x is None else torch_x, layout)
    assert ref.dtype == torch.uint8
    assert np.array_equal(ref.numpy(), rust)
    y_rust = kvcore.dequantize(rust, layout)
    y_ref = tq.dequantize(torch.from_numpy(rust), layout)
    assert np.array_equal(y_ref.numpy().view(np.uint32), y_rust.view(np.uint32))


def test_worked_example() -> None:
    layout = QuantLayout(**EXAMPLE_LAYOUT)  # type: ignore[arg-type]
    assert tq.quantize(torch.from_numpy(EXAMPLE_X), layout).numpy().tobytes() == (
        doc_example_bytes()
    )


@st.composite
def cases(draw: st.DrawFn) -> tuple[QuantLayout, np.ndarray]:
    bits = draw(st.sampled_from([2, 4, 8]))
    axis = draw(st.sampled_from(["channel", "token"]))
    meta = draw(st.sampled_from(["float16", "float32"]))
    g = draw(st.sampled_from([4, 8, 32]))
    t = g * draw(st.integers(1, 2)) if axis == "token" else draw(st.integers(1, 4))
    d = g * draw(st.integers(1, 2)) if axis == "channel" else draw(st.integers(1, 5))
    layout = QuantLayout(bits, g, t, d, axis=axis, meta_dtype=meta)
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    lim = 60000.0
    x = draw(
        hnp.arrays(
            dtype,
            (draw(st.integers(1, 3)), t, d),
            elements=st.floats(-lim, lim, width=16 if dtype == np.float16 else 32),
        )
    )
    if dtype == np.float32:
        x = (x * np.float32(draw(st.sampled_from([1e-30, 1e-3, 1.0])))).astype(np.float32)
    return layout, x


@given(cases())
def test_bit_identical_hypothesis(case: tuple[QuantLayout, np.ndarray]) -> None:
    layout, x = case
    both(x, layout)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("meta", ["float16", "float32"])
def test_bit_identical_special(bits: int, axis: str, meta: str) -> None:
    layout = QuantLayout(bits, 32, 32, 64, axis=axis, meta_dtype=meta)
    rng = np.random.default_rng(bits)
    for x in (
        rng.standard_normal((4, 32, 64)).astype(np.float32),
        np.full((1, 32, 64), -7.0, np.float32),
        (rng.standard_normal((1, 32, 64)) * 1e-42).astype(np.float32),  # subnormals
        np.where(rng.random((1, 32, 64)) < 0.01, 3e4, 0.5).astype(np.float32),  # outliers
        # exact ties: integer data with scale 1 lands on .5 after shifts by a half
        (rng.integers(0, 4, (1, 32, 64)) + 0.5 * (rng.random((1, 32, 64)) < 0.5)).astype(
            np.float32
        ),
    ):
        both(x, layout)


@given(cases(), st.sampled_from([1e-3, 1.0, 1e3]))
def test_bfloat16_hypothesis(case: tuple[QuantLayout, np.ndarray], scale: float) -> None:
    layout, x = case
    xt = (torch.from_numpy(x.astype(np.float32)) * scale).to(torch.bfloat16)
    if not bool(torch.isfinite(xt).all()):
        return  # scaled past the bfloat16 range: covered by the non-finite error tests
    bits = xt.view(torch.int16).numpy().view(np.uint16)
    try:
        kvcore.quantize(bits, layout)
    except ValueError as e:
        # metadata overflow (large values with float16 metadata): both references refuse
        assert "does not fit the float16" in str(e)
        with pytest.raises(ValueError, match="does not fit the float16"):
            tq.quantize(xt, layout)
        return
    both(bits, layout, torch_x=xt)


def test_bfloat16() -> None:
    layout = QuantLayout(4, 32, 4, 64)
    xt = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    bits = xt.view(torch.int16).numpy().view(np.uint16)
    both(bits, layout, torch_x=xt)


def test_errors_match() -> None:
    layout = QuantLayout(8, 4, 2, 4)
    bad = np.zeros((2, 4), np.float32)
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        tq.quantize(torch.from_numpy(bad), layout)
    with pytest.raises(ValueError, match="non-finite"):
        kvcore.quantize(bad, layout)
    big = np.full((2, 4), -1e6, np.float32)
    with pytest.raises(ValueError, match="does not fit the float16 metadata"):
        tq.quantize(torch.from_numpy(big), layout)
    with pytest.raises(ValueError, match="num_tokens=2, head_dim=4"):
        tq.quantize(torch.zeros(3, 4), layout)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tq.quantize(torch.zeros(2, 4, dtype=torch.float64), layout)


def test_import_kvcore_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, kvcore; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
