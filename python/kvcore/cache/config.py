"""The cache's configuration: frozen values that check themselves once, at construction.

``CacheConfig`` gathers everything a :class:`~kvcore.cache.KVCache` needs besides the model's
shape, its policy, dtype, device and RoPE frequencies. It has three parts, each one frozen
dataclass validated on its own:

* :class:`StorageConfig`: the page format (``kv_format``, ``quant_group``) and ``block_size``;
* :class:`MergeConfig`: what happens to evicted tokens that are merged (``merge=``);
* :class:`TierConfig`: MiKV's low-precision tier of evicted tokens (``evicted_format=``);

plus the capacity, the :class:`Schedule`, the positions and the softmax scale. Rules that
join parts (a low tier needs ``merge=None``) are checked by ``CacheConfig`` itself; rules that
need the model's shape (a quantization group must divide ``head_dim``) or the policy are
checked when a cache is built from it.

``KVCache(..., kv_format="int4", merge="ems")`` and ``kvcore.hf.compressed_cache(model, ...,
kv_format="int4")`` keep taking the flat keywords: :meth:`CacheConfig.from_keywords` maps
them, and ``config=CacheConfig(...)`` passes the whole value instead.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "KEYWORDS",
    "KV_FORMATS",
    "MIXED_BITS",
    "CacheConfig",
    "MergeConfig",
    "Schedule",
    "StorageConfig",
    "TierConfig",
]

BITS = {"native": 0, "int8": 8, "int4": 4, "int2": 2, "kivi2": 2, "kivi4": 4}
# KIVI's layout with keys and values at different bits: kv_format -> (key bits, value bits).
# "k4v2" sits between kivi2 and kivi4 in bytes: outlier key channels want the bits more than
# the values do (issue 18).
MIXED_BITS = {f"k{kb}v{vb}": (kb, vb) for kb in (8, 4, 2) for vb in (8, 4, 2) if kb != vb}
KV_FORMATS = (*BITS, *MIXED_BITS)
MERGES = (None, "ems", "kvmerger", "cam")
LO_FORMATS = ("int8", "int4", "int2")
KEY_QUANTS = ("channel", "token")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_count(name: str, v: object, optional: bool = True, unit: str = "") -> None:
    """``v`` is an int >= 1 (or None when ``optional``); bools are refused."""
    if (v is None and optional) or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return
    raise ValueError(f"{name} must be an int >= 1{unit}, got {v!r}")


@dataclass(frozen=True)
class Schedule:
    """When compression runs.

    Attributes:
        on_prefill: compress after multi-token steps (prefill, chunks of a chunked prefill,
            new turns) once a stream holds more than its budget.
        decode_every: compress after every ``N``-th single-token step (None: never).
        multi_turn: ``"rescore"``: every later multi-token step (a new turn) compresses again
            with its own queries; ``"once"``: only the first one does (SCBench's
            compress-once), later turns are appended uncompressed.
        chunk: chunk size of a chunked prefill (``kvcore.hf.prefill`` splits the input), or
            None.
    """

    on_prefill: bool = True
    decode_every: int | None = None
    multi_turn: str = "rescore"
    chunk: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.on_prefill, bool):
            raise TypeError(f"on_prefill must be a bool, got {self.on_prefill!r}")
        if self.decode_every is not None and (
            not _is_int(self.decode_every) or self.decode_every < 1
        ):
            raise ValueError(f"decode_every must be None or an int >= 1, got {self.decode_every}")
        if self.multi_turn not in ("rescore", "once"):
            raise ValueError(f"multi_turn must be 'rescore' or 'once', got {self.multi_turn!r}")
        if self.chunk is not None and (not _is_int(self.chunk) or self.chunk < 1):
            raise ValueError(f"chunk must be None or an int >= 1, got {self.chunk}")

    @classmethod
    def prefill(cls, multi_turn: str = "rescore") -> Schedule:
        """Once at prefill (SnapKV, PyramidKV, Ada-KV)."""
        return cls(on_prefill=True, multi_turn=multi_turn)

    @classmethod
    def chunked(cls, chunk: int) -> Schedule:
        """Chunked prefill under a fixed budget (Locret, InfiniPot)."""
        return cls(on_prefill=True, chunk=chunk)

    @classmethod
    def decode(cls, every: int, on_prefill: bool = True) -> Schedule:
        """Every ``every`` decode steps (H2O, TOVA, StreamingLLM)."""
        return cls(on_prefill=on_prefill, decode_every=every)

    def headroom(self) -> int:
        """Tokens a stream may hold above its budget between two compressions (decode side)."""
        return max(self.decode_every or 0, self.chunk or 0)

    def decides(self, q: int, compressed_once: bool, decode_steps: int) -> bool:
        """Whether a step of ``q`` tokens is compressed after its attention.

        Args:
            q: the step's tokens (> 1: a prefill, a chunk or a new turn).
            compressed_once: whether a multi-token step of the layer was compressed before.
            decode_steps: single-token steps of the layer before this one.
        """
        if q > 1:
            return self.on_prefill and (self.multi_turn == "rescore" or not compressed_once)
        every = self.decode_every
        return every is not None and (decode_steps + 1) % every == 0


@dataclass(frozen=True)
class StorageConfig:
    """How pages store K and V.

    Attributes:
        kv_format: ``"native"`` (``dtype`` vectors), ``"int8"`` / ``"int4"`` / ``"int2"``
            (quantized pages, keys as ``key_quant`` says), ``"kivi2"`` / ``"kivi4"`` (KIVI:
            sealed pages per channel / per token, an open page in ``dtype``), or
            ``"k4v2"`` / ``"k2v4"`` / ``"k8v4"`` / ... (KIVI's layout with keys and values
            at different bits: ``"k4v2"`` keys at 4 bits per channel, values at 2 bits per
            token); docs/cache.md.
        quant_group: channels per quantization group of the per-token parts (None:
            ``min(32, head_dim)``).
        block_size: tokens per page.
        key_quant: how ``int8`` / ``int4`` / ``int2`` pages quantize keys. ``"channel"``
            (the default): per channel, one group of ``block_size`` tokens per channel and
            page, values per token, the stream's last page in ``dtype`` until it fills (the
            layout of KIVI's pages, at the format's bits). ``"token"``: keys per token like the
            values, every token encoded alone into its page (needed by a MiKV high tier). Per
            token, a few outlier key channels (|K| of 150 against a median of 5 to 10 in
            Qwen2.5's first layers) set every group's range and break attention
            (``bench/results/int4_keys.json``). None: ``"channel"`` for int formats; KIVI
            formats are always per channel, native pages ignore it (only None allowed).
    """

    kv_format: str = "native"
    quant_group: int | None = None
    block_size: int = 16
    key_quant: str | None = None

    def __post_init__(self) -> None:
        if self.kv_format not in KV_FORMATS:
            raise ValueError(
                f"kv_format must be one of {', '.join(map(repr, KV_FORMATS))}, "
                f"got {self.kv_format!r}"
            )
        _check_count("block_size", self.block_size, optional=False)
        if self.quant_group is not None and not (
            _is_int(self.quant_group) and self.quant_group >= 1
        ):
            raise ValueError(f"quant_group must be an int >= 1, got {self.quant_group!r}")
        if self.key_quant is not None:
            if self.key_quant not in KEY_QUANTS:
                raise ValueError(
                    f"key_quant must be None, 'channel' or 'token', got {self.key_quant!r}"
                )
            if self.kv_format not in ("int8", "int4", "int2"):
                raise ValueError(
                    f"key_quant applies to kv_format 'int8', 'int4' or 'int2', not "
                    f"{self.kv_format!r} (KIVI pages always quantize keys per channel)"
                )
        bits = self.key_bits
        if self.kivi and self.block_size * bits % 8:
            raise ValueError(
                f"{self.kv_format}: keys are quantized per channel in groups of block_size "
                f"tokens, so block_size * {bits} bits must be whole bytes (block_size a "
                f"multiple of {8 // bits}), got block_size={self.block_size}"
            )

    @property
    def bits(self) -> int:
        """Bits per stored value, the wider side's when keys and values differ (0: native
        ``dtype``)."""
        return max(self.key_bits, self.value_bits)

    @property
    def key_bits(self) -> int:
        """Bits per stored key channel value (0: native ``dtype``)."""
        return MIXED_BITS[self.kv_format][0] if self.mixed else BITS[self.kv_format]

    @property
    def value_bits(self) -> int:
        """Bits per stored value channel value (0: native ``dtype``)."""
        return MIXED_BITS[self.kv_format][1] if self.mixed else BITS[self.kv_format]

    @property
    def mixed(self) -> bool:
        """Keys and values at different bits (``"k4v2"``, ...; KIVI's layout)."""
        return self.kv_format in MIXED_BITS

    @property
    def kivi(self) -> bool:
        """Pages of KIVI's layout (keys per channel, values per token, an open page in
        ``dtype``): ``kivi2`` / ``kivi4``, ``k4v2`` and the other mixed formats, and int
        pages with per-channel keys."""
        if self.kv_format.startswith("kivi"):
            return True
        return self.bits > 0 and self.key_quant != "token"

    @property
    def layout(self) -> str:
        """Which page format stores it (:data:`kvcore.cache.formats.KINDS`): ``"native"``,
        ``"token"`` (int pages, every token encoded alone), ``"kivi"`` or ``"mixed"`` (KIVI's
        layout, keys and values at different bits)."""
        if self.bits == 0:
            return "native"
        if self.mixed:
            return "mixed"
        return "kivi" if self.kivi else "token"

    def group(self, head_dim: int) -> int:
        """The quantization group for a head size."""
        return min(32, head_dim) if self.quant_group is None else self.quant_group


@dataclass(frozen=True)
class MergeConfig:
    """Merging the tokens a policy evicts into the kept ones (docs/merging.md).

    Attributes:
        method: None (evicted tokens are dropped), ``"ems"``, ``"kvmerger"`` or ``"cam"``.
        threshold: the cosine threshold of ``"ems"`` and ``"kvmerger"``, in ``[-1, 1]``.
        sigma: ``"kvmerger"``: the Gaussian kernel width (> 0), None: the run's RMS distance.
        window: ``"cam"``: kept tokens after an evicted one that share its value (None: 64).
        seed: ``"cam"``: the seed of the merge draws (None: 0).
        bias: whether attention adds ``log(slot_count)`` to each slot's logit (None: True for
            ``"ems"`` and ``"kvmerger"``, whose slots are means; False for ``"cam"``).
    """

    method: str | None = None
    threshold: float = 0.5
    sigma: float | None = None
    window: int | None = None
    seed: int | None = None
    bias: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in MERGES:
            raise ValueError(
                f"merge must be None or one of {', '.join(map(repr, MERGES[1:]))}, "
                f"got {self.method!r}"
            )
        for pname, pval, owner in (
            ("merge_sigma", self.sigma, "kvmerger"),
            ("merge_window", self.window, "cam"),
            ("merge_seed", self.seed, "cam"),
        ):
            if pval is not None and self.method != owner:
                raise ValueError(
                    f"{pname} is a parameter of merge={owner!r}, not of {self.method!r}"
                )
        s = self.sigma
        if s is not None and (
            not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or s <= 0
        ):
            raise ValueError(f"merge_sigma must be None or a finite float > 0, got {s!r}")
        if self.window is not None and not (_is_int(self.window) and self.window >= 1):
            raise ValueError(f"merge_window must be an int >= 1, got {self.window!r}")
        if self.seed is not None and not (_is_int(self.seed) and self.seed >= 0):
            raise ValueError(f"merge_seed must be an int >= 0, got {self.seed!r}")
        if self.bias is not None and (self.method is None or not isinstance(self.bias, bool)):
            raise ValueError(
                f"merge_bias must be None or a bool, and needs a merge method (got "
                f"merge_bias={self.bias!r}, merge={self.method!r})"
            )
        t = self.threshold
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not -1.0 <= float(t) <= 1.0:
            raise ValueError(f"merge_threshold must be a float in [-1, 1], got {t!r}")

    @property
    def logcount_bias(self) -> bool:
        """Whether merged slots get their ``log(count)`` logit bias."""
        return self.bias if self.bias is not None else self.method in ("ems", "kvmerger")


@dataclass(frozen=True)
class TierConfig:
    """MiKV: the evicted tokens kept in a low-precision tier (docs/cache.md).

    Attributes:
        evicted_format: None (evicted tokens are dropped) or ``"int8"``, ``"int4"``, ``"int2"``.
        evicted_capacity: low-tier tokens per stream (None: the first step's length plus
            ``max(schedule headroom, 256)``).
    """

    evicted_format: str | None = None
    evicted_capacity: int | None = None

    def __post_init__(self) -> None:
        if self.evicted_format is not None and self.evicted_format not in LO_FORMATS:
            raise ValueError(
                f"evicted_format must be None or one of {', '.join(map(repr, LO_FORMATS))}, "
                f"got {self.evicted_format!r}"
            )
        cap = self.evicted_capacity
        if cap is not None and (self.evicted_format is None or not (_is_int(cap) and cap >= 1)):
            raise ValueError(
                "evicted_capacity must be None or an int >= 1 tokens per stream, and needs "
                f"evicted_format (got evicted_capacity={cap!r}, "
                f"evicted_format={self.evicted_format!r})"
            )

    @property
    def enabled(self) -> bool:
        return self.evicted_format is not None


@dataclass(frozen=True)
class CacheConfig:
    """Everything a cache needs besides the model's shape, policy, dtype, device and RoPE.

    Attributes:
        storage, merge, tier: the parts (see their classes).
        capacity: tokens per stream of fixed pools (None: sized on demand, or by
            ``capacity_bytes``).
        capacity_bytes: the total bytes of fixed K and V pools, instead of ``capacity``.
        schedule: when to compress.
        positions: ``"original"`` or ``"compact"`` (needs RoPE frequencies).
        scaling: the attention softmax scale (None: ``head_dim ** -0.5``).

    Raises:
        ValueError / TypeError: naming the broken rule, at construction.
    """

    storage: StorageConfig = field(default_factory=StorageConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    tier: TierConfig = field(default_factory=TierConfig)
    capacity: int | None = None
    capacity_bytes: int | None = None
    schedule: Schedule = field(default_factory=Schedule.prefill)
    positions: str = "original"
    scaling: float | None = None

    def __post_init__(self) -> None:
        for name, part, cls in (
            ("storage", self.storage, StorageConfig),
            ("merge", self.merge, MergeConfig),
            ("tier", self.tier, TierConfig),
            ("schedule", self.schedule, Schedule),
        ):
            if not isinstance(part, cls):
                raise TypeError(
                    f"{name} must be a kvcore.cache.{cls.__name__}, got {type(part).__name__}"
                )
        if self.capacity is not None and self.capacity_bytes is not None:
            raise ValueError("give capacity (tokens) or capacity_bytes, not both")
        _check_count("capacity", self.capacity, unit=" tokens per stream")
        if self.capacity_bytes is not None and not (
            _is_int(self.capacity_bytes) and self.capacity_bytes >= 1
        ):
            raise ValueError(f"capacity_bytes must be an int >= 1, got {self.capacity_bytes!r}")
        if self.positions not in ("original", "compact"):
            raise ValueError(f"positions must be 'original' or 'compact', got {self.positions!r}")
        s = self.scaling
        if s is not None and (
            not isinstance(s, numbers.Real) or isinstance(s, bool) or not math.isfinite(s) or s <= 0
        ):
            raise ValueError(f"scaling must be None or a finite float > 0, got {s!r}")
        if (
            self.storage.quant_group is not None
            and self.storage.kv_format == "native"
            and not self.tier.enabled
        ):
            raise ValueError("quant_group needs a quantized kv_format or evicted_format")
        if self.tier.enabled:
            why = None
            if self.storage.kivi:
                why = (
                    "a kv_format other than KIVI's layout (keys per channel): 'native', or "
                    "'int8' / 'int4' / 'int2' with key_quant='token', whose tokens are "
                    "encoded alone"
                )
            elif self.merge.method is not None:
                why = "merge=None (evicted tokens go to the low tier, not into kept ones)"
            elif self.positions != "original":
                why = "positions='original'"
            if why is not None:
                raise ValueError(f"evicted_format={self.tier.evicted_format!r} needs {why}")

    @classmethod
    def from_keywords(cls, **kw: Any) -> CacheConfig:
        """The configuration of ``KVCache``'s flat keywords (``kv_format=``, ``merge=``,
        ``merge_threshold=``, ``evicted_format=``, ...; :data:`KEYWORDS`), None meaning the
        default. Raises ``TypeError`` naming an unknown keyword."""
        unknown = sorted(set(kw) - set(KEYWORDS))
        if unknown:
            raise TypeError(
                f"unknown cache keyword(s) {', '.join(unknown)}; valid: {', '.join(KEYWORDS)}"
            )
        parts: dict[str, dict[str, Any]] = {
            "": {},
            "storage": {},
            "merge": {},
            "tier": {},
        }
        for key, value in kw.items():
            part, name = KEYWORDS[key]
            if value is None and part == "" and name == "schedule":
                continue
            parts[part][name] = value
        return cls(
            storage=StorageConfig(**parts["storage"]),
            merge=MergeConfig(**parts["merge"]),
            tier=TierConfig(**parts["tier"]),
            **parts[""],
        )

    def keywords(self) -> dict[str, Any]:
        """The flat keywords of this configuration (the inverse of :meth:`from_keywords`)."""
        return {
            key: getattr(self if part == "" else getattr(self, part), name)
            for key, (part, name) in KEYWORDS.items()
        }

    def with_keywords(self, **kw: Any) -> CacheConfig:
        """A copy with some flat keywords changed (validated again)."""
        if not kw:
            return self
        merged = self.keywords()
        merged.update(kw)
        return CacheConfig.from_keywords(**merged)

    @property
    def kivi(self) -> bool:
        return self.storage.kivi

    def replace(self, **changes: Any) -> CacheConfig:
        """``dataclasses.replace`` (validated again)."""
        return replace(self, **changes)


# The flat keyword of KVCache / compressed_cache -> (part, field).
KEYWORDS: dict[str, tuple[str, str]] = {
    "capacity": ("", "capacity"),
    "capacity_bytes": ("", "capacity_bytes"),
    "block_size": ("storage", "block_size"),
    "schedule": ("", "schedule"),
    "positions": ("", "positions"),
    "scaling": ("", "scaling"),
    "kv_format": ("storage", "kv_format"),
    "quant_group": ("storage", "quant_group"),
    "key_quant": ("storage", "key_quant"),
    "merge": ("merge", "method"),
    "merge_threshold": ("merge", "threshold"),
    "merge_sigma": ("merge", "sigma"),
    "merge_window": ("merge", "window"),
    "merge_seed": ("merge", "seed"),
    "merge_bias": ("merge", "bias"),
    "evicted_format": ("tier", "evicted_format"),
    "evicted_capacity": ("tier", "evicted_capacity"),
}
