"""The page-format protocol: what one slot of a tier's pages holds and how it is written, read,
moved and counted.

A format is a value (its bits, layouts, block size, head size, dtype): it holds no tensors. The
tensors are a :class:`PageStore` it allocates; every method takes the store it works on, so one
format serves any number of stores of any size, and a cache's two tiers (MiKV) are two format
instances used through the same calls.

Streams and slots (as in the cache)::

    slot  = block_id * block_size + offset      block 0 is the null block, never written
    store = K pool, V pool (one row per block)  + whatever else the format keeps per block or
                                                  per stream (KIVI: its open pages)

An update writes in three phases, so a step the format refuses changes nothing:
:meth:`PageFormat.prepare` (the values alone, before any pending work runs), then
:meth:`PageFormat.stage` (what needs the pages, before the allocator appends), then
:meth:`PageFormat.commit` (after the append, at the slots the allocator gave).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from kvcore._kvcore import BlockAllocator, QuantLayout
from kvcore.cache.config import StorageConfig

Side = Literal["k", "v"]
SIDES: tuple[Side, Side] = ("k", "v")
_F = TypeVar("_F", bound="PageFormat")


@dataclass(frozen=True)
class PageStore:
    """One tier's page tensors: the K and V pools, one row per block (block 0 the null block).

    A format that keeps more subclasses it; :meth:`per_block` names the tensors that have one
    row per block (they move when the pools are resized), the others are per stream.
    """

    k: torch.Tensor
    v: torch.Tensor

    def side(self, side: Side) -> torch.Tensor:
        """The pool of one side (``"k"`` or ``"v"``)."""
        return self.k if side == "k" else self.v

    @property
    def num_blocks(self) -> int:
        return int(self.k.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of K and V the store holds: the pools (and a subclass's per-stream pages)."""
        return int(self.k.nbytes + self.v.nbytes)

    def per_block(self) -> list[tuple[torch.Tensor, float]]:
        """``(tensor, fill)`` of every tensor with one row per block, in field order, with the
        value of a block that holds nothing."""
        return [(self.k, 0.0), (self.v, 0.0)]

    def with_blocks(self, tensors: Sequence[torch.Tensor]) -> PageStore:
        """The store with :meth:`per_block`'s tensors replaced (resized pools), in that order."""
        names = [f.name for f in fields(self)][: len(tensors)]
        return replace(self, **dict(zip(names, tensors, strict=True)))


@dataclass(frozen=True)
class Streams:
    """The streams one step appends to, for a format that keeps state per stream.

    Attributes:
        allocator: the tier's allocator.
        tables: ``(S,)`` int64 table ids of the streams.
        lengths: ``(S,)`` int64 tokens each stream held before the step.
        rows: ``(S,)`` int64 on the store's device: each stream's row of per-stream state.
    """

    allocator: BlockAllocator
    tables: np.ndarray
    lengths: np.ndarray
    rows: torch.Tensor

    def block_table(self, device: torch.device) -> torch.Tensor:
        """``(S, W)`` int64 block ids of the streams now (the allocator's vLLM block table)."""
        bt, _, _ = self.allocator.vllm_layout(np.ascontiguousarray(self.tables))
        return torch.from_numpy(np.asarray(bt, dtype=np.int64)).to(device)


def check_slots(store: PageStore, block_size: int, *slots: torch.Tensor) -> None:
    """Refuses slots that are not a 1-d int64 tensor on the store's device, or lie outside
    the pools (a TypeError / IndexError before anything is read or written)."""
    limit = store.num_blocks * block_size
    for s in slots:
        if not isinstance(s, torch.Tensor) or s.dtype != torch.int64 or s.ndim != 1:
            raise TypeError(f"slots must be a 1-d int64 tensor, got {_describe(s)}")
        if s.device != store.k.device:
            raise ValueError(f"slots must be on {store.k.device}, got {s.device}")
        if s.numel() and bool(((s < 0) | (s >= limit)).any()):
            raise IndexError(
                f"slots must lie in [0, {limit}) ({store.num_blocks} blocks of "
                f"block_size={block_size}), got [{int(s.min())}, {int(s.max())}]"
            )


