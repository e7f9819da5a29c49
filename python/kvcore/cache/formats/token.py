"""Formats whose slots hold their token alone (native and per-token quantized pages): a
slot's bytes never depend on the page's other tokens, so a write or a move touches that token
alone and every piece of it moves in one ``compact_pools`` call."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcore.cache.formats.base import PageFormat, PageStore, Side, Streams, check_slots, compact


class TokenFormat(PageFormat):
    """A format whose slots hold their token alone (a slot's bytes never depend on the page's
    other tokens): writes scatter each token's encoding into its page, reads gather and decode
    it, moves copy each token's pieces in one ``compact_pools`` call. A subclass says how a
    token is encoded (:meth:`encode`, :meth:`decode`) and where its pieces lie in a page
    (:meth:`slot_views`)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` vectors -> ``(N, W)`` what one slot stores."""
        raise NotImplementedError

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """:meth:`encode`'s rows -> ``(N, D)`` vectors in ``dtype``."""
        raise NotImplementedError

    def slot_views(self, pool: torch.Tensor) -> list[tuple[torch.Tensor, int, int]]:
        """``(view, offset in the token's encoding, width)`` per piece of a slot: each view
        ``(num_blocks, block_size, width)`` over ``pool``, so ``view[block, offset]`` is one
        slot's piece."""
        raise NotImplementedError

    def prepare(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's tokens encoded (a value the format cannot hold raises here)."""
        return self.encode(k), self.encode(v)

    def stage(
        self, store: PageStore, prepared: tuple[torch.Tensor, torch.Tensor], streams: Streams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return prepared

    def commit(
        self,
        store: PageStore,
        staged: tuple[torch.Tensor, torch.Tensor],
        slots: torch.Tensor,
        streams: Streams,
    ) -> None:
        flat = slots.reshape(-1)
        self._put(store.k, flat, staged[0])
        self._put(store.v, flat, staged[1])

    def _read(self, store: PageStore, side: Side, slots: torch.Tensor) -> torch.Tensor:
        return self.decode(self._stored(store, side, slots))

    def _write(self, store: PageStore, side: Side, slots: torch.Tensor, x: torch.Tensor) -> None:
        self._put(store.side(side), slots, self.encode(x))

    def _move(
        self, store: PageStore, src: torch.Tensor, dst: torch.Tensor, state: Sequence[torch.Tensor]
    ) -> None:
        """Each token moves as its pieces (K and V) in one ``compact_pools`` call, ``state`` in
        another."""
        views = [v for pool in (store.k, store.v) for v, _, _ in self.slot_views(pool)]
        num_slots = store.num_blocks * self.block_size
        compact(views, src, dst, num_slots)
        compact(state, src, dst, num_slots)

    def _nbytes(self, store: PageStore, slots: torch.Tensor) -> int:
        return len(torch.unique(slots // self.block_size)) * self.page_bytes

    def stored(self, store: PageStore, side: Side, slots: torch.Tensor) -> torch.Tensor:
        """What ``slots`` store, as :meth:`encode` wrote it (quantized pages: one-token blocks
        whose padding between codes and scales is zero, as the encoder writes it)."""
        check_slots(store, self.block_size, slots)
        return self._stored(store, side, slots)

    def _stored(self, store: PageStore, side: Side, slots: torch.Tensor) -> torch.Tensor:
        """:meth:`stored` without the slot checks (a device sync each on CUDA)."""
        pool, bs = store.side(side), self.block_size
        views = self.slot_views(pool)
        width = max(to + w for _, to, w in views)
        out = torch.zeros(len(slots), width, dtype=pool.dtype, device=pool.device)
        b, o = slots // bs, slots % bs
        for view, to, w in views:
            out[:, to : to + w] = view[b, o]
        return out

    def _put(self, pool: torch.Tensor, slots: torch.Tensor, enc: torch.Tensor) -> None:
        """Scatters :meth:`encode`'s ``(N, W)`` rows into their pages at ``slots``."""
        bs = self.block_size
        b, o = slots // bs, slots % bs
        for view, to, w in self.slot_views(pool):
            view[b, o] = enc[:, to : to + w]
