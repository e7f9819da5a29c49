"""The engine-facing calls of ``BlockAllocator``: decode-time registration in
``append_batch(..., token_ids=...)``, batched admission over CSR token arrays, and blocks named
by the engine's own hashes. The stateful test covers them against the model; these pin the
documented behaviour and messages."""

from __future__ import annotations

import numpy as np
import pytest

import kvcore


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_decode_step_registers_each_block_as_it_fills() -> None:
    a = kvcore.BlockAllocator(num_blocks=16, block_size=4)
    t = a.create_table()
    a.append_batch(i64(t), 6, token_ids=i64(1, 2, 3, 4, 5, 6))  # prefill: block 1 registered
    probe = a.create_table()
    assert a.adopt_prefix(probe, i64(1, 2, 3, 4, 5, 6, 7, 8)) == 4
    a.free(probe)
    a.append_batch(i64(t), 1, token_ids=i64(7))
    a.append_batch(i64(t), 1, token_ids=i64(8))  # the second block fills
    probe = a.create_table()
    assert a.adopt_prefix(probe, i64(1, 2, 3, 4, 5, 6, 7, 8)) == 8
    assert a.block_table(probe).tolist() == a.block_table(t).tolist()
    # Exactly what register_prefix would have done: nothing is left to register.
    assert a.register_prefix(t, i64(1, 2, 3, 4, 5, 6, 7, 8)) == 0
    a.check_invariants()


def test_the_chain_pauses_without_ids_and_resumes_with_register_prefix() -> None:
    a = kvcore.BlockAllocator(num_blocks=16, block_size=2)
    t = a.create_table()
    a.append(t, 1)  # no ids: the chain is unknown
    a.append_batch(i64(t), 1, token_ids=i64(2))
    probe = a.create_table()
    assert a.adopt_prefix(probe, i64(1, 2)) == 0
    assert a.register_prefix(t, i64(1, 2)) == 1
    a.append_batch(i64(t), 2, token_ids=i64(3, 4))
    assert a.adopt_prefix(a.create_table(), i64(1, 2, 3, 4)) == 4


def test_decode_registration_uses_the_salt_of_the_adoption() -> None:
    a = kvcore.BlockAllocator(num_blocks=16, block_size=2)
    t = a.create_table()
    assert a.adopt_prefix(t, i64(), salt="lora-1") == 0  # a miss still sets the chain's salt
    a.append_batch(i64(t), 2, token_ids=i64(5, 6))
    assert a.adopt_prefix(a.create_table(), i64(5, 6)) == 0
    assert a.adopt_prefix(a.create_table(), i64(5, 6), salt="lora-1") == 2


def hold_prefix(a: kvcore.BlockAllocator, tokens: np.ndarray) -> int:
    """A table holding ``tokens``, registered: a cached prefix for later tables to hit."""
    t = a.create_table()
    a.append(t, len(tokens))
    a.register_prefix(t, tokens)
    return t


def test_admission_wave_matches_one_request_at_a_time() -> None:
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 9, 9, 9], [7, 7]]
    wave = kvcore.BlockAllocator(num_blocks=32, block_size=2)
    single = kvcore.BlockAllocator(num_blocks=32, block_size=2)
    for a in (wave, single):
        hold_prefix(a, i64(1, 2, 3, 4))
    tables = wave.create_tables(3)
    look = np.concatenate([i64(*p[:-1]) for p in prompts])
    indptr = np.cumsum([0] + [len(p) - 1 for p in prompts])
    hits = wave.adopt_prefix_batch(tables, indptr, look)
    assert hits.dtype == np.int64 and hits.tolist() == [4, 4, 0]
    rest = np.concatenate([i64(*p[h:]) for p, h in zip(prompts, hits.tolist(), strict=True)])
    counts = i64(*[len(p) - h for p, h in zip(prompts, hits.tolist(), strict=True)])
    wave.append_batch(tables, counts, token_ids=rest)
    for p in prompts:
        t = single.create_table()
        hit = single.adopt_prefix(t, i64(*p[:-1]))
        single.append(t, len(p) - hit)
        single.register_prefix(t, i64(*p))
    for t in tables.tolist():
        assert wave.block_table(t).tolist() == single.block_table(t).tolist()
    assert wave.free_queue().tolist() == single.free_queue().tolist()
    got = wave.register_prefix_batch(
        tables,
        np.cumsum([0] + [len(p) for p in prompts]),
        np.concatenate([i64(*p) for p in prompts]),
    )
    assert got.tolist() == [0, 0, 0]  # the prefill already registered every full block


