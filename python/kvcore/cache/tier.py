"""MiKV's low-precision tier of evicted tokens (``evicted_format=``).

Each stream gets a second table in a second ``BlockAllocator`` whose pools hold pages of
``lo_format``: a second :class:`~kvcore.cache.formats.QuantizedFormat` (per-token pages of
``evicted_format``'s bits), used through the same protocol as the high tier's format. The
tokens a policy evicts move there, re-encoded, with their positions, and are attended by
:mod:`kvcore.cache.dispatch` together with the high tier.
"""

from __future__ import annotations

import numpy as np
import torch

from kvcore._kvcore import BlockAllocator
from kvcore.cache import resize
from kvcore.cache.config import BITS, CacheConfig
from kvcore.cache.formats import QuantizedFormat
from kvcore.cache.pages import Pages
from kvcore.scoring import ScoreInputs, TorchPolicy


def low_tier_format(
    config: CacheConfig, policy: TorchPolicy | None, head_dim: int, dtype: torch.dtype
) -> QuantizedFormat | None:
    """The low tier's page format: per-token pages of ``evicted_format`` (None without it).

    Raises:
        ValueError: the tier needs a policy, and one without a compensation token.
    """
    fmt = config.tier.evicted_format
    if fmt is None:
        return None
    why = None
    if policy is None:
        why = "a policy (it keeps the tokens a policy evicts)"
    elif getattr(policy, "compensation", "none") != "none":
        why = "a policy without a compensation token"
    if why is not None:
        raise ValueError(f"evicted_format={fmt!r} needs {why}")
    g, bs = config.storage.group(head_dim), config.storage.block_size
    return QuantizedFormat(bs, head_dim, dtype, BITS[fmt], g, fmt)


