"""KIVI pages with keys and values at different bits (``kv_format="k4v2"``: keys at 4 bits per
channel, values at 2 bits per token; ``"k2v4"`` the reverse; any pair of 8, 4 and 2 bits).

Everything but the bits is :class:`~kvcore.cache.formats.kivi.KiviFormat`'s: sealed pages of
``QuantLayout(key_bits, bs, bs, D, "token")`` keys and ``QuantLayout(value_bits, G, bs, D,
"channel")`` values, each stream's open page in ``dtype``. A ``k4v2`` page holds what a
``kivi4`` page holds on the key side and a ``kivi2`` page on the value side, byte for byte.

Why: on Qwen2.5 a few key channels of the first layers reach |K| of 150 against a median of 5
to 10 (``bench/results/int4_keys.json``). KIVI quantizes keys per channel so those channels
keep their own range, but 2 bits still round the other channels coarsely; values, quantized
per token and averaged by attention, lose less. ``k4v2`` spends the bits on the keys, between
KIVI-2 and KIVI-4 in bytes.
"""

from __future__ import annotations

import torch

from kvcore.cache.config import StorageConfig
from kvcore.cache.formats.kivi import KiviFormat


class MixedKiviFormat(KiviFormat):
    """KIVI's pages with ``key_bits`` per key value and ``value_bits`` per value (each 8, 4
    or 2). ``bits`` is the wider of the two."""

    def __init__(
        self,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        key_bits: int,
        value_bits: int,
        group: int,
        name: str | None = None,
    ) -> None:
        """Raises:
        ValueError: bits or a group the layouts cannot hold (from ``QuantLayout``, naming
            the broken rule)."""
        self.key_bits, self.value_bits = key_bits, value_bits
        name = name or f"k{key_bits}v{value_bits}"
        super().__init__(block_size, head_dim, dtype, max(key_bits, value_bits), group, name)

    @classmethod
    def from_storage(
        cls, storage: StorageConfig, head_dim: int, dtype: torch.dtype
    ) -> MixedKiviFormat:
        g = storage.group(head_dim)
        return cls(
            storage.block_size,
            head_dim,
            dtype,
            storage.key_bits,
            storage.value_bits,
            g,
            storage.kv_format,
        )

    def _setup(self) -> None:
        self._set_layouts(self.key_bits, self.value_bits)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, key_bits={self.key_bits}, "
            f"value_bits={self.value_bits}, group={self.group}, block_size={self.block_size}, "
            f"head_dim={self.head_dim}, {self.dtype})"
        )
