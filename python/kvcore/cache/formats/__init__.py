"""Page formats: how a tier's pages store K and V, one file per format behind one protocol
(:class:`~kvcore.cache.formats.base.PageFormat`: alloc, prepare / stage / commit, read,
write, move, nbytes); :mod:`~kvcore.cache.formats.token` holds what native and per-token
quantized pages share (a slot holds its token alone).

* :mod:`~kvcore.cache.formats.native`: ``dtype`` vectors;
* :mod:`~kvcore.cache.formats.quantized`: per-token int8 / int4 / int2 pages (``key_quant=
  "token"``, and MiKV's low tier);
* :mod:`~kvcore.cache.formats.kivi`: KIVI's sealed per-channel / per-token pages with an open
  page per stream (``kivi2`` / ``kivi4``, and int pages with ``key_quant="channel"``);
* :mod:`~kvcore.cache.formats.mixed`: KIVI's pages with keys and values at different bits
  (``k4v2``, ``k2v4``, ...).

A cache picks its format once, from its :class:`~kvcore.cache.config.StorageConfig`, with
:func:`page_format`; a new format is one new file, one entry in :data:`KINDS`, and its tests.
"""

from __future__ import annotations

import torch

from kvcore.cache.config import StorageConfig
from kvcore.cache.formats.base import PageFormat, PageStore, Side, Streams
from kvcore.cache.formats.kivi import KiviFormat, KiviStore
from kvcore.cache.formats.mixed import MixedKiviFormat
from kvcore.cache.formats.native import NativeFormat
from kvcore.cache.formats.quantized import QuantizedFormat

__all__ = [
    "KINDS",
    "KiviFormat",
    "KiviStore",
    "MixedKiviFormat",
    "NativeFormat",
    "PageFormat",
    "PageStore",
    "QuantizedFormat",
    "Side",
    "Streams",
    "page_format",
]

# StorageConfig.layout -> the format class that stores it.
KINDS: dict[str, type[PageFormat]] = {
    "native": NativeFormat,
    "token": QuantizedFormat,
    "kivi": KiviFormat,
    "mixed": MixedKiviFormat,
}


def page_format(storage: StorageConfig, head_dim: int, dtype: torch.dtype) -> PageFormat:
    """The format of a cache's pages, as ``storage`` says (``storage.layout`` picks it).

    Raises:
        ValueError: from ``QuantLayout``, naming the broken rule (the group divides the head
            size, whole bytes).
    """
    return KINDS[storage.layout].from_storage(storage, head_dim, dtype)
