"""Every page format through its protocol alone (kvcore.cache.formats): no cache, only a
BlockAllocator for the slots, the format's store, and alloc / prepare / stage / commit / read /
write / move / nbytes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="kvcore.cache needs torch")

from cache_view import table_slots  # noqa: E402

import kvcore.quant as kq  # noqa: E402
from kvcore import BlockAllocator  # noqa: E402
from kvcore.cache import KVCache, StorageConfig  # noqa: E402
from kvcore.cache.formats import (  # noqa: E402
    KINDS,
    KiviFormat,
    KiviStore,
    MixedKiviFormat,
    NativeFormat,
    PageFormat,
    QuantizedFormat,
    Streams,
    page_format,
)
from kvcore.scoring import get  # noqa: E402

D, BS, S = 32, 8, 3  # head size, tokens per page, streams

# (kv_format, key_quant, dtype) -> the class page_format picks
CASES = [
    ("native", None, torch.float32, NativeFormat),
    ("native", None, torch.float16, NativeFormat),
    ("int8", "token", torch.float32, QuantizedFormat),
    ("int4", "token", torch.float32, QuantizedFormat),
    ("int2", "token", torch.float16, QuantizedFormat),
    ("int8", "channel", torch.float32, KiviFormat),
    ("int4", "channel", torch.float32, KiviFormat),
    ("int2", "channel", torch.float16, KiviFormat),
    ("kivi2", None, torch.float32, KiviFormat),
    ("kivi4", None, torch.float16, KiviFormat),
    ("k4v2", None, torch.float32, MixedKiviFormat),
    ("k2v4", None, torch.float16, MixedKiviFormat),
    ("k8v4", None, torch.float32, MixedKiviFormat),
]
IDS = [f"{f}-{kq_ or 'default'}-{str(dt)[6:]}" for f, kq_, dt, _ in CASES]


def make(kv_format: str, key_quant: str | None, dtype: torch.dtype) -> PageFormat:
    storage = StorageConfig(kv_format=kv_format, block_size=BS, key_quant=key_quant)
    return page_format(storage, D, dtype)


def bound(fmt: PageFormat, x: torch.Tensor, side: str = "k") -> float:
    """The largest error a stored vector of ``side`` may have: none for native pages; else
    one quantization step of that side's bits over the data's whole range (a group's range is
    at most that; rounding costs half a step, the float16 scales and zero points the rest)
    plus the dtype's own rounding."""
    layout = fmt.k_layout if side == "k" else fmt.v_layout
    if layout is None:
        return 0.0
    step = float(x.max() - x.min()) / (2**layout.bits - 1)
    return step + 2**-9 * float(x.abs().max())


class Tier:
    """A format's store and an allocator's tables: what a cache tier holds, nothing more."""

    def __init__(self, fmt: PageFormat, num_blocks: int = 16) -> None:
        self.fmt = fmt
        self.alloc = BlockAllocator(num_blocks=num_blocks, block_size=BS)
        self.tables = self.alloc.create_tables(S)
        self.store = fmt.alloc(num_blocks, S, torch.device("cpu"))

    def lengths(self) -> np.ndarray:
        return np.array([self.alloc.num_tokens(int(t)) for t in self.tables], dtype=np.int64)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """One step of ``(S, q, D)`` K and V, in the protocol's three phases."""
        streams = Streams(self.alloc, self.tables, self.lengths(), torch.arange(S))
        prepared = self.fmt.prepare(k, v)
        staged = self.fmt.stage(self.store, prepared, streams)
        slots, _, _, _ = self.alloc.append_batch(self.tables, k.shape[1])
        self.fmt.commit(self.store, staged, torch.from_numpy(slots).reshape(S, -1), streams)

    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        return table_slots(self.alloc, self.tables, self.lengths())

    def read(self, side: str) -> torch.Tensor:
        """``(S, T, D)`` every stored token of every stream (each stream equally long)."""
        slots, mask = self.slots()
        assert mask.all()
        return self.fmt.read(self.store, side, slots.reshape(-1)).reshape(S, -1, D)


