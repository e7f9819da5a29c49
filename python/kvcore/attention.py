"""Paged attention in plain torch: the CPU path and the reference for the CUDA kernels.

It reads K and V straight from the paged pools through one block table per
(sequence, kv-head) stream, so every head of every sequence may hold a different number of
tokens (ragged per-head budgets). The tokens of the current step are passed densely and are
attended causally after the stored prefix::

    stream (b, h):  pages of the prefix (length lengths[b, h])   | new chunk (q tokens)
                    block_table[b*H + h] -> slots, masked >= len   | causal, masked by new_valid

Nothing is copied into a contiguous cache: the gather ``pool[block_table]`` reads pages.
"""

from __future__ import annotations

import torch

__all__ = ["paged_attention"]


def paged_attention(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    slot_valid: torch.Tensor | None = None,
    new_keys: torch.Tensor | None = None,
    new_values: torch.Tensor | None = None,
    new_valid: torch.Tensor | None = None,
    scaling: float | None = None,
    slot_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` over paged prefixes plus an optional dense causal chunk.

    Args:
        query: ``(B, Hq, q, D)`` float; ``Hq`` a multiple of ``H`` (GQA).
        k_pool, v_pool: ``(num_blocks, block_size, D)`` float, the pools (same dtype as
            ``query``).
        block_table: ``(B * H, W)`` int64 block ids per stream ``b * H + h``; padded with
            block 0.
        lengths: ``(B * H,)`` int64 stored prefix length of each stream.
        slot_valid: optional ``(num_blocks * block_size,)`` bool; False slots (padding tokens)
            are masked out.
        new_keys, new_values: optional ``(B, H, q, D)`` the current chunk, attended causally.
        new_valid: optional ``(B, q)`` bool, False for padding tokens of the chunk.
        scaling: softmax scale, default ``D ** -0.5``.
        slot_bias: optional ``(num_blocks * block_size,)`` float added to the logits of each
            stored slot (the log-count bias of merged slots; 0 for plain slots).

    Returns:
        ``(B, q, Hq, D)`` in ``query``'s dtype (the layout HF attention functions return).
        A query row with no visible key (a padding token) gets zeros.
    """
    b_sz, hq, q_len, d = query.shape
    n_streams, width = block_table.shape
    if n_streams % b_sz:
        raise ValueError(f"block_table has {n_streams} rows, not a multiple of batch {b_sz}")
    h = n_streams // b_sz
    if hq % h:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({h})")
    group = hq // h
    bs = k_pool.shape[1]
    scale = d**-0.5 if scaling is None else scaling

    # Pages -> (B, H, W * block_size, D): a gather by block id, no contiguous cache kept.
    keys = k_pool[block_table].reshape(b_sz, h, width * bs, d)
    values = v_pool[block_table].reshape(b_sz, h, width * bs, d)
    idx = torch.arange(width * bs, device=query.device)
    mask = (idx[None, :] < lengths[:, None]).reshape(b_sz, h, 1, width * bs)
    slots = (block_table[:, :, None] * bs + torch.arange(bs, device=query.device)).reshape(
        b_sz, h, width * bs
    )
    if slot_valid is not None:
        mask = mask & slot_valid[slots].reshape(b_sz, h, 1, width * bs)
    bias = None
    if slot_bias is not None:
        bias = slot_bias[slots].reshape(b_sz, h, 1, width * bs).float()
    mask = mask.expand(b_sz, h, q_len, width * bs)

    if new_keys is not None and new_values is not None:
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril()
        nmask = causal.expand(b_sz, h, q_len, q_len)
        if new_valid is not None:
            nmask = nmask & new_valid[:, None, None, :]
        keys = torch.cat([keys, new_keys], dim=2)
        values = torch.cat([values, new_values], dim=2)
        mask = torch.cat([mask, nmask], dim=3)
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(b_sz, h, 1, q_len)], dim=3)

    # GQA: query head j reads kv head j // group. float32 for a precise reference.
    keys = keys.repeat_interleave(group, dim=1).float()
    values = values.repeat_interleave(group, dim=1).float()
    mask = mask.repeat_interleave(group, dim=1)
    if bias is not None:
        attn_mask = bias.repeat_interleave(group, dim=1).expand_as(mask)
        attn_mask = attn_mask.masked_fill(~mask, float("-inf"))
    else:
        attn_mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        attn_mask = attn_mask.masked_fill(~mask, float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float(), keys, values, attn_mask=attn_mask, scale=scale
    )
    out = torch.nan_to_num(out, nan=0.0).to(query.dtype)  # rows with no visible key
    return out.transpose(1, 2).contiguous()