def test_admit_batch_is_the_three_calls_in_one() -> None:
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 9, 9, 9], [7, 7], [], [1, 2, 3, 4]]
    one = kvcore.BlockAllocator(num_blocks=32, block_size=2)
    three = kvcore.BlockAllocator(num_blocks=32, block_size=2)
    for a in (one, three):
        a.free(hold_prefix(a, i64(1, 2, 3, 4)))
    indptr = np.cumsum([0] + [len(p) for p in prompts])
    flat = np.concatenate([i64(*p) for p in prompts])
    tables, hits, slots, slot_indptr = one.admit_batch(indptr, flat.astype(np.int32), "s")
    assert all(x.dtype == np.int64 for x in (tables, hits, slots, slot_indptr))
    # The same on the other allocator, in three calls (no salt on either side: a miss).
    want_tables = three.create_tables(len(prompts))
    heads = [p[:-1] for p in prompts]
    want_hits = three.adopt_prefix_batch(
        want_tables,
        np.cumsum([0] + [len(h) for h in heads]),
        np.concatenate([i64(*h) for h in heads]),
        "s",
    )
    rest = [p[h:] for p, h in zip(prompts, want_hits.tolist(), strict=True)]
    want = three.append_batch(
        want_tables,
        i64(*[len(r) for r in rest]),
        token_ids=np.concatenate([i64(*r) for r in rest]),
    )
    assert hits.tolist() == want_hits.tolist() == [0, 0, 0, 0, 0]  # another salt
    assert tables.tolist() == want_tables.tolist()
    assert (slots.tolist(), slot_indptr.tolist()) == (want[0].tolist(), want[1].tolist())
    assert one.free_queue().tolist() == three.free_queue().tolist()
    # Without the salt the cached prefix hits, never the last token: [1, 2, 3, 4] hits 2.
    _, hits, _, slot_indptr = one.admit_batch(indptr, flat)
    assert hits.tolist() == [4, 4, 0, 0, 2]
    assert np.diff(slot_indptr).tolist() == [1, 3, 2, 0, 2]
    one.check_invariants()


def test_admit_batch_that_does_not_fit_changes_nothing() -> None:
    a = kvcore.BlockAllocator(num_blocks=5, block_size=2)  # 4 usable blocks
    a.free(hold_prefix(a, i64(1, 2, 3, 4)))  # 2 cached blocks, 2 free
    before = (a.stats(), a.free_queue().tolist())
    # Hits 4 tokens (2 cached blocks taken out of the queue), then 3 more blocks: 5 > 4.
    with pytest.raises(kvcore.OutOfBlocksError, match="needs 5 block"):
        a.admit_batch(i64(0, 10), i64(1, 2, 3, 4, 5, 6, 7, 8, 9, 10))
    assert (a.stats(), a.free_queue().tolist()) == before
    assert a.num_tables == 0
    tables, hits, _, _ = a.admit_batch(i64(0, 8), i64(1, 2, 3, 4, 5, 6, 7, 8))  # 2 + 2 fit
    assert hits.tolist() == [4] and a.num_free_blocks + a.num_cached_blocks == 0
    a.check_invariants()