def data(q: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(S, q, D, generator=g) * 2
    v = torch.randn(S, q, D, generator=g)
    return k.to(dtype), v.to(dtype)


def filled(fmt: PageFormat, dtype: torch.dtype) -> tuple[Tier, torch.Tensor, torch.Tensor]:
    """A tier after steps of 13, 1 and 5 tokens (sealed, open and partial pages)."""
    tier = Tier(fmt)
    ks, vs = [], []
    for i, q in enumerate((13, 1, 5)):
        k, v = data(q, dtype, i)
        tier.append(k, v)
        ks.append(k)
        vs.append(v)
    return tier, torch.cat(ks, 1), torch.cat(vs, 1)


@pytest.mark.parametrize(("kv_format", "key_quant", "dtype", "cls"), CASES, ids=IDS)
def test_the_storage_config_picks_the_format(kv_format, key_quant, dtype, cls):
    fmt = make(kv_format, key_quant, dtype)
    assert type(fmt) is cls and fmt.name == kv_format
    assert (fmt.block_size, fmt.head_dim, fmt.dtype) == (BS, D, dtype)
    assert set(KINDS.values()) == {NativeFormat, QuantizedFormat, KiviFormat, MixedKiviFormat}
    if cls is MixedKiviFormat:  # "k{key bits}v{value bits}", KIVI's layout otherwise
        kb, vb = int(kv_format[1]), int(kv_format[3])
        assert (fmt.key_bits, fmt.value_bits, fmt.bits) == (kb, vb, max(kb, vb))
        assert (fmt.k_layout.bits, fmt.k_layout.axis) == (kb, "token")
        assert (fmt.v_layout.bits, fmt.v_layout.axis) == (vb, "channel")


@pytest.mark.parametrize(("kv_format", "key_quant", "dtype", "cls"), CASES, ids=IDS)
def test_append_read_round_trip(kv_format, key_quant, dtype, cls):
    fmt = make(kv_format, key_quant, dtype)
    tier, k, v = filled(fmt, dtype)
    for side, x in (("k", k), ("v", v)):
        got = tier.read(side)
        assert got.dtype == dtype and got.shape == x.shape
        err = float((got.float() - x.float()).abs().max())
        assert err <= bound(fmt, x.float(), side), (side, err)
    if cls is NativeFormat:
        assert torch.equal(tier.read("k"), k)
    if cls is QuantizedFormat:  # every token encoded alone: kvcore.quant's round trip
        tok = fmt.token_layout
        want = kq.dequantize(kq.quantize(v.reshape(-1, 1, D).float(), tok), tok)
        assert torch.equal(tier.read("v").float(), want.reshape(S, -1, D).to(dtype).float())
    if issubclass(cls, KiviFormat):  # 19 tokens: two sealed pages and an open one of 3
        assert isinstance(tier.store, KiviStore)
        slots, _ = tier.slots()
        rows = tier.store.block_row[slots // BS]
        assert (rows[:, :16] == -1).all() and (rows[:, 16:] == torch.arange(S)[:, None]).all()
        assert torch.equal(tier.store.res_k[:, :3], k[:, 16:])  # the open page, exact


@pytest.mark.parametrize(("kv_format", "key_quant", "dtype", "cls"), CASES, ids=IDS)
def test_write_replaces_the_tokens(kv_format, key_quant, dtype, cls):
    fmt = make(kv_format, key_quant, dtype)
    tier, k, _ = filled(fmt, dtype)
    slots, _ = tier.slots()
    at = slots[:, [2, 9, 17]].reshape(-1)  # a token of each page of each stream
    new = torch.randn(len(at), D, generator=torch.Generator().manual_seed(7)).to(dtype)
    fmt.write(tier.store, "k", at, new)
    got = fmt.read(tier.store, "k", at)
    assert float((got.float() - new.float()).abs().max()) <= bound(fmt, new.float())
    # the other tokens stay (a KIVI page is re-sealed: one more rounding at most)
    want = k.clone()
    want[:, [2, 9, 17]] = new.reshape(S, 3, D)
    err = float((tier.read("k").float() - want.float()).abs().max())
    assert err <= 2 * bound(fmt, want.float())


@pytest.mark.parametrize(("kv_format", "key_quant", "dtype", "cls"), CASES, ids=IDS)
def test_move_applies_a_compaction_plan(kv_format, key_quant, dtype, cls):
    fmt = make(kv_format, key_quant, dtype)
    tier, _, _ = filled(fmt, dtype)
    before_k, before_v = tier.read("k"), tier.read("v")
    keep = [0, 3, 4, 10, 11, 12, 18]  # tokens of every page; 7 stay in each stream
    indptr = np.arange(S + 1, dtype=np.int64) * len(keep)
    positions = np.tile(np.array(keep, dtype=np.int64), S)
    src, dst, _ = tier.alloc.compact_batch(tier.tables, indptr, positions)
    src_t, dst_t = torch.from_numpy(src), torch.from_numpy(dst)
    num_slots = tier.store.num_blocks * BS
    pos = torch.arange(num_slots)  # per-slot state moves in the same pass
    fmt.move(tier.store, src_t, dst_t, [pos])
    assert torch.equal(pos[dst_t], src_t)
    for side, got, was in (("k", tier.read("k"), before_k), ("v", tier.read("v"), before_v)):
        want = was[:, keep]
        if issubclass(cls, KiviFormat):  # moved tokens re-seal their pages
            err = float((got.float() - want.float()).abs().max())
            assert err <= bound(fmt, want.float(), side)
        else:  # bytes moved as they are
            assert torch.equal(got, want)


@pytest.mark.parametrize(("kv_format", "key_quant", "dtype", "cls"), CASES, ids=IDS)
def test_bytes_are_the_tensors_bytes(kv_format, key_quant, dtype, cls):
    fmt = make(kv_format, key_quant, dtype)
    tier, _, _ = filled(fmt, dtype)
    store = tier.store
    assert fmt.page_bytes * store.num_blocks == store.k.nbytes + store.v.nbytes
    others = store.nbytes - store.k.nbytes - store.v.nbytes  # KIVI's open pages
    assert others == fmt.stream_bytes * S
    slots, _ = tier.slots()
    blocks = torch.unique(slots.reshape(-1) // BS)
    if isinstance(store, KiviStore):  # sealed pages whole, open pages by their tokens
        sealed = blocks[store.block_row[blocks] < 0]
        want = store.k[sealed].nbytes + store.v[sealed].nbytes
        want += store.res_k[:, :3].nbytes + store.res_v[:, :3].nbytes
    else:
        want = store.k[blocks].nbytes + store.v[blocks].nbytes
    assert fmt.nbytes(store, slots.reshape(-1)) == want
    assert fmt.nbytes(store, torch.zeros(0, dtype=torch.int64)) == 0


@pytest.mark.parametrize(("kv_format", "key_quant", "dtype", "cls"), CASES, ids=IDS)
def test_bad_input_raises_and_changes_nothing(kv_format, key_quant, dtype, cls):
    fmt = make(kv_format, key_quant, dtype)
    tier, _, _ = filled(fmt, dtype)
    store = tier.store
    saved = [t.clone() for t, _ in store.per_block()]
    slots, _ = tier.slots()
    flat = slots.reshape(-1)
    x = torch.zeros(len(flat), D, dtype=dtype)
    limit = store.num_blocks * BS
    with pytest.raises(TypeError, match="slots must be a 1-d int64 tensor"):
        fmt.read(store, "k", flat.float())
    with pytest.raises(TypeError, match="slots must be a 1-d int64 tensor"):
        fmt.write(store, "k", slots, x)
    with pytest.raises(IndexError, match=rf"slots must lie in \[0, {limit}\)"):
        fmt.read(store, "v", torch.tensor([limit]))
    with pytest.raises(IndexError, match=r"slots must lie in"):
        fmt.write(store, "v", torch.tensor([-1]), x[:1])
    with pytest.raises(ValueError, match=rf"vectors must have shape \({len(flat)}, {D}\)"):
        fmt.write(store, "k", flat, x[:, :-1])
    with pytest.raises(TypeError, match="vectors must be a floating tensor"):
        fmt.write(store, "k", flat, x.to(torch.int32))
    with pytest.raises(ValueError, match="src and dst must have one slot per move"):
        fmt.move(store, flat[:2], flat[:1])
    if cls is not NativeFormat:  # quantized pages refuse what their metadata cannot hold
        k = torch.zeros(S, 2, D, dtype=dtype)
        k[0, 1, 3] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            fmt.prepare(k, torch.zeros_like(k))
        with pytest.raises(ValueError, match="non-finite"):
            fmt.write(store, "k", flat[:2], k[0])
    for (t, _), was in zip(store.per_block(), saved, strict=True):
        assert torch.equal(t, was)


def test_bad_format_parameters_raise():
    with pytest.raises(ValueError):
        QuantizedFormat(BS, D, torch.float32, 4, 7)  # a group that does not divide D
    with pytest.raises(ValueError, match="native pages store dtype values"):
        NativeFormat(BS, D, torch.float32, 4)
    with pytest.raises(ValueError):
        KiviFormat(3, D, torch.float32, 2, 32)  # 3 tokens of 2 bits: not whole bytes
    with pytest.raises(ValueError):
        MixedKiviFormat(3, D, torch.float32, 4, 2, 32)  # 3 keys of 4 bits: not whole bytes
    with pytest.raises(ValueError):
        MixedKiviFormat(BS, D, torch.float32, 4, 3, 32)  # 3-bit values


def test_the_mikv_low_tier_is_a_second_format_instance():
    c = KVCache(1, 2, D, block_size=BS, policy=get("streaming", 8, sinks=2), evicted_format="int2")
    assert type(c.format) is NativeFormat
    lo = c.lo_format
    assert type(lo) is QuantizedFormat and lo.name == "int2" and lo.bits == 2
    assert c.lo_page_bytes == lo.page_bytes == 2 * lo.layout.nbytes
