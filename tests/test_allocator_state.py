"""Stateful property test: ``kvcore.BlockAllocator`` against the pure-Python model.

Hypothesis drives random sequences of operations (append, batches, fork, free, compaction,
prefix caching, misuse) on a small pool so that running out of blocks, cache eviction and
sharing happen all the time. Every operation runs on both the allocator and the model in
``allocator_model.py``; their return values must agree, and after every step the whole
observable state must agree too.

The test also plays the caller's part: it keeps a per-slot "memory" (one row per slot: the
token id and a unique write id) into which it writes appended tokens, applies copy-on-write
copies and applies compaction plans. Reading that memory through every table's slots must
give back exactly the table's tokens, which checks the *meaning* of the plans, the copies
and the prefix hits, not just their agreement with the model.

``pytest --hypothesis-show-statistics`` lists how often the interesting situations (copy on
write, eviction, prefix hits, replaced shared blocks, ...) came up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import allocator_model as am
import numpy as np
import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import kvcore

# A tiny vocabulary makes equal blocks (and so duplicate registrations and prefix hits)
# common even without reusing a stored token list.
VOCAB = 3
MAX_BATCH = 4
MAX_HISTORIES = 8

Salt = int | str | bytes | None
# 1, "1" and b"1" must be three different salts; None differs from b"".
SALTS: st.SearchStrategy[Salt] = st.one_of(
    st.none(),
    st.sampled_from([1, 0, -1, 2**64 - 1, -(2**63)]),
    st.sampled_from(["1", "a"]),
    st.sampled_from([b"1", b""]),
)
ID_DTYPES = st.sampled_from([np.int64, np.int32])

ERRORS: dict[type[am.ModelError], type[Exception]] = {
    am.OutOfBlocks: kvcore.OutOfBlocksError,
    am.UnknownTable: kvcore.UnknownTableError,
    am.TableFreed: kvcore.TableFreedError,
    am.InvalidPositions: kvcore.InvalidPositionsError,
    am.InvalidArgument: ValueError,
}

W = TypeVar("W")
G = TypeVar("G")
Calls = dict[str, tuple[Callable[[], Any], Callable[[], Any]]]


def expect_error(err: am.ModelError, real_call: Callable[[], object]) -> None:
    """kvcore must raise the exception matching the model's predicted error."""
    with pytest.raises(ERRORS[type(err)]) as info:
        real_call()
    if isinstance(err, am.InvalidArgument):
        # A plain ValueError, not one of kvcore's own (more specific) classes.
        assert type(info.value) is ValueError, repr(info.value)
    if isinstance(err, am.OutOfBlocks):
        want = f"needs {err.needed} block(s) but only {err.available} of {err.capacity}"
        assert want in str(info.value), (want, str(info.value))


def both(model_call: Callable[[], W], real_call: Callable[[], G]) -> tuple[W, G] | None:
    """Runs the model, then kvcore. Returns both results, or None when the model predicted an
    error and kvcore raised the matching exception (there is then nothing to apply: the
    per-step invariant proves kvcore changed nothing, as the model did not)."""
    try:
        want = model_call()
    except am.ModelError as err:
        expect_error(err, real_call)
        event(f"raised {type(err).__name__}")
        return None
    return want, real_call()


