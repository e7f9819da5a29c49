"""Per-token quantized pages (``kv_format="int8" | "int4" | "int2"`` with ``key_quant="token"``,
and MiKV's low tier): one ``QuantLayout(bits, G, block_size, D, "channel")`` block per page
(pools ``(num_blocks, layout.nbytes)`` uint8), K and V alike.

Every token is encoded alone, as a one-token block of ``token_layout``, and its codes, scales
and zero points are scattered into its page: its bytes never depend on the page's other tokens,
so a write or a move touches that token alone (docs/cache.md). With axis ``"channel"`` every
group lies inside one token, so token ``o`` of a page owns three contiguous byte ranges, each
``o * width`` past the start of its region::

    page:  | codes: tok 0 | tok 1 | ... | pad | scales: tok 0 | tok 1 | ... | zeros: ...
             <-- cb -->                         <-- sb -->
    token: | codes (cb) | pad | scales (sb) | zeros (sb) |   (QuantLayout(.., 1, D, ..))
"""

from __future__ import annotations

import torch

from kvcore._kvcore import QuantLayout
from kvcore.cache.formats.base import PageStore
from kvcore.cache.formats.token import TokenFormat


class QuantizedFormat(TokenFormat):
    """Pages of per-token quantized vectors (``bits`` of 8, 4 or 2; groups of ``group``
    channels; float16 scales and zero points)."""

    prefix = "int"

    def _setup(self) -> None:
        bits, g, bs, d = self.bits, self.group, self.block_size, self.head_dim
        self.layout = QuantLayout(bits, g, bs, d, "channel", "float16")
        self.token_layout = QuantLayout(bits, g, 1, d, "channel", "float16")
        self.k_layout = self.v_layout = self.layout
        self.page_bytes = 2 * int(self.layout.nbytes)

    def alloc(self, num_blocks: int, num_streams: int, device: torch.device) -> PageStore:
        nb = self.layout.nbytes
        with torch.inference_mode(False):
            k = torch.zeros(num_blocks, nb, dtype=torch.uint8, device=device)
            v = torch.zeros(num_blocks, nb, dtype=torch.uint8, device=device)
        return PageStore(k, v)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` vectors -> ``(N, token_layout.nbytes)`` uint8: one one-token block each
        (bytes identical to the token's piece of its page).

        Raises:
            ValueError: a NaN or infinite value, or metadata beyond float16.
        """
        from kvcore import kernels

        return kernels.quantize(x.reshape(-1, 1, self.head_dim).contiguous(), self.token_layout)

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        from kvcore import kernels

        out = kernels.dequantize(raw.contiguous(), self.token_layout, torch.float32)
        return out.reshape(-1, self.head_dim).to(self.dtype)

    def slot_views(self, pool: torch.Tensor) -> list[tuple[torch.Tensor, int, int]]:
        """Strided views of the three regions of the pages (codes, scales, zeros), each
        ``(num_blocks, block_size, width)``."""
        page, tok, bs = self.layout, self.token_layout, self.block_size
        cb = int(tok.codes_bytes)
        sb = int(tok.zeros_offset) - int(tok.scales_offset)
        regions = [
            (0, 0, cb),
            (int(page.scales_offset), int(tok.scales_offset), sb),
            (int(page.zeros_offset), int(tok.zeros_offset), sb),
        ]
        return [
            (pool[:, po : po + bs * w].view(pool.shape[0], bs, w), to, w) for po, to, w in regions
        ]