def test_engine_block_hashes_in_every_form() -> None:
    a = kvcore.BlockAllocator(num_blocks=16, block_size=4)
    t = a.create_table()
    a.append(t, 8)
    h128 = np.array([[11, 12], [13, 14]], dtype=np.uint64)  # two 128-bit hashes
    assert a.register_prefix(t, block_hashes=h128, salt=3) == 2
    as_bytes = [row.tobytes() for row in h128]
    assert a.adopt_prefix(a.create_table(), block_hashes=as_bytes, salt=3) == 8
    as_u8 = np.frombuffer(b"".join(as_bytes), dtype=np.uint8).reshape(2, 16)
    assert a.adopt_prefix(a.create_table(), block_hashes=as_u8[:1], salt=3) == 4
    assert a.adopt_prefix(a.create_table(), block_hashes=as_bytes) == 0  # no salt: a miss
    tables = a.create_tables(2)
    hits = a.adopt_prefix_batch(
        tables, i64(0, 2, 3), salt=3, block_hashes=h128.view(np.int64)[[0, 1, 0]]
    )
    assert hits.tolist() == [8, 4]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda a, t: a.append_batch(i64(t), 2, token_ids=i64(1)),
            ValueError,
            r"token_ids must hold one id per appended token \(2\), got 1",
        ),
        (lambda a, t: a.register_prefix(t), TypeError, "exactly one of token_ids and block_hashes"),
        (lambda a, t: a.adopt_prefix(t, i64(1), block_hashes=[b"x"]), TypeError, "exactly one of"),
        (
            lambda a, t: a.register_prefix(t, block_hashes=[b"ab", b"c"]),
            ValueError,
            r"equally long, but block_hashes\[1\] has 1 bytes",
        ),
        (
            lambda a, t: a.register_prefix(t, block_hashes=np.zeros(2, np.uint8)),
            ValueError,
            "2-D numpy array",
        ),
        (
            lambda a, t: a.register_prefix(t, block_hashes=np.zeros((1, 2), np.float32)),
            TypeError,
            "got dtype",
        ),
        (
            lambda a, t: a.register_prefix(t, block_hashes=[b"12345678"] * 2),
            ValueError,
            r"one row per full block of the table \(1\), got 2",
        ),
        (
            lambda a, t: a.register_prefix_batch(i64(t), i64(0), i64()),
            ValueError,
            r"indptr must have len\(tables\) \+ 1 = 2 entries, got 1",
        ),
        (
            lambda a, t: a.register_prefix_batch(i64(t), i64(0, 1), i64(1, 2)),
            ValueError,
            r"indptr must start at 0 and end at len\(token_ids\) = 2, got 0 and 1",
        ),
        (
            lambda a, t: a.adopt_prefix_batch(i64(t), i64(0, 0), i64()),
            ValueError,
            "adopt_prefix needs an empty table",
        ),
        (
            lambda a, t: a.adopt_prefix_batch(i64(t, t), i64(0, 0, 0), i64()),
            ValueError,
            "appears more than once",
        ),
        (
            lambda a, t: a.admit_batch(i64(), i64()),
            ValueError,
            r"indptr must hold len\(prompts\) \+ 1 offsets, got an empty array",
        ),
        (
            lambda a, t: a.admit_batch(i64(0, 3), i64(1, 2)),
            ValueError,
            r"indptr must start at 0 and end at len\(token_ids\) = 2, got 0 and 3",
        ),
        (
            lambda a, t: a.admit_batch(i64(0, 2, 1), i64(1)),
            ValueError,
            r"indptr must be non-decreasing, but indptr\[2\] = 1 < indptr\[1\] = 2",
        ),
        (lambda a, t: a.admit_batch([0, 1], i64(1)), TypeError, "indptr must be a 1-D numpy"),
        (
            lambda a, t: a.admit_batch(i64(0, 1), np.array([1.0])),
            TypeError,
            "token_ids must be",
        ),
        (lambda a, t: a.admit_batch(i64(0, 1), i64(1), 1.5), TypeError, "salt"),
        (
            lambda a, t: a.admit_batch(i64(0, 30), np.arange(30)),
            kvcore.OutOfBlocksError,
            "needs 8 block",
        ),
    ],
)
def test_bad_engine_arguments_raise_and_change_nothing(call, error, match) -> None:  # type: ignore[no-untyped-def]
    a = kvcore.BlockAllocator(num_blocks=8, block_size=4)
    t = a.create_table()
    a.append(t, 5)
    before = (a.stats(), a.free_queue().tolist(), a.block_table(t).tolist())
    with pytest.raises(error, match=match):
        call(a, t)
    assert (a.stats(), a.free_queue().tolist(), a.block_table(t).tolist()) == before
    a.check_invariants()