def i64(values: Sequence[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def often(data: st.DataObject, label: str) -> bool:
    """True three times out of four (shrinks to True)."""
    return data.draw(st.integers(0, 3), label=label) != 3


def keep_positions(n: int) -> st.SearchStrategy[list[int]]:
    """Keep sets for a table of ``n`` tokens, biased to the shapes compaction treats apart."""
    return st.one_of(
        # A prefix: nothing moves, blocks are only dropped (and the last may turn partial).
        st.integers(0, n).map(lambda k: list(range(k))),
        # Any subset.
        st.lists(st.booleans(), min_size=n, max_size=n).map(
            lambda mask: [i for i, k in enumerate(mask) if k]
        ),
        # Everything but one token: a long run of one-slot moves.
        st.integers(0, max(n - 1, 0)).map(lambda k: [p for p in range(n) if p != k]),
    )


class AllocatorMachine(RuleBasedStateMachine):
    alloc: kvcore.BlockAllocator
    model: am.AllocatorModel
    bs: int
    live: list[int]
    freed: list[int]
    tokens: dict[int, list[int]]
    uids: dict[int, list[int]]
    salts: dict[int, Salt]
    histories: list[tuple[tuple[int, ...], Salt]]
    mem: np.ndarray
    next_uid: int

    @initialize(num_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 2, 3, 4, 8]))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.alloc = kvcore.BlockAllocator(num_blocks, block_size)
        self.model = am.AllocatorModel(num_blocks, block_size)
        self.bs = block_size
        self.live = []
        self.freed = []
        # The caller's view of every live table: its token ids and the write id of each.
        self.tokens = {}
        self.uids = {}
        self.salts = {}
        # Registered (tokens, salt) pairs, reused so that adoption often hits.
        self.histories = []
        # Columns: token id, unique write id. -1 marks a slot never written.
        self.mem = np.full((num_blocks * block_size, 2), -1, dtype=np.int64)
        self.next_uid = 0

    # ------------------------------------------------------------------------------------
    # Helpers playing the caller's part
    # ------------------------------------------------------------------------------------

    def new_table(self, salt: Salt) -> int:
        tid = self.alloc.create_table()
        assert tid == self.model.create_table()
        assert tid not in self.tokens, f"table id {tid} handed out twice"
        self.live.append(tid)
        self.tokens[tid] = []
        self.uids[tid] = []
        self.salts[tid] = salt
        return tid

    def pick_table(self, data: st.DataObject) -> int:
        """A live table; a new one when none is live (rather than a precondition, which
        would make Hypothesis discard whole sequences)."""
        if not self.live:
            return self.new_table(data.draw(SALTS, label="salt"))
        return data.draw(st.sampled_from(self.live), label="table")

    def pick_tables(self, data: st.DataObject) -> list[int]:
        """Distinct live tables for a batch call, in any order."""
        if not self.live:
            return []
        strategy = st.lists(st.sampled_from(self.live), max_size=MAX_BATCH, unique=True)
        return data.draw(strategy, label="tables")

    def drop_table(self, tid: int) -> None:
        self.live.remove(tid)
        self.freed.append(tid)
        del self.tokens[tid], self.uids[tid], self.salts[tid]

    def count(self, data: st.DataObject) -> int:
        # Mostly small appends (decode steps, partial blocks), sometimes up to or past the
        # whole budget; too many large ones would keep the pool full all the time.
        if often(data, "small count"):
            return data.draw(st.integers(0, 2 * self.bs), label="n")
        return data.draw(st.integers(0, (self.model.capacity + 1) * self.bs), label="n")

    def new_tokens(self, data: st.DataObject, tid: int, n: int) -> list[int]:
        if self.histories and data.draw(st.booleans(), label="continue a registered list"):
            # Continue a registered token list, so equal blocks show up in several tables.
            start = len(self.tokens[tid])
            h_toks = data.draw(st.sampled_from(self.histories), label="history")[0]
            tail = list(h_toks[start : start + n])
            return tail + [0] * (n - len(tail))
        return data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))

    def prompt(self, data: st.DataObject) -> tuple[list[int], Salt]:
        """Token ids and salt for adoption: mostly a registered list (cut anywhere, maybe with
        a new tail) under its own salt, so that hits are common."""
        vocab = st.integers(0, VOCAB - 1)
        if self.histories and often(data, "from a registered list"):
            h_toks, h_salt = data.draw(st.sampled_from(self.histories), label="history")
            cut = data.draw(st.integers(0, len(h_toks)), label="cut")
            tail = data.draw(st.lists(vocab, max_size=2 * self.bs), label="tail")
            salt = h_salt if often(data, "same salt") else data.draw(SALTS, label="salt")
            return list(h_toks[:cut]) + tail, salt
        toks = data.draw(st.lists(vocab, max_size=4 * self.bs), label="tokens")
        return toks, data.draw(SALTS, label="salt")

    def write(self, tid: int, slots: np.ndarray, toks: list[int]) -> None:
        assert len(slots) == len(toks)
        uids = list(range(self.next_uid, self.next_uid + len(toks)))
        self.next_uid += len(toks)
        self.mem[slots, 0] = toks
        self.mem[slots, 1] = uids
        self.tokens[tid] += toks
        self.uids[tid] += uids

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.bs
        self.mem[dst * bs : (dst + 1) * bs] = self.mem[src * bs : (src + 1) * bs]

    def apply_plan(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Applies a plan both ways the contract allows; they must give the same memory."""
        assert (src.dtype, dst.dtype) == (np.int64, np.int64)
        if len(src) > 0:
            event("compaction moved tokens")
        sequential = self.mem.copy()
        for s, d in zip(src.tolist(), dst.tolist(), strict=True):
            sequential[d] = sequential[s]
        self.mem[dst] = self.mem[src]  # one gather, then one scatter
        assert np.array_equal(sequential, self.mem), "sequential and gather/scatter differ"

    def keep(self, tid: int, keep: list[int], old_blocks: list[int]) -> None:
        self.tokens[tid] = [self.tokens[tid][p] for p in keep]
        self.uids[tid] = [self.uids[tid][p] for p in keep]
        if any(b != old_blocks[i] for i, b in enumerate(self.model.block_table(tid))):
            event("compaction replaced a shared block")

    # The three operations below are shared by their own rules and by `prefill`.

    def do_append(self, data: st.DataObject, tid: int, n: int, toks: list[int] | None) -> bool:
        assert self.alloc.blocks_needed(tid, n) == self.model.blocks_needed(tid, n)
        res = both(lambda: self.model.append(tid, n), lambda: self.alloc.append(tid, n))
        if res is None:
            return False
        (want_slots, want_cow), (slots, cow) = res
        assert slots.dtype == np.int64
        assert slots.tolist() == want_slots
        assert cow == want_cow
        if cow is not None:
            event("append: copy on write")
            self.copy_block(*cow)  # before writing the new slots, as documented
        self.write(tid, slots, self.new_tokens(data, tid, n) if toks is None else toks)
        return True

    def do_register(self, data: st.DataObject, tid: int) -> None:
        toks, salt = self.tokens[tid], self.salts[tid]
        chained = len(self.model.table(tid).hashes)
        arr = np.asarray(toks, dtype=data.draw(ID_DTYPES, label="dtype"))
        got = self.alloc.register_prefix(tid, arr, salt)
        assert got == self.model.register_prefix(tid, toks, salt)
        if got < len(self.model.table(tid).hashes) - chained:
            event("register: a block already cached elsewhere was not registered again")
        entry = (tuple(toks), salt)
        if len(toks) >= self.bs and entry not in self.histories:
            self.histories.append(entry)
            del self.histories[:-MAX_HISTORIES]

    def do_adopt(self, data: st.DataObject, tid: int, toks: list[int], salt: Salt) -> int:
        unreferenced = {b for b in range(1, self.model.num_blocks) if self.model.ref_cnt[b] == 0}
        arr = np.asarray(toks, dtype=data.draw(ID_DTYPES, label="dtype"))
        res = both(
            lambda: self.model.adopt_prefix(tid, toks, salt),
            lambda: self.alloc.adopt_prefix(tid, arr, salt),
        )
        assert res is not None
        want, got = res
        assert got == want
        if got > 0:
            event("adopt: hit")
        if unreferenced & set(self.model.block_table(tid)):
            event("adopt: revived an unreferenced cached block")
        # The table now holds the hit tokens; the invariant checks that memory agrees. The
        # write ids are whatever the cached blocks hold: from now on they must follow along.
        self.tokens[tid] = toks[:got]
        self.uids[tid] = self.mem[self.model.slot_mapping(tid), 1].tolist()
        self.salts[tid] = salt
        return got

    # ------------------------------------------------------------------------------------
    # Tables
    # ------------------------------------------------------------------------------------

    @rule(n=st.integers(1, 3), salt=SALTS)
    def create(self, n: int, salt: Salt) -> None:
        if n == 1:
            self.new_table(salt)
            return
        ids = self.alloc.create_tables(n)
        assert ids.dtype == np.int64
        assert ids.tolist() == [self.model.create_table() for _ in range(n)]
        for tid in ids.tolist():
            self.live.append(tid)
            self.tokens[tid], self.uids[tid], self.salts[tid] = [], [], salt

    @rule(data=st.data())
    def append(self, data: st.DataObject) -> None:
        tid = self.pick_table(data)
        self.do_append(data, tid, self.count(data), None)

    @rule(data=st.data())
    def append_batch(self, data: st.DataObject) -> None:
        tids = self.pick_tables(data)
        arg: int | np.ndarray
        if data.draw(st.booleans(), label="one count for all"):
            arg = self.count(data)
            counts = [arg] * len(tids)
        else:
            counts = [self.count(data) for _ in tids]
            arg = np.asarray(counts, dtype=data.draw(ID_DTYPES, label="dtype"))
        res = both(
            lambda: self.model.append_batch(tids, counts),
            lambda: self.alloc.append_batch(i64(tids), arg),
        )
        if res is None:
            return
        (w_slots, w_indptr, w_src, w_dst), (slots, indptr, src, dst) = res
        assert (slots.dtype, indptr.dtype) == (np.int64, np.int64)
        assert (src.dtype, dst.dtype) == (np.int32, np.int32)
        assert slots.tolist() == w_slots
        assert indptr.tolist() == w_indptr
        assert (src.tolist(), dst.tolist()) == (w_src, w_dst)
        if len(src) > 0:
            event("append_batch: copy on write")
        # Every copy first, then the new tokens.
        for s, d in zip(src.tolist(), dst.tolist(), strict=True):
            self.copy_block(s, d)
        for i, tid in enumerate(tids):
            table_slots = slots[indptr[i] : indptr[i + 1]]
            self.write(tid, table_slots, self.new_tokens(data, tid, len(table_slots)))

    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        tid = self.pick_table(data)
        child = self.alloc.fork(tid)
        assert child == self.model.fork(tid)
        assert child not in self.tokens, f"table id {child} handed out twice"
        self.live.append(child)
        self.tokens[child] = list(self.tokens[tid])
        self.uids[child] = list(self.uids[tid])
        self.salts[child] = self.salts[tid]

    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        tid = self.pick_table(data)
        self.model.free(tid)
        self.alloc.free(tid)
        self.drop_table(tid)

    @rule(data=st.data())
    def free_batch(self, data: st.DataObject) -> None:
        tids = self.pick_tables(data)
        self.model.free_batch(tids)
        self.alloc.free_batch(i64(tids))
        for tid in tids:
            self.drop_table(tid)

    # ------------------------------------------------------------------------------------
    # Compaction
    # ------------------------------------------------------------------------------------

    @rule(data=st.data())
    def compact(self, data: st.DataObject) -> None:
        tid = self.pick_table(data)
        n = len(self.tokens[tid])
        keep = data.draw(keep_positions(n), label="keep")
        form = data.draw(st.sampled_from(["int64", "int32", "mask"]), label="form")
        model_call: Callable[[], tuple[list[int], list[int]]]
        if form == "mask":
            arg = np.zeros(n, dtype=np.bool_)
            arg[keep] = True
            mask = arg.tolist()
            model_call = lambda: self.model.compact(tid, mask, as_mask=True)  # noqa: E731
        else:
            arg = np.asarray(keep, dtype=form)
            model_call = lambda: self.model.compact(tid, keep)  # noqa: E731
        old_blocks = self.model.block_table(tid)
        res = both(model_call, lambda: self.alloc.compact(tid, arg))
        if res is None:
            return
        (w_src, w_dst), (src, dst) = res
        assert (src.tolist(), dst.tolist()) == (w_src, w_dst)
        self.apply_plan(src, dst)
        self.keep(tid, keep, old_blocks)

    @rule(data=st.data())
    def compact_batch(self, data: st.DataObject) -> None:
        tids = self.pick_tables(data)
        keeps = [data.draw(keep_positions(len(self.tokens[t])), label="keep") for t in tids]
        indptr = [0]
        for k in keeps:
            indptr.append(indptr[-1] + len(k))
        positions = [p for k in keeps for p in k]
        dtype = data.draw(ID_DTYPES, label="dtype")
        old_blocks = {t: self.model.block_table(t) for t in tids}
        res = both(
            lambda: self.model.compact_batch(tids, indptr, positions),
            lambda: self.alloc.compact_batch(
                i64(tids), np.asarray(indptr, dtype=dtype), np.asarray(positions, dtype=dtype)
            ),
        )
        if res is None:
            return
        (w_src, w_dst, w_indptr), (src, dst, plan_indptr) = res
        assert (src.tolist(), dst.tolist()) == (w_src, w_dst)
        assert plan_indptr.dtype == np.int64
        assert plan_indptr.tolist() == w_indptr
        self.apply_plan(src, dst)  # the whole batch plan at once
        for tid, keep in zip(tids, keeps, strict=True):
            self.keep(tid, keep, old_blocks[tid])

    # ------------------------------------------------------------------------------------
    # Prefix caching
    # ------------------------------------------------------------------------------------

    @rule(data=st.data())
    def register_prefix(self, data: st.DataObject) -> None:
        self.do_register(data, self.pick_table(data))

    @rule(data=st.data())
    def adopt_prefix(self, data: st.DataObject) -> None:
        empty = [t for t in self.live if not self.tokens[t]]
        tid = data.draw(st.sampled_from(empty), label="empty table") if empty else None
        toks, salt = self.prompt(data)
        self.do_adopt(data, self.new_table(salt) if tid is None else tid, toks, salt)

    @rule(data=st.data())
    def prefill(self, data: st.DataObject) -> None:
        """A serving engine's prefill: adopt the cached prefix of a prompt, append the rest of
        the prompt, then register the prompt's full blocks for later requests."""
        toks, salt = self.prompt(data)
        tid = self.new_table(salt)
        hit = self.do_adopt(data, tid, toks, salt)
        if self.do_append(data, tid, len(toks) - hit, toks[hit:]):
            self.do_register(data, tid)

    @rule()
    def reset_prefix_cache(self) -> None:
        dropped = self.alloc.reset_prefix_cache()
        assert dropped == self.model.reset_prefix_cache()
        if dropped:
            event("reset_prefix_cache dropped blocks")

    # ------------------------------------------------------------------------------------
    # The engine's calls: decode-time registration, batched admission, engine block hashes
    # ------------------------------------------------------------------------------------

    def chain_salt(self, tid: int) -> Salt:
        """The salt of the table's chain (its last adopt or register), from the model."""
        key = self.model.table(tid).salt
        return None if key is None else key[1]  # type: ignore[return-value]

    def remember_chain(self, tid: int) -> None:
        """A tracked table's tokens are registered as they fill: adoptions may hit them."""
        if self.model.table(tid).tail is not None and len(self.tokens[tid]) >= self.bs:
            entry = (tuple(self.tokens[tid]), self.chain_salt(tid))
            if entry not in self.histories:
                self.histories.append(entry)
                del self.histories[:-MAX_HISTORIES]

    def check_append_result(
        self, want: Any, got: Any, tids: list[int], parts: list[list[int]]
    ) -> None:
        (w_slots, w_indptr, w_src, w_dst), (slots, indptr, src, dst) = want, got
        assert slots.tolist() == w_slots
        assert indptr.tolist() == w_indptr
        assert (src.tolist(), dst.tolist()) == (w_src, w_dst)
        for s, d in zip(src.tolist(), dst.tolist(), strict=True):
            self.copy_block(s, d)
        for i, tid in enumerate(tids):
            self.write(tid, slots[indptr[i] : indptr[i + 1]], parts[i])
            self.remember_chain(tid)

    @rule(data=st.data())
    def decode_step(self, data: st.DataObject) -> None:
        """The engine's step: one ``append_batch`` with the new tokens' ids, which registers
        every block they fill in tables whose chain is known."""
        tids = self.pick_tables(data)
        one = often(data, "one token each")
        counts = [1 if one else data.draw(st.integers(0, 2 * self.bs), label="n") for _ in tids]
        parts = [self.new_tokens(data, t, c) for t, c in zip(tids, counts, strict=True)]
        flat = [x for part in parts for x in part]
        arg: int | np.ndarray = 1 if one else i64(counts)
        ids = np.asarray(flat, dtype=data.draw(ID_DTYPES, label="dtype"))
        cached = self.model.num_cached_blocks + len(self.model.index)
        res = both(
            lambda: self.model.append_batch(tids, counts, flat),
            lambda: self.alloc.append_batch(i64(tids), arg, token_ids=ids),
        )
        if res is None:
            return
        self.check_append_result(*res, tids, parts)
        if self.model.num_cached_blocks + len(self.model.index) > cached:
            event("decode_step: registered a filled block")

    @rule(data=st.data())
    def admit_wave(self, data: st.DataObject) -> None:
        """Batched admission: ``create_tables``, ``adopt_prefix_batch`` of the prompts less
        their last token, one ``append_batch`` of the missed tokens with their ids."""
        k = data.draw(st.integers(1, 3), label="wave size")
        prompts = [self.prompt(data)[0] for _ in range(k)]
        salt = data.draw(SALTS, label="salt") if not self.histories else self.prompt(data)[1]
        tids = self.alloc.create_tables(k).tolist()
        assert tids == [self.model.create_table() for _ in range(k)]
        for tid in tids:
            self.live.append(tid)
            self.tokens[tid], self.uids[tid], self.salts[tid] = [], [], salt
        look = [p[:-1] for p in prompts]
        indptr = np.cumsum([0] + [len(x) for x in look])
        flat = [x for part in look for x in part]
        res = both(
            lambda: self.model.adopt_prefix_batch(tids, indptr.tolist(), flat, salt),
            lambda: self.alloc.adopt_prefix_batch(i64(tids), indptr, i64(flat), salt),
        )
        assert res is not None
        want, hits = res
        assert hits.dtype == np.int64 and hits.tolist() == want
        if any(want):
            event("admit_wave: hit")
        for tid, p, hit in zip(tids, prompts, want, strict=True):
            self.tokens[tid] = p[:hit]
            self.uids[tid] = self.mem[self.model.slot_mapping(tid), 1].tolist()
        parts = [p[hit:] for p, hit in zip(prompts, want, strict=True)]
        counts = [len(x) for x in parts]
        rest = [x for part in parts for x in part]
        res = both(
            lambda: self.model.append_batch(tids, counts, rest),
            lambda: self.alloc.append_batch(i64(tids), i64(counts), token_ids=i64(rest)),
        )
        if res is not None:
            self.check_append_result(*res, tids, parts)

    @rule(data=st.data())
    def admit_batch(self, data: st.DataObject) -> None:
        """Admission in one call: ``admit_batch`` does what ``admit_wave``'s three calls do,
        all or nothing (a wave that does not fit changes nothing: the invariants check)."""
        k = data.draw(st.integers(0, 3), label="wave size")
        prompts = [self.prompt(data)[0] for _ in range(k)]
        salt = data.draw(SALTS, label="salt") if not self.histories else self.prompt(data)[1]
        indptr = np.cumsum([0] + [len(p) for p in prompts])
        flat = [x for p in prompts for x in p]
        dtype = data.draw(ID_DTYPES, label="dtype")
        res = both(
            lambda: self.model.admit_batch(indptr.tolist(), flat, salt),
            lambda: self.alloc.admit_batch(
                indptr.astype(dtype), np.asarray(flat, dtype=dtype), salt
            ),
        )
        if res is None:
            return
        want, got = res
        assert all(x.dtype == np.int64 for x in got)
        tids, hits, slots, slot_ptr = (x.tolist() for x in got)
        assert (tids, hits, slots, slot_ptr) == want
        if any(hits):
            event("admit_batch: hit")
        for i, (tid, p, hit) in enumerate(zip(tids, prompts, hits, strict=True)):
            self.live.append(tid)
            self.salts[tid] = salt
            self.tokens[tid] = p[:hit]
            self.uids[tid] = self.mem[self.model.slot_mapping(tid)[:hit], 1].tolist()
            self.write(tid, got[2][slot_ptr[i] : slot_ptr[i + 1]], p[hit:])
            self.remember_chain(tid)

    @rule(data=st.data())
    def register_prefix_batch(self, data: st.DataObject) -> None:
        tids = self.pick_tables(data)
        salt = data.draw(SALTS, label="salt")
        indptr = np.cumsum([0] + [len(self.tokens[t]) for t in tids])
        flat = [x for t in tids for x in self.tokens[t]]
        dtype = data.draw(ID_DTYPES, label="dtype")
        res = both(
            lambda: self.model.register_prefix_batch(tids, indptr.tolist(), flat, salt),
            lambda: self.alloc.register_prefix_batch(
                i64(tids), indptr.astype(dtype), np.asarray(flat, dtype=dtype), salt
            ),
        )
        assert res is not None
        want, got = res
        assert got.dtype == np.int64 and got.tolist() == want
        for tid in tids:
            self.remember_chain(tid)

    @rule(data=st.data())
    def block_hashes(self, data: st.DataObject) -> None:
        """Blocks named by the engine's own keys (here: the bytes of their token ids) register
        and adopt like token ids, in every accepted form, and never alias token-id blocks."""
        tid = self.pick_table(data)
        bs, toks, salt = self.bs, self.tokens[tid], self.salts[tid]
        nfull = len(toks) // bs
        rows = [
            np.asarray(toks[i * bs : (i + 1) * bs], dtype="<i8").tobytes() for i in range(nfull)
        ]
        form = data.draw(st.sampled_from(["list", "int64", "uint64", "uint8"]), label="form")
        flat = np.asarray(toks[: nfull * bs], dtype="<i8")

        def arg(rows_: list[bytes], n: int) -> Any:
            if form == "list":
                return rows_[:n]
            if form == "uint8":
                return np.frombuffer(b"".join(rows_), dtype=np.uint8).reshape(nfull, 8 * bs)[:n]
            return flat.view(form).reshape(nfull, bs)[:n]

        got = self.alloc.register_prefix(tid, salt=salt, block_hashes=arg(rows, nfull))
        assert got == self.model.register_prefix(tid, rows, salt, hashes=True)
        new = self.new_table(salt)
        cut = data.draw(st.integers(0, nfull), label="cut")
        hit = self.alloc.adopt_prefix(new, None, salt, block_hashes=arg(rows, cut))
        assert hit == self.model.adopt_prefix(new, rows[:cut], salt, hashes=True)
        if hit:
            event("block_hashes: hit")
        self.tokens[new] = toks[:hit]
        self.uids[new] = self.mem[self.model.slot_mapping(new), 1].tolist()

    def bad_engine_arguments(self, data: st.DataObject) -> None:
        tid = self.pick_table(data)
        n = len(self.tokens[tid])
        a, m = self.alloc, self.model
        calls: Calls = {
            "append_batch with one token id too many": (
                lambda: m.append_batch([tid], [1], [0, 0]),
                lambda: a.append_batch(i64([tid]), 1, token_ids=i64([0, 0])),
            ),
            "register_prefix_batch with a short indptr": (
                lambda: m.register_prefix_batch([tid], [0], []),
                lambda: a.register_prefix_batch(i64([tid]), i64([0]), i64([])),
            ),
            "register_prefix_batch with one token too many": (
                lambda: m.register_prefix_batch([tid], [0, n + 1], [0] * (n + 1)),
                lambda: a.register_prefix_batch(i64([tid]), i64([0, n + 1]), i64([0] * (n + 1))),
            ),
        }
        for ptr, what in (([], "empty"), ([0, 1], "past the end"), ([0, 1, 0], "decreasing")):
            calls[f"admit_batch with an indptr {what}"] = (
                lambda ptr=ptr: m.admit_batch(ptr, []),
                lambda ptr=ptr: a.admit_batch(i64(ptr), i64([])),
            )
        if n > 0:
            fresh = self.new_table(None)
            calls["adopt_prefix_batch with a table holding tokens"] = (
                lambda: m.adopt_prefix_batch([fresh, tid], [0, 0, 0], []),
                lambda: a.adopt_prefix_batch(i64([fresh, tid]), i64([0, 0, 0]), i64([])),
            )
        name = data.draw(st.sampled_from(sorted(calls)), label="case")
        assert both(*calls[name]) is None, name
        # Keys: exactly one of token_ids and block_hashes, rows of one width.
        with pytest.raises(TypeError, match="exactly one of token_ids and block_hashes"):
            a.register_prefix(tid, i64([0] * n), block_hashes=[b"x"])
        with pytest.raises(TypeError, match="exactly one of token_ids and block_hashes"):
            a.adopt_prefix(tid)
        with pytest.raises(ValueError, match="equally long"):
            a.register_prefix(tid, block_hashes=[b"ab", b"c"])

    # ------------------------------------------------------------------------------------
    # Misuse: every call must raise the documented error and change nothing
    # ------------------------------------------------------------------------------------

    def calls_on(self, ids: list[int]) -> Calls:
        """(model call, kvcore call) pairs on ``ids[0]`` (batch calls: on all of ``ids``)."""
        a, m, t = self.alloc, self.model, ids[0]
        empty = np.zeros(0, dtype=np.int64)
        arr = i64(ids)
        zeros = [0] * (len(ids) + 1)
        return {
            "free": (lambda: m.free(t), lambda: a.free(t)),
            "append": (lambda: m.append(t, 1), lambda: a.append(t, 1)),
            "blocks_needed": (lambda: m.blocks_needed(t, 1), lambda: a.blocks_needed(t, 1)),
            "fork": (lambda: m.fork(t), lambda: a.fork(t)),
            "num_tokens": (lambda: m.num_tokens(t), lambda: a.num_tokens(t)),
            "block_table": (lambda: m.block_table(t), lambda: a.block_table(t)),
            "slot_mapping": (lambda: m.slot_mapping(t), lambda: a.slot_mapping(t)),
            "compact": (lambda: m.compact(t, []), lambda: a.compact(t, empty)),
            "register": (lambda: m.register_prefix(t, []), lambda: a.register_prefix(t, empty)),
            "adopt": (lambda: m.adopt_prefix(t, []), lambda: a.adopt_prefix(t, empty)),
            "free_batch": (lambda: m.free_batch(ids), lambda: a.free_batch(arr)),
            "append_batch": (
                lambda: m.append_batch(ids, [1] * len(ids)),
                lambda: a.append_batch(arr, 1),
            ),
            "compact_batch": (
                lambda: m.compact_batch(ids, zeros, []),
                lambda: a.compact_batch(arr, i64(zeros), empty),
            ),
            "flashinfer_layout": (
                lambda: [m.table(x) for x in ids],
                lambda: a.flashinfer_layout(arr),
            ),
            "vllm_layout": (lambda: [m.table(x) for x in ids], lambda: a.vllm_layout(arr)),
        }

    def use_after_free(self, data: st.DataObject) -> None:
        tid = data.draw(st.sampled_from(self.freed), label="freed table")
        # A batch that also lists live tables must fail without touching them.
        others = self.pick_tables(data)[:2]
        calls = self.calls_on([tid, *others])
        name = data.draw(st.sampled_from(sorted(calls)), label="call")
        model_call, real_call = calls[name]
        with pytest.raises(am.TableFreed):
            model_call()
        with pytest.raises(kvcore.TableFreedError):
            real_call()

    def unknown_id(self, data: st.DataObject) -> None:
        # Negative ids, a slot never handed out, and a generation no slot has reached yet.
        bogus = [-1, -(2**63), len(self.model.slot_tables) + 7, 1 << 40]
        # A generation beyond the one each slot holds now: no table has had that id yet.
        gens = self.model.generations
        bogus += [
            (t & 0xFFFF_FFFF) | ((gens[t & 0xFFFF_FFFF] + 5) << 32) for t in self.live + self.freed
        ]
        calls = self.calls_on([data.draw(st.sampled_from(bogus), label="bogus id")])
        name = data.draw(st.sampled_from(sorted(calls)), label="call")
        model_call, real_call = calls[name]
        with pytest.raises(am.UnknownTable):
            model_call()
        with pytest.raises(kvcore.UnknownTableError):
            real_call()

    def duplicate_in_batch(self, data: st.DataObject) -> None:
        tid = self.pick_table(data)
        ids = data.draw(st.permutations([tid, tid, *self.live[:2]]), label="ids")
        calls = self.calls_on(ids)
        name = data.draw(st.sampled_from(["free_batch", "append_batch", "compact_batch"]))
        assert both(*calls[name]) is None, "a batch listing a table twice must be rejected"

    def bad_keep(self, data: st.DataObject) -> None:
        tid = self.pick_table(data)
        n = len(self.tokens[tid])
        bad: list[list[int]] = [[-1], [n], [0, n]]
        if n >= 1:
            bad.append([0, 0])  # duplicated
        if n >= 2:
            bad.append([1, 0])  # unsorted
        keep = data.draw(st.sampled_from(bad), label="keep")
        a, m = self.alloc, self.model
        mask = [True] * (n + 1)  # one entry too many
        calls: Calls = {
            "compact": (lambda: m.compact(tid, keep), lambda: a.compact(tid, i64(keep))),
            "compact with a long mask": (
                lambda: m.compact(tid, mask, as_mask=True),
                lambda: a.compact(tid, np.asarray(mask, dtype=np.bool_)),
            ),
            "compact_batch": (
                lambda: m.compact_batch([tid], [0, len(keep)], keep),
                lambda: a.compact_batch(i64([tid]), i64([0, len(keep)]), i64(keep)),
            ),
        }
        name = data.draw(st.sampled_from(sorted(calls)), label="call")
        assert both(*calls[name]) is None, "invalid keep positions must be rejected"

    def bad_arguments(self, data: st.DataObject) -> None:
        tid = self.pick_table(data)
        n = len(self.tokens[tid])
        a, m = self.alloc, self.model
        toks = [0] * (n + 1)
        calls: Calls = {
            "register with one token too many": (
                lambda: m.register_prefix(tid, toks),
                lambda: a.register_prefix(tid, i64(toks)),
            ),
            "append_batch with too few counts": (
                lambda: m.append_batch([tid], []),
                lambda: a.append_batch(i64([tid]), i64([])),
            ),
            "compact_batch with a short indptr": (
                lambda: m.compact_batch([tid], [0], []),
                lambda: a.compact_batch(i64([tid]), i64([0]), i64([])),
            ),
            "compact_batch with indptr not ending at len(positions)": (
                lambda: m.compact_batch([tid], [0, 1], []),
                lambda: a.compact_batch(i64([tid]), i64([0, 1]), i64([])),
            ),
        }
        if n > 0:
            calls["adopt into a table holding tokens"] = (
                lambda: m.adopt_prefix(tid, []),
                lambda: a.adopt_prefix(tid, i64([])),
            )
        name = data.draw(st.sampled_from(sorted(calls)), label="case")
        assert both(*calls[name]) is None, name

    @rule(data=st.data())
    def misuse(self, data: st.DataObject) -> None:
        # One rule for every kind of misuse, so they do not crowd out the real work.
        kinds = [self.unknown_id, self.duplicate_in_batch, self.bad_keep, self.bad_arguments]
        kinds.append(self.bad_engine_arguments)
        if self.freed:
            kinds.append(self.use_after_free)
        data.draw(st.sampled_from(kinds), label="misuse")(data)

    # ------------------------------------------------------------------------------------
    # Invariants, after every step
    # ------------------------------------------------------------------------------------

    @invariant()
    def agrees_with_model(self) -> None:
        a, m, bs = self.alloc, self.model, self.bs
        a.check_invariants()
        if m.num_evictions:
            event("a cached block was evicted")

        # Counters.
        stats = a.stats()
        want = {
            "num_blocks": m.num_blocks,
            "block_size": bs,
            "capacity": m.capacity,
            "num_free_blocks": m.num_free_blocks,
            "num_cached_blocks": m.num_cached_blocks,
            "num_used_blocks": m.num_used_blocks,
            "num_shared_blocks": m.num_shared_blocks,
            "num_available_blocks": m.num_available_blocks,
            "num_tables": len(self.live),
        }
        assert {k: stats[k] for k in want} == want
        assert (
            stats["num_free_blocks"] + stats["num_used_blocks"] + stats["num_cached_blocks"]
            == stats["capacity"]
        )
        assert stats["usage"] == m.num_used_blocks / m.capacity
        assert (a.num_free_blocks, a.num_cached_blocks, a.num_used_blocks) == (
            m.num_free_blocks,
            m.num_cached_blocks,
            m.num_used_blocks,
        )
        assert a.num_available_blocks == m.num_available_blocks
        assert a.num_tables == m.num_tables == len(self.live)
        assert sorted(m.live_ids()) == sorted(self.live)

        # The free queue, in order, and every ref count.
        assert a.free_queue().tolist() == m.queue
        refs = a.ref_counts().tolist()
        assert refs == m.ref_cnt

        # Tables.
        blocks: dict[int, list[int]] = {}
        slots: dict[int, list[int]] = {}
        for tid in self.live:
            blocks[tid] = a.block_table(tid).tolist()
            slots[tid] = a.slot_mapping(tid).tolist()
            n = a.num_tokens(tid)
            assert blocks[tid] == m.block_table(tid), f"table {tid}"
            assert slots[tid] == m.slot_mapping(tid), f"table {tid}"
            assert n == m.num_tokens(tid) == len(self.tokens[tid]), f"table {tid}"
            assert slots[tid] == [blocks[tid][p // bs] * bs + p % bs for p in range(n)]
            assert 0 not in blocks[tid] and len(set(blocks[tid])) == len(blocks[tid])

        # Each ref count is the number of live tables listing the block, so a block is in
        # two tables only when both hold a reference; in particular no slot has two owners
        # unless it lies in a block shared by (at least) all of them.
        listed = Counter(b for bl in blocks.values() for b in bl)
        assert refs == [listed[b] for b in range(m.num_blocks)]
        slot_owners = Counter(s for sl in slots.values() for s in sl)
        for s, owners in slot_owners.items():
            assert owners == 1 or refs[s // bs] >= owners, f"slot {s} owned {owners} times"

        # Page-table exports, rebuilt from the per-table block tables.
        ids = i64(self.live)
        lens = [len(self.tokens[t]) for t in self.live]
        fi_indptr, fi_indices, fi_last = a.flashinfer_layout(ids)
        assert (fi_indptr.dtype, fi_indices.dtype, fi_last.dtype) == (np.int32,) * 3
        assert fi_indptr.tolist() == np.cumsum([0] + [len(blocks[t]) for t in self.live]).tolist()
        assert fi_indices.tolist() == [b for t in self.live for b in blocks[t]]
        assert fi_last.tolist() == [(n - 1) % bs + 1 if n else 0 for n in lens]

        width = max((len(blocks[t]) for t in self.live), default=0)
        table = np.zeros((len(self.live), width + 1), dtype=np.int32)
        for i, t in enumerate(self.live):
            table[i, : len(blocks[t])] = blocks[t]
        bt, sm, sl = a.vllm_layout(ids)
        assert (bt.dtype, sm.dtype, sl.dtype) == (np.int32, np.int64, np.int32)
        assert bt.shape == (len(self.live), width)
        assert np.array_equal(bt, table[:, :width])
        assert sm.tolist() == [s for t in self.live for s in slots[t]]
        assert sl.tolist() == lens
        # A decode-like step: the last one or two tokens of each table, one padding column.
        new = [min(n, 1 + i % 2) for i, n in enumerate(lens)]
        bt, sm, sl = a.vllm_layout(ids, i64(new), width + 1)
        assert np.array_equal(bt, table)
        tails = [slots[t][len(slots[t]) - k :] for t, k in zip(self.live, new, strict=True)]
        assert sm.tolist() == [s for tail in tails for s in tail]
        assert sl.tolist() == lens

        # Memory read through each table's slots gives back exactly its tokens, and each
        # token is the very write that produced it (write ids are unique).
        for tid in self.live:
            at = self.mem[slots[tid]]
            assert at[:, 0].tolist() == self.tokens[tid], f"tokens of table {tid}"
            assert at[:, 1].tolist() == self.uids[tid], f"write ids of table {tid}"
        # A block registered under a hash holds the tokens that hash names, referenced or not:
        # nothing ever writes into a block while it is in the prefix cache.
        for b, h in enumerate(m.block_hash):
            if h is not None and h[2][0] != "key":  # blocks named by engine keys: no ids
                assert self.mem[b * bs : (b + 1) * bs, 0].tolist() == list(h[2]), f"block {b}"


TestAllocatorState = AllocatorMachine.TestCase
