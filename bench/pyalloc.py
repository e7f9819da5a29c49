"""A pure-Python paged KV block allocator with kvcore's semantics: the benchmark's baseline.

It is written the way a careful Python serving engine writes its allocator (vLLM's
``BlockPool`` / ``FreeKVCacheBlockQueue`` style): all per-block state lives in preallocated
lists indexed by block id, and the free queue is an intrusive doubly linked list threaded
through two of them (``_prev`` / ``_next``), so pop, push and unlink are O(1) and create no
objects. Block 0, the null block, is never handed out, so it doubles as the list's sentinel:
``_next[0]`` is the front of the queue and ``_prev[0]`` its back.

Semantics mirror ``rust/kvcore-core/src/allocator`` exactly (the benchmark's ``--check`` mode
asserts identical slots, copy-on-write pairs, plans, hits and table ids):

* free queue order: never-cached blocks at the front (most recently freed first), cached ones
  at the back in LRU order; cached blocks are evicted only when the front runs dry;
* tables free their blocks tail first; ids are ``(generation << 32) | slot``;
* copy-on-write when appending to a shared partial last block;
* chained prefix hashes with register / adopt (Python's tuple hash instead of XXH3-128; only
  hit/miss behaviour matters, not the hash values), single and batched over CSR token arrays,
  and a whole admission wave in one call (``admit_batch``: lookups, adoptions, prefill);
* decode-time registration: ``append_batch(..., token_ids=...)`` hashes and registers every
  block that fills, from the table's known chain (its hashes plus the ids of its partial last
  block), the way vLLM v1 hashes a request's blocks as its tokens arrive;
* compaction plans with the rules of ``compact.rs``.

Results are plain Python lists, the natural output of a Python allocator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Parent "hash" of the first block of every chain.
_ROOT_HASH = hash("kvcore-pyalloc-root")
# Table slots are retired instead of reused at this generation, as in the Rust core.
_MAX_GENERATION = 2**31 - 1
_SLOT_MASK = 0xFFFF_FFFF


class OutOfBlocks(Exception):
    """The pool cannot supply the blocks a call needs; nothing changed."""


class UnknownTable(LookupError):
    """A table id this allocator never handed out."""


class TableFreed(LookupError):
    """A table id that was already freed."""


def _as_list(values: Any) -> list[int]:
    # numpy arrays arrive from the trace; a Python allocator would convert them once.
    return values.tolist() if hasattr(values, "tolist") else list(values)


class PyBlockAllocator:
    """``num_blocks`` blocks of ``block_size`` slots; block 0 is the null block."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError("need num_blocks >= 2 and block_size >= 1")
        n = num_blocks
        self.num_blocks = n
        self.block_size = block_size
        self._ref = [0] * n
        self._hash: list[int | None] = [None] * n
        # Circular list with sentinel 0, initially 1, 2, ..., n-1 (as the Rust pool).
        self._next = list(range(1, n)) + [0]
        self._prev = [n - 1] + list(range(n - 1))
        self.num_free = n - 1
        self.num_cached = 0
        self.num_shared = 0
        self._index: dict[int, int] = {}
        # Per table slot: blocks, token count, chain hashes, generation. A freed slot has
        # blocks None. The chain is "tracked" when the hashes cover every full block and
        # _t_tail holds the ids of the partial last block; _t_salt is the chain's salt.
        self._t_blocks: list[list[int] | None] = []
        self._t_ntok: list[int] = []
        self._t_hashes: list[list[int]] = []
        self._t_tail: list[list[int] | None] = []
        self._t_salt: list[object] = []
        self._t_gen: list[int] = []
        self._free_slots: list[int] = []
        self.num_tables = 0

    # ------------------------------------------------------------------ free queue

    def _pop(self) -> int:
        """Takes the front block (the caller checked availability); ref count becomes 1."""
        nxt = self._next
        b = nxt[0]
        q = nxt[b]
        nxt[0] = q
        self._prev[q] = 0
        h = self._hash[b]
        if h is not None:
            # A reclaimed cached block is about to be overwritten: it leaves the cache.
            self._hash[b] = None
            self.num_cached -= 1
            if self._index.get(h) == b:
                del self._index[h]
        else:
            self.num_free -= 1
        self._ref[b] = 1
        return b

    def _incref(self, b: int) -> None:
        ref = self._ref
        r = ref[b]
        if r == 0:
            # A prefix hit on an unreferenced cached block takes it out of the queue.
            p = self._prev[b]
            q = self._next[b]
            self._next[p] = q
            self._prev[q] = p
            if self._hash[b] is not None:
                self.num_cached -= 1
            else:
                self.num_free -= 1
        elif r == 1:
            self.num_shared += 1
        ref[b] = r + 1

    def _decref(self, b: int) -> None:
        ref = self._ref
        r = ref[b] - 1
        ref[b] = r
        if r == 1:
            self.num_shared -= 1
        elif r == 0:
            nxt = self._next
            prv = self._prev
            if self._hash[b] is not None:
                # Cached: back of the queue, kept longest for prefix hits (LRU).
                t = prv[0]
                nxt[t] = b
                prv[b] = t
                nxt[b] = 0
                prv[0] = b
                self.num_cached += 1
            else:
                # Never cached: front of the queue, reused first.
                h = nxt[0]
                nxt[0] = b
                prv[b] = 0
                nxt[b] = h
                prv[h] = b
                self.num_free += 1

    def _unregister(self, b: int) -> None:
        h = self._hash[b]
        if h is not None:
            self._hash[b] = None
            if self._index.get(h) == b:
                del self._index[h]

    # ------------------------------------------------------------------ tables

    def _slot(self, tid: int) -> int:
        idx = tid & _SLOT_MASK
        gens = self._t_gen
        if tid >= 0 and idx < len(gens):
            gen = tid >> 32
            if gens[idx] == gen and self._t_blocks[idx] is not None:
                return idx
            if gen < gens[idx]:
                raise TableFreed(tid)
        raise UnknownTable(tid)

    def _insert(
        self, blocks: list[int], ntok: int, hashes: list[int], tail: list[int] | None, salt: object
    ) -> int:
        self.num_tables += 1
        if self._free_slots:
            idx = self._free_slots.pop()
            self._t_blocks[idx] = blocks
            self._t_ntok[idx] = ntok
            self._t_hashes[idx] = hashes
            self._t_tail[idx] = tail
            self._t_salt[idx] = salt
            return (self._t_gen[idx] << 32) | idx
        idx = len(self._t_gen)
        self._t_blocks.append(blocks)
        self._t_ntok.append(ntok)
        self._t_hashes.append(hashes)
        self._t_tail.append(tail)
        self._t_salt.append(salt)
        self._t_gen.append(0)
        return idx

    def create_table(self) -> int:
        return self._insert([], 0, [], [], None)

    def create_tables(self, n: int) -> list[int]:
        return [self._insert([], 0, [], [], None) for _ in range(n)]

    def num_tokens(self, tid: int) -> int:
        return self._t_ntok[self._slot(tid)]

    def block_table(self, tid: int) -> list[int]:
        return list(self._t_blocks[self._slot(tid)])  # type: ignore[arg-type]

    @property
    def num_available_blocks(self) -> int:
        return self.num_free + self.num_cached

    def _need(self, blocks: list[int], ntok: int, n: int) -> int:
        """Blocks an append of n tokens takes, counting a copy-on-write block."""
        if n == 0:
            return 0
        bs = self.block_size
        used = ntok % bs
        if used:
            rest = n - (bs - used)
            need = 1 if self._ref[blocks[-1]] > 1 else 0
        else:
            rest = n
            need = 0
        if rest > 0:
            need += -(-rest // bs)
        return need

    def blocks_needed(self, tid: int, n: int) -> int:
        idx = self._slot(tid)
        return self._need(self._t_blocks[idx], self._t_ntok[idx], n)  # type: ignore[arg-type]

    def _append_at(self, idx: int, n: int, out: list[int]) -> tuple[int, int] | None:
        """Appends n slots to table idx (capacity already checked); slot ids go to out."""
        bs = self.block_size
        blocks: list[int] = self._t_blocks[idx]  # type: ignore[assignment]
        start = self._t_ntok[idx]
        cow = None
        if n == 0:
            return None
        if start % bs:
            last = blocks[-1]
            if self._ref[last] > 1:
                fresh = self._pop()
                self._decref(last)
                blocks[-1] = fresh
                cow = (last, fresh)
            elif self._hash[last] is not None:
                # Compaction can leave a hashed partial block; its contents now change.
                self._unregister(last)
        end = start + n
        while len(blocks) * bs < end:
            blocks.append(self._pop())
        self._t_ntok[idx] = end
        if n == 1:
            out.append(blocks[start // bs] * bs + start % bs)
        else:
            # One range per block instead of one division per token.
            pos = start
            while pos < end:
                i, off = divmod(pos, bs)
                stop = min(end, (i + 1) * bs)
                base = blocks[i] * bs - i * bs
                out.extend(range(base + pos, base + stop))
                pos = stop
        return cow

    def append(self, tid: int, n: int) -> tuple[list[int], tuple[int, int] | None]:
        """Appends n token slots; returns (slot ids, copy-on-write pair or None)."""
        if n < 0:
            raise ValueError("num_tokens must be non-negative")
        idx = self._slot(tid)
        need = self._need(self._t_blocks[idx], self._t_ntok[idx], n)  # type: ignore[arg-type]
        if need > self.num_free + self.num_cached:
            raise OutOfBlocks(need)
        out: list[int] = []
        cow = self._append_at(idx, n, out)
        if n:
            self._t_tail[idx] = None
        return out, cow

    def append_batch(
        self,
        tables: Sequence[int],
        num_tokens: int | Sequence[int],
        token_ids: Any = None,
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """All or nothing; returns (slots, indptr, cow_src, cow_dst) like kvcore. With
        ``token_ids`` (the id of every appended token, table after table) every block that
        fills in a tracked table is hashed and registered."""
        slot = self._slot
        idxs = [slot(t) for t in _as_list(tables)]
        if len(set(idxs)) != len(idxs):
            raise ValueError("a table appears more than once in the batch")
        counts = [num_tokens] * len(idxs) if isinstance(num_tokens, int) else _as_list(num_tokens)
        if len(counts) != len(idxs):
            raise ValueError("tables and num_tokens must have the same length")
        toks = None if token_ids is None else _as_list(token_ids)
        if toks is not None and len(toks) != sum(counts):
            raise ValueError("token_ids must hold one id per appended token")
        t_blocks = self._t_blocks
        t_ntok = self._t_ntok
        need_of = self._need
        need = 0
        for idx, n in zip(idxs, counts, strict=True):
            if n < 0:
                raise ValueError("num_tokens must be non-negative")
            need += need_of(t_blocks[idx], t_ntok[idx], n)  # type: ignore[arg-type]
        if need > self.num_free + self.num_cached:
            raise OutOfBlocks(need)
        slots: list[int] = []
        indptr = [0]
        cow_src: list[int] = []
        cow_dst: list[int] = []
        append_at = self._append_at
        t_tail = self._t_tail
        t_hashes = self._t_hashes
        register = self._register_block
        bs = self.block_size
        at = 0
        for idx, n in zip(idxs, counts, strict=True):
            cow = append_at(idx, n, slots)
            if cow is not None:
                cow_src.append(cow[0])
                cow_dst.append(cow[1])
            indptr.append(len(slots))
            if toks is None:
                if n:
                    t_tail[idx] = None
                continue
            tail = t_tail[idx]
            if tail is not None:
                # The decode step's common case, one token, without slicing.
                if n == 1:
                    tail.append(toks[at])
                    if len(tail) == bs:
                        register(idx, tail, t_hashes[idx])
                        t_tail[idx] = []
                else:
                    self._extend_chain(idx, toks[at : at + n])
            at += n
        return slots, indptr, cow_src, cow_dst

    def _register_block(self, idx: int, block_tokens: list[int], hashes: list[int]) -> bool:
        """Hashes the table's next full block under its chain and registers it."""
        h = hash((hashes[-1] if hashes else _ROOT_HASH, self._t_salt[idx], tuple(block_tokens)))
        b = self._t_blocks[idx][len(hashes)]  # type: ignore[index]
        hashes.append(h)
        # Never de-duplicate (as register_prefix).
        if self._hash[b] is None and h not in self._index:
            self._index[h] = b
            self._hash[b] = h
            return True
        return False

    def _extend_chain(self, idx: int, toks: list[int]) -> None:
        tail: list[int] = self._t_tail[idx]  # type: ignore[assignment]
        hashes = self._t_hashes[idx]
        bs = self.block_size
        for tok in toks:
            tail.append(tok)
            if len(tail) == bs:
                self._register_block(idx, tail, hashes)
                tail = []
        self._t_tail[idx] = tail

    def fork(self, tid: int) -> int:
        idx = self._slot(tid)
        blocks = list(self._t_blocks[idx])  # type: ignore[arg-type]
        incref = self._incref
        for b in blocks:
            incref(b)
        tail = self._t_tail[idx]
        return self._insert(
            blocks,
            self._t_ntok[idx],
            list(self._t_hashes[idx]),
            None if tail is None else list(tail),
            self._t_salt[idx],
        )

    def _free_at(self, idx: int) -> None:
        blocks: list[int] = self._t_blocks[idx]  # type: ignore[assignment]
        decref = self._decref
        # Tail first, so a cached tail is evicted before the prefix it extends.
        for b in reversed(blocks):
            decref(b)
        self._t_blocks[idx] = None
        self._t_hashes[idx] = []
        self._t_tail[idx] = None
        gen = self._t_gen[idx] + 1
        self._t_gen[idx] = gen
        if gen < _MAX_GENERATION:
            self._free_slots.append(idx)
        self.num_tables -= 1

    def free(self, tid: int) -> None:
        self._free_at(self._slot(tid))

    def free_batch(self, tables: Sequence[int]) -> None:
        idxs = [self._slot(t) for t in tables]
        if len(set(idxs)) != len(idxs):
            raise ValueError("a table appears more than once in the batch")
        for idx in idxs:
            self._free_at(idx)

    # ------------------------------------------------------------------ prefix caching

    def register_prefix(self, tid: int, token_ids: Any, salt: object = None) -> int:
        idx = self._slot(tid)
        toks = _as_list(token_ids)
        ntok = self._t_ntok[idx]
        if len(toks) != ntok:
            raise ValueError("token_ids must hold one id per token of the table")
        bs = self.block_size
        blocks: list[int] = self._t_blocks[idx]  # type: ignore[assignment]
        hashes = self._t_hashes[idx]
        bh = self._hash
        index = self._index
        registered = 0
        parent = hashes[-1] if hashes else _ROOT_HASH
        for i in range(len(hashes), ntok // bs):
            h = hash((parent, salt, tuple(toks[i * bs : (i + 1) * bs])))
            b = blocks[i]
            # Never de-duplicate: a hash already naming another block is left alone, but the
            # chain goes on through this block.
            if bh[b] is None and h not in index:
                index[h] = b
                bh[b] = h
                registered += 1
            hashes.append(h)
            parent = h
        self._t_tail[idx] = toks[ntok // bs * bs :]
        self._t_salt[idx] = salt
        return registered

    def adopt_prefix(self, tid: int, token_ids: Any, salt: object = None) -> int:
        idx = self._slot(tid)
        if self._t_ntok[idx] != 0:
            raise ValueError("adopt_prefix needs an empty table")
        toks = _as_list(token_ids)
        bs = self.block_size
        blocks: list[int] = self._t_blocks[idx]  # type: ignore[assignment]
        hashes = self._t_hashes[idx]
        index = self._index
        incref = self._incref
        parent = _ROOT_HASH
        for i in range(len(toks) // bs):
            h = hash((parent, salt, tuple(toks[i * bs : (i + 1) * bs])))
            b = index.get(h)
            if b is None:
                break
            incref(b)
            blocks.append(b)
            hashes.append(h)
            parent = h
        hit = len(blocks) * bs
        self._t_ntok[idx] = hit
        self._t_tail[idx] = []
        self._t_salt[idx] = salt
        return hit

    def _batch(self, tables: Any, indptr: Any, token_ids: Any) -> list[tuple[int, list[int]]]:
        ids = _as_list(tables)
        ip = _as_list(indptr)
        toks = _as_list(token_ids)
        if len(ip) != len(ids) + 1 or ip[0] != 0 or ip[-1] != len(toks):
            raise ValueError("indptr must have len(tables) + 1 offsets from 0 to len(token_ids)")
        if any(ip[i + 1] < ip[i] for i in range(len(ids))):
            raise ValueError("indptr must be non-decreasing")
        idxs = [self._slot(t) for t in ids]
        if len(set(idxs)) != len(idxs):
            raise ValueError("a table appears more than once in the batch")
        return [(t, toks[ip[i] : ip[i + 1]]) for i, t in enumerate(ids)]

    def adopt_prefix_batch(
        self, tables: Any, indptr: Any, token_ids: Any, salt: object = None
    ) -> list[int]:
        """Adopts for every (empty) table of the batch, all or nothing."""
        parts = self._batch(tables, indptr, token_ids)
        if any(self._t_ntok[self._slot(t)] for t, _ in parts):
            raise ValueError("adopt_prefix needs an empty table")
        return [self.adopt_prefix(t, toks, salt) for t, toks in parts]

    def register_prefix_batch(
        self, tables: Any, indptr: Any, token_ids: Any, salt: object = None
    ) -> list[int]:
        """Registers every table of the batch, all or nothing."""
        parts = self._batch(tables, indptr, token_ids)
        if any(self._t_ntok[self._slot(t)] != len(toks) for t, toks in parts):
            raise ValueError("token_ids must hold one id per token of the table")
        return [self.register_prefix(t, toks, salt) for t, toks in parts]

    def admit_batch(
        self, indptr: Any, token_ids: Any, salt: object = None
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """An admission wave in one call, all or nothing, like kvcore's: a new table per
        prompt ``token_ids[indptr[i]:indptr[i+1]]`` adopts the cached prefix of the prompt
        without its last token, then takes slots for the rest, registering the blocks it
        fills. Every lookup comes first (nothing changes until the wave is known to fit),
        then every adoption (so no append evicts a block the wave hits), then the appends.
        Returns (tables, hits, slots, slot indptr)."""
        ip = _as_list(indptr)
        toks = _as_list(token_ids)
        n = len(ip) - 1
        if n < 0 or ip[0] != 0 or ip[-1] != len(toks):
            raise ValueError("indptr must hold len(prompts) + 1 offsets from 0 to len(token_ids)")
        if any(ip[i + 1] < ip[i] for i in range(n)):
            raise ValueError("indptr must be non-decreasing")
        bs = self.block_size
        index = self._index
        ref = self._ref
        found: list[tuple[list[int], list[int]]] = []
        taken: set[int] = set()
        need = 0
        for i in range(n):
            s, e = ip[i], ip[i + 1]
            blocks: list[int] = []
            hashes: list[int] = []
            parent = _ROOT_HASH
            # The full blocks of the prompt without its last token.
            for j in range(s, e - bs, bs):
                h = hash((parent, salt, tuple(toks[j : j + bs])))
                b = index.get(h)
                if b is None:
                    break
                if ref[b] == 0:
                    taken.add(b)
                blocks.append(b)
                hashes.append(h)
                parent = h
            need += -(-(e - s) // bs) - len(blocks)
            found.append((blocks, hashes))
        need += len(taken)
        if need > self.num_free + self.num_cached:
            raise OutOfBlocks(need)
        incref = self._incref
        insert = self._insert
        tables = []
        hits = []
        for blocks, hashes in found:
            for b in blocks:
                incref(b)
            hit = len(blocks) * bs
            tables.append(insert(blocks, hit, hashes, [], salt))
            hits.append(hit)
        slots: list[int] = []
        slot_ptr = [0]
        append_at = self._append_at
        extend_chain = self._extend_chain
        for i, t in enumerate(tables):
            idx = t & _SLOT_MASK
            rest = toks[ip[i] + hits[i] : ip[i + 1]]
            append_at(idx, len(rest), slots)
            extend_chain(idx, rest)
            slot_ptr.append(len(slots))
        return tables, hits, slots, slot_ptr

    def reset_prefix_cache(self) -> int:
        nxt = self._next
        prv = self._prev
        bh = self._hash
        dropped = 0
        b = nxt[0]
        while b != 0:
            after = nxt[b]
            h = bh[b]
            if h is not None:
                del self._index[h]
                bh[b] = None
                self.num_cached -= 1
                self.num_free += 1
                # Unlink, then push to the front with the never-cached blocks.
                p = prv[b]
                nxt[p] = after
                prv[after] = p
                head = nxt[0]
                nxt[0] = b
                prv[b] = 0
                nxt[b] = head
                prv[head] = b
                dropped += 1
            b = after
        return dropped

    # ------------------------------------------------------------------ compaction

    def compact(self, tid: int, keep: Any) -> tuple[list[int], list[int]]:
        """Keeps positions ``keep`` (ascending ints or a bool mask); returns (src, dst)."""
        idx = self._slot(tid)
        ntok = self._t_ntok[idx]
        dtype = getattr(keep, "dtype", None)
        if dtype is not None and dtype.kind == "b":
            if len(keep) != ntok:
                raise ValueError("keep mask must have one entry per token")
            pos = [i for i, k in enumerate(keep.tolist()) if k]
        else:
            pos = _as_list(keep)
            prev = -1
            for p in pos:
                if p <= prev or p >= ntok:
                    raise ValueError("keep positions must be strictly ascending and in range")
                prev = p
        bs = self.block_size
        m = len(pos)
        # Leading kept tokens already in place stay untouched.
        first_moved = m
        for j, p in enumerate(pos):
            if p != j:
                first_moved = j
                break
        new_nb = -(-m // bs)
        write_start = first_moved // bs if first_moved < m else new_nb
        hash_valid = min(write_start, m // bs)
        old: list[int] = self._t_blocks[idx]  # type: ignore[assignment]
        ref = self._ref
        need = 0
        for b in old[write_start:new_nb]:
            if ref[b] > 1:
                need += 1
        if need > self.num_free + self.num_cached:
            raise OutOfBlocks(need)

        # Destinations are private: shared blocks in the rewritten range are replaced, and
        # before any old block is released, so no destination still holds a source.
        blocks = old[:new_nb]
        for i in range(write_start, new_nb):
            if ref[old[i]] > 1:
                blocks[i] = self._pop()
        src: list[int] = []
        dst: list[int] = []
        for j in range(write_start * bs, m):
            p = pos[j]
            s = old[p // bs] * bs + p % bs
            d = blocks[j // bs] * bs + j % bs
            if s != d:
                src.append(s)
                dst.append(d)
        # Private blocks whose contents change leave the prefix cache; shared ones keep it.
        for b in blocks[hash_valid:]:
            if ref[b] == 1:
                self._unregister(b)
        del self._t_hashes[idx][hash_valid:]
        if m != ntok:
            self._t_tail[idx] = None
        for i in range(len(old) - 1, min(write_start, new_nb) - 1, -1):
            if i >= new_nb or blocks[i] != old[i]:
                self._decref(old[i])
        self._t_blocks[idx] = blocks
        self._t_ntok[idx] = m
        return src, dst

    # ------------------------------------------------------------------ inspection

    def ref_counts(self) -> list[int]:
        return list(self._ref)

    def free_queue(self) -> list[int]:
        out = []
        b = self._next[0]
        while b != 0:
            out.append(b)
            b = self._next[b]
        return out

    def stats(self) -> dict[str, int]:
        cap = self.num_blocks - 1
        return {
            "num_free_blocks": self.num_free,
            "num_cached_blocks": self.num_cached,
            "num_used_blocks": cap - self.num_free - self.num_cached,
            "num_shared_blocks": self.num_shared,
            "num_tables": self.num_tables,
        }
