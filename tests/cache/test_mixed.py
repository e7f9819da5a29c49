"""KIVI pages with keys and values at different bits (``kv_format="k4v2"``, ``"k2v4"``, ...):
each side is the uniform KIVI format of its bits, checked against Rust's stand-alone
``kvcore.KiviCache`` (the oracle of tests/cache/test_kivi.py), one oracle per side."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="kvcore.cache needs torch")

from test_int_keys import HQ, T, planted, reference  # noqa: E402
from test_int_keys import D as KD  # noqa: E402

import kvcore  # noqa: E402
from kvcore.cache import CacheConfig, KVCache, StorageConfig  # noqa: E402
from kvcore.cache.formats import MixedKiviFormat  # noqa: E402

D, BS, H = 16, 8, 2
MIXED = [("k4v2", 4, 2), ("k2v4", 2, 4), ("k8v2", 8, 2), ("k4v8", 4, 8)]


@pytest.mark.parametrize(("fmt", "kb", "vb"), MIXED)
@pytest.mark.parametrize("steps", [[5, 1, 1, 9, 1, 3, 2, 1], [17, 1, 1, 1, 8]])
def test_each_side_equals_the_rust_kivi_cache_of_its_bits(fmt, kb, vb, steps):
    cache = KVCache(1, 1, D, block_size=BS, dtype=torch.float16, kv_format=fmt, quant_group=BS)
    assert type(cache.format) is MixedKiviFormat
    keys_oracle = kvcore.KiviCache(D, bits=kb, group_size=BS, residual=BS)
    values_oracle = kvcore.KiviCache(D, bits=vb, group_size=BS, residual=BS)
    g = torch.Generator().manual_seed(kb * 10 + vb + len(steps))
    n = 0
    for q in steps:
        k = (torch.randn(1, 1, q, D, generator=g) * 3).half()
        v = (torch.randn(1, 1, q, D, generator=g) * 3).half()
        keys, values = cache.update(0, k, v)
        for oracle in (keys_oracle, values_oracle):
            oracle.append(k[0, 0].float().numpy(), v[0, 0].float().numpy())
        n += q
        assert torch.equal(keys[0, 0], torch.from_numpy(keys_oracle.keys()).half()), n
        # values: compared where both hold them the same way (test_kivi.py says why)
        want_v = torch.from_numpy(values_oracle.values()).half()
        sealed, fifo_from = n // BS * BS, values_oracle.num_quantized_values
        assert torch.equal(values[0, 0, : min(sealed, fifo_from)], want_v[: min(sealed, fifo_from)])
        assert torch.equal(values[0, 0, max(sealed, fifo_from) :], want_v[max(sealed, fifo_from) :])


@pytest.mark.parametrize(("fmt", "kb", "vb"), MIXED)
def test_a_mixed_page_is_the_uniform_formats_sides(fmt, kb, vb):
    """What a k{kb}v{vb} cache stores and reads back is, side by side, what kivi{kb}-bits and
    kivi{vb}-bits pages store (same tokens, same layout but the bits), and it costs the sum of
    their sides: sealed pages at their layouts' bytes, the open page's tokens in dtype."""
    uniform = {b: f"int{b}" for b in (8, 4, 2)}  # int pages with per-channel keys: KIVI's
    g = torch.Generator().manual_seed(kb + 3 * vb)
    k, v = torch.randn(2, H, 37, 32, generator=g), torch.randn(2, H, 37, 32, generator=g)
    caches = {
        name: KVCache(1, H, 32, block_size=BS, kv_format=name)
        for name in (fmt, uniform[kb], uniform[vb])
    }
    out = {name: c.update(0, k, v) for name, c in caches.items()}
    assert torch.equal(out[fmt][0], out[uniform[kb]][0])
    assert torch.equal(out[fmt][1], out[uniform[vb]][1])
    mixed = caches[fmt]
    k_page = kvcore.QuantLayout(kb, BS, BS, 32, "token", "float16").nbytes
    v_page = kvcore.QuantLayout(vb, 32, BS, 32, "channel", "float16").nbytes
    assert mixed.page_bytes == k_page + v_page
    sealed, open_ = 37 // BS, 37 % BS
    want = 2 * H * (sealed * (k_page + v_page) + open_ * 2 * 32 * 4)
    assert mixed.used_bytes() == want
    # the reverse format holds the other halves: together, the two uniform formats' bytes
    swapped = KVCache(1, H, 32, block_size=BS, kv_format=f"k{vb}v{kb}")
    swapped.update(0, k, v)
    both = caches[uniform[kb]].used_bytes() + caches[uniform[vb]].used_bytes()
    assert mixed.used_bytes() + swapped.used_bytes() == both


def test_the_spelling_and_its_rules():
    s = StorageConfig("k4v2")
    assert (s.key_bits, s.value_bits, s.bits, s.layout, s.kivi) == (4, 2, 4, "mixed", True)
    s = StorageConfig("k2v4", block_size=4)
    assert (s.key_bits, s.value_bits, s.layout) == (2, 4, "mixed")
    assert (StorageConfig("kivi2").key_bits, StorageConfig("int4").value_bits) == (2, 4)
    with pytest.raises(ValueError, match=r"kv_format must be one of .*'k4v2', .*got 'k4v4'"):
        StorageConfig("k4v4")  # equal bits: that is kivi4 / int4
    with pytest.raises(ValueError, match=r"k2v4: .*block_size a multiple of 4\), got block_size=2"):
        StorageConfig("k2v4", block_size=2)
    StorageConfig("k4v2", block_size=2)  # 2 keys of 4 bits are a byte; values are per token
    with pytest.raises(ValueError, match="KIVI pages always quantize keys per channel"):
        StorageConfig("k4v2", key_quant="token")
    with pytest.raises(ValueError, match="needs a kv_format other than KIVI's layout"):
        CacheConfig.from_keywords(kv_format="k4v2", evicted_format="int2")
    with pytest.raises(ValueError, match="group"):
        KVCache(1, H, 32, block_size=BS, kv_format="k4v2", quant_group=5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_outlier_key_channels_cost_the_keys_bits_only(seed):
    """tests/cache/test_int_keys.py's planted outlier channels (a RoPE pair of key channels
    40x larger, the queries' same channels 40x smaller: full-precision attention unchanged).
    Keys per channel do not see them: each format attends as well with them as without, and
    four bits on either side sit between KIVI-2 and KIVI-4. Measured relative errors of the
    decode step's attention (seeds 0, 1, 2): kivi2 0.77 / 0.51 / 0.81, k2v4 0.66 / 0.40 /
    0.66, k4v2 0.33 / 0.35 / 0.47, kivi4 0.10 / 0.10 / 0.19."""
    k, v, q, s = planted(seed)
    errs = {}
    for fmt in ("k4v2", "k2v4", "kivi2", "kivi4"):
        errs[fmt] = []
        for kk, qq in ((k, q), (k / s, q * s)):
            c = KVCache(1, H, KD, block_size=16, kv_format=fmt)
            c.update(0, kk[:, :, :-1], v[:, :, :-1])
            c.attend(0, qq.expand(1, HQ, T - 1, KD).contiguous())
            c.update(0, kk[:, :, -1:], v[:, :, -1:])
            errs[fmt].append(_rel(c.attend(0, qq), reference(qq, kk, v)))
        assert abs(errs[fmt][0] - errs[fmt][1]) < 0.01, (fmt, errs[fmt])
    # more bits on either side lowers the error: k4v2 and k2v4 both beat kivi2, kivi4 both
    # of them
    for fmt in ("k4v2", "k2v4"):
        assert errs["kivi4"][0] < errs[fmt][0] < errs["kivi2"][0], errs