def check_plan(store: PageStore, block_size: int, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Refuses a compaction plan whose slots are bad or whose ``src`` and ``dst`` differ in
    length."""
    check_slots(store, block_size, src, dst)
    if len(src) != len(dst):
        raise ValueError(f"src and dst must have one slot per move, got {len(src)} and {len(dst)}")


def compact(
    tensors: Sequence[torch.Tensor], src: torch.Tensor, dst: torch.Tensor, num_slots: int
) -> None:
    """One :func:`kvcore.kernels.compact_pools` call applying one plan to every tensor."""
    from kvcore import kernels

    if not tensors:
        return
    indptr = torch.tensor([0, len(src)], dtype=torch.int64, device=src.device)
    kernels.compact_pools(list(tensors), [0] * len(tensors), src, dst, indptr, num_slots)


def check_vectors(x: torch.Tensor, n: int, head_dim: int) -> None:
    """Refuses anything but ``(n, head_dim)`` floating vectors."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"vectors must be a floating tensor, got {_describe(x)}")
    if tuple(x.shape) != (n, head_dim):
        raise ValueError(f"vectors must have shape ({n}, {head_dim}), got {tuple(x.shape)}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {tuple(x.shape)}"
    return type(x).__name__


class PageFormat(ABC):
    """How pages store K and V: the protocol every format implements (one file each).

    :meth:`read`, :meth:`write`, :meth:`move` and :meth:`nbytes` check their arguments here,
    once for every format, then call the format's ``_read`` / ``_write`` / ``_move`` /
    ``_nbytes``; a call refused on its arguments changes nothing.

    Attributes:
        name: the format's ``kv_format`` name (``"native"``, ``"int4"``, ``"kivi2"``, ...).
        block_size, head_dim: tokens per page, channels per vector.
        dtype: the dtype of what :meth:`read` returns and :meth:`write` takes.
        bits, group: bits per stored value and channels per quantization group (0: native).
        k_layout, v_layout: the ``QuantLayout`` of one K / V page the attention kernels read
            (``(num_blocks, nbytes)`` uint8 pools); None: pools ``(num_blocks, block_size,
            head_dim)`` of ``dtype``.
        page_bytes: bytes of one block, K pool plus V pool.
        stream_bytes: bytes each stream keeps outside the pools (KIVI's open page), K plus V.
    """

    k_layout: QuantLayout | None = None
    v_layout: QuantLayout | None = None
    stream_bytes = 0
    page_bytes: int

    prefix = "native"  # the name: prefix + bits ("int4", "kivi2")

    def __init__(
        self,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        bits: int = 0,
        group: int = 0,
        name: str | None = None,
    ) -> None:
        """Raises:
        ValueError: parameters the format cannot lay out (from ``QuantLayout``, naming the
            broken rule: bits of 2, 4 or 8, the group divides the head size, whole bytes)."""
        self.block_size, self.head_dim, self.dtype = block_size, head_dim, dtype
        self.bits, self.group = bits, group
        self.name = name or (f"{self.prefix}{bits}" if bits else self.prefix)
        self.elt = torch.empty(0, dtype=dtype).element_size()
        self._setup()

    @abstractmethod
    def _setup(self) -> None:
        """Sets the layouts, ``page_bytes`` and ``stream_bytes`` from the parameters."""

    @classmethod
    def from_storage(
        cls: type[_F], storage: StorageConfig, head_dim: int, dtype: torch.dtype
    ) -> _F:
        """The format of ``storage``'s pages (its bits, quantization group and block size)."""
        g = storage.group(head_dim) if storage.bits else 0
        return cls(storage.block_size, head_dim, dtype, storage.bits, g, storage.kv_format)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, bits={self.bits}, group={self.group}, "
            f"block_size={self.block_size}, head_dim={self.head_dim}, {self.dtype})"
        )

    @abstractmethod
    def alloc(self, num_blocks: int, num_streams: int, device: torch.device) -> PageStore:
        """Zeroed tensors of ``num_blocks`` blocks (null block included) for ``num_streams``
        streams."""

    @abstractmethod
    def prepare(self, k: torch.Tensor, v: torch.Tensor) -> Any:
        """Checks (and encodes, where that needs no page) one step's ``(S, q, D)`` K and V.

        Raises:
            ValueError: values the format cannot store (NaN, inf, beyond its metadata).
        """

    @abstractmethod
    def stage(self, store: PageStore, prepared: Any, streams: Streams) -> Any:
        """What the step writes, computed from the pages before the allocator appends (a
        stream's last page, when the format re-encodes it). Changes nothing."""

    @abstractmethod
    def commit(self, store: PageStore, staged: Any, slots: torch.Tensor, streams: Streams) -> None:
        """Writes the staged step at ``slots`` ``(S, q)`` (the allocator's, after the append)."""

    def read(self, store: PageStore, side: Side, slots: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` vectors in ``dtype`` of ``(N,)`` int64 slots (dequantized).

        Raises:
            TypeError / ValueError / IndexError: slots that are not a 1-d int64 tensor on the
                store's device within the pools.
        """
        check_slots(store, self.block_size, slots)
        return self._read(store, side, slots)

    def write(self, store: PageStore, side: Side, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Stores ``(N, D)`` vectors at ``(N,)`` slots of held pages (re-encoded as needed).

        Raises:
            as :meth:`read`; TypeError / ValueError: ``x`` not ``(N, D)`` floating, or values
                the format cannot store.
        """
        check_slots(store, self.block_size, slots)
        check_vectors(x, len(slots), self.head_dim)
        self.check_values(x)
        self._write(store, side, slots, x)

    def move(
        self,
        store: PageStore,
        src: torch.Tensor,
        dst: torch.Tensor,
        state: Sequence[torch.Tensor] = (),
    ) -> None:
        """A compaction plan: slot ``dst[i]`` takes what ``src[i]`` holds, K and V, and so does
        every per-slot tensor of ``state`` (one row per slot; native pages: in the same
        :func:`kvcore.kernels.compact_pools` call). No move reads a slot an earlier one wrote.

        Raises:
            as :meth:`read`, or ``src`` and ``dst`` of different lengths.
        """
        check_plan(store, self.block_size, src, dst)
        self._move(store, src, dst, state)

    def nbytes(self, store: PageStore, slots: torch.Tensor) -> int:
        """Bytes that the tokens at ``slots`` take in ``store``: the pages holding them."""
        check_slots(store, self.block_size, slots)
        return self._nbytes(store, slots)

    def check_values(self, x: torch.Tensor) -> None:  # noqa: B027 (a hook: most formats accept all)
        """Refuses values the format cannot store (before anything is written)."""

    # The unchecked implementations. The cache itself calls them: its slots and plans come
    # from its own allocator and its values were checked at the update, and the range checks
    # of the public methods cost a device sync each on CUDA, on every gather and compaction.
    @abstractmethod
    def _read(self, store: PageStore, side: Side, slots: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _write(
        self, store: PageStore, side: Side, slots: torch.Tensor, x: torch.Tensor
    ) -> None: ...

    @abstractmethod
    def _move(
        self, store: PageStore, src: torch.Tensor, dst: torch.Tensor, state: Sequence[torch.Tensor]
    ) -> None: ...

    @abstractmethod
    def _nbytes(self, store: PageStore, slots: torch.Tensor) -> int: ...
