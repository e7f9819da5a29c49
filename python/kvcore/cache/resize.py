"""Pool sizes: how many blocks a tier's pools hold, and the copy that changes it.

Both tiers (the high tier and MiKV's low tier) size their pools by the blocks all their
streams hold together, not by the longest stream times the number of streams::

    pools after a shrink : held + streams + 1        one spare block a stream, the null block
    pools grown          : held + needed + max(streams, (held + needed) // 8) + 1
                           (at most the per-stream capacity times the streams, + 1)

A prefill that every layer compresses as soon as it is stored needs, at most, the pages every
layer keeps after its compression plus one layer's whole prompt (the layers run in order and
share the pools, so layer ``l + 1`` stores its prompt in the blocks layer ``l`` freed)::

    pools for a compressed prefill : max(sum(kept) - min(kept) + one layer's prompt,
                                         sum(kept) + streams) + 1
                                     (kept: the pages a layer keeps after its compression)

A resize moves every stream's pages, block by block in table order, into a fresh allocator
and fresh tensors with their per-block and per-slot state: block ids change, a token's
offset in its page does not, so nothing is re-encoded and attention reads the same values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvcore import _args
from kvcore._kvcore import BlockAllocator


def pages(lengths: np.ndarray, block_size: int) -> int:
    """Blocks that streams of ``lengths`` tokens hold together (each its own last block)."""
    return int((-(-lengths.astype(np.int64) // block_size)).sum())


def pages_added(lengths: np.ndarray, q: np.ndarray | int, block_size: int) -> int:
    """New blocks the streams take when each appends ``q`` tokens (one count, or one a stream)."""
    after = lengths.astype(np.int64) + np.asarray(q, dtype=np.int64)
    return pages(after, block_size) - pages(lengths, block_size)


def head_pages(tokens: np.ndarray, n: int, block_size: int, split: bool) -> int:
    """The most blocks one sequence's heads hold with at most ``tokens`` ``(H,)`` each.

    ``split``: the heads share ``tokens.sum()`` in any proportion, each at most ``n`` (Ada-KV's
    one top-k per layer), so a head may hold a block more than its share's pages::

        sum_h ceil(x_h / bs) <= (sum_h x_h + H (bs - 1)) // bs,   and <= H ceil(n / bs)
    """
    t = tokens.astype(np.int64)
    if not split:
        return pages(t, block_size)
    h = len(t)
    return min(h * -(-n // block_size), (int(t.sum()) + h * (block_size - 1)) // block_size)


def grown(used: int, needed: int, streams: int, limit: int | None) -> int:
    """Blocks (null block included) of pools grown because ``needed`` more blocks do not fit.

    The spare, ``max(streams, total // 8)``, makes growth amortized: a pool grows at most
    once every ``block_size`` decode steps, and copies its pages a bounded number of times
    per block appended. ``limit`` is the most blocks the streams may hold (their fixed
    per-stream capacity), None for pools sized on demand.
    """
    total = used + needed
    n = total + max(streams, total // 8)
    return (n if limit is None else max(min(n, limit), total)) + 1


def fitted(used: int, streams: int, limit: int | None) -> int:
    """Blocks (null block included) of pools fitted to ``used`` blocks: one spare a stream."""
    n = used + streams
    return (n if limit is None else max(min(n, limit), used)) + 1


def check_size(
    num_blocks: int, block_bytes: int, block_size: int, what: str, extra: int = 0
) -> None:
    """Refuses pools the machine cannot hold before allocating any: twice ``block_bytes`` of
    pages per block (the old and the new pools while a resize copies), ``extra`` bytes, and
    17 bytes of per-slot state (position, validity, score, count)."""
    _args.size(
        2 * num_blocks * block_bytes + extra + 17 * num_blocks * block_size,
        f"{what} ({num_blocks} blocks of block_size={block_size})",
        1,
    )


def relocate(
    allocator: BlockAllocator,
    tables: np.ndarray,
    lengths: np.ndarray,
    num_blocks: int,
    tensors: Sequence[tuple[torch.Tensor, int, float]],
) -> tuple[BlockAllocator, np.ndarray, list[torch.Tensor]]:
    """Moves every stream's pages into a new allocator of ``num_blocks`` blocks.

    Args:
        allocator, tables: the tier's allocator and its ``(S,)`` table ids, one a stream.
        lengths: ``(S,)`` int64 tokens each stream holds.
        num_blocks: blocks of the new pools, null block included (at least the pages held
            plus one).
        tensors: ``(tensor, per_block, fill)``: a tensor with one row per block
            (``per_block=1``: a pool, ``block_row``) or ``per_block`` rows per block (the
            per-slot state, ``block_size`` rows), and the value of the new rows no page
            fills.

    Returns:
        ``(allocator, tables, tensors)``: the new allocator, its ``(S,)`` tables (stream
        ``s``'s block ``k`` holds the same tokens as before), and the moved tensors in the
        order given.
    """
    bs = allocator.block_size
    lens = lengths.astype(np.int64)
    alloc = BlockAllocator(num_blocks=num_blocks, block_size=bs)
    new_tables = alloc.create_tables(len(tables))
    alloc.append_batch(new_tables, lens)
    used = -(-lens // bs)
    width = int(used.max()) if used.size else 0
    old_bt = allocator.vllm_layout(np.ascontiguousarray(tables))[0][:, :width]
    new_bt = alloc.vllm_layout(new_tables)[0][:, :width]
    mask = np.arange(width)[None, :] < used[:, None]
    out = []
    with torch.inference_mode(False):
        for t, per_block, fill in tensors:
            src = torch.from_numpy(old_bt[mask].astype(np.int64)).to(t.device)
            dst = torch.from_numpy(new_bt[mask].astype(np.int64)).to(t.device)
            old = t.reshape(-1, per_block, *t.shape[1:]) if per_block > 1 else t
            new = torch.full((num_blocks, *old.shape[1:]), fill, dtype=t.dtype, device=t.device)
            new[dst] = old[src]
            out.append(new.reshape(-1, *t.shape[1:]) if per_block > 1 else new)
    return alloc, new_tables, out
