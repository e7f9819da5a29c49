"""Quantized layouts through the bindings: round trips, error bounds, exact bytes, errors.

The bounds follow docs/layouts.md section 4: ``|x - x'| <= scale/2`` plus the rounding of the
metadata dtype (half an ulp of the zero point, ``qmax`` times half an ulp of the scale) plus
float32 rounding of ``x - zero``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kvcore
from kvcore import KiviCache, MixedPrecisionStore, QuantLayout, dequantize, kivi_nbytes, quantize

BITS = (2, 4, 8)
AXES = ("channel", "token")
METAS = ("float16", "float32")


def half_ulp(v: np.ndarray, meta: str) -> np.ndarray:
    """Half an ulp of ``v`` in the metadata dtype (0 where it is exact)."""
    dt = np.float16 if meta == "float16" else np.float32
    a = np.abs(v).astype(dt)
    return (np.spacing(a).astype(np.float64)) / 2


def group_meta(blocks: np.ndarray, layout: QuantLayout) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zeros of every block, read from the byte map of docs/layouts.md."""
    dt = np.dtype("<f2") if layout.meta_dtype == "float16" else np.dtype("<f4")
    flat = blocks.reshape(-1, layout.nbytes)
    ng = layout.num_groups
    so, zo = layout.scales_offset, layout.zeros_offset
    scales = flat[:, so : so + ng * dt.itemsize].copy().view(dt).astype(np.float64)
    zeros = flat[:, zo : zo + ng * dt.itemsize].copy().view(dt).astype(np.float64)
    return scales, zeros


