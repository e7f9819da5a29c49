"""docs/layouts.md is the format: a plain numpy decoder written from the page, and the page's
worked example, checked against the Rust bytes (and the torch reference in test_quant_torch)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from kvcore import QuantLayout, dequantize, quantize

DOC = Path(__file__).resolve().parent.parent / "docs" / "layouts.md"


def doc_example_bytes() -> bytes:
    m = re.search(r"`example bytes: ([0-9a-f ]+)`", DOC.read_text())
    assert m, "docs/layouts.md lost its example-bytes line"
    return bytes.fromhex(m.group(1))


EXAMPLE_LAYOUT = dict(bits=2, group_size=4, num_tokens=2, head_dim=4, axis="channel")
EXAMPLE_X = np.array([[0, 1, 2, 3], [-1, 0.5, 0.5, 2]], np.float32)


def decode_from_doc(block: bytes, layout: QuantLayout) -> np.ndarray:
    """Decodes one block with nothing but the rules of docs/layouts.md, element by element."""
    t, d, g, bits = layout.num_tokens, layout.head_dim, layout.group_size, layout.bits
    mdt = "<f2" if layout.meta_dtype == "float16" else "<f4"
    m = np.dtype(mdt).itemsize
    ng = t * d // g
    codes_bytes = t * d * bits // 8
    scales_at = -(-codes_bytes // m) * m
    zeros_at = scales_at + ng * m
    assert len(block) == zeros_at + ng * m
    assert all(b == 0 for b in block[codes_bytes:scales_at]), "padding must be zero"
    scales = np.frombuffer(block, mdt, ng, scales_at).astype(np.float32)
    zeros = np.frombuffer(block, mdt, ng, zeros_at).astype(np.float32)
    out = np.zeros((t, d), np.float32)
    for gi in range(ng):
        for j in range(g):
            i = gi * g + j
            byte = block[i * bits // 8]
            code = (byte >> ((i % (8 // bits)) * bits)) & ((1 << bits) - 1)
            if layout.axis == "channel":
                tt, cc = gi // (d // g), (gi % (d // g)) * g + j
            else:
                tt, cc = (gi // d) * g + j, gi % d
            out[tt, cc] = np.float32(code) * scales[gi] + zeros[gi]
    return out


def test_worked_example_matches_rust() -> None:
    layout = QuantLayout(**EXAMPLE_LAYOUT)  # type: ignore[arg-type]
    assert quantize(EXAMPLE_X, layout).tobytes() == doc_example_bytes()
    assert np.array_equal(
        decode_from_doc(doc_example_bytes(), layout),
        np.array([[0, 1, 2, 3], [-1, 1, 1, 2]], np.float32),
    )


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("meta", ["float16", "float32"])
def test_doc_decoder_matches_rust(bits: int, axis: str, meta: str) -> None:
    layout = QuantLayout(bits, 4, 8, 12, axis=axis, meta_dtype=meta)
    x = np.random.default_rng(bits).standard_normal((3, 8, 12)).astype(np.float32)
    blocks = quantize(x, layout)
    want = dequantize(blocks, layout)
    for b in range(3):
        assert np.array_equal(decode_from_doc(blocks[b].tobytes(), layout), want[b])
