"""Native pages (``kv_format="native"``): one ``dtype`` vector per slot, pools ``(num_blocks,
block_size, head_dim)``, read by the attention kernels as they are."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcore.cache.formats.base import PageStore, Side, compact
from kvcore.cache.formats.token import TokenFormat


class NativeFormat(TokenFormat):
    """Pages of ``dtype`` values: a slot is one row of its pool, written as given."""

    def _setup(self) -> None:
        if self.bits:
            raise ValueError(f"native pages store dtype values, not {self.bits}-bit codes")
        self.page_bytes = 2 * self.block_size * self.head_dim * self.elt

    def alloc(self, num_blocks: int, num_streams: int, device: torch.device) -> PageStore:
        shape = (num_blocks, self.block_size, self.head_dim)
        # Normal tensors even under torch.inference_mode(): a later call made outside it
        # could not update inference tensors in place.
        with torch.inference_mode(False):
            k = torch.zeros(shape, dtype=self.dtype, device=device)
            v = torch.zeros(shape, dtype=self.dtype, device=device)
        return PageStore(k, v)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.head_dim).to(self.dtype)

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def slot_views(self, pool: torch.Tensor) -> list[tuple[torch.Tensor, int, int]]:
        return [(pool, 0, self.head_dim)]  # one row per slot, contiguous

    def _read(self, store: PageStore, side: Side, slots: torch.Tensor) -> torch.Tensor:
        """One row per slot: a plain gather (``view`` raises on a pool that is not contiguous,
        where a ``reshape`` would gather from a copy)."""
        return store.side(side).view(-1, self.head_dim).index_select(0, slots)

    def _write(self, store: PageStore, side: Side, slots: torch.Tensor, x: torch.Tensor) -> None:
        """One row per slot: a plain scatter into the pool's rows."""
        store.side(side).view(-1, self.head_dim).index_copy_(0, slots, self.encode(x))

    def _move(
        self, store: PageStore, src: torch.Tensor, dst: torch.Tensor, state: Sequence[torch.Tensor]
    ) -> None:
        """One row per slot, like the state: the pools and ``state`` in one launch."""
        compact([store.k, store.v, *state], src, dst, store.num_blocks * self.block_size)