class LowTier(Pages):
    """The low tier: its pools, writes, reads, FIFO bound and key balancer."""

    def _init_low_tier(self, batch: int, first_len: int, num_blocks: int | None = None) -> None:
        """MiKV's low tier: one more allocator table per stream, in its own pool of pages of
        ``lo_format``. ``lo_capacity`` bounds each stream (FIFO); the pools hold the blocks the
        streams hold together plus a spare (:mod:`kvcore.cache.resize`), or ``num_blocks``
        (null block included) when the caller knows what a compressed prefill will demote."""
        assert self.lo_format is not None
        streams = batch * self.num_layers * self.num_kv_heads
        cap = self._lo_capacity_req
        if cap is None:
            cap = first_len + self._slack()
        self.lo_capacity = -(-cap // self.block_size) * self.block_size
        # The tier starts empty: one spare block a stream; demotions grow it (_lo_reserve).
        if num_blocks is None:
            num_blocks = resize.fitted(0, streams, None)
        lo = BlockAllocator(num_blocks=num_blocks, block_size=self.block_size)
        n_slots = num_blocks * self.block_size
        self.lo_store = self.lo_format.alloc(num_blocks, streams, self.device)
        with torch.inference_mode(False):
            self.lo_slot_pos = torch.zeros(n_slots, dtype=torch.int64, device=self.device)
            self.lo_slot_valid = torch.zeros(n_slots, dtype=torch.bool, device=self.device)
            # MiKV's per-channel key balancer of each stream (keys stored as K / s)
            self.lo_key_scale = torch.ones(
                batch,
                self.num_layers,
                self.num_kv_heads,
                self.head_dim,
                device=self.device,
            )
        self.lo_tables = lo.create_tables(streams).reshape(
            batch, self.num_layers, self.num_kv_heads
        )
        self.lo_lengths = np.zeros((batch, self.num_layers, self.num_kv_heads), dtype=np.int64)
        self.lo_allocator = lo

    @property
    def lo_page_bytes(self) -> int:
        """MiKV: bytes of one low-tier block, K plus V (``2 * lo_format.layout.nbytes``; 0
        without ``evicted_format``)."""
        return self.lo_format.page_bytes if self.lo_format is not None else 0

    @property
    def lo_k_pool(self) -> torch.Tensor:
        """MiKV: the low tier's K pool, ``(num_blocks, lo_format.layout.nbytes)`` uint8."""
        return self.lo_store.k

    @property
    def lo_v_pool(self) -> torch.Tensor:
        """MiKV: the low tier's V pool (as :attr:`lo_k_pool`)."""
        return self.lo_store.v

    def _lo_limit(self) -> int:
        """The most blocks the low tier's streams may hold together (``lo_capacity`` each)."""
        return int(self.lo_lengths.size) * (self.lo_capacity // self.block_size)

    def _lo_reserve(self, layer: int, n_new: np.ndarray) -> None:
        """Grows the low tier's pools when their free blocks do not cover ``n_new`` more
        tokens in each of ``layer``'s streams (within ``lo_capacity``, which the FIFO keeps)."""
        assert self.lo_allocator is not None
        lens = self.lo_lengths[:, layer].reshape(-1)
        needed = resize.pages_added(lens, n_new, self.block_size)
        if needed > self.lo_allocator.num_free_blocks:
            used = int(self.lo_allocator.num_used_blocks)
            self._lo_resize(resize.grown(used, needed, int(self.lo_lengths.size), self._lo_limit()))

    def _lo_resize(self, num_blocks: int) -> None:
        """Moves the low tier's pages into pools of ``num_blocks`` blocks (null block
        included) with their per-slot state, as the high tier's resize does. No size check:
        the tier never holds more tokens than the high tier held before it demoted them."""
        assert self.lo_allocator is not None
        bs = self.block_size
        old_bytes = self.lo_store.nbytes
        pages = self.lo_store.per_block()
        parts: list[tuple[torch.Tensor, int, float]] = [(t, 1, fill) for t, fill in pages]
        parts += [(self.lo_slot_pos, bs, 0.0), (self.lo_slot_valid, bs, 0.0)]
        alloc, tables, out = resize.relocate(
            self.lo_allocator,
            self.lo_tables.reshape(-1),
            self.lo_lengths.reshape(-1),
            num_blocks,
            parts,
        )
        self.lo_store = self.lo_store.with_blocks(out[: len(pages)])
        self.lo_slot_pos, self.lo_slot_valid = out[len(pages) :]
        self.lo_allocator = alloc
        self.lo_tables = tables.reshape(self.lo_lengths.shape)
        self._peak_bytes = max(self._peak_bytes, self.memory_bytes() + old_bytes)

    def _lo_move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """A low-tier compaction plan: each token's pages and its state move (one
        ``compact_pools`` call)."""
        assert self.lo_format is not None
        self.lo_format._move(self.lo_store, src, dst, [self.lo_slot_pos, self.lo_slot_valid])

    def _demote(
        self, layer: int, inp: ScoreInputs, keep: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """Moves the valid tokens the policy evicts from the high tier (``slots``, before the
        compaction) to the end of their streams' low tier, re-encoded at ``evicted_format``
        from their (dequantized) high-tier values. A low-tier stream past ``lo_capacity``
        drops its earliest demoted tokens first (FIFO); padding is never demoted."""
        assert self.lo_allocator is not None
        b, h, t = keep.shape
        ev = (inp.valid & ~keep.to(inp.valid.device)).reshape(b * h, t)
        n_ev = ev.sum(-1)
        if int(n_ev.sum()) == 0:
            return
        cap = self.lo_capacity
        if bool((n_ev > cap).any()):  # more than fits at once: the latest ones
            rank = ev.cumsum(-1)
            ev &= rank > (n_ev - cap).clamp(min=0)[:, None]
            n_ev = ev.sum(-1)
        n_new = n_ev.cpu().numpy().astype(np.int64)
        lo_tables = np.ascontiguousarray(self.lo_tables[:, layer].reshape(-1))
        lo_lens = self.lo_lengths[:, layer].reshape(-1).copy()
        over = np.maximum(lo_lens + n_new - cap, 0)
        if over.any():
            indptr = np.zeros(len(lo_tables) + 1, dtype=np.int64)
            indptr[1:] = np.cumsum(lo_lens - over)
            positions = np.concatenate(
                [
                    np.arange(o, n, dtype=np.int64)
                    for o, n in zip(over.tolist(), lo_lens.tolist(), strict=True)
                ]
            )
            src_np, dst_np, _ = self.lo_allocator.compact_batch(lo_tables, indptr, positions)
            if len(src_np):
                self._lo_move(
                    torch.from_numpy(src_np).to(self.device),
                    torch.from_numpy(dst_np).to(self.device),
                )
            lo_lens -= over
            self.lo_lengths[:, layer] = lo_lens.reshape(b, h)
        self._lo_reserve(layer, n_new)  # moves pages: the tables change
        lo_tables = np.ascontiguousarray(self.lo_tables[:, layer].reshape(-1))
        assert self.lo_allocator is not None
        dst_np, _, _, _ = self.lo_allocator.append_batch(lo_tables, n_new)
        dst = torch.from_numpy(dst_np).to(self.device)
        src = slots.reshape(b * h, t)[ev]  # stream by stream, in stream order: as dst
        # MiKV's key balancer, fixed per stream when its low tier starts (empty now).
        fresh = torch.from_numpy(lo_lens == 0).to(self.device).reshape(b, h)
        scale = self.lo_key_scale[:, layer]  # (B, H, D)
        scale[fresh] = self._balance(inp)[fresh]
        owner = torch.repeat_interleave(
            torch.arange(b * h, device=self.device), n_ev.to(self.device)
        )
        keys = self._read("k", src) / scale.reshape(b * h, -1)[owner]
        assert self.lo_format is not None
        self.lo_format._write(self.lo_store, "k", dst, keys)
        self.lo_format._write(self.lo_store, "v", dst, self._read("v", src))
        self.lo_slot_pos[dst] = self.slot_pos[src]
        self.lo_slot_valid[dst] = True
        self.lo_lengths[:, layer] += n_new.reshape(b, h)

    def _balance(self, inp: ScoreInputs) -> torch.Tensor:
        """MiKV's per-channel key balancer ``(B, H, D)``: ``s_c = sqrt(max|K_c| / max|Q_c|)``
        over the layer's valid stored keys and the observed queries of the head's GQA group;
        the low tier stores ``K / s`` and attends with ``Q * s``, so ``q . k`` is unchanged
        while the keys' outlier channels are flattened before their per-token quantization
        (SmoothQuant's migration with alpha = 0.5). Without observed queries the keys'
        channel maxima are balanced against their mean."""
        b, h, _, d = inp.keys.shape
        k = inp.keys.float().abs().masked_fill(~inp.valid[..., None], 0.0)
        kmax = k.amax(2).clamp(min=1e-6)  # (B, H, D)
        if inp.queries is not None:
            q = inp.queries.float().abs()
            if inp.query_valid is not None:
                q = q.masked_fill(~inp.query_valid[:, None, :, None].to(q.device), 0.0)
            qmax = q.reshape(b, h, -1, d).amax(2).clamp(min=1e-6)  # group heads x window
        else:
            qmax = kmax.mean(-1, keepdim=True).expand_as(kmax)
        return (kmax / qmax).sqrt().to(self.device)