def per_element(meta: np.ndarray, layout: QuantLayout) -> np.ndarray:
    """Broadcasts per-group metadata ``(blocks, NG)`` to ``(blocks, T, D)``."""
    t, d, g = layout.num_tokens, layout.head_dim, layout.group_size
    b = meta.shape[0]
    if layout.axis == "channel":
        return np.repeat(meta.reshape(b, t, d // g), g, axis=2)
    return np.repeat(meta.reshape(b, t // g, d), g, axis=1)


def check_bound(x: np.ndarray, layout: QuantLayout) -> float:
    """Quantizes, dequantizes and asserts the documented bound; returns the max error."""
    blocks = quantize(x, layout)
    assert blocks.shape == x.shape[:-2] + (layout.nbytes,)
    y = dequantize(blocks, layout)
    assert y.shape == x.shape and y.dtype == np.float32
    xs = x.astype(np.float32).astype(np.float64).reshape(-1, layout.num_tokens, layout.head_dim)
    scales, zeros = group_meta(blocks, layout)
    s = per_element(scales, layout)
    z = per_element(zeros, layout)
    qmax = 2**layout.bits - 1
    meta_err = half_ulp(z, layout.meta_dtype) + qmax * half_ulp(s, layout.meta_dtype)
    f32_err = 2 * np.spacing(np.abs(xs).astype(np.float32) + np.abs(z).astype(np.float32))
    bound = s / 2 + meta_err + f32_err
    err = np.abs(xs - y.reshape(xs.shape).astype(np.float64))
    worst = np.argmax(err - bound)
    assert (err <= bound).all(), (
        f"error {err.flat[worst]} > bound {bound.flat[worst]} (scale {s.flat[worst]})"
    )
    return float(err.max())


@st.composite
def layouts_and_data(draw: st.DrawFn) -> tuple[QuantLayout, np.ndarray]:
    bits = draw(st.sampled_from(BITS))
    axis = draw(st.sampled_from(AXES))
    meta = draw(st.sampled_from(METAS))
    g = draw(st.sampled_from([4, 8, 16, 32]))
    t = g * draw(st.integers(1, 3)) if axis == "token" else draw(st.integers(1, 6))
    d = g * draw(st.integers(1, 3)) if axis == "channel" else draw(st.integers(1, 6))
    layout = QuantLayout(bits, g, t, d, axis=axis, meta_dtype=meta)
    nblocks = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    limit = 60000.0 if meta == "float16" or dtype == np.float16 else 2.0**100
    elems = st.floats(-limit, limit, width=16 if dtype == np.float16 else 32, allow_nan=False)
    scale = draw(st.sampled_from([1e-6, 1.0, 100.0]))
    x = draw(hnp.arrays(dtype, (nblocks, t, d), elements=elems))
    if dtype == np.float32:
        x = np.clip(x * np.float32(scale), -limit, limit).astype(np.float32)
    return layout, x


@given(layouts_and_data())
def test_round_trip_bound_hypothesis(case: tuple[QuantLayout, np.ndarray]) -> None:
    layout, x = case
    check_bound(x, layout)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("meta", METAS)
def test_special_groups(bits: int, axis: str, meta: str) -> None:
    layout = QuantLayout(bits, 8, 8, 16, axis=axis, meta_dtype=meta)
    rng = np.random.default_rng(bits)
    cases = {
        "constant": np.full((8, 16), 3.25, np.float32),
        "zeros": np.zeros((8, 16), np.float32),
        "subnormal": (rng.standard_normal((8, 16)) * 1e-40).astype(np.float32),
        "extremes": rng.choice(np.float32([-60000, 60000, 0, 1]), (8, 16)).astype(np.float32),
        "outlier": np.where(np.arange(128).reshape(8, 16) == 5, 1000.0, 0.01).astype(np.float32),
    }
    for name, x in cases.items():
        err = check_bound(x, layout)
        if name in ("constant", "zeros") and meta == "float32":
            assert err == 0.0, name


def test_single_outlier_only_hurts_its_group() -> None:
    layout = QuantLayout(4, 8, 1, 32, axis="channel", meta_dtype="float32")
    x = np.linspace(-1, 1, 32, dtype=np.float32)[None, :]
    x[0, 3] = 500.0
    y = dequantize(quantize(x, layout), layout)
    err = np.abs(x - y)[0]
    # the other groups keep their resolution: range 7 * 2/31 over 15 steps, half a step
    assert err[8:].max() <= 7 * (2 / 31) / 15 / 2 + 1e-6
    # the outlier's group loses it (scale ~ 501/15)
    assert err[:8].max() > 10 * err[8:].max()


def test_bfloat16_bits_and_float16_match_float32() -> None:
    rng = np.random.default_rng(0)
    x16 = rng.standard_normal((2, 4, 32)).astype(np.float16)
    layout = QuantLayout(4, 32, 4, 32)
    assert np.array_equal(quantize(x16, layout), quantize(x16.astype(np.float32), layout))
    xb = (rng.standard_normal((2, 4, 32)).astype(np.float32).view(np.uint32) >> 16).astype(
        np.uint16
    )
    widened = (xb.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(quantize(xb, layout), quantize(widened, layout))
    # non-contiguous input is copied, same bytes
    big = rng.standard_normal((4, 64)).astype(np.float32)
    assert np.array_equal(
        quantize(big[:, ::2], layout), quantize(np.ascontiguousarray(big[:, ::2]), layout)
    )


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("meta", METAS)
@pytest.mark.parametrize("g", [4, 8, 32])
def test_exact_bytes_every_layout(bits: int, axis: str, meta: str, g: int) -> None:
    t, d = (g * 2, 12) if axis == "token" else (3, g * 2)
    layout = QuantLayout(bits, g, t, d, axis=axis, meta_dtype=meta)
    m = 2 if meta == "float16" else 4
    codes = t * d * bits // 8
    scales_at = -(-codes // m) * m
    groups = t * d // g
    assert layout.codes_bytes == codes
    assert layout.num_groups == groups
    assert layout.scales_offset == scales_at
    assert layout.zeros_offset == scales_at + groups * m
    assert layout.nbytes == scales_at + 2 * groups * m
    x = np.ones((5, t, d), np.float32)
    assert quantize(x, layout).nbytes == 5 * layout.nbytes


def test_bad_layouts_and_inputs() -> None:
    with pytest.raises(ValueError, match="group_size 24 does not divide head_dim 64"):
        QuantLayout(2, 24, 4, 64)
    with pytest.raises(ValueError, match="does not divide num_tokens 12"):
        QuantLayout(4, 8, 12, 64, axis="token")
    with pytest.raises(ValueError, match="bits must be 2, 4 or 8, got 3"):
        QuantLayout(3, 8, 8, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        QuantLayout(2, 2, 8, 8)
    with pytest.raises(ValueError, match="group axis must be"):
        QuantLayout(2, 8, 8, 8, axis="row")
    with pytest.raises(ValueError, match="metadata dtype must be"):
        QuantLayout(2, 8, 8, 8, meta_dtype="bfloat16")
    with pytest.raises(TypeError, match="group_size must be an int"):
        QuantLayout(2, 8.0, 8, 8)  # type: ignore[arg-type]
    layout = QuantLayout(8, 4, 2, 4)
    with pytest.raises(ValueError, match=r"non-finite value .* block 1, token 0, channel 2"):
        x = np.zeros((2, 2, 4), np.float32)
        x[1, 0, 2] = np.nan
        quantize(x, layout)
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.full((2, 4), np.inf, np.float32), layout)
    with pytest.raises(ValueError, match="does not fit the float16 metadata"):
        quantize(np.full((2, 4), -1e6, np.float32), layout)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., num_tokens=2, head_dim=4\)"):
        quantize(np.zeros((3, 4), np.float32), layout)
    with pytest.raises(TypeError, match="float32, float16 or uint16"):
        quantize(np.zeros((2, 4), np.float64), layout)
    with pytest.raises(TypeError, match="numpy array"):
        quantize([[0.0] * 4] * 2, layout)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"blocks must have shape \(\.\.\., nbytes=16\)"):
        dequantize(np.zeros((3, 5), np.uint8), layout)
    with pytest.raises(TypeError, match="uint8"):
        dequantize(np.zeros((3, 16), np.int8), layout)


def test_layout_value_semantics() -> None:
    a = QuantLayout(2, 32, 32, 128, axis="token")
    assert a == QuantLayout(2, 32, 32, 128, axis="token")
    assert a != QuantLayout(2, 32, 32, 128)
    assert hash(a) == hash(QuantLayout(2, 32, 32, 128, axis="token"))
    assert "axis='token'" in repr(a)


# ----------------------------------------------------------------------------------- KIVI


def kivi_plain(x: np.ndarray, bits: int, g: int, r: int, meta: str) -> tuple[np.ndarray, ...]:
    """KIVI from the rules of docs/layouts.md section 5, with quantize/dequantize as codec."""
    n, d = x.shape
    h = x.astype(np.float16).astype(np.float32)
    nk = (n // r) * r
    nv = max(n - r, 0)
    keys = h.copy()
    if nk:
        kl = QuantLayout(bits, g, r, d, axis="token", meta_dtype=meta)
        keys[:nk] = dequantize(quantize(h[:nk].reshape(-1, r, d), kl), kl).reshape(nk, d)
    values = h.copy()
    if nv:
        vl = QuantLayout(bits, g, 1, d, axis="channel", meta_dtype=meta)
        values[:nv] = dequantize(quantize(h[:nv].reshape(nv, 1, d), vl), vl).reshape(nv, d)
    return keys, values


@given(
    n=st.integers(0, 100),
    split=st.integers(0, 100),
    bits=st.sampled_from(BITS),
    g=st.sampled_from([4, 8]),
    rmul=st.integers(1, 3),
    meta=st.sampled_from(METAS),
)
def test_kivi_matches_the_plain_rules(
    n: int, split: int, bits: int, g: int, rmul: int, meta: str
) -> None:
    d = 16
    r = g * rmul
    x = np.random.default_rng(n * 7 + split).standard_normal((n, d)).astype(np.float32)
    c = KiviCache(d, bits=bits, group_size=g, residual=r, meta_dtype=meta)
    s = min(split, n)
    c.append(x[:s], x[:s] * 2)
    c.append(x[s:], x[s:] * 2)
    k, _ = kivi_plain(x, bits, g, r, meta)
    _, v = kivi_plain(x * 2, bits, g, r, meta)
    assert np.array_equal(c.keys(), k)
    assert np.array_equal(c.values(), v)
    assert c.num_tokens == n
    assert c.num_quantized_keys == (n // r) * r
    assert c.num_quantized_values == max(n - r, 0)
    assert c.nbytes == kivi_nbytes(n, d, bits=bits, group_size=g, residual=r, meta_dtype=meta)


def test_kivi_defaults_and_bytes() -> None:
    c = KiviCache(128)
    assert c.key_layout == QuantLayout(2, 32, 32, 128, axis="token")
    assert c.value_layout == QuantLayout(2, 32, 1, 128)
    # 100 tokens, d=128: 3 key blocks of 32x128 (1024 code bytes + 2*128*2 metadata),
    # 4 fp16 keys, 68 value tokens (32 code bytes + 2*4*2), 32 fp16 values.
    expect = 3 * (1024 + 512) + 4 * 256 + 68 * (32 + 16) + 32 * 256
    assert kivi_nbytes(100, 128) == expect
    x = np.random.default_rng(1).standard_normal((100, 128)).astype(np.float32)
    c.append(x, x)
    assert c.nbytes == expect
    with pytest.raises(ValueError, match="positive multiple of group_size"):
        KiviCache(128, residual=48)
    with pytest.raises(ValueError, match=r"shape \(num_tokens, head_dim=128\)"):
        c.append(x[:, :64], x[:, :64])
    bad = x[:3].copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="keys contain a non-finite value"):
        c.append(bad, x[:3])
    assert c.num_tokens == 100


# ----------------------------------------------------------------------------------- MiKV


def test_mixed_precision_demotion_error_is_bounded() -> None:
    d, g = 64, 32
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, d)).astype(np.float32)
    s = MixedPrecisionStore(d, group_size=g, meta_dtype="float32")
    s.append(x[:10], "float16")
    s.append(x[10:], "int8")
    assert s.nbytes == 10 * d * 2 + 30 * s.token_nbytes("int8")
    s.demote(np.arange(0, 40, 2), "int4")
    s.demote(np.arange(0, 40, 4), "int2")
    tiers = s.tiers()
    y = s.read()
    rng_g = x.reshape(40, d // g, g).max(-1) - x.reshape(40, d // g, g).min(-1)
    steps = {"float16": 0.0, "int8": 1 / 255, "int4": 1 / 15, "int2": 1 / 3}
    for i, t in enumerate(tiers):
        path = ["int8", "int4", "int2"] if i >= 10 else ["float16", "int4", "int2"]
        path = path[: path.index(t) + 1] if t in path else path
        # each step at most half a scale of the (slightly widened) range it quantized
        bound = sum(steps[p] / 2 for p in path) * rng_g[i].max() * 1.5 + 1e-3
        assert np.abs(x[i] - y[i]).max() <= bound, (i, t)
    expect = sum(s.token_nbytes(t) for t in tiers)
    assert s.nbytes == expect
    with pytest.raises(ValueError, match="cannot promote token 0 from int2 to int8"):
        s.demote(np.array([0]), "int8")
    with pytest.raises(ValueError, match="out of range"):
        s.demote(np.array([40]), "int2")
    with pytest.raises(ValueError, match="tier must be"):
        s.append(x[:1], "int3")


def test_module_exports() -> None:
    for name in ("QuantLayout", "quantize", "dequantize", "KiviCache", "MixedPrecisionStore"):
        assert hasattr(kvcore, name)
