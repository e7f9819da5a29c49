"""kvcore.cache.config: a frozen configuration that checks itself once."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch", reason="the torch cache needs torch (pip install .[torch])")

from kvcore.cache import (  # noqa: E402
    CacheConfig,
    KVCache,
    MergeConfig,
    Schedule,
    StorageConfig,
    TierConfig,
)
from kvcore.cache.config import KEYWORDS  # noqa: E402
from kvcore.scoring import get  # noqa: E402

L, H, D = 2, 2, 8


def test_parts_are_frozen_and_keywords_round_trip():
    cfg = CacheConfig.from_keywords(kv_format="int4", quant_group=4, block_size=8, capacity=64)
    assert cfg.storage == StorageConfig("int4", 4, 8) and cfg.capacity == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.capacity = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.storage.kv_format = "int8"  # type: ignore[misc]
    assert set(cfg.keywords()) == set(KEYWORDS)
    assert CacheConfig.from_keywords(**cfg.keywords()) == cfg
    assert cfg.with_keywords(kv_format="int8").storage.kv_format == "int8"
    assert CacheConfig.from_keywords(schedule=None).schedule == Schedule.prefill()


@pytest.mark.parametrize(
    ("build", "err", "match"),
    [
        (lambda: StorageConfig("int3"), ValueError, "kv_format must be one of"),
        (lambda: StorageConfig(block_size=0), ValueError, "block_size must be an int >= 1"),
        (lambda: StorageConfig("kivi2", block_size=3), ValueError, "must be whole bytes"),
        (lambda: StorageConfig("int4", quant_group=True), ValueError, "quant_group must be"),
        (lambda: MergeConfig("avg"), ValueError, "merge must be None or one of"),
        (lambda: MergeConfig("ems", window=4), ValueError, "merge_window is a parameter"),
        (lambda: MergeConfig("kvmerger", sigma=-1.0), ValueError, "merge_sigma must be"),
        (lambda: MergeConfig("ems", threshold=2.0), ValueError, r"merge_threshold .* \[-1, 1\]"),
        (lambda: MergeConfig(bias=True), ValueError, "needs a merge method"),
        (lambda: TierConfig("int3"), ValueError, "evicted_format must be None or one of"),
        (lambda: TierConfig(evicted_capacity=8), ValueError, "needs evicted_format"),
        (lambda: CacheConfig(capacity=8, capacity_bytes=10), ValueError, "not both"),
        (lambda: CacheConfig(storage="int4"), TypeError, "storage must be a kvcore.cache"),
        (lambda: CacheConfig(schedule="x"), TypeError, "schedule must be a kvcore.cache"),
        (lambda: CacheConfig(positions="x"), ValueError, "positions must be"),
        (
            lambda: CacheConfig(tier=TierConfig("int2"), merge=MergeConfig("ems")),
            ValueError,
            "needs merge=None",
        ),
        (
            lambda: CacheConfig(tier=TierConfig("int2"), storage=StorageConfig("kivi2")),
            ValueError,
            "needs a kv_format other than KIVI",
        ),
        (
            lambda: CacheConfig(storage=StorageConfig(quant_group=4)),
            ValueError,
            "quant_group needs a quantized kv_format",
        ),
        (lambda: CacheConfig.from_keywords(kv_fromat="int4"), TypeError, "unknown cache keyword"),
        (lambda: Schedule(decode_every=True), ValueError, "decode_every must be"),
        (lambda: Schedule(on_prefill=1), TypeError, "on_prefill must be a bool"),
    ],
)
def test_every_rule_is_checked_at_construction(build, err, match):
    with pytest.raises(err, match=match):
        build()


def test_a_cache_from_a_config_is_the_cache_from_its_keywords():
    kw = {"kv_format": "int4", "quant_group": 4, "block_size": 4, "merge": "ems"}
    policy = get("streaming", 6, sinks=2)
    a = KVCache(L, H, D, policy=policy, **kw)
    b = KVCache(L, H, D, policy=policy, config=CacheConfig.from_keywords(**kw))
    assert a.config == b.config
    g = torch.Generator().manual_seed(0)
    for n in (12, 1, 1):
        for layer in range(L):
            k, v = torch.randn(2, 2 * H, n, D, generator=g).chunk(2, dim=1)
            q = torch.randn(2, 2 * H, n, D, generator=g)
            for x, y in zip(a.update(layer, k, v), b.update(layer, k, v), strict=True):
                assert torch.equal(x, y)
            assert torch.equal(a.attend(layer, q), b.attend(layer, q))
    with pytest.raises(ValueError, match=r"give config= or the keywords .* \(got block_size\)"):
        KVCache(L, H, D, block_size=4, config=CacheConfig())
    with pytest.raises(TypeError, match="config must be a CacheConfig"):
        KVCache(L, H, D, config={"kv_format": "int4"})  # type: ignore[arg-type]
