"""KIVI pages of the torch cache against Rust's stand-alone `kvcore.KiviCache`, the oracle.

With ``residual = group_size = block_size`` the two store the same thing: keys per channel
in blocks of ``block_size`` tokens once a block is full, values per token in groups of
``block_size`` channels, everything else in float16. Rust quantizes a value when its FIFO of
the last ``residual`` values overflows, the torch cache when its page fills, so a value is
compared where both hold it the same way (both quantized, or both in float16).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch cache needs torch (pip install .[torch])")

import kvcore  # noqa: E402
from kvcore.cache import KVCache  # noqa: E402

D, BS = 16, 8


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("steps", [[5, 1, 1, 9, 1, 3, 2, 1], [17, 1, 1, 1, 8], [1] * 19])
def test_kivi_pages_equal_the_rust_kivi_cache(bits, steps):
    cache = KVCache(
        1, 1, D, block_size=BS, dtype=torch.float16, kv_format=f"kivi{bits}", quant_group=BS
    )
    oracle = kvcore.KiviCache(D, bits=bits, group_size=BS, residual=BS)
    g = torch.Generator().manual_seed(bits * 100 + len(steps))
    n = 0
    for q in steps:
        k = (torch.randn(1, 1, q, D, generator=g) * 3).half()
        v = (torch.randn(1, 1, q, D, generator=g) * 3).half()
        keys, values = cache.update(0, k, v)
        oracle.append(k[0, 0].float().numpy(), v[0, 0].float().numpy())
        n += q
        assert keys.shape == (1, 1, n, D) and oracle.num_tokens == n
        want_k = torch.from_numpy(oracle.keys()).half()
        assert torch.equal(keys[0, 0], want_k), f"keys differ after {n} tokens"
        sealed = n // BS * BS  # values the torch cache holds quantized
        fifo_from = oracle.num_quantized_values  # values Rust holds quantized: [0, this)
        want_v = torch.from_numpy(oracle.values()).half()
        both_q = min(sealed, fifo_from)
        assert torch.equal(values[0, 0, :both_q], want_v[:both_q])
        both_fp = max(sealed, fifo_from)
        assert torch.equal(values[0, 0, both_fp:], want_v[both_fp:])
        assert oracle.num_quantized_keys == sealed


def test_kivi_refuses_what_the_oracle_refuses():
    """Beyond float16: Rust's KiviCache and the torch cache both refuse, and change nothing."""
    cache = KVCache(1, 1, D, block_size=BS, kv_format="kivi2", quant_group=BS)
    oracle = kvcore.KiviCache(D, bits=2, group_size=BS, residual=BS)
    k = torch.full((1, 1, 1, D), 1e5)
    with pytest.raises(ValueError):
        oracle.append(k[0, 0].numpy(), np.zeros((1, D), np.float32))
    with pytest.raises(ValueError, match="float16's range"):
        cache.update(0, k, torch.zeros_like(k))
    assert oracle.num_tokens == 0 and cache.stored_lengths().shape == (0, 1, 1)
