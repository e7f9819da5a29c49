"""A naive pure-Python model of ``kvcore.BlockAllocator``: the oracle of the stateful test.

Everything here is a plain list or dict, and every operation is written the slow, obvious
way. The model must still agree with the Rust core on every observable detail, including
*which* block a pop hands out, so the free queue keeps the exact order the Rust intrusive
list keeps:

* front: blocks that hold no cached prefix, handed out first (a block whose last reference
  goes away is pushed here, so the most recently freed one is reused first);
* back: unreferenced blocks that still hold a registered prefix hash, least recently freed
  first; they are only reclaimed once the front runs dry.

A prefix hash is represented by the nested tuple ``(parent hash, salt key, block tokens)``
instead of a 128-bit digest (``(parent hash, salt key, ("key", bytes))`` for a block named by
an engine's own hash, so it never equals a block of token ids). Nesting the parent makes a hash
name the whole prefix and the salt, exactly like the Rust chain; only equality of hashes is
observable, so the two agree (up to digest collisions, which the Rust side rules out by using
128 bits).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

NULL_BLOCK = 0
#: Table slots are retired once their generation reaches this value (as in the Rust core).
MAX_GENERATION = 2**31 - 1

#: A chained prefix hash, see the module docstring.
Hash = tuple[object, ...]
#: The parent of every chain's first block.
ROOT_HASH: Hash = ("root",)

SaltKey = tuple[str, object] | None


class ModelError(Exception):
    """An error the model predicts; the test maps each subclass to a kvcore exception."""


class OutOfBlocks(ModelError):
    def __init__(self, needed: int, available: int, capacity: int) -> None:
        super().__init__(f"needs {needed} block(s), {available} of {capacity} available")
        self.needed = needed
        self.available = available
        self.capacity = capacity


class UnknownTable(ModelError):
    pass


class TableFreed(ModelError):
    pass


class InvalidPositions(ModelError):
    pass


class InvalidArgument(ModelError):
    pass


def salt_key(salt: int | str | bytes | None) -> SaltKey:
    """The bindings tag a salt's bytes with its type, so ``1``, ``"1"`` and ``b"1"`` are three
    different salts; a (type, value) pair keeps exactly those distinctions."""
    if salt is None:
        return None
    if isinstance(salt, bool):
        raise TypeError("a bool is not a salt")
    if isinstance(salt, int):
        return ("int", salt)
    if isinstance(salt, str):
        return ("str", salt)
    if isinstance(salt, bytes):
        return ("bytes", salt)
    raise TypeError(f"not a salt: {salt!r}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Table:
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0
    #: Chain hashes of the leading full blocks whose contents are known (registered or
    #: adopted), whether or not the block itself ended up registered under them.
    hashes: list[Hash] = field(default_factory=list)
    #: The ids of the tokens past the hashed blocks while the chain covers every token
    #: (appends with token ids then register the blocks they fill); None once it does not.
    tail: list[int] | None = field(default_factory=list)
    #: The salt of the last adopt or register call: decode-time registration uses it.
    salt: SaltKey = None


#: What names a table's blocks: token ids, or one engine key (bytes) per block.
Keys = Sequence[int] | list[bytes]


class AllocatorModel:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks >= 2 and block_size >= 1
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_cnt = [0] * num_blocks
        #: The hash a block is registered under, or None.
        self.block_hash: list[Hash | None] = [None] * num_blocks
        #: hash -> the one block registered under it.
        self.index: dict[Hash, int] = {}
        #: Unreferenced blocks, front (next handed out) first. Block 0 never enters it.
        self.queue: list[int] = list(range(1, num_blocks))
        # Table handles: a slab of slots, each with a generation; freed slots are reused
        # last-in first-out with the next generation, so a stale id never names a new table.
        self.generations: list[int] = []
        self.slot_tables: list[Table | None] = []
        self.free_slots: list[int] = []
        #: Cached blocks reclaimed by a pop, for the test's coverage statistics.
        self.num_evictions = 0

    # ------------------------------------------------------------------------------------
    # Counters
    # ------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1

    @property
    def num_available_blocks(self) -> int:
        return len(self.queue)

    @property
    def num_cached_blocks(self) -> int:
        return sum(1 for b in self.queue if self.block_hash[b] is not None)

    @property
    def num_free_blocks(self) -> int:
        return sum(1 for b in self.queue if self.block_hash[b] is None)

    @property
    def num_used_blocks(self) -> int:
        return sum(1 for r in self.ref_cnt if r > 0)

    @property
    def num_shared_blocks(self) -> int:
        return sum(1 for r in self.ref_cnt if r > 1)

    @property
    def num_tables(self) -> int:
        return sum(1 for t in self.slot_tables if t is not None)

    def live_ids(self) -> list[int]:
        return [
            (self.generations[i] << 32) | i for i, t in enumerate(self.slot_tables) if t is not None
        ]

    # ------------------------------------------------------------------------------------
    # The block pool
    # ------------------------------------------------------------------------------------

    def _pop(self) -> int:
        """Takes the front block; a cached block loses its hash (it is about to be reused)."""
        b = self.queue.pop(0)
        if self.block_hash[b] is not None:
            self.num_evictions += 1
        self._drop_hash(b)
        self.ref_cnt[b] = 1
        return b

    def _incref(self, b: int) -> None:
        if self.ref_cnt[b] == 0:
            self.queue.remove(b)
        self.ref_cnt[b] += 1

    def _decref(self, b: int) -> None:
        assert self.ref_cnt[b] > 0, f"model bug: decref of free block {b}"
        self.ref_cnt[b] -= 1
        if self.ref_cnt[b] == 0:
            if self.block_hash[b] is not None:
                self.queue.append(b)  # cached: kept as long as possible
            else:
                self.queue.insert(0, b)  # plain free block: reused first

    def _drop_hash(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            self.block_hash[b] = None
            if self.index.get(h) == b:
                del self.index[h]

    def _register(self, b: int, h: Hash) -> bool:
        # Never de-duplicate and never re-register: the first block under a hash keeps it.
        if self.block_hash[b] is not None or h in self.index:
            return False
        self.block_hash[b] = h
        self.index[h] = b
        return True

    def _out_of_blocks(self, needed: int) -> OutOfBlocks:
        return OutOfBlocks(needed, self.num_available_blocks, self.capacity)

    # ------------------------------------------------------------------------------------
    # Table handles
    # ------------------------------------------------------------------------------------

    def _slot(self, tid: int) -> int:
        if tid < 0:
            raise UnknownTable(tid)
        idx, gen = tid & 0xFFFF_FFFF, tid >> 32
        if idx < len(self.slot_tables):
            if self.generations[idx] == gen and self.slot_tables[idx] is not None:
                return idx
            if gen < self.generations[idx]:
                raise TableFreed(tid)
        raise UnknownTable(tid)

    def _table_at(self, idx: int) -> Table:
        t = self.slot_tables[idx]
        assert t is not None, "model bug: a resolved slot holds no table"
        return t

    def table(self, tid: int) -> Table:
        return self._table_at(self._slot(tid))

    def _batch_slots(self, ids: Sequence[int]) -> list[int]:
        """Resolves ids in order; the first bad or repeated id decides the error."""
        out: list[int] = []
        for tid in ids:
            idx = self._slot(tid)
            if idx in out:
                raise InvalidArgument(f"table {tid} appears more than once in the batch")
            out.append(idx)
        return out

    def _insert(self, table: Table) -> int:
        if self.free_slots:
            idx = self.free_slots.pop()
            self.slot_tables[idx] = table
        else:
            idx = len(self.slot_tables)
            self.slot_tables.append(table)
            self.generations.append(0)
        return (self.generations[idx] << 32) | idx

    def create_table(self) -> int:
        return self._insert(Table())

    def num_tokens(self, tid: int) -> int:
        return self.table(tid).num_tokens

    def block_table(self, tid: int) -> list[int]:
        return list(self.table(tid).blocks)

    def slot_mapping(self, tid: int) -> list[int]:
        t = self.table(tid)
        bs = self.block_size
        return [t.blocks[p // bs] * bs + p % bs for p in range(t.num_tokens)]

    # ------------------------------------------------------------------------------------
    # Append, fork, free
    # ------------------------------------------------------------------------------------

    def _append_need(self, t: Table, n: int) -> int:
        if n == 0:
            return 0
        bs = self.block_size
        new_blocks = ceil_div(t.num_tokens + n, bs) - len(t.blocks)
        # Writing into a shared partial last block first needs a private copy of it.
        cow = t.num_tokens % bs != 0 and self.ref_cnt[t.blocks[-1]] > 1
        return new_blocks + int(cow)

    def blocks_needed(self, tid: int, n: int) -> int:
        return self._append_need(self.table(tid), n)

    def _extend_chain(self, t: Table, toks: Sequence[int]) -> None:
        """Feeds appended token ids into a tracked chain, registering every filled block."""
        assert t.tail is not None
        bs = self.block_size
        for tok in toks:
            t.tail.append(tok)
            if len(t.tail) == bs:
                parent = t.hashes[-1] if t.hashes else ROOT_HASH
                h: Hash = (parent, t.salt, tuple(t.tail))
                self._register(t.blocks[len(t.hashes)], h)
                t.hashes.append(h)
                t.tail = []

    def _append_at(self, t: Table, n: int) -> tuple[list[int], tuple[int, int] | None]:
        bs = self.block_size
        cow = None
        if n > 0 and t.num_tokens % bs != 0:
            last = t.blocks[-1]
            if self.ref_cnt[last] > 1:
                fresh = self._pop()
                self._decref(last)
                t.blocks[-1] = fresh
                cow = (last, fresh)
            else:
                # The block's contents are about to change: it leaves the prefix cache.
                self._drop_hash(last)
        start = t.num_tokens
        t.num_tokens += n
        while len(t.blocks) * bs < t.num_tokens:
            t.blocks.append(self._pop())
        slots = [t.blocks[p // bs] * bs + p % bs for p in range(start, t.num_tokens)]
        return slots, cow

    def append(self, tid: int, n: int) -> tuple[list[int], tuple[int, int] | None]:
        t = self.table(tid)
        needed = self._append_need(t, n)
        if needed > self.num_available_blocks:
            raise self._out_of_blocks(needed)
        out = self._append_at(t, n)
        if n:
            t.tail = None  # the new tokens' ids are unknown
        return out

    def append_batch(
        self, ids: Sequence[int], counts: Sequence[int], token_ids: Sequence[int] | None = None
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """Returns ``(slots, indptr, cow_src, cow_dst)``."""
        if len(ids) != len(counts):
            raise InvalidArgument("tables and counts must have the same length")
        idxs = self._batch_slots(ids)
        tables = [self._table_at(i) for i in idxs]
        if token_ids is not None and len(token_ids) != sum(counts):
            raise InvalidArgument("token_ids must hold one id per appended token")
        # All or nothing: the whole batch's needs are summed before anything changes.
        needed = sum(self._append_need(t, n) for t, n in zip(tables, counts, strict=True))
        if needed > self.num_available_blocks:
            raise self._out_of_blocks(needed)
        slots: list[int] = []
        indptr = [0]
        cow_src: list[int] = []
        cow_dst: list[int] = []
        at = 0
        for t, n in zip(tables, counts, strict=True):
            s, cow = self._append_at(t, n)
            slots += s
            indptr.append(len(slots))
            if cow is not None:
                cow_src.append(cow[0])
                cow_dst.append(cow[1])
            if token_ids is None:
                if n:
                    t.tail = None
            elif t.tail is not None:
                self._extend_chain(t, token_ids[at : at + n])
            at += n
        return slots, indptr, cow_src, cow_dst

    def fork(self, tid: int) -> int:
        parent = self.table(tid)
        child = Table(
            list(parent.blocks),
            parent.num_tokens,
            list(parent.hashes),
            None if parent.tail is None else list(parent.tail),
            parent.salt,
        )
        for b in child.blocks:
            self._incref(b)
        return self._insert(child)

    def _free_at(self, idx: int) -> None:
        t = self._table_at(idx)
        # Tail first, so a cached tail sits ahead of its prefix in the LRU order.
        for b in reversed(t.blocks):
            self._decref(b)
        self.slot_tables[idx] = None
        self.generations[idx] += 1
        if self.generations[idx] < MAX_GENERATION:
            self.free_slots.append(idx)

    def free(self, tid: int) -> None:
        self._free_at(self._slot(tid))

    def free_batch(self, ids: Sequence[int]) -> None:
        for idx in self._batch_slots(ids):
            self._free_at(idx)

    # ------------------------------------------------------------------------------------
    # Prefix caching
    # ------------------------------------------------------------------------------------

    def _block_hash(self, keys: Keys, i: int, parent: Hash, key: SaltKey) -> Hash:
        bs = self.block_size
        if keys and isinstance(keys[0], bytes):
            return (parent, key, ("key", keys[i]))
        return (parent, key, tuple(keys[i * bs : (i + 1) * bs]))

    def _check_register(self, t: Table, keys: Keys, hashes: bool) -> None:
        want = t.num_tokens // self.block_size if hashes else t.num_tokens
        if len(keys) != want:
            raise InvalidArgument("token_ids (block_hashes) must cover the table")

    def _register_at(
        self, t: Table, keys: Keys, salt: int | str | bytes | None, hashes: bool
    ) -> int:
        bs = self.block_size
        key = salt_key(salt)
        registered = 0
        num_full = t.num_tokens // bs
        for i in range(len(t.hashes), num_full):
            parent = t.hashes[-1] if t.hashes else ROOT_HASH
            h = self._block_hash(keys, i, parent, key)
            registered += int(self._register(t.blocks[i], h))
            # The chain goes on through a block that was not registered.
            t.hashes.append(h)
        t.salt = key
        if hashes:
            t.tail = [] if t.num_tokens % bs == 0 else None
        else:
            t.tail = [int(x) for x in keys[num_full * bs :]]  # type: ignore[arg-type]
        return registered

    def register_prefix(
        self,
        tid: int,
        tokens: Keys,
        salt: int | str | bytes | None = None,
        *,
        hashes: bool = False,
    ) -> int:
        """``hashes``: ``tokens`` is a list of engine keys, one per full block."""
        t = self.table(tid)
        self._check_register(t, tokens, hashes)
        return self._register_at(t, tokens, salt, hashes)

    def _adopt_at(self, t: Table, keys: Keys, salt: int | str | bytes | None, hashes: bool) -> int:
        bs = self.block_size
        key = salt_key(salt)
        parent = ROOT_HASH
        for i in range(len(keys) if hashes else len(keys) // bs):
            h = self._block_hash(keys, i, parent, key)
            if h not in self.index:
                break  # a chain hash names its whole prefix: nothing later can hit
            b = self.index[h]
            self._incref(b)
            t.blocks.append(b)
            t.hashes.append(h)
            parent = h
        t.num_tokens = len(t.blocks) * bs
        t.tail = []
        t.salt = key
        return t.num_tokens

    def adopt_prefix(
        self,
        tid: int,
        tokens: Keys,
        salt: int | str | bytes | None = None,
        *,
        hashes: bool = False,
    ) -> int:
        t = self.table(tid)
        if t.num_tokens != 0:
            raise InvalidArgument("adopt_prefix needs an empty table")
        return self._adopt_at(t, tokens, salt, hashes)

    @staticmethod
    def _check_indptr(n: int, indptr: Sequence[int], total: int) -> None:
        if len(indptr) != n + 1:
            raise InvalidArgument("indptr must have len(tables) + 1 entries")
        if indptr[0] != 0 or indptr[-1] != total:
            raise InvalidArgument("indptr must start at 0 and end at the number of keys")
        if any(indptr[i + 1] < indptr[i] for i in range(n)):
            raise InvalidArgument("indptr must be non-decreasing")

    def _batch_parts(
        self, ids: Sequence[int], indptr: Sequence[int], keys: Keys
    ) -> list[tuple[Table, Keys]]:
        """Each table of a batched prefix call with its part of the CSR keys."""
        self._check_indptr(len(ids), indptr, len(keys))
        tables = [self._table_at(i) for i in self._batch_slots(ids)]
        return [(t, keys[indptr[i] : indptr[i + 1]]) for i, t in enumerate(tables)]

    def register_prefix_batch(
        self,
        ids: Sequence[int],
        indptr: Sequence[int],
        keys: Keys,
        salt: int | str | bytes | None = None,
        *,
        hashes: bool = False,
    ) -> list[int]:
        parts = self._batch_parts(ids, indptr, keys)
        for t, part in parts:
            self._check_register(t, part, hashes)
        return [self._register_at(t, k, salt, hashes) for t, k in parts]

    def adopt_prefix_batch(
        self,
        ids: Sequence[int],
        indptr: Sequence[int],
        keys: Keys,
        salt: int | str | bytes | None = None,
        *,
        hashes: bool = False,
    ) -> list[int]:
        parts = self._batch_parts(ids, indptr, keys)
        if any(t.num_tokens for t, _ in parts):
            raise InvalidArgument("adopt_prefix needs an empty table")
        return [self._adopt_at(t, k, salt, hashes) for t, k in parts]

    def admit_batch(
        self, indptr: Sequence[int], tokens: Sequence[int], salt: int | str | bytes | None = None
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """The three calls it stands for, on a copy of the model: ``create_table`` per prompt,
        ``adopt_prefix_batch`` of every prompt but its last token, ``append_batch`` of the
        rest with its ids. The copy replaces the model only when the whole wave fit; the
        blocks a wave needs are those its appends took plus the cached blocks its hits took
        out of the free queue."""
        if not indptr:
            raise InvalidArgument("indptr must hold len(prompts) + 1 offsets")
        n = len(indptr) - 1
        self._check_indptr(n, indptr, len(tokens))
        prompts = [list(tokens[indptr[i] : indptr[i + 1]]) for i in range(n)]
        trial = copy.deepcopy(self)
        ids = [trial.create_table() for _ in range(n)]
        heads = [p[:-1] for p in prompts]
        head_ptr = [0]
        for h in heads:
            head_ptr.append(head_ptr[-1] + len(h))
        hits = trial.adopt_prefix_batch(ids, head_ptr, [x for h in heads for x in h], salt)
        taken = self.num_available_blocks - trial.num_available_blocks
        parts = [p[hit:] for p, hit in zip(prompts, hits, strict=True)]
        try:
            slots, slot_ptr, src, _ = trial.append_batch(
                ids, [len(x) for x in parts], [x for part in parts for x in part]
            )
        except OutOfBlocks as err:
            raise self._out_of_blocks(err.needed + taken) from None
        assert not src, "a new table's blocks are private or full"
        self.__dict__ = trial.__dict__
        return ids, hits, slots, slot_ptr

    def reset_prefix_cache(self) -> int:
        dropped = 0
        # Walk the queue front to back, moving each cached block to the front as it is met
        # (so the dropped blocks end up in reverse order ahead of the plain free ones).
        for b in list(self.queue):
            if self.block_hash[b] is not None:
                self._drop_hash(b)
                self.queue.remove(b)
                self.queue.insert(0, b)
                dropped += 1
        return dropped

    # ------------------------------------------------------------------------------------
    # Compaction
    # ------------------------------------------------------------------------------------

    @staticmethod
    def _check_positions(keep: Sequence[int], num_tokens: int) -> None:
        for i, p in enumerate(keep):
            if not 0 <= p < num_tokens:
                raise InvalidPositions(f"keep position {p} is out of range")
            if i > 0 and p <= keep[i - 1]:
                raise InvalidPositions("keep positions must be strictly ascending")

    def _geometry(self, keep: Sequence[int]) -> tuple[int, int, int]:
        """``(new_num_blocks, write_start, hash_valid)`` for keeping ``keep``."""
        bs = self.block_size
        m = len(keep)
        # The first kept token that is not already at its destination.
        first_moved = next((j for j, p in enumerate(keep) if p != j), m)
        new_num_blocks = ceil_div(m, bs)
        # The first block that receives a move (none: past the kept blocks).
        write_start = first_moved // bs if first_moved < m else new_num_blocks
        # Leading blocks that stay full and untouched keep their chain hashes.
        hash_valid = min(write_start, m // bs)
        return new_num_blocks, write_start, hash_valid

    def _compaction_need(self, t: Table, keep: Sequence[int]) -> int:
        new_num_blocks, write_start, _ = self._geometry(keep)
        # One fresh block for every shared block that would be written into.
        return sum(1 for b in t.blocks[write_start:new_num_blocks] if self.ref_cnt[b] > 1)

    def _compact_at(self, t: Table, keep: Sequence[int]) -> tuple[list[int], list[int]]:
        bs = self.block_size
        new_num_blocks, write_start, hash_valid = self._geometry(keep)
        old = list(t.blocks)
        new = old[:new_num_blocks]
        # Fresh private destinations are taken before any old block is released, so no
        # destination can be a block that still holds one of this plan's sources.
        for i in range(write_start, new_num_blocks):
            if self.ref_cnt[old[i]] > 1:
                new[i] = self._pop()
        src: list[int] = []
        dst: list[int] = []
        for j, p in enumerate(keep):
            s = old[p // bs] * bs + p % bs
            d = new[j // bs] * bs + j % bs
            if s != d:  # a token already in place does not move
                src.append(s)
                dst.append(d)
        # Private blocks that get rewritten (or stop being full) leave the prefix cache;
        # shared ones keep their hash because other tables still read them unchanged.
        for b in new[hash_valid:]:
            if self.ref_cnt[b] == 1:
                self._drop_hash(b)
        del t.hashes[hash_valid:]
        # Release dropped and replaced blocks, tail first.
        for i in reversed(range(len(old))):
            if i >= new_num_blocks or new[i] != old[i]:
                self._decref(old[i])
        t.blocks = new
        if len(keep) != t.num_tokens:
            t.tail = None  # the kept ids no longer name the K/V one to one
        t.num_tokens = len(keep)
        return src, dst

    def compact(
        self, tid: int, keep: Sequence[int] | Sequence[bool], *, as_mask: bool = False
    ) -> tuple[list[int], list[int]]:
        """Keeps positions ``keep`` (or the True entries of a mask) of the table."""
        t = self.table(tid)
        if as_mask:
            if len(keep) != t.num_tokens:
                raise InvalidPositions("keep mask must have one entry per token")
            positions = [i for i, k in enumerate(keep) if k]
        else:
            positions = [int(p) for p in keep]
            self._check_positions(positions, t.num_tokens)
        needed = self._compaction_need(t, positions)
        if needed > self.num_available_blocks:
            raise self._out_of_blocks(needed)
        return self._compact_at(t, positions)

    def compact_batch(
        self, ids: Sequence[int], indptr: Sequence[int], positions: Sequence[int]
    ) -> tuple[list[int], list[int], list[int]]:
        """Returns ``(src, dst, plan_indptr)``."""
        if len(indptr) != len(ids) + 1:
            raise InvalidArgument("indptr must have len(tables) + 1 entries")
        if indptr[0] != 0 or indptr[-1] != len(positions):
            raise InvalidArgument("indptr must start at 0 and end at len(positions)")
        if any(indptr[i + 1] < indptr[i] for i in range(len(ids))):
            raise InvalidArgument("indptr must be non-decreasing")
        idxs = self._batch_slots(ids)
        keeps = [list(positions[indptr[i] : indptr[i + 1]]) for i in range(len(ids))]
        needed = 0
        for idx, keep in zip(idxs, keeps, strict=True):
            t = self._table_at(idx)
            self._check_positions(keep, t.num_tokens)
            # Conservative: every table's need on its own, all measured before any change.
            needed += self._compaction_need(t, keep)
        if needed > self.num_available_blocks:
            raise self._out_of_blocks(needed)
        src: list[int] = []
        dst: list[int] = []
        plan_indptr = [0]
        for idx, keep in zip(idxs, keeps, strict=True):
            s, d = self._compact_at(self._table_at(idx), keep)
            src += s
            dst += d
            plan_indptr.append(len(src))
        return src, dst, plan_indptr
