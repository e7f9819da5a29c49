"""Unit tests of kvcore.BlockAllocator through the Python bindings.

The exhaustive semantics are checked by the state machine in test_allocator_state.py; this
file pins the documented behaviour of each method and the exact error messages.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvcore
from kvcore import (
    BlockAllocator,
    InvalidPositionsError,
    KVCoreError,
    OutOfBlocksError,
    TableFreedError,
    UnknownTableError,
)


def i64(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def snapshot(a: BlockAllocator, tables: list[int]) -> tuple[object, ...]:
    """Everything observable about the allocator, to prove a failed call changed nothing."""
    return (
        a.stats(),
        a.free_queue().tolist(),
        a.ref_counts().tolist(),
        [(a.num_tokens(t), a.block_table(t).tolist()) for t in tables],
    )


def test_module_metadata() -> None:
    assert kvcore.build_profile in ("release", "debug")
    assert isinstance(kvcore.__version__, str) and kvcore.__version__
    assert issubclass(OutOfBlocksError, KVCoreError)
    assert issubclass(UnknownTableError, LookupError)
    assert issubclass(TableFreedError, LookupError)
    assert issubclass(InvalidPositionsError, ValueError)


def test_capacity_excludes_the_null_block() -> None:
    a = BlockAllocator(8, 16)
    assert (a.num_blocks, a.block_size, a.capacity) == (8, 16, 7)
    assert a.num_free_blocks == 7 and a.usage == 0.0
    t = a.create_table()
    slots, cow = a.append(t, 16 * 7)
    assert cow is None
    assert slots.dtype == np.int64 and slots.shape == (112,)
    assert 0 not in a.block_table(t)  # the null block is never handed out
    assert slots.min() >= 16
    assert a.usage == 1.0


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((1, 16), ValueError, "num_blocks must be at least 2"),
        ((8, 0), ValueError, "block_size must be positive, got 0"),
        ((-3, 16), ValueError, "num_blocks must be non-negative, got -3"),
        ((8, -1), ValueError, "block_size must be non-negative, got -1"),
        ((8.0, 16), TypeError, "num_blocks must be an int, got float"),
        ((8, "16"), TypeError, "block_size must be an int, got str"),
        ((2**31 + 5, 1), ValueError, "num_blocks must be at most 2147483647"),
        ((2**40, 2**30), ValueError, "num_blocks must be at most"),
        ((2**70, 1), ValueError, r"num_blocks must be an int in \[0, 2\*\*63\)"),
    ],
)
def test_constructor_rejects_bad_sizes(args: tuple[object, ...], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        BlockAllocator(*args)  # type: ignore[arg-type]


def test_append_returns_slot_ids() -> None:
    a = BlockAllocator(6, 4)
    t = a.create_table()
    slots, cow = a.append(t, 6)
    assert cow is None
    assert slots.tolist() == [4, 5, 6, 7, 8, 9]  # blocks 1 and 2
    assert a.block_table(t).tolist() == [1, 2]
    assert a.block_table(t).dtype == np.int32
    assert a.slot_mapping(t).tolist() == [4, 5, 6, 7, 8, 9]
    assert a.num_tokens(t) == 6
    empty, _ = a.append(t, 0)
    assert empty.shape == (0,) and a.num_tokens(t) == 6


def test_out_of_blocks_is_all_or_nothing() -> None:
    a = BlockAllocator(3, 4)
    t = a.create_table()
    a.append(t, 5)
    before = snapshot(a, [t])
    with pytest.raises(
        OutOfBlocksError, match=r"needs 1 block\(s\) but only 0 of 2 are free or reclaimable"
    ):
        a.append(t, 4)
    assert snapshot(a, [t]) == before
    a.append(t, 3)  # exactly the budget still fits
    assert a.num_available_blocks == 0


def test_fork_and_copy_on_write() -> None:
    a = BlockAllocator(8, 4)
    p = a.create_table()
    a.append(p, 6)
    c = a.fork(p)
    assert a.num_shared_blocks == 2
    assert a.ref_counts()[a.block_table(p)].tolist() == [2, 2]
    assert a.blocks_needed(c, 1) == 1  # the copy-on-write block
    slots, cow = a.append(c, 1)
    assert cow is not None
    src, dst = cow
    assert src == a.block_table(p)[1]
    assert a.block_table(c).tolist() == [a.block_table(p)[0], dst]
    assert slots.tolist() == [dst * 4 + 2]
    _, cow2 = a.append(p, 1)
    assert cow2 is None  # the parent owns its partial block alone now


def test_free_double_free_and_unknown_ids() -> None:
    a = BlockAllocator(8, 4)
    t = a.create_table()
    a.append(t, 9)
    a.free(t)
    assert a.num_free_blocks == 7 and a.num_tables == 0
    with pytest.raises(TableFreedError, match=rf"table {t} was already freed"):
        a.free(t)
    with pytest.raises(TableFreedError, match="already freed"):
        a.append(t, 1)
    with pytest.raises(UnknownTableError, match="unknown table id 999"):
        a.num_tokens(999)
    with pytest.raises(UnknownTableError, match="unknown table id -5"):
        a.fork(-5)
    with pytest.raises(
        UnknownTableError, match=r"unknown table id 1267650600228229401496703205376"
    ):
        a.free(2**100)
    with pytest.raises(TypeError, match="table must be an int table id, got str"):
        a.free("0")  # type: ignore[arg-type]
    t2 = a.create_table()
    assert t2 != t  # a freed id is never handed out again
    a.check_invariants()


def test_batch_append_and_free() -> None:
    a = BlockAllocator(8, 2)
    ts = a.create_tables(3)
    assert ts.dtype == np.int64 and ts.shape == (3,)
    slots, indptr, cs, cd = a.append_batch(ts, i64(3, 0, 2))
    assert indptr.tolist() == [0, 3, 3, 5]
    assert slots.shape == (5,) and cs.shape == cd.shape == (0,)
    assert cs.dtype == np.int32
    slots, indptr, _, _ = a.append_batch(ts, 1)  # a decode step: one token each
    assert indptr.tolist() == [0, 1, 2, 3]
    before = snapshot(a, ts.tolist())
    with pytest.raises(OutOfBlocksError):
        a.append_batch(ts, 4)
    assert snapshot(a, ts.tolist()) == before
    with pytest.raises(ValueError, match="appears more than once in the batch"):
        a.append_batch(i64(ts[0], ts[0]), 1)
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
        a.append_batch(ts, i64(1, 1))
    with pytest.raises(
        ValueError, match=r"num_tokens must be non-negative, got num_tokens\[1\] = -1"
    ):
        a.append_batch(ts, i64(1, -1, 1))
    with pytest.raises(ValueError, match="appears more than once in the batch"):
        a.free_batch(np.concatenate([ts, ts[:1]]))  # nothing is freed
    assert a.num_tables == 3
    a.free_batch(ts)
    assert a.num_tables == 0 and a.num_used_blocks == 0


def test_batch_copy_on_write_pairs() -> None:
    a = BlockAllocator(16, 4)
    p = a.create_table()
    a.append(p, 3)
    kids = np.array([a.fork(p) for _ in range(3)], dtype=np.int64)
    _, _, cs, cd = a.append_batch(kids, 1)
    # The parent keeps a reference, so the block stays shared and every child copies it.
    assert cs.tolist() == [a.block_table(p)[0]] * 3
    assert len(set(cd.tolist())) == 3
    a.check_invariants()


def test_prefix_cache_register_adopt_and_salts() -> None:
    a = BlockAllocator(16, 4)
    tokens = np.arange(100, 110, dtype=np.int64)
    t = a.create_table()
    a.append(t, 10)
    assert a.register_prefix(t, tokens) == 2
    assert a.register_prefix(t, tokens) == 0  # already registered
    u = a.create_table()
    assert a.adopt_prefix(u, tokens.astype(np.int32)) == 8  # int32 ids hash the same
    assert a.block_table(u).tolist() == a.block_table(t)[:2].tolist()
    for salt in (1, "1", b"1", "policy=snapkv"):
        v = a.create_table()
        assert a.adopt_prefix(v, tokens, salt=salt) == 0
        a.free(v)
    w = a.create_table()
    a.append(w, 8)
    assert a.register_prefix(w, tokens[:8], salt="1") == 2
    x = a.create_table()
    assert a.adopt_prefix(x, tokens, salt="1") == 8
    y = a.create_table()
    assert a.adopt_prefix(y, tokens, salt=b"1") == 0  # str and bytes salts differ
    with pytest.raises(ValueError, match="adopt_prefix needs an empty table"):
        a.adopt_prefix(t, tokens)
    with pytest.raises(ValueError, match=r"one id per token of the table \(10\), got 3"):
        a.register_prefix(t, tokens[:3])
    with pytest.raises(TypeError, match="salt must be an int, str, bytes or None, got float"):
        a.adopt_prefix(y, tokens, salt=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="an int salt must fit in 64 bits"):
        a.adopt_prefix(y, tokens, salt=2**80)


def test_cached_blocks_are_reused_last_and_in_lru_order() -> None:
    a = BlockAllocator(6, 2)  # 5 usable blocks
    tokens = np.array([10, 11, 12, 13], dtype=np.int64)
    t = a.create_table()
    a.append(t, 4)
    a.register_prefix(t, tokens)
    a.free(t)
    assert (a.num_cached_blocks, a.num_free_blocks) == (2, 3)
    assert a.num_available_blocks == 5
    filler = a.create_table()
    a.append(filler, 6)  # takes the three never-cached blocks first
    x = a.create_table()
    assert a.adopt_prefix(x, tokens) == 4
    a.free(x)
    a.append(filler, 1)  # must evict: the tail of the freed chain goes first
    y = a.create_table()
    assert a.adopt_prefix(y, tokens) == 2
    assert a.reset_prefix_cache() == 0  # the one cached block left is referenced by y
    a.free(y)
    assert a.reset_prefix_cache() == 1
    assert a.num_cached_blocks == 0


def test_compaction_plan_packs_kept_tokens() -> None:
    a = BlockAllocator(8, 4)
    t = a.create_table()
    slots, _ = a.append(t, 10)
    mem = np.full(8 * 4, -1, dtype=np.int64)
    mem[slots] = np.arange(10)
    src, dst = a.compact(t, i64(0, 1, 5, 6, 9))
    assert src.tolist() == [9, 10, 13] and dst.tolist() == [6, 7, 8]
    mem[dst] = mem[src]
    assert mem[a.slot_mapping(t)].tolist() == [0, 1, 5, 6, 9]
    assert a.num_used_blocks == 2
    # A bool mask works too, and keeping nothing frees everything.
    src, dst = a.compact(t, np.array([True, False, True, False, True]))
    mem[dst] = mem[src]
    assert mem[a.slot_mapping(t)].tolist() == [0, 5, 9]
    a.compact(t, np.zeros(3, dtype=bool))
    assert a.num_tokens(t) == 0 and a.num_used_blocks == 0


def test_compaction_never_writes_shared_blocks() -> None:
    a = BlockAllocator(12, 4)
    p = a.create_table()
    slots, _ = a.append(p, 10)
    c = a.fork(p)
    mem = np.full(12 * 4, -1, dtype=np.int64)
    mem[slots] = np.arange(10)
    src, dst = a.compact(c, i64(0, 2, 3, 4, 7, 8))
    assert not set((dst // 4).tolist()) & set(a.block_table(p).tolist())
    for s, d in zip(src.tolist(), dst.tolist(), strict=True):  # sequential order also works
        mem[d] = mem[s]
    assert mem[a.slot_mapping(c)].tolist() == [0, 2, 3, 4, 7, 8]
    assert mem[a.slot_mapping(p)].tolist() == list(range(10))


def test_compaction_out_of_blocks_changes_nothing() -> None:
    a = BlockAllocator(4, 2)
    p = a.create_table()
    a.append(p, 6)
    c = a.fork(p)
    before = snapshot(a, [p, c])
    with pytest.raises(OutOfBlocksError, match="needs 1 block"):
        a.compact(c, i64(1, 2))
    assert snapshot(a, [p, c]) == before


@pytest.mark.parametrize(
    ("keep", "exc", "match"),
    [
        (i64(0, 0), InvalidPositionsError, "they are duplicated: keep\\[1\\] = 0"),
        (i64(2, 1), InvalidPositionsError, "they are unsorted: keep\\[1\\] = 1 follows"),
        (i64(4), InvalidPositionsError, "keep position 4 \\(index 0\\) is out of range"),
        (i64(-1), InvalidPositionsError, "keep position -1 \\(index 0\\) is out of range"),
        (np.ones(3, dtype=bool), InvalidPositionsError, "one entry per token of table"),
        (np.zeros(2, dtype=np.float32), TypeError, "got dtype float32"),
        (np.zeros((2, 2), dtype=np.int64), ValueError, "got an array with shape \\[2, 2\\]"),
        ([0, 1], TypeError, "keep must be a 1-D numpy array .* got list"),
    ],
)
def test_compaction_rejects_bad_keep(keep: object, exc: type, match: str) -> None:
    a = BlockAllocator(4, 2)
    t = a.create_table()
    a.append(t, 4)
    before = snapshot(a, [t])
    with pytest.raises(exc, match=match):
        a.compact(t, keep)  # type: ignore[arg-type]
    assert snapshot(a, [t]) == before


def test_compact_batch_equals_one_by_one() -> None:
    def build() -> tuple[BlockAllocator, np.ndarray]:
        a = BlockAllocator(32, 4)
        ts = a.create_tables(3)
        a.append_batch(ts, i64(7, 10, 13))
        a.fork(int(ts[0]))
        return a, ts

    keeps = [i64(1, 2, 6), i64(0, 1, 2, 3, 9), i64()]
    a, ts = build()
    indptr = np.cumsum([0] + [len(k) for k in keeps]).astype(np.int64)
    src, dst, pip = a.compact_batch(ts, indptr, np.concatenate(keeps))
    b, ts_b = build()
    plans = [b.compact(int(t), k) for t, k in zip(ts_b, keeps, strict=True)]
    assert src.tolist() == sum((p[0].tolist() for p in plans), [])
    assert dst.tolist() == sum((p[1].tolist() for p in plans), [])
    assert pip.tolist() == np.cumsum([0] + [len(p[0]) for p in plans]).tolist()
    with pytest.raises(ValueError, match="keep_indptr must have len\\(tables\\) \\+ 1 = 4 entries"):
        a.compact_batch(ts, indptr[:2], np.concatenate(keeps))


def test_page_table_exports() -> None:
    a = BlockAllocator(8, 4)
    ts = a.create_tables(3)
    a.append(int(ts[0]), 5)
    a.append(int(ts[1]), 4)
    indptr, indices, last = a.flashinfer_layout(ts)
    assert indptr.tolist() == [0, 2, 3, 3]
    assert indices.tolist() == [1, 2, 3]
    assert last.tolist() == [1, 4, 0]
    assert {indptr.dtype, indices.dtype, last.dtype} == {np.dtype(np.int32)}
    table, slot_mapping, seq_lens = a.vllm_layout(ts, num_new_tokens=i64(1, 2, 0), width=3)
    assert table.dtype == np.int32 and table.shape == (3, 3)
    assert table.tolist() == [[1, 2, 0], [3, 0, 0], [0, 0, 0]]
    assert slot_mapping.dtype == np.int64 and slot_mapping.tolist() == [8, 14, 15]
    assert seq_lens.tolist() == [5, 4, 0]
    table, slot_mapping, _ = a.vllm_layout(ts)
    assert table.shape == (3, 2) and len(slot_mapping) == 9
    with pytest.raises(ValueError, match="width 1 is smaller than the longest block table"):
        a.vllm_layout(ts, width=1)
    with pytest.raises(ValueError, match=r"num_new_tokens\[0\] = 6 must be in \[0, 5\]"):
        a.vllm_layout(ts[:1], num_new_tokens=i64(6))


def test_stats_and_repr() -> None:
    a = BlockAllocator(10, 4)
    t = a.create_table()
    a.append(t, 8)
    a.fork(t)
    s = a.stats()
    assert s["num_used_blocks"] == 2 and s["num_shared_blocks"] == 2
    assert s["num_free_blocks"] + s["num_cached_blocks"] + s["num_used_blocks"] == s["capacity"]
    assert s["num_tables"] == 2 and s["usage"] == pytest.approx(2 / 9)
    assert "BlockAllocator(num_blocks=10, block_size=4, used=2" in repr(a)


def test_arrays_are_not_aliased_and_non_contiguous_input_works() -> None:
    a = BlockAllocator(64, 4)
    ts = a.create_tables(6)
    a.append_batch(ts[::2], 3)  # a strided view is read correctly
    assert [a.num_tokens(int(t)) for t in ts] == [3, 0, 3, 0, 3, 0]
    bt = a.block_table(int(ts[0]))
    bt[0] = 999  # the returned array is a copy owned by the caller
    assert a.block_table(int(ts[0]))[0] != 999


def test_numpy_integer_scalars_are_accepted_as_ids_and_counts() -> None:
    a = BlockAllocator(8, 4)
    ts = a.create_tables(2)
    slots, _ = a.append(ts[0], np.int32(3))  # numpy scalars straight from an id array
    assert slots.shape == (3,)
    _, indptr, _, _ = a.append_batch(ts, np.int64(2))
    assert indptr.tolist() == [0, 2, 4]
    assert a.num_tokens(ts[1]) == 2
    with pytest.raises(TypeError, match="num_tokens must be an int, got bool"):
        a.append(ts[0], True)
    with pytest.raises(TypeError, match="num_tokens must be an int, got float64"):
        a.append(ts[0], np.float64(1.0))
