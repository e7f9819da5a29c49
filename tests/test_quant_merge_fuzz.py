"""Fuzz the quantization and merge bindings with wrong and odd arguments: every call either
succeeds or raises TypeError / ValueError / a KVCoreError, never an internal error (a caught
Rust panic) and never a crash."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcore


def _full(shape: tuple[int, ...], value: float, dtype: type) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.full(shape, value).astype(dtype)


ARRAYS = st.one_of(
    st.tuples(
        st.sampled_from([np.float32, np.float16, np.uint16, np.float64, np.int64, np.uint8]),
        st.lists(st.integers(0, 5), min_size=0, max_size=3),
        st.sampled_from([0.0, 1.0, -1e30, np.nan, np.inf, 7.0]),
    ).map(lambda t: _full(tuple(t[1]), t[2], t[0])),
    st.integers(-3, 300).map(lambda n: np.arange(n, dtype=np.int64) if n >= 0 else np.int64(n)),
)
ARGS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(["channel", "token", "float16", "float32", "int8", "int2"]),
    ARRAYS,
)


def call(fn, *args) -> None:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except (TypeError, ValueError, OverflowError):
        pass
    except kvcore.KVCoreError as e:
        assert "internal error" not in str(e), e


@settings(max_examples=300)
@given(st.lists(ARGS, min_size=0, max_size=6), st.integers(0, 11))
def test_fuzz_quant_and_merge_bindings(args: list[object], which: int) -> None:
    layout = kvcore.QuantLayout(2, 4, 2, 4)
    kivi = kvcore.KiviCache(4, group_size=4, residual=4)
    store = kvcore.MixedPrecisionStore(4, group_size=4)
    book = kvcore.MergeBook(4)
    fns = [
        kvcore.QuantLayout,
        lambda *a: kvcore.quantize(*(a[:1] or [None]), layout),
        lambda *a: kvcore.dequantize(*(a[:1] or [None]), layout),
        kvcore.kivi_nbytes,
        lambda *a: kivi.append(*a),
        lambda *a: store.append(*a),
        lambda *a: store.demote(*a),
        kvcore.kvmerger_plan,
        kvcore.ems_plan,
        kvcore.cam_plan,
        kvcore.minicache_merge,
        lambda *a: book.compact(*a),
    ]
    call(fns[which], *args)
    # the objects stay usable after whatever happened
    assert kivi.num_tokens >= 0 and store.num_tokens >= 0 and book.num_slots >= 0
    kivi.append(np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32))
