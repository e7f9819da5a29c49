"""Snapshots: record every stream's length, and drop what was appended since."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvcore.cache.pools import Pools


@dataclass(frozen=True)
class CacheSnapshot:
    """What :meth:`KVCache.restore` needs to drop the tokens appended after a snapshot."""

    lengths: np.ndarray | None
    seen: list[int]
    next_pos: list[int]
    compressed_once: list[bool]
    decode_steps: list[int]
    num_compressions: int


class Snapshots(Pools):
    """:meth:`snapshot` / :meth:`restore` (several questions on one compressed context)."""

    def snapshot(self) -> CacheSnapshot:
        """The cache's current contents, to :meth:`restore` after a few more steps.

        Used to ask several questions about one compressed context: snapshot after the
        context, then restore after each question. Pending compressions run first.
        """
        self.flush()
        return CacheSnapshot(
            lengths=self.lengths.copy() if self.allocator is not None else None,
            seen=list(self._seen),
            next_pos=list(self._next_pos),
            compressed_once=list(self._compressed_once),
            decode_steps=list(self._decode_steps),
            num_compressions=self.num_compressions,
        )

    def restore(self, snap: CacheSnapshot) -> None:
        """Drops every token appended since ``snap`` (their blocks go back to the pool).

        Raises:
            ValueError: a compression ran since the snapshot (evicted tokens cannot come
                back), or the snapshot is from before the pools existed. The cache is then
                unchanged.
        """
        if not isinstance(snap, CacheSnapshot):
            raise TypeError(f"snap must be a CacheSnapshot, got {type(snap).__name__}")
        if len(snap.seen) != self.num_layers or (
            snap.lengths is not None
            and snap.lengths.shape[1:] != (self.num_layers, self.num_kv_heads)
        ):
            raise ValueError("cannot restore: the snapshot is of a cache of another shape")
        if snap.num_compressions != self.num_compressions:
            raise ValueError(
                "cannot restore: the cache compressed since the snapshot "
                f"({self.num_compressions - snap.num_compressions} time(s)); take snapshots "
                "with a schedule that does not compress the dropped steps (e.g. "
                "Schedule.prefill(multi_turn='once'))"
            )
        if self.allocator is None or snap.lengths is None:
            if self.allocator is None and snap.lengths is None:
                self._pending.clear()
                return
            raise ValueError("cannot restore a snapshot taken before the first update")
        if snap.lengths.shape != self.lengths.shape or bool((snap.lengths > self.lengths).any()):
            raise ValueError("cannot restore: the snapshot holds tokens the cache no longer has")
        # The steps being dropped must not trigger compressions (checked above: none ran).
        self._pending.clear()
        tables = self.tables.reshape(-1)
        old = snap.lengths.reshape(-1)
        indptr = np.zeros(len(tables) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum(old)
        positions = np.concatenate([np.arange(n, dtype=np.int64) for n in old])
        # Keeping each stream's prefix moves nothing; emptied tail blocks are freed.
        src, _, _ = self.allocator.compact_batch(tables, indptr, positions)
        assert len(src) == 0, "a prefix compaction never moves tokens"
        self.lengths = snap.lengths.copy()
        self._seen = list(snap.seen)
        self._next_pos = list(snap.next_pos)
        self._compressed_once = list(snap.compressed_once)
        self._decode_steps = list(snap.decode_steps)
        self._step = [None] * self.num_layers
        self._next_queries = [None] * self.num_layers
