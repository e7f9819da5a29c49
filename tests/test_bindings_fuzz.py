"""Fuzzing the binding surface: no Python input may panic or crash the process.

Every public method is called with arbitrary arguments (garbage types, huge and negative
ints, arrays of every dtype and shape, strided views, valid ids mixed in). Each call must
either succeed or raise TypeError, ValueError or a KVCoreError, and the allocator must stay
internally consistent afterwards. A panic reaching Python would surface as
pyo3_runtime.PanicException (a BaseException), which this test does not catch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcore import BlockAllocator, KVCoreError

ALLOWED = (TypeError, ValueError, KVCoreError)

METHODS: dict[str, int] = {
    "create_tables": 1,
    "num_tokens": 1,
    "block_table": 1,
    "slot_mapping": 1,
    "blocks_needed": 2,
    "append": 2,
    "append_batch": 2,
    "fork": 1,
    "free": 1,
    "free_batch": 1,
    "register_prefix": 3,
    "adopt_prefix": 3,
    "compact": 2,
    "compact_batch": 3,
    "flashinfer_layout": 1,
    "vllm_layout": 3,
}

DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint32, np.uint64, np.float32, np.float64]
DTYPES += [np.bool_, np.complex64]

ints = st.one_of(
    st.integers(-3, 40),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**31 - 1, 2**32, 2**63 - 1, 2**63, -(2**63), 2**64]),
)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from([(), (0,), (1,), (3,), (7,), (2, 3), (1, 1, 2)]))
    size = int(np.prod(shape)) if shape else 1
    values = draw(st.lists(st.integers(-(2**40), 2**40), min_size=size, max_size=size))
    with np.errstate(all="ignore"):
        arr = np.array(values, dtype=np.int64).astype(dtype).reshape(shape)
    if draw(st.booleans()) and arr.ndim == 1 and arr.size > 1:
        arr = arr[::2]  # a non-contiguous view
    if draw(st.booleans()) and arr.ndim >= 1:
        arr.flags.writeable = False
    return arr


def garbage(valid_ids: list[int]) -> st.SearchStrategy[Any]:
    ids = st.sampled_from(valid_ids) if valid_ids else st.just(0)
    return st.one_of(
        ints,
        ids,
        st.none(),
        st.booleans(),
        st.floats(allow_nan=True),
        st.text(max_size=3),
        st.binary(max_size=3),
        st.lists(st.integers(-2, 10), max_size=4),
        st.tuples(st.integers(0, 3)),
        arrays(),
        ids.map(lambda t: np.array([t], dtype=np.int64)),
        st.just(object()),
        st.just({"a": 1}),
    )


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_no_input_crashes_or_corrupts(data: st.DataObject) -> None:
    a = BlockAllocator(12, 4)
    live = [a.create_table() for _ in range(3)]
    a.append(live[0], 5)
    a.append(live[1], 9)
    live.append(a.fork(live[1]))
    for _ in range(data.draw(st.integers(1, 6), label="calls")):
        name = data.draw(st.sampled_from(sorted(METHODS)), label="method")
        args = [data.draw(garbage(live), label=f"arg{i}") for i in range(METHODS[name])]
        try:
            getattr(a, name)(*args)
        except ALLOWED:
            pass
        a.check_invariants()
    s = a.stats()
    assert s["num_free_blocks"] + s["num_cached_blocks"] + s["num_used_blocks"] == s["capacity"]


@pytest.mark.parametrize(
    "args",
    [
        (),
        (1,),
        (1, 2, 3),
        (None, None),
    ],
)
def test_constructor_arity_and_types(args: tuple[Any, ...]) -> None:
    with pytest.raises(TypeError):
        BlockAllocator(*args)


def test_keyword_arguments_follow_the_stub() -> None:
    a = BlockAllocator(num_blocks=8, block_size=2)
    t = a.create_table()
    a.append(table=t, num_tokens=3)
    tokens = np.arange(3, dtype=np.int64)
    assert a.register_prefix(table=t, token_ids=tokens, salt=None) == 1
    src, dst = a.compact(table=t, keep=np.array([1], dtype=np.int64))
    assert src.tolist() == [3] and dst.tolist() == [2]  # token 1 (block 1) moves to slot 2
    ids = np.array([t], dtype=np.int64)
    assert a.vllm_layout(tables=ids, num_new_tokens=None, width=None)[0].shape == (1, 1)
