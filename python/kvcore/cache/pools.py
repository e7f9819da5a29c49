"""Pools: sizing at the first update, byte accounting, lengths, page tables, shrinking and
growing (every reallocation moves pages block by block with their per-slot state).
"""

from __future__ import annotations

import numpy as np
import torch

from kvcore._kvcore import BlockAllocator
from kvcore.cache import resize
from kvcore.cache.controller import Controller


class Pools(Controller):
    """Sizes, lengths and reallocation of the high tier's pools."""

    @property
    def initialized(self) -> bool:
        return self.allocator is not None

    def _init(self, batch: int, first_len: int) -> None:
        streams = batch * self.num_layers * self.num_kv_heads
        block_bytes = self.page_bytes
        plan: tuple[int, int] | None = None
        # KIVI: one full-precision residual page (K and V) per stream besides the pools
        res_bytes = streams * self.residual_page_bytes
        capacity: int | None = None
        if self._capacity_bytes is not None:
            blocks_per_stream = ((self._capacity_bytes - res_bytes) // block_bytes - 1) // streams
            if blocks_per_stream < 1:
                raise ValueError(
                    f"capacity_bytes={self._capacity_bytes} holds less than one block "
                    f"({block_bytes} bytes) per stream for {streams} streams"
                )
            capacity = blocks_per_stream * self.block_size
        elif self._capacity_req is not None:
            capacity = -(-self._capacity_req // self.block_size) * self.block_size
        if capacity is not None:
            if self.policy is not None and self.policy.max_budget() > capacity:
                raise ValueError(
                    f"budget ({self.policy.max_budget()}) is above the capacity ({capacity} "
                    "tokens per stream)"
                )
            # fixed pools: the memory of the whole capacity, reserved once
            num_blocks = streams * (capacity // self.block_size) + 1
        else:
            plan = self._prefill_blocks(batch, first_len)
            if plan is None:
                # on demand: the first step of every layer, and one spare block a stream
                num_blocks = resize.fitted(
                    streams * -(-first_len // self.block_size), streams, None
                )
            else:
                # a compressed prefill: the layers' kept pages plus one layer's prompt
                num_blocks = plan[0] + 1
        # Refuse pools the machine cannot hold before allocating any (a huge block_size or
        # capacity): K and V pages, the residual pages, and the per-slot state.
        resize.check_size(num_blocks, block_bytes, self.block_size, "the pools", res_bytes)
        self.capacity = capacity
        alloc = BlockAllocator(num_blocks=num_blocks, block_size=self.block_size)
        n_slots = num_blocks * self.block_size
        self.store = self.format.alloc(num_blocks, streams, self.device)
        # Normal tensors even when the first update runs under torch.inference_mode():
        # inference tensors could not be updated in place by a later call made outside it.
        with torch.inference_mode(False):
            self.slot_pos = torch.zeros(n_slots, dtype=torch.int64, device=self.device)
            self.slot_valid = torch.zeros(n_slots, dtype=torch.bool, device=self.device)
            self.slot_score = torch.zeros(n_slots, dtype=torch.float32, device=self.device)
            # Tokens each slot stands for (> 1 for a merged / compensation slot).
            self.slot_count = torch.ones(n_slots, dtype=torch.float32, device=self.device)
        self.tables = alloc.create_tables(streams).reshape(
            batch, self.num_layers, self.num_kv_heads
        )
        if self.lo_format is not None:
            self._init_low_tier(batch, first_len, None if plan is None else max(plan[1], 1) + 1)
        self.lengths = np.zeros((batch, self.num_layers, self.num_kv_heads), dtype=np.int64)
        self.batch_size = batch
        self.allocator = alloc
        self._peak_bytes = max(self._peak_bytes, self.memory_bytes())

    def _prefill_blocks(self, batch: int, q: int) -> tuple[int, int] | None:
        """The most blocks of the high and the low tier a first step of ``q`` tokens takes
        when every layer compresses it once stored (None: the schedule does not compress it).

        The layers store their step one after the other and each is compressed before the
        next one stores (the compression runs at the next update, :meth:`flush`), in pools
        they share: the high tier needs every layer's kept pages except the smallest, plus
        one layer's prompt (:mod:`kvcore.cache.resize`), and at least one spare block a
        stream after it; MiKV's low tier needs every layer's demoted pages. The kept tokens
        are the policy's bound (:meth:`kvcore.policies.Policy.kept_tokens`).
        """
        policy = self.policy
        if policy is None or not self._will_compress(0, q):
            return None
        bs, heads, n_layers = self.block_size, self.num_kv_heads, self.num_layers
        split = policy.splits_layer_budget
        lo_cap = q
        if self._lo_capacity_req is not None:
            lo_cap = min(q, -(-self._lo_capacity_req // bs) * bs)
        kept, demoted = [], 0
        for layer in range(n_layers):
            k = np.minimum(policy.kept_tokens(layer, n_layers, heads, q), q)
            kept.append(batch * resize.head_pages(k, q, bs, split))
            if self.lo_format is not None:
                demoted += batch * resize.head_pages(np.minimum(q - k, lo_cap), lo_cap, bs, split)
        prompt = batch * heads * -(-q // bs)
        # and one free block a stream once the prefill is done (the first decode steps'),
        # which is more than the last layer's freed prompt only when few tokens are evicted
        spare = batch * n_layers * heads
        return max(sum(kept) - min(kept) + prompt, sum(kept) + spare), demoted

    def peak_memory_bytes(self) -> int:
        """The largest :meth:`memory_bytes` the cache has had, the old and the new pools
        together while a resize copies: pools are reallocated by :meth:`shrink`, when a step
        needs more blocks than are free (pools sized on demand, or shrunk), and when on-demand
        pools shrink at the start of a step."""
        return max(self._peak_bytes, self.memory_bytes())

    def used_bytes(self) -> int:
        """Bytes of K and V in blocks that streams hold now."""
        if self.allocator is None:
            return 0
        self.flush()
        assert self.allocator is not None
        held = self._held_slots(self.allocator, self.tables, self.lengths)
        n = self.format.nbytes(self.store, held)
        if self.lo_allocator is not None and self.lo_format is not None:
            held = self._held_slots(self.lo_allocator, self.lo_tables, self.lo_lengths)
            n += self.lo_format.nbytes(self.lo_store, held)
        return n

    def stored_lengths(self, layer_idx: int | None = None) -> np.ndarray:
        """Stored tokens per stream: ``(B, L, H)`` or ``(B, H)`` for one layer (padding
        tokens included until they are evicted)."""
        if layer_idx is not None:
            self._check_layer(layer_idx)
        self.flush()
        if self.allocator is None:
            return np.zeros((0, self.num_layers, self.num_kv_heads), np.int64)
        out: np.ndarray = (self.lengths if layer_idx is None else self.lengths[:, layer_idx]).copy()
        return out

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The logical length: positions of the next token (all tokens seen with
        ``positions="original"``, the stored length with ``"compact"``)."""
        self._check_layer(layer_idx)
        self.flush()
        return self._next_pos[layer_idx]

    def get_stored_length(self, layer_idx: int = 0) -> int:
        """The longest stream of the layer, in stored tokens (the physical kv length)."""
        self._check_layer(layer_idx)
        self.flush()
        if self.allocator is None:
            return 0
        return int(self.lengths[:, layer_idx].max())

    def is_ragged(self, layer_idx: int) -> bool:
        """Whether the layer's streams differ in length or hold padding tokens, so dense
        attention over :meth:`update`'s output would be wrong (use :meth:`attend`)."""
        if self.allocator is None:
            return False
        lens = self.lengths[:, layer_idx]
        if self.lo_allocator is not None and bool(self.lo_lengths[:, layer_idx].any()):
            return True  # the low tier is only read by attend
        return bool(lens.min() != lens.max()) or self._seen_padding(layer_idx)

    def _seen_padding(self, layer_idx: int) -> bool:
        """Whether padding tokens are still stored in the layer."""
        lens = self.lengths[:, layer_idx].reshape(-1)
        slots = self._slots(self.tables[:, layer_idx].reshape(-1), lens)[0]
        return bool((~self.slot_valid[slots] & (slots >= 0)).any()) if slots.numel() else False

    def page_table(
        self, layer_idx: int, layout: str = "flashinfer"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The layer's page table for a serving kernel, one row per stream ``b * H + h``.

        Args:
            layout: ``"flashinfer"`` -> ``(indptr, indices, last_page_len)`` int32;
                ``"vllm"`` -> ``(block_table, slot_mapping, seq_lens)`` (see
                ``BlockAllocator.flashinfer_layout`` / ``vllm_layout``). Block ids index
                ``k_pool`` / ``v_pool`` ``(num_blocks, block_size, head_dim)``.
        """
        self._check_layer(layer_idx)
        if layout not in ("flashinfer", "vllm"):
            raise ValueError(f"layout must be 'flashinfer' or 'vllm', got {layout!r}")
        if self.allocator is None:
            raise ValueError("the cache holds nothing yet: call update first")
        self.flush()
        assert self.allocator is not None
        tables = np.ascontiguousarray(self.tables[:, layer_idx].reshape(-1))
        if layout == "flashinfer":
            return self.allocator.flashinfer_layout(tables)
        return self.allocator.vllm_layout(tables)

    def shrink(self, capacity: int | None = None) -> int:
        """Fits the pools to the pages the streams hold once compression has emptied blocks,
        and returns the bytes given back.

        The pools are sized at the first update, and a compression returns blocks to the
        allocator, not memory to the device: with the default ``Schedule.prefill()`` they
        still span the whole prompt after it. ``shrink`` copies every stream's pages, block by
        block in table order, into pools of the blocks all streams hold together plus one
        spare block a stream (both tiers), with their per-slot state; nothing is re-encoded
        and no token moves within its page, so attention reads the same values. Later steps
        grow the pools again when they need more blocks than are free (by at least one block
        a stream, so at most once every ``block_size`` decode steps), never past the
        capacity. Pending compressions run first.

        Args:
            capacity: also lowers the capacity to this many tokens per stream (rounded up to
                whole blocks; a larger one leaves it as it is), and fixes it from then on: a
                step past it raises ``OutOfBlocksError``, even when the pools were sized on
                demand. None: the capacity stays (pools sized on demand stay so).

        Returns:
            ``memory_bytes()`` at the call minus after it (0 when the pools are already that
            small, or before the first update).

        Raises:
            ValueError: ``capacity`` below the longest stream or the policy's budget (the
                cache is unchanged).
        """
        if capacity is not None:
            # Checked before the pending compressions run, so a refused call changes nothing;
            # only a capacity that the pending compressions could make room for waits for them.
            floor = self._need_budget() if self._compression_pending() else self._need()
            if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < floor:
                self._refuse_capacity(capacity, floor)
        # before the pending compressions: MiKV's demotions may grow the low tier
        before = self.memory_bytes()
        self.flush()
        if self.allocator is None:
            return 0
        if capacity is not None:
            need = self._need()
            if capacity < need:
                self._refuse_capacity(capacity, need)
            cap = -(-capacity // self.block_size) * self.block_size
            self.capacity = cap if self.capacity is None else min(cap, self.capacity)
            self._auto_size = False
        self._fit(0, 1)
        return before - self.memory_bytes()

    def _need_budget(self) -> int:
        return self.policy.max_budget() if self.policy is not None else 0

    def _need(self) -> int:
        """Tokens per stream the capacity must keep: the longest stream, at least the budget."""
        longest = int(self.lengths.max()) if self.allocator is not None else 0
        return max(longest, self._need_budget())

    def _refuse_capacity(self, capacity: object, need: int) -> None:
        longest = int(self.lengths.max()) if self.allocator is not None else 0
        raise ValueError(
            f"capacity must be an int >= {need} tokens per stream (the longest stream "
            f"holds {longest}, the policy's budget is {self._need_budget()}), got {capacity!r}"
        )

    def _limit(self) -> int | None:
        """The most blocks the high tier's streams may hold together (None: no capacity)."""
        if self.capacity is None:
            return None
        return int(self.lengths.size) * (self.capacity // self.block_size)

    def _fit(self, q: int, ratio: float) -> None:
        """Resizes each tier whose pools hold at least ``ratio`` times what they need: their
        pages (the high tier's after a step of ``q`` tokens to every layer) plus one spare
        block a stream."""
        assert self.allocator is not None
        streams, bs = int(self.lengths.size), self.block_size
        used = int(self.allocator.num_used_blocks) + resize.pages_added(self.lengths, q, bs)
        target = resize.fitted(used, streams, self._limit())
        if ratio * target <= self.allocator.num_blocks and target < self.allocator.num_blocks:
            self._resize(target)
        lo = self.lo_allocator
        if lo is not None:
            target = resize.fitted(int(lo.num_used_blocks), streams, self._lo_limit())
            if ratio * target <= lo.num_blocks and target < lo.num_blocks:
                self._lo_resize(target)

    def _auto_shrink(self, q: int) -> None:
        """On-demand pools, at the start of a step of ``q`` tokens with every layer's
        compressions done: fit pools at least a third larger than the contents need."""
        if self.allocator is None or len(set(self._seen)) != 1:
            return
        self._fit(q, 4 / 3)

    def _reserve(self, layer: int, q: int) -> None:
        """Grows the pools when their free blocks do not cover a step of ``q`` tokens to
        ``layer``; the layers that have not taken the step yet are counted too, so a step grows
        the pools once. Within the capacity (checked by the caller)."""
        assert self.allocator is not None
        bs = self.block_size
        if resize.pages_added(self.lengths[:, layer], q, bs) <= self.allocator.num_free_blocks:
            return
        todo = [i for i in range(self.num_layers) if self._seen[i] == self._seen[layer]]
        needed = resize.pages_added(self.lengths[:, todo], q, bs)
        used = int(self.allocator.num_used_blocks)
        self._resize(resize.grown(used, needed, int(self.lengths.size), self._limit()))

    def _resize(self, num_blocks: int) -> None:
        """Moves every stream's pages, block by block in table order, into new pools of
        ``num_blocks`` blocks (null block included), with their per-slot state (contents
        unchanged)."""
        assert self.allocator is not None
        bs = self.block_size
        streams = int(self.lengths.size)
        resize.check_size(
            num_blocks, self.page_bytes, bs, "the pools", streams * self.residual_page_bytes
        )
        old_bytes = self.k_pool.nbytes + self.v_pool.nbytes
        pages = self.store.per_block()  # the pools, and what else the format keeps per block
        parts: list[tuple[torch.Tensor, int, float]] = [(t, 1, fill) for t, fill in pages]
        parts += [
            (self.slot_pos, bs, 0.0),
            (self.slot_valid, bs, 0.0),
            (self.slot_score, bs, 0.0),
            (self.slot_count, bs, 1.0),
        ]
        alloc, tables, out = resize.relocate(
            self.allocator, self.tables.reshape(-1), self.lengths.reshape(-1), num_blocks, parts
        )
        n = len(pages)
        self.store = self.store.with_blocks(out[:n])
        self.slot_pos, self.slot_valid, self.slot_score, self.slot_count = out[n:]
        self.allocator = alloc
        self.tables = tables.reshape(self.batch_size, self.num_layers, self.num_kv_heads)
        # both generations of pools exist while the pages are copied
        self._peak_bytes = max(self._peak_bytes, self.memory_bytes() + old_bytes)

    def evicted_lengths(self, layer_idx: int | None = None) -> np.ndarray:
        """MiKV: tokens per stream in the low-precision tier, ``(B, L, H)`` or ``(B, H)``
        (zeros without ``evicted_format``)."""
        if layer_idx is not None:
            self._check_layer(layer_idx)
        self.flush()
        if self.allocator is None:
            return np.zeros((0, self.num_layers, self.num_kv_heads), np.int64)
        if self.lo_allocator is None:
            lens = np.zeros_like(self.lengths)
        else:
            lens = self.lo_lengths.copy()
        return lens if layer_idx is None else lens[:, layer_idx].copy()
