"""The tiny random Llama the transformers tests share (GQA: 4 query heads, 2 kv heads)."""

from __future__ import annotations

from typing import Any

CFG: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
)


def tiny(impl: str, **over: Any) -> Any:
    """A seeded ``LlamaForCausalLM`` of :data:`CFG` (``over`` replaces fields) in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**CFG, **over})
    return LlamaForCausalLM._from_config(cfg, attn_implementation=impl).eval()
