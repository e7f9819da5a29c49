"""`KVCache`: paged K/V pools in torch, allocated through `BlockAllocator`, kept within budget.

Layout. One allocator table per (sequence ``b``, layer ``l``, kv-head ``h``) stream, so every
stream can hold a different number of tokens and evicting a head's tokens frees its blocks::

    stream id  = tables[b, l, h]                 (one allocator, one pool for all streams)
    k_pool     : (num_blocks, block_size, head_dim)   one head's key per slot
    slot       = block_id * block_size + offset       (block 0 is the null block, never written)
    per slot   : slot_pos (int64 sequence index), slot_valid (bool, False for padding),
                 slot_score (float32, accumulated attention), slot_count (float32, tokens a
                 merged slot stands for) -- moved with K/V by compaction
    kv_format      : "int8" / "int4" / "int2" pools hold one quantized layout block per page
                     ((num_blocks, layout.nbytes) uint8, docs/cache.md); "kivi2" / "kivi4":
                     sealed pages per channel (K) / per token (V), open pages in res_k / res_v

Steps. ``update(layer, k, v)`` appends the step's tokens and returns what dense attention reads.
Compression of layer ``l`` for step ``t`` is decided by the :class:`Schedule` and runs *after*
step ``t``'s attention of that layer, lazily: at the next ``update`` of any layer or the next
query of the cache's lengths. So the pool holds at most ``budget + step`` tokens per stream
(``budget + chunk`` for chunked prefill, ``budget + N`` when compressing every ``N`` decode
steps), and never more than its ``capacity`` (fixed when given, else sized on demand: grown
when a step does not fit, shrunk after compressions; see ``KVCache``).

Positions. ``positions="original"`` keeps every key at the position it was encoded at and the
logical length grows with every token seen (``get_seq_length``), apart from the stored length.
``positions="compact"`` renumbers the kept tokens ``0..n-1`` after each compression and rotates
each kept key by its position delta with the layer's RoPE frequencies (StreamingLLM, InfiniPot).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvcore._kvcore import BlockAllocator, MergePlan, OutOfBlocksError, QuantLayout
from kvcore.scoring import ScoreInputs, TorchPolicy

__all__ = ["KVCache", "Schedule", "rotate_keys"]

_BITS = {"native": 0, "int8": 8, "int4": 4, "int2": 2, "kivi2": 2, "kivi4": 4}
_MERGES = (None, "ems", "kvmerger", "cam")
_LO_FORMATS = ("int8", "int4", "int2")


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
        if self.decode_every is not None and (
            not isinstance(self.decode_every, int) or self.decode_every < 1
        ):
            raise ValueError(f"decode_every must be None or an int >= 1, got {self.decode_every}")
        if self.multi_turn not in ("rescore", "once"):
            raise ValueError(f"multi_turn must be 'rescore' or 'once', got {self.multi_turn!r}")
        if self.chunk is not None and (not isinstance(self.chunk, int) or self.chunk < 1):
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


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE-encoded keys by ``delta`` positions (``rotate_half`` convention).

    Args:
        keys: ``(n, D)`` float keys already rotated at their old positions.
        delta: ``(n,)`` int64 new position minus old position.
        inv_freq: ``(R / 2,)`` float32 the layer's RoPE frequencies (scaling already folded
            in, as transformers' ``rotary_emb.inv_freq``); dimensions past ``R`` are not rotated.

    Returns:
        ``(n, D)`` keys as if encoded at the new positions.
    """
    rot = inv_freq.numel() * 2
    freqs = delta.to(torch.float64)[:, None] * inv_freq.to(keys.device, torch.float64)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    k = keys[:, :rot].to(torch.float64)
    half = rot // 2
    rotated_half = torch.cat([-k[:, half:], k[:, :half]], dim=-1)
    out = keys.clone()
    out[:, :rot] = (k * cos + rotated_half * sin).to(keys.dtype)
    return out


@dataclass(frozen=True)
class CacheSnapshot:
    """What :meth:`KVCache.restore` needs to drop the tokens appended after a snapshot."""

    lengths: np.ndarray | None
    seen: list[int]
    next_pos: list[int]
    compressed_once: list[bool]
    decode_steps: list[int]
    num_compressions: int


def _merge_by_lse(
    o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Two attentions of the same queries over disjoint key sets, ``(B, q, Hq, D)`` outputs
    and ``(B, q, Hq)`` log-sum-exps, merged into the attention over their union (a side with
    no visible key has lse -inf and weight 0)."""
    lse = torch.logaddexp(l1, l2)
    w1 = torch.nan_to_num((l1 - lse).exp(), nan=0.0)[..., None]
    w2 = torch.nan_to_num((l2 - lse).exp(), nan=0.0)[..., None]
    return (w1 * o1.float() + w2 * o2.float()).to(dtype)


class KVCache:
    """A fixed-budget paged KV cache for ``num_layers`` layers of ``num_kv_heads`` heads.

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention shape.
        capacity: tokens per (sequence, layer, kv-head) stream the pool holds (rounded up to
            whole blocks); a step past it raises ``OutOfBlocksError``. None (and no
            ``capacity_bytes``): the pools are sized on demand. The first update sizes them to
            ``max(budget, first step) + slack`` with ``slack = max(schedule headroom, 256)``
            tokens per stream; a step that does not fit grows them (to the longest stream +
            the step + slack) instead of raising; and once every layer has run its
            compressions, pools at least a third larger than ``max(longest stream, budget) +
            step + slack`` are shrunk to that (:meth:`shrink`). Either way pools are
            reallocated, so block ids exported earlier (:meth:`page_table`) go stale: a
            serving stack that keeps them should give a fixed ``capacity``.
        capacity_bytes: alternatively, the total bytes of the K and V pools (null block
            included); the per-stream capacity is what fits. With ``evicted_format`` this
            bounds the high tier; the low tier is sized by ``evicted_capacity`` (both are
            counted by :meth:`memory_bytes`).
        block_size: tokens per block.
        dtype, device: of the pools; every update must match them.
        policy: a :class:`kvcore.scoring.TorchPolicy` or None (no compression).
        schedule: when to compress (default: :meth:`Schedule.prefill`).
        positions: ``"original"`` or ``"compact"`` (needs ``rope``).
        rope: the RoPE ``inv_freq`` ``(R / 2,)`` of every layer (one tensor, or one per
            layer), needed by ``positions="compact"``.
        scaling: attention softmax scale for scoring (default ``head_dim ** -0.5``).
        kv_format: ``"native"`` (the pools hold ``dtype`` vectors) or ``"int8"``, ``"int4"``,
            ``"int2"``: every page is one block of issue 4's layout
            ``QuantLayout(bits, quant_group, block_size, head_dim, "channel", "float16")``
            (packed codes, then one float16 scale and zero point per group); a token is
            encoded alone (:func:`kvcore.kernels.quantize`) and its codes and metadata are
            scattered into its page, and it is dequantized to ``dtype`` when read.
            ``"kivi2"``, ``"kivi4"``: KIVI (docs/cache.md): full pages sealed, keys per channel
            (``QuantLayout(bits, block_size, block_size, head_dim, "token")``), values per
            token; each stream's open last page in ``dtype`` in a residual buffer.
        quant_group: channels per quantization group (default ``min(32, head_dim)``; KIVI:
            of the values).
        merge: None (evicted tokens are dropped) or a method that folds the tokens the
            policy evicts into the kept ones (the kept set, hence every budget, is the
            policy's; docs/merging.md):

            * ``"ems"``: issue 4's ``kvcore.ems_plan``: a token joins the kept token with the
              most similar key when the cosine is >= ``merge_threshold``, else it is dropped;
              a center becomes the attention-weighted mean of itself and its members.
            * ``"kvmerger"``: ``kvcore.kvmerger_plan``: maximal runs of consecutive tokens
              whose adjacent keys have cosine >= ``merge_threshold`` merge into their pivot,
              the most attended *kept* token of the run, with Gaussian weights
              ``exp(-|k_p - k_i|^2 / 2 sigma^2)`` (``merge_sigma``; None: the run's RMS
              distance) renormalised over the pivot and its evicted members; other kept
              tokens of the run stay verbatim, a run without a kept token is dropped.
            * ``"cam"``: ``kvcore.cam_plan``: an evicted token ``e`` is merged with
              probability ``clip(attn[e] / max attn of the kept tokens, 0, 1)`` (draws from
              ``numpy.random.default_rng(merge_seed)``) into the next ``merge_window`` kept
              tokens, each adding ``V[e] / r``; keys are not merged.

            ``slot_count`` follows ``MergeBook``'s mass rule for all three.
        merge_threshold: the cosine threshold of ``"ems"`` and ``"kvmerger"`` (KVMerger's
            ``eps``), in ``[-1, 1]``.
        merge_sigma: ``"kvmerger"`` only: the Gaussian kernel width (a float > 0), or None.
        merge_window: ``"cam"`` only: kept tokens after an evicted one that share its value
            (default 64, KVCache-Factory ``CAMKVCluster.window_size``).
        merge_seed: ``"cam"`` only: the seed of the merge draws (default 0).
        merge_bias: whether :meth:`attend` adds ``log(slot_count)`` to each slot's logit, so
            a merged slot weighs like the tokens it stands for. Default: True for ``"ems"``
            and ``"kvmerger"`` (their slots are weighted *means*), False for ``"cam"``
            (its values are *sums*, ``V[r] + V[e] / r``, which already carry the evicted
            token's contribution; a bias would count it twice).
        evicted_format: None (evicted tokens are dropped) or ``"int8"``, ``"int4"``,
            ``"int2"``: MiKV's mixed precision (docs/cache.md). The tokens the policy evicts
            at a compression are moved, re-encoded from their high-tier values, to a
            low-precision tier of the same stream: a second allocator table per stream in its
            own pool of pages of ``lo_layout = QuantLayout(bits, quant_group, block_size,
            head_dim, "channel", "float16")`` (``kv_format="int2"``'s page layout), with their
            positions and validity (``lo_slot_pos``, ``lo_slot_valid``). The high tier holds
            exactly the policy's budget, as without it. :meth:`attend` reads both tiers and
            merges them by log-sum-exp; :meth:`update`'s dense return is the high tier only
            (:meth:`is_ragged` is true once a layer's low tier holds tokens). Low-tier tokens
            are never re-promoted. Needs a policy, a non-KIVI ``kv_format``, ``merge=None``,
            ``positions="original"`` and no compensation token.
        evicted_capacity: low-tier tokens per stream (rounded up to whole blocks); None: the
            first step's length + ``max(schedule headroom, 256)``. The low tier is bounded:
            a compression that would pass it drops the stream's earliest demoted tokens first
            (FIFO), so it never raises ``OutOfBlocksError``.

    Raises:
        ValueError: bad sizes, a budget above the capacity or below the policy's needs.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        capacity: int | None = None,
        capacity_bytes: int | None = None,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        policy: TorchPolicy | None = None,
        schedule: Schedule | None = None,
        positions: str = "original",
        rope: torch.Tensor | Sequence[torch.Tensor] | None = None,
        scaling: float | None = None,
        kv_format: str = "native",
        quant_group: int | None = None,
        merge: str | None = None,
        merge_threshold: float = 0.5,
        merge_sigma: float | None = None,
        merge_window: int | None = None,
        merge_seed: int | None = None,
        merge_bias: bool | None = None,
        evicted_format: str | None = None,
        evicted_capacity: int | None = None,
    ) -> None:
        for name, v in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("block_size", block_size),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if capacity is not None and capacity_bytes is not None:
            raise ValueError("give capacity (tokens) or capacity_bytes, not both")
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be an int >= 1 tokens per stream, got {capacity!r}")
        if positions not in ("original", "compact"):
            raise ValueError(f"positions must be 'original' or 'compact', got {positions!r}")
        if positions == "compact" and rope is None:
            raise ValueError("positions='compact' needs rope= (the layers' RoPE inv_freq)")
        if kv_format not in _BITS:
            raise ValueError(
                f"kv_format must be one of {', '.join(map(repr, _BITS))}, got {kv_format!r}"
            )
        self.kv_format = kv_format
        self.layout: QuantLayout | None = None  # int pages: (block_size, head_dim) tokens
        self.token_layout: QuantLayout | None = None  # one token of a page, as it is encoded
        self.kivi = kv_format.startswith("kivi")
        # The page layouts attention reads (None: pages of dtype values).
        self.k_layout: QuantLayout | None = None
        self.v_layout: QuantLayout | None = None
        if self.kivi:
            g = min(32, head_dim) if quant_group is None else quant_group
            if not isinstance(g, int) or isinstance(g, bool) or g < 1:
                raise ValueError(f"quant_group must be an int >= 1, got {quant_group!r}")
            bits = _BITS[kv_format]
            if block_size * bits % 8:
                raise ValueError(
                    f"{kv_format}: keys are quantized per channel in groups of block_size "
                    f"tokens, so block_size * {bits} bits must be whole bytes (block_size a "
                    f"multiple of {8 // bits}), got block_size={block_size}"
                )
            # Keys: per channel, one group of block_size tokens per channel and page (KIVI's
            # R = G = block_size); values: per token, groups of quant_group channels.
            self.k_layout = QuantLayout(bits, block_size, block_size, head_dim, "token", "float16")
            self.v_layout = QuantLayout(bits, g, block_size, head_dim, "channel", "float16")
        elif kv_format != "native":
            g = min(32, head_dim) if quant_group is None else quant_group
            if not isinstance(g, int) or isinstance(g, bool) or g < 1:
                raise ValueError(f"quant_group must be an int >= 1, got {quant_group!r}")
            # QuantLayout raises ValueError naming the broken rule (divides D, whole bytes).
            self.token_layout = QuantLayout(_BITS[kv_format], g, 1, head_dim, "channel", "float16")
            self.layout = QuantLayout(
                _BITS[kv_format], g, block_size, head_dim, "channel", "float16"
            )
            self.k_layout = self.v_layout = self.layout
        elif quant_group is not None and evicted_format is None:
            raise ValueError("quant_group needs a quantized kv_format or evicted_format")
        # MiKV: the evicted tokens' low-precision tier (its own allocator and pools).
        self.evicted_format = evicted_format
        self.lo_layout: QuantLayout | None = None
        self.lo_token_layout: QuantLayout | None = None
        if evicted_format is not None:
            if evicted_format not in _LO_FORMATS:
                raise ValueError(
                    f"evicted_format must be None or one of {', '.join(map(repr, _LO_FORMATS))}, "
                    f"got {evicted_format!r}"
                )
            why = None
            if policy is None:
                why = "a policy (it keeps the tokens a policy evicts)"
            elif self.kivi:
                why = "a kv_format other than KIVI's"
            elif merge is not None:
                why = "merge=None (evicted tokens go to the low tier, not into kept ones)"
            elif positions != "original":
                why = "positions='original'"
            elif getattr(policy, "compensation", "none") != "none":
                why = "a policy without a compensation token"
            if why is not None:
                raise ValueError(f"evicted_format={evicted_format!r} needs {why}")
            g = min(32, head_dim) if quant_group is None else quant_group
            if not isinstance(g, int) or isinstance(g, bool) or g < 1:
                raise ValueError(f"quant_group must be an int >= 1, got {quant_group!r}")
            bits = _BITS[evicted_format]
            self.lo_token_layout = QuantLayout(bits, g, 1, head_dim, "channel", "float16")
            self.lo_layout = QuantLayout(bits, g, block_size, head_dim, "channel", "float16")
        if evicted_capacity is not None and (
            evicted_format is None
            or not isinstance(evicted_capacity, int)
            or isinstance(evicted_capacity, bool)
            or evicted_capacity < 1
        ):
            raise ValueError(
                "evicted_capacity must be None or an int >= 1 tokens per stream, and needs "
                f"evicted_format (got evicted_capacity={evicted_capacity!r}, "
                f"evicted_format={evicted_format!r})"
            )
        self._lo_capacity_req = evicted_capacity
        self.lo_capacity = 0
        self.lo_allocator: BlockAllocator | None = None
        if merge not in _MERGES:
            raise ValueError(
                f"merge must be None or one of {', '.join(map(repr, _MERGES[1:]))}, got {merge!r}"
            )
        for pname, pval, owner in (
            ("merge_sigma", merge_sigma, "kvmerger"),
            ("merge_window", merge_window, "cam"),
            ("merge_seed", merge_seed, "cam"),
        ):
            if pval is not None and merge != owner:
                raise ValueError(f"{pname} is a parameter of merge={owner!r}, not of {merge!r}")
        if merge_sigma is not None and (
            not isinstance(merge_sigma, (int, float))
            or isinstance(merge_sigma, bool)
            or not math.isfinite(merge_sigma)
            or merge_sigma <= 0
        ):
            raise ValueError(f"merge_sigma must be None or a finite float > 0, got {merge_sigma!r}")
        if merge_window is not None and (
            not isinstance(merge_window, int) or isinstance(merge_window, bool) or merge_window < 1
        ):
            raise ValueError(f"merge_window must be an int >= 1, got {merge_window!r}")
        if merge_seed is not None and (
            not isinstance(merge_seed, int) or isinstance(merge_seed, bool) or merge_seed < 0
        ):
            raise ValueError(f"merge_seed must be an int >= 0, got {merge_seed!r}")
        if merge_bias is not None and (merge is None or not isinstance(merge_bias, bool)):
            raise ValueError(
                f"merge_bias must be None or a bool, and needs a merge method (got "
                f"merge_bias={merge_bias!r}, merge={merge!r})"
            )
        if (
            not isinstance(merge_threshold, (int, float))
            or isinstance(merge_threshold, bool)
            or not -1.0 <= float(merge_threshold) <= 1.0
        ):
            raise ValueError(f"merge_threshold must be a float in [-1, 1], got {merge_threshold!r}")
        self.merge = merge
        self.merge_threshold = float(merge_threshold)
        self.merge_sigma = None if merge_sigma is None else float(merge_sigma)
        self.merge_window = 64 if merge_window is None else merge_window
        self._merge_rng = np.random.default_rng(0 if merge_seed is None else merge_seed)
        if policy is not None and not isinstance(policy, TorchPolicy):
            raise TypeError(f"policy must be a kvcore.scoring.TorchPolicy, got {policy!r}")
        if policy is not None:
            policy.check_shape(num_layers, num_kv_heads)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size = block_size
        self.dtype, self.device = dtype, torch.device(device)
        self.policy = policy
        self.schedule = schedule or Schedule.prefill()
        self.positions = positions
        self.scaling = head_dim**-0.5 if scaling is None else float(scaling)
        self._rope: list[torch.Tensor] | None = None
        if rope is not None:
            rl = [rope] * num_layers if isinstance(rope, torch.Tensor) else list(rope)
            if len(rl) != num_layers:
                raise ValueError(f"rope has {len(rl)} entries for {num_layers} layers")
            for i, r in enumerate(rl):
                if not isinstance(r, torch.Tensor) or r.ndim != 1 or 2 * r.numel() > head_dim:
                    raise ValueError(
                        f"rope[{i}] must be a 1-d inv_freq tensor of at most head_dim / 2 = "
                        f"{head_dim // 2} frequencies, got "
                        f"{tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__}"
                    )
            self._rope = [r.detach().float().cpu() for r in rl]
        if policy is not None and capacity is not None:
            if policy.max_budget() > capacity:
                raise ValueError(
                    f"budget ({policy.max_budget()}) is above the capacity ({capacity} tokens)"
                )
        self._capacity_req = capacity
        self._capacity_bytes = capacity_bytes
        self._auto_size = capacity is None and capacity_bytes is None
        self._peak_bytes = 0
        self.batch_size = 0
        self.capacity = 0
        self.allocator: BlockAllocator | None = None
        self.k_pool = torch.empty(0)
        self.v_pool = torch.empty(0)
        self._seen = [0] * num_layers  # logical tokens seen per layer (padding included)
        self._next_pos = [0] * num_layers  # position of the next token
        self._pending: set[int] = set()
        self._compressed_once = [False] * num_layers
        self._decode_steps = [0] * num_layers
        self._step: list[dict[str, Any] | None] = [None] * num_layers
        self._next_queries: list[torch.Tensor | None] = [None] * num_layers
        self.num_compressions = 0
        # log(count) logit bias of merged slots in attend (RazorAttention "mean_logcount").
        self.logcount_bias = getattr(policy, "compensation", "none") == "mean_logcount" or (
            merge_bias if merge_bias is not None else merge in ("ems", "kvmerger")
        )

    # ------------------------------------------------------------------ set-up

    @property
    def initialized(self) -> bool:
        return self.allocator is not None

    def _init(self, batch: int, first_len: int) -> None:
        streams = batch * self.num_layers * self.num_kv_heads
        block_bytes = self.page_bytes
        # KIVI: one full-precision residual page (K and V) per stream besides the pools
        res_bytes = streams * self.residual_page_bytes
        if self._capacity_bytes is not None:
            blocks_per_stream = ((self._capacity_bytes - res_bytes) // block_bytes - 1) // streams
            if blocks_per_stream < 1:
                raise ValueError(
                    f"capacity_bytes={self._capacity_bytes} holds less than one block "
                    f"({block_bytes} bytes) per stream for {streams} streams"
                )
        else:
            cap = self._capacity_req
            if cap is None:
                budget = self.policy.max_budget() if self.policy is not None else first_len
                cap = max(budget, first_len) + self._slack()
            blocks_per_stream = -(-cap // self.block_size)
        self.capacity = blocks_per_stream * self.block_size
        if self.policy is not None and self.policy.max_budget() > self.capacity:
            raise ValueError(
                f"budget ({self.policy.max_budget()}) is above the capacity ({self.capacity} "
                "tokens per stream)"
            )
        num_blocks = streams * blocks_per_stream + 1
        alloc = BlockAllocator(num_blocks=num_blocks, block_size=self.block_size)
        n_slots = num_blocks * self.block_size
        # Normal tensors even when the first update runs under torch.inference_mode():
        # inference tensors could not be updated in place by a later call made outside it.
        with torch.inference_mode(False):
            if self.k_layout is not None and self.v_layout is not None:
                # one quantized layout block (codes, float16 scales, zeros) per page
                self.k_pool = torch.zeros(
                    num_blocks, self.k_layout.nbytes, dtype=torch.uint8, device=self.device
                )
                self.v_pool = torch.zeros(
                    num_blocks, self.v_layout.nbytes, dtype=torch.uint8, device=self.device
                )
            else:
                shape = (num_blocks, self.block_size, self.head_dim)
                self.k_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
                self.v_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.kivi:
                # KIVI's residual window: each stream's open (not yet full) page, K and V in
                # dtype, one row per stream (b, l, h); block_row[block] is the row holding an
                # open page, -1 for a sealed (quantized) one.
                res = (streams, self.block_size, self.head_dim)
                self.res_k = torch.zeros(res, dtype=self.dtype, device=self.device)
                self.res_v = torch.zeros(res, dtype=self.dtype, device=self.device)
                self.block_row = torch.full(
                    (num_blocks,), -1, dtype=torch.int64, device=self.device
                )
            self.slot_pos = torch.zeros(n_slots, dtype=torch.int64, device=self.device)
            self.slot_valid = torch.zeros(n_slots, dtype=torch.bool, device=self.device)
            self.slot_score = torch.zeros(n_slots, dtype=torch.float32, device=self.device)
            # Tokens each slot stands for (> 1 for a merged / compensation slot).
            self.slot_count = torch.ones(n_slots, dtype=torch.float32, device=self.device)
        self.tables = alloc.create_tables(streams).reshape(
            batch, self.num_layers, self.num_kv_heads
        )
        if self.lo_layout is not None:
            self._init_low_tier(batch, first_len)
        self.lengths = np.zeros((batch, self.num_layers, self.num_kv_heads), dtype=np.int64)
        self.batch_size = batch
        self.allocator = alloc
        self._peak_bytes = max(self._peak_bytes, self.memory_bytes())

    def _init_low_tier(self, batch: int, first_len: int) -> None:
        """MiKV's low tier: one more allocator table per stream, in its own pool of pages of
        ``lo_layout`` (the per-page quantized layout of ``kv_format="int2"`` and friends)."""
        assert self.lo_layout is not None
        streams = batch * self.num_layers * self.num_kv_heads
        cap = self._lo_capacity_req
        if cap is None:
            cap = first_len + self._slack()
        blocks_per_stream = -(-cap // self.block_size)
        self.lo_capacity = blocks_per_stream * self.block_size
        num_blocks = streams * blocks_per_stream + 1
        lo = BlockAllocator(num_blocks=num_blocks, block_size=self.block_size)
        n_slots = num_blocks * self.block_size
        with torch.inference_mode(False):
            nb = self.lo_layout.nbytes
            self.lo_k_pool = torch.zeros(num_blocks, nb, dtype=torch.uint8, device=self.device)
            self.lo_v_pool = torch.zeros(num_blocks, nb, dtype=torch.uint8, device=self.device)
            self.lo_slot_pos = torch.zeros(n_slots, dtype=torch.int64, device=self.device)
            self.lo_slot_valid = torch.zeros(n_slots, dtype=torch.bool, device=self.device)
            # MiKV's per-channel key balancer of each stream (keys stored as K / s)
            self.lo_key_scale = torch.ones(
                batch, self.num_layers, self.num_kv_heads, self.head_dim, device=self.device
            )
        self.lo_tables = lo.create_tables(streams).reshape(
            batch, self.num_layers, self.num_kv_heads
        )
        self.lo_lengths = np.zeros((batch, self.num_layers, self.num_kv_heads), dtype=np.int64)
        self.lo_allocator = lo

    # ------------------------------------------------------------------ slot storage

    @property
    def page_bytes(self) -> int:
        """Bytes of one block in the K pool plus the V pool: ``2 * block_size * head_dim``
        values of ``dtype``, or the page layouts' exact ``nbytes`` (docs/layouts.md)."""
        if self.k_layout is not None and self.v_layout is not None:
            return int(self.k_layout.nbytes) + int(self.v_layout.nbytes)
        return 2 * self.block_size * self.head_dim * self._elt()

    @property
    def lo_page_bytes(self) -> int:
        """MiKV: bytes of one low-tier block, K plus V (``2 * lo_layout.nbytes``; 0 without
        ``evicted_format``)."""
        return 2 * int(self.lo_layout.nbytes) if self.lo_layout is not None else 0

    @property
    def residual_page_bytes(self) -> int:
        """KIVI: bytes of one stream's full-precision residual page, K and V (0 otherwise)."""
        return 2 * self.block_size * self.head_dim * self._elt() if self.kivi else 0

    def _elt(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def _regions(
        self, page: QuantLayout | None = None, tok: QuantLayout | None = None
    ) -> list[tuple[int, int, int]]:
        """Where one token's bytes lie in a quantized page, as ``(page offset, offset in the
        token's own one-token block, width)`` for its codes, its scales and its zero points.

        With axis ``"channel"`` every group lies inside one token, so token ``o`` of a page
        owns three contiguous byte ranges, each ``o * width`` past the start of its region::

            page:  | codes: tok 0 | tok 1 | ... | pad | scales: tok 0 | tok 1 | ... | zeros: ...
                     <-- cb -->                         <-- sb -->
            token: | codes (cb) | pad | scales (sb) | zeros (sb) |   (QuantLayout(.., 1, D, ..))
        """
        if page is None:
            page, tok = self.layout, self.token_layout
        assert page is not None and tok is not None
        cb = int(tok.codes_bytes)
        sb = int(tok.zeros_offset) - int(tok.scales_offset)
        return [
            (0, 0, cb),
            (int(page.scales_offset), int(tok.scales_offset), sb),
            (int(page.zeros_offset), int(tok.zeros_offset), sb),
        ]

    def _slot_views(
        self, pool: torch.Tensor, page: QuantLayout | None = None, tok: QuantLayout | None = None
    ) -> list[tuple[torch.Tensor, int, int]]:
        """Per-slot byte views of a pool: ``(view, token offset, width)``, each view
        ``(num_blocks, block_size, width)`` over the pool's storage (strided for quantized
        pages), so ``view[block, offset]`` is one slot's piece. ``page`` / ``tok``: other
        layouts than the cache's pages (the MiKV low tier)."""
        if page is None and self.layout is None:
            return [(pool, 0, pool.shape[-1])]
        bs = self.block_size
        return [
            (pool[:, po : po + bs * w].view(pool.shape[0], bs, w), to, w)
            for po, to, w in self._regions(page, tok)
        ]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` vectors -> what one slot stores: ``dtype`` values, or one one-token
        block of ``token_layout`` (bytes identical to the token's piece of its page)."""
        if self.token_layout is None:
            return x.to(self.dtype)
        from kvcore import kernels

        return kernels.quantize(x.reshape(-1, 1, self.head_dim).contiguous(), self.token_layout)

    def _put(
        self,
        pool: torch.Tensor,
        slots: torch.Tensor,
        enc: torch.Tensor,
        page: QuantLayout | None = None,
        tok: QuantLayout | None = None,
    ) -> None:
        """Stores :meth:`_encode`'s ``(N, ...)`` rows at ``slots`` (``page`` / ``tok``: as
        :meth:`_slot_views`)."""
        bs = self.block_size
        b, o = slots // bs, slots % bs
        for view, to, w in self._slot_views(pool, page, tok):
            view[b, o] = enc[:, to : to + w]

    def _get(
        self,
        pool: torch.Tensor,
        slots: torch.Tensor,
        page: QuantLayout | None = None,
        tok: QuantLayout | None = None,
    ) -> torch.Tensor:
        """What ``slots`` store, as :meth:`_encode` wrote it (one-token blocks when quantized;
        the padding between codes and scales is zero, as the encoder writes it). ``page`` /
        ``tok``: as :meth:`_slot_views`."""
        if page is None:
            if self.layout is None:
                return pool.view(-1, pool.shape[-1])[slots]
            tok = self.token_layout
        assert tok is not None
        bs = self.block_size
        b, o = slots // bs, slots % bs
        out = torch.zeros(len(slots), tok.nbytes, dtype=torch.uint8, device=pool.device)
        for view, to, w in self._slot_views(pool, page, tok):
            out[:, to : to + w] = view[b, o]
        return out

    def _move_pieces(
        self,
        pools: Sequence[torch.Tensor],
        src: torch.Tensor,
        dst: torch.Tensor,
        page: QuantLayout | None = None,
        tok: QuantLayout | None = None,
    ) -> None:
        """A compaction plan over quantized pages: each token moves as its three pieces
        (codes, scales, zeros), never as a raw row of its page, in one
        :func:`kvcore.kernels.compact_pools` call over the pieces' strided views."""
        from kvcore import kernels

        views = [v for pool in pools for v, _, _ in self._slot_views(pool, page, tok)]
        indptr = torch.tensor([0, len(src)], dtype=torch.int64, device=src.device)
        num_slots = views[0].shape[0] * views[0].shape[1]
        kernels.compact_pools(views, [0] * len(views), src, dst, indptr, num_slots)

    def _read(self, pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` vectors in ``dtype`` of the given slots (dequantized when quantized)."""
        if self.kivi:
            return self._kivi_read(pool, slots)
        raw = self._get(pool, slots)
        if self.token_layout is None:
            return raw
        from kvcore import kernels

        out = kernels.dequantize(raw.contiguous(), self.token_layout, torch.float32)
        return out.reshape(-1, self.head_dim).to(self.dtype)

    def _write(self, pool: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Stores ``(N, D)`` vectors at ``slots`` (encoded as the format says)."""
        if self.kivi:
            self._kivi_write(pool, slots, x)
            return
        self._put(pool, slots, self._encode(x))

    # ------------------------------------------------------------------ MiKV low tier

    def _lo_write(self, pool: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Encodes ``(N, D)`` vectors alone with ``lo_token_layout`` and scatters each one's
        codes, scales and zeros into its page of the low tier."""
        from kvcore import kernels

        assert self.lo_layout is not None and self.lo_token_layout is not None
        enc = kernels.quantize(
            x.float().reshape(-1, 1, self.head_dim).contiguous(), self.lo_token_layout
        )
        self._put(pool, slots, enc, self.lo_layout, self.lo_token_layout)

    def _lo_read(self, pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` float32 dequantized vectors of low-tier ``slots``."""
        from kvcore import kernels

        assert self.lo_layout is not None and self.lo_token_layout is not None
        raw = self._get(pool, slots, self.lo_layout, self.lo_token_layout)
        out = kernels.dequantize(raw.contiguous(), self.lo_token_layout, torch.float32)
        return out.reshape(-1, self.head_dim)

    def _lo_move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """A low-tier compaction plan: each token's three pieces and its state move."""
        from kvcore import kernels

        assert self.lo_layout is not None
        pools = (self.lo_k_pool, self.lo_v_pool)
        self._move_pieces(pools, src, dst, self.lo_layout, self.lo_token_layout)
        state = [self.lo_slot_pos, self.lo_slot_valid]
        indptr = torch.tensor([0, len(src)], dtype=torch.int64, device=src.device)
        kernels.compact_pools(state, [0, 0], src, dst, indptr, int(self.lo_slot_pos.numel()))

    def _demote(
        self, layer: int, inp: ScoreInputs, keep: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """Moves the valid tokens the policy evicts from the high tier (``slots``, before the
        compaction) to the end of their streams' low tier, re-encoded at ``evicted_format``
        from their (dequantized) high-tier values. A low-tier stream past ``lo_capacity``
        drops its earliest demoted tokens first (FIFO); padding is never demoted."""
        assert self.lo_allocator is not None
        b, h, t = keep.shape
        ev = (inp.valid & ~keep.to(inp.valid.device)).reshape(b * h, t)
        n_ev = ev.sum(-1)
        if int(n_ev.sum()) == 0:
            return
        cap = self.lo_capacity
        if bool((n_ev > cap).any()):  # more than fits at once: the latest ones
            rank = ev.cumsum(-1)
            ev &= rank > (n_ev - cap).clamp(min=0)[:, None]
            n_ev = ev.sum(-1)
        n_new = n_ev.cpu().numpy().astype(np.int64)
        lo_tables = np.ascontiguousarray(self.lo_tables[:, layer].reshape(-1))
        lo_lens = self.lo_lengths[:, layer].reshape(-1).copy()
        over = np.maximum(lo_lens + n_new - cap, 0)
        if over.any():
            indptr = np.zeros(len(lo_tables) + 1, dtype=np.int64)
            indptr[1:] = np.cumsum(lo_lens - over)
            positions = np.concatenate(
                [
                    np.arange(o, n, dtype=np.int64)
                    for o, n in zip(over.tolist(), lo_lens.tolist(), strict=True)
                ]
            )
            src_np, dst_np, _ = self.lo_allocator.compact_batch(lo_tables, indptr, positions)
            if len(src_np):
                self._lo_move(
                    torch.from_numpy(src_np).to(self.device),
                    torch.from_numpy(dst_np).to(self.device),
                )
            lo_lens -= over
            self.lo_lengths[:, layer] = lo_lens.reshape(b, h)
        # Fits by construction (capacity per stream, blocks reserved per stream).
        dst_np, _, _, _ = self.lo_allocator.append_batch(lo_tables, n_new)
        dst = torch.from_numpy(dst_np).to(self.device)
        src = slots.reshape(b * h, t)[ev]  # stream by stream, in stream order: as dst
        # MiKV's key balancer, fixed per stream when its low tier starts (empty now).
        fresh = torch.from_numpy(lo_lens == 0).to(self.device).reshape(b, h)
        scale = self.lo_key_scale[:, layer]  # (B, H, D)
        scale[fresh] = self._balance(inp)[fresh]
        owner = torch.repeat_interleave(
            torch.arange(b * h, device=self.device), n_ev.to(self.device)
        )
        keys = self._read(self.k_pool, src) / scale.reshape(b * h, -1)[owner]
        self._lo_write(self.lo_k_pool, dst, keys)
        self._lo_write(self.lo_v_pool, dst, self._read(self.v_pool, src))
        self.lo_slot_pos[dst] = self.slot_pos[src]
        self.lo_slot_valid[dst] = True
        self.lo_lengths[:, layer] += n_new.reshape(b, h)

    def _balance(self, inp: ScoreInputs) -> torch.Tensor:
        """MiKV's per-channel key balancer ``(B, H, D)``: ``s_c = sqrt(max|K_c| / max|Q_c|)``
        over the layer's valid stored keys and the observed queries of the head's GQA group;
        the low tier stores ``K / s`` and attends with ``Q * s``, so ``q . k`` is unchanged
        while the keys' outlier channels are flattened before their per-token quantization
        (SmoothQuant's migration with alpha = 0.5). Without observed queries the keys'
        channel maxima are balanced against their mean."""
        b, h, _, d = inp.keys.shape
        k = inp.keys.float().abs().masked_fill(~inp.valid[..., None], 0.0)
        kmax = k.amax(2).clamp(min=1e-6)  # (B, H, D)
        if inp.queries is not None:
            q = inp.queries.float().abs()
            if inp.query_valid is not None:
                q = q.masked_fill(~inp.query_valid[:, None, :, None].to(q.device), 0.0)
            qmax = q.reshape(b, h, -1, d).amax(2).clamp(min=1e-6)  # group heads x window
        else:
            qmax = kmax.mean(-1, keepdim=True).expand_as(kmax)
        return (kmax / qmax).sqrt().to(self.device)

    def evicted_lengths(self, layer_idx: int | None = None) -> np.ndarray:
        """MiKV: tokens per stream in the low-precision tier, ``(B, L, H)`` or ``(B, H)``
        (zeros without ``evicted_format``)."""
        self.flush()
        if self.allocator is None:
            return np.zeros((0, self.num_layers, self.num_kv_heads), np.int64)
        if self.lo_allocator is None:
            lens = np.zeros_like(self.lengths)
        else:
            lens = self.lo_lengths.copy()
        return lens if layer_idx is None else lens[:, layer_idx].copy()

    def _lo_attend(
        self, query: torch.Tensor, layer: int, q: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention (output, lse) of the step's queries over the layer's low tier: every query
        sees every low-tier token (they all precede the step). Pages of ``lo_layout`` through
        the fused-dequantization path; the kernel's causal window is opened by ``q - 1``
        extra slots, masked (null block, or dead slots of the last page)."""
        from kvcore import kernels

        assert self.lo_allocator is not None
        bs, dev = self.block_size, self.device
        tables = np.ascontiguousarray(self.lo_tables[:, layer].reshape(-1))
        lens = self.lo_lengths[:, layer].reshape(-1)
        eff = lens + (q - 1) * (lens > 0)
        width = max(1, -(-int(eff.max()) // bs))
        bt, _, _ = self.lo_allocator.vllm_layout(tables)
        table = np.zeros((len(tables), width), dtype=np.int64)
        cols = min(width, bt.shape[1])
        table[:, :cols] = bt[:, :cols]
        slots, mask = self._slots(tables, lens, self.lo_allocator)
        live = torch.zeros_like(self.lo_slot_valid)
        live[slots[mask]] = True
        group = query.shape[1] // self.num_kv_heads
        scale = self.lo_key_scale[:, layer].repeat_interleave(group, dim=1)  # (B, Hq, D)
        return kernels.decode_attention(
            (query.float() * scale[:, :, None, :]).to(query.dtype),
            self.lo_k_pool,
            self.lo_v_pool,
            torch.from_numpy(table).to(dev),
            torch.from_numpy(eff.astype(np.int64)).to(dev),
            slot_valid=self.lo_slot_valid & live,
            scaling=self.scaling,
            k_layout=self.lo_layout,
            v_layout=self.lo_layout,
            return_lse=True,
        )

    # ------------------------------------------------------------------ KIVI storage
    #
    # A stream's full pages are sealed: keys one QuantLayout(bits, bs, bs, D, "token") block
    # (per channel, one group of bs tokens), values one QuantLayout(bits, G, bs, D, "channel")
    # block (per token). Its last page, while not full, is open: its K and V live in dtype in
    # the stream's residual row (block_row[block] = row). A page is sealed when it fills up.
    # After a compaction or a restore, a stream's last page may be sealed with fewer tokens
    # (its tail slots hold stale tokens, never read); the next update reads its tokens back
    # (dequantized) and reopens it.

    def _kivi_side(self, pool: torch.Tensor) -> tuple[QuantLayout, torch.Tensor]:
        if pool is self.k_pool:
            assert self.k_layout is not None
            return self.k_layout, self.res_k
        assert self.v_layout is not None
        return self.v_layout, self.res_v

    def _kivi_read(self, pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        from kvcore import kernels

        layout, res = self._kivi_side(pool)
        bs = self.block_size
        blocks, off = slots // bs, slots % bs
        row = self.block_row[blocks]
        out = torch.empty(len(slots), self.head_dim, dtype=self.dtype, device=self.device)
        is_open = row >= 0
        out[is_open] = res[row[is_open], off[is_open]]
        sealed = ~is_open
        if bool(sealed.any()):
            # a key group spans the whole page: dequantize each page read once
            pages, inv = torch.unique(blocks[sealed], return_inverse=True)
            dense = kernels.dequantize(pool[pages].contiguous(), layout, torch.float32)
            out[sealed] = dense[inv, off[sealed]].to(self.dtype)
        return out

    def _kivi_write(self, pool: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Writes tokens into their pages: an open page's residual row directly; a sealed
        page is re-sealed from its dequantized tokens with the new ones in place (one more
        rounding of the page's other tokens: their groups change)."""
        from kvcore import kernels

        layout, res = self._kivi_side(pool)
        bs = self.block_size
        blocks, off = slots // bs, slots % bs
        row = self.block_row[blocks]
        is_open = row >= 0
        res[row[is_open], off[is_open]] = x[is_open].to(self.dtype)
        sealed = ~is_open
        if bool(sealed.any()):
            pages, inv = torch.unique(blocks[sealed], return_inverse=True)
            dense = kernels.dequantize(pool[pages].contiguous(), layout, torch.float32)
            dense[inv, off[sealed]] = x[sealed].float()
            pool[pages] = kernels.quantize(dense, layout)

    def _kivi_stage(
        self, tables: np.ndarray, prev: np.ndarray, k: torch.Tensor, v: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Everything an update writes, computed before the allocator appends anything (so a
        rejected step changes nothing): the pages the step fills, sealed, and the new open
        pages.

        Per stream ``s`` with ``r = prev % bs`` tokens in its last page::

            work[s] = | the r tokens of the last page | the q new tokens | ...
                      |<-- page 0 -->|<-- page 1 -->| ...   pages k < (r + q) // bs are full
        """
        from kvcore import kernels

        if not bool(torch.isfinite(k).all()) or not bool(torch.isfinite(v).all()):
            raise ValueError("input contains a non-finite value (NaN or inf)")
        assert self.k_layout is not None and self.v_layout is not None
        bs, d, dev = self.block_size, self.head_dim, self.device
        n_s, q = k.shape[0], k.shape[1]
        r = torch.from_numpy(prev % bs).to(dev)
        num_pages = int((r + q).max()) // bs + 1
        works = []
        tail_slots = None
        if int(r.max()) > 0:
            bt = torch.from_numpy(self._block_table(tables)).to(dev)
            j = torch.arange(bs, device=dev)
            has = j[None, :] < r[:, None]
            col = torch.from_numpy(prev // bs).to(dev).clamp(max=bt.shape[1] - 1)
            last = bt.gather(1, col[:, None])
            tail_slots = (last * bs + j[None, :])[has]
        for pool, x in ((self.k_pool, k), (self.v_pool, v)):
            w = torch.zeros(n_s, num_pages * bs, d, dtype=self.dtype, device=dev)
            if tail_slots is not None:
                j = torch.arange(bs, device=dev)
                has = j[None, :] < r[:, None]
                w[:, :bs][has] = self._kivi_read(pool, tail_slots)
            cols = r[:, None] + torch.arange(q, device=dev)[None, :]
            w[torch.arange(n_s, device=dev)[:, None], cols] = x.to(self.dtype)
            works.append(w.view(n_s, num_pages, bs, d))
        full = (r + q) // bs
        page_mask = torch.arange(num_pages, device=dev)[None, :] < full[:, None]
        rows = torch.arange(n_s, device=dev)
        sealed_k = sealed_v = torch.empty(0, dtype=torch.uint8, device=dev)
        if bool(page_mask.any()):
            sealed_k = kernels.quantize(works[0][page_mask].contiguous(), self.k_layout)
            sealed_v = kernels.quantize(works[1][page_mask].contiguous(), self.v_layout)
        return {
            "full": full,
            "page_mask": page_mask,
            "k_sealed": sealed_k,
            "v_sealed": sealed_v,
            "k_open": works[0][rows, full],
            "v_open": works[1][rows, full],
            "has_open": (r + q) % bs > 0,
        }

    def _block_table(self, tables: np.ndarray) -> np.ndarray:
        """``(len(tables), W)`` int64 block ids of the streams (vLLM block table)."""
        assert self.allocator is not None
        bt, _, _ = self.allocator.vllm_layout(np.ascontiguousarray(tables))
        return np.asarray(bt, dtype=np.int64)

    def _kivi_commit(
        self, layer: int, tables: np.ndarray, prev: np.ndarray, st: dict[str, torch.Tensor]
    ) -> None:
        """After the append: sealed pages into the pools, open pages into residual rows."""
        bs, dev = self.block_size, self.device
        bt = torch.from_numpy(self._block_table(tables)).to(dev)
        base = torch.from_numpy(prev // bs).to(dev)
        s_idx, k_idx = torch.nonzero(st["page_mask"], as_tuple=True)
        if len(s_idx):
            blocks = bt[s_idx, base[s_idx] + k_idx]
            self.k_pool[blocks] = st["k_sealed"]
            self.v_pool[blocks] = st["v_sealed"]
            self.block_row[blocks] = -1
        b, h = self.batch_size, self.num_kv_heads
        rows = torch.arange(b * self.num_layers * h, device=dev).reshape(b, self.num_layers, h)
        rows = rows[:, layer].reshape(-1)
        o = torch.nonzero(st["has_open"], as_tuple=True)[0]
        if len(o):
            blocks = bt[o, base[o] + st["full"][o]]
            self.res_k[rows[o]] = st["k_open"][o]
            self.res_v[rows[o]] = st["v_open"][o]
            self.block_row[blocks] = rows[o]

    # ------------------------------------------------------------------ sizes

    def memory_bytes(self) -> int:
        """Bytes held by the K and V pool tensors (what the budget is measured against), and
        for KIVI the full-precision residual pages."""
        n = self.k_pool.nbytes + self.v_pool.nbytes
        if self.kivi and self.allocator is not None:
            n += self.res_k.nbytes + self.res_v.nbytes
        if self.lo_allocator is not None and self.allocator is not None:
            n += self.lo_k_pool.nbytes + self.lo_v_pool.nbytes
        return int(n)

    def peak_memory_bytes(self) -> int:
        """The largest :meth:`memory_bytes` the cache has had: its pools are reallocated by
        :meth:`shrink` and, when sized on demand, when a step does not fit."""
        return max(self._peak_bytes, self.memory_bytes())

    def used_bytes(self) -> int:
        """Bytes of K and V in blocks that streams hold now."""
        if self.allocator is None:
            return 0
        self.flush()
        if self.kivi:
            return self._kivi_used_bytes()
        n = int(self.allocator.num_used_blocks) * self.page_bytes
        if self.lo_allocator is not None:
            n += int(self.lo_allocator.num_used_blocks) * self.lo_page_bytes
        return n

    def _kivi_used_bytes(self) -> int:
        """Sealed pages at their layouts' bytes, open pages at their tokens' full-precision
        bytes (``n // bs`` key and value pages plus ``n % bs`` tokens per stream, when each
        stream's last page is open; KIVI's ``kivi_nbytes`` with ``R = G = block_size``, values
        paged like the keys)."""
        assert self.allocator is not None
        bs = self.block_size
        lens = self.lengths.reshape(-1)
        tables = self.tables.reshape(-1)
        bt = self.allocator.vllm_layout(tables)[0].astype(np.int64)
        pages = -(-lens // bs)
        row = self.block_row.cpu().numpy()
        total = 0
        tok = 2 * self.head_dim * self._elt()
        for s_, n in enumerate(lens.tolist()):
            if n == 0:
                continue
            last = int(bt[s_, pages[s_] - 1])
            open_tail = row[last] >= 0
            total += (pages[s_] - int(open_tail)) * self.page_bytes
            if open_tail:
                total += (n - (pages[s_] - 1) * bs) * tok
        return int(total)

    def stored_lengths(self, layer_idx: int | None = None) -> np.ndarray:
        """Stored tokens per stream: ``(B, L, H)`` or ``(B, H)`` for one layer (padding
        tokens included until they are evicted)."""
        self.flush()
        if self.allocator is None:
            return np.zeros((0, self.num_layers, self.num_kv_heads), np.int64)
        out: np.ndarray = (self.lengths if layer_idx is None else self.lengths[:, layer_idx]).copy()
        return out

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The logical length: positions of the next token (all tokens seen with
        ``positions="original"``, the stored length with ``"compact"``)."""
        self._check_layer(layer_idx)
        self.flush()
        return self._next_pos[layer_idx]

    def get_stored_length(self, layer_idx: int = 0) -> int:
        """The longest stream of the layer, in stored tokens (the physical kv length)."""
        self._check_layer(layer_idx)
        self.flush()
        if self.allocator is None:
            return 0
        return int(self.lengths[:, layer_idx].max())

    def is_ragged(self, layer_idx: int) -> bool:
        """Whether the layer's streams differ in length or hold padding tokens, so dense
        attention over :meth:`update`'s output would be wrong (use :meth:`attend`)."""
        if self.allocator is None:
            return False
        lens = self.lengths[:, layer_idx]
        if self.lo_allocator is not None and bool(self.lo_lengths[:, layer_idx].any()):
            return True  # the low tier is only read by attend
        return bool(lens.min() != lens.max()) or self._seen_padding(layer_idx)

    def page_table(
        self, layer_idx: int, layout: str = "flashinfer"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The layer's page table for a serving kernel, one row per stream ``b * H + h``.

        Args:
            layout: ``"flashinfer"`` -> ``(indptr, indices, last_page_len)`` int32;
                ``"vllm"`` -> ``(block_table, slot_mapping, seq_lens)`` (see
                ``BlockAllocator.flashinfer_layout`` / ``vllm_layout``). Block ids index
                ``k_pool`` / ``v_pool`` ``(num_blocks, block_size, head_dim)``.
        """
        self._check_layer(layer_idx)
        self.flush()
        if self.allocator is None:
            raise ValueError("the cache holds nothing yet: call update first")
        tables = np.ascontiguousarray(self.tables[:, layer_idx].reshape(-1))
        if layout == "flashinfer":
            return self.allocator.flashinfer_layout(tables)
        if layout == "vllm":
            return self.allocator.vllm_layout(tables)
        raise ValueError(f"layout must be 'flashinfer' or 'vllm', got {layout!r}")

    # ------------------------------------------------------------------ checks

    def _check_layer(self, layer_idx: int) -> None:
        if (
            not isinstance(layer_idx, int)
            or isinstance(layer_idx, bool)
            or not 0 <= layer_idx < self.num_layers
        ):
            raise IndexError(
                f"layer_idx must be an int in [0, {self.num_layers}), got {layer_idx!r}"
            )

    def _check_kv(self, name: str, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4 or t.shape[1] != self.num_kv_heads or t.shape[3] != self.head_dim:
            raise ValueError(
                f"{name} must have shape (batch, {self.num_kv_heads}, seq_len, {self.head_dim}), "
                f"got {tuple(t.shape)}"
            )
        if t.dtype != self.dtype:
            raise TypeError(f"{name} must have dtype {self.dtype}, got {t.dtype}")
        if t.device.type != self.device.type or (
            self.device.index is not None and t.device.index != self.device.index
        ):
            raise ValueError(f"{name} must be on {self.device}, got {t.device}")

    # ------------------------------------------------------------------ the loop API

    def observe(self, layer_idx: int, queries: torch.Tensor) -> None:
        """Record the (rotated) queries of the next :meth:`update` of ``layer_idx``, for
        query-aware scores. They must be the *last* ``w`` tokens of that step.

        Args:
            queries: ``(B, Hq, w, D)`` with ``Hq`` a multiple of ``num_kv_heads``.
        """
        self._check_layer(layer_idx)
        if not isinstance(queries, torch.Tensor) or queries.ndim != 4:
            raise ValueError("queries must be a (batch, num_q_heads, w, head_dim) tensor")
        if queries.shape[1] % self.num_kv_heads or queries.shape[3] != self.head_dim:
            raise ValueError(
                f"queries must have shape (batch, k * {self.num_kv_heads}, w, {self.head_dim}), "
                f"got {tuple(queries.shape)}"
            )
        self._next_queries[layer_idx] = queries.detach()

    def update(
        self,
        layer_idx: int,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one step of K/V for a layer and return what dense attention reads.

        Args:
            layer_idx: in ``[0, num_layers)``.
            key_states, value_states: ``(B, num_kv_heads, q, head_dim)`` in the cache's dtype
                and device (keys already rotated).
            valid: optional ``(B, q)`` bool, False for padding tokens (never kept when
                compressing, masked by :meth:`attend`).

        Returns:
            ``(keys, values)``, each ``(B, num_kv_heads, T, head_dim)``: every stored token of
            the layer, this step's included, padded with zeros to the longest stream. When
            :meth:`is_ragged` is true the padding would be attended: use :meth:`attend`.
            With ``evicted_format`` only the high tier is returned (the low tier is read by
            :meth:`attend` alone; :meth:`is_ragged` is then true).

        Raises:
            IndexError: a bad layer index. TypeError / ValueError: wrong types, shapes, dtype or
            device; a batch size other than the first update's. kvcore.OutOfBlocksError: the
            step does not fit in the capacity. The cache is unchanged after any of them.
        """
        self.append(layer_idx, key_states, value_states, valid)
        return self._gather_dense(layer_idx)

    def append(
        self,
        layer_idx: int,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> None:
        """:meth:`update` without gathering the dense K/V: for loops that read the pages
        with :meth:`attend` (the paged attention), which saves a copy of every stored token
        per step. Same arguments, errors and guarantees as :meth:`update`."""
        self._check_layer(layer_idx)
        self._check_kv("key_states", key_states)
        self._check_kv("value_states", value_states)
        if key_states.shape != value_states.shape:
            raise ValueError(
                f"key_states {tuple(key_states.shape)} and value_states "
                f"{tuple(value_states.shape)} must have the same shape"
            )
        b, _, q, _ = key_states.shape
        if valid is not None:
            if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
                raise TypeError("valid must be a (batch, seq_len) bool tensor")
            if tuple(valid.shape) != (b, q):
                raise ValueError(f"valid must have shape ({b}, {q}), got {tuple(valid.shape)}")
        if self.allocator is not None and b != self.batch_size:
            raise ValueError(f"batch size {b} differs from the cache's {self.batch_size}")
        qobs = self._next_queries[layer_idx]
        if qobs is not None and (qobs.shape[0] != b or qobs.shape[2] > q):
            self._next_queries[layer_idx] = None
            raise ValueError(
                f"observed queries {tuple(qobs.shape)} do not fit a step of batch {b} and "
                f"{q} tokens"
            )
        # Compressions decided for earlier steps run first; they are not undone if this
        # step then fails.
        self.flush()
        fresh = self.allocator is None
        if fresh:
            self._init(b, q)
        elif self._auto_size:
            if layer_idx == 0:
                self._auto_shrink(q)
            if int(self.lengths[:, layer_idx].max()) + q > self.capacity:
                # on-demand pools grow instead of raising (the contents move unchanged)
                grown = int(self.lengths.max()) + q + self._slack()
                self._resize(-(-grown // self.block_size))
        assert self.allocator is not None
        tables = self.tables[:, layer_idx].reshape(-1)
        prev = self.lengths[:, layer_idx].reshape(-1).copy()
        try:  # encode first: a value quantization rejects (NaN, inf) changes nothing
            if self.kivi:
                d = self.head_dim
                staged = self._kivi_stage(
                    tables, prev, key_states.reshape(-1, q, d), value_states.reshape(-1, q, d)
                )
            else:
                k_enc = self._encode(key_states.reshape(-1, self.head_dim))
                v_enc = self._encode(value_states.reshape(-1, self.head_dim))
        except Exception:
            if fresh:
                self.allocator = None
                self.k_pool = self.v_pool = torch.empty(0)
            raise
        if int(prev.max()) + q > self.capacity:
            if fresh:
                self.allocator = None
            raise OutOfBlocksError(
                f"layer {layer_idx}: {int(prev.max())} stored + {q} new tokens exceed the "
                f"capacity of {self.capacity} tokens per stream"
            )
        try:
            # All or nothing: raises OutOfBlocksError before any change.
            slots_np, _, _, _ = self.allocator.append_batch(tables, q)
        except Exception:
            if fresh:
                self.allocator = None
                self.k_pool = self.v_pool = torch.empty(0)
            raise
        slots = torch.from_numpy(slots_np).to(self.device).reshape(b, self.num_kv_heads, q)
        if self.kivi:
            self._kivi_commit(layer_idx, tables, prev, staged)
        else:
            self._put(self.k_pool, slots.reshape(-1), k_enc)
            self._put(self.v_pool, slots.reshape(-1), v_enc)
        pos = self._next_pos[layer_idx] + torch.arange(q, device=self.device)
        self.slot_pos[slots.reshape(-1)] = pos.expand(b, self.num_kv_heads, q).reshape(-1)
        v_mask = (
            torch.ones(b, q, dtype=torch.bool, device=self.device)
            if valid is None
            else valid.to(self.device)
        )
        self.slot_valid[slots.reshape(-1)] = (
            v_mask[:, None, :].expand(b, self.num_kv_heads, q).reshape(-1)
        )
        self.slot_score[slots.reshape(-1)] = 0.0
        self.slot_count[slots.reshape(-1)] = 1.0
        self.lengths[:, layer_idx] += q
        self._seen[layer_idx] += q
        self._next_pos[layer_idx] += q
        self._step[layer_idx] = {
            "q": q,
            "positions": pos,
            "valid": v_mask,
            "queries": qobs,
            # quantized pages: the chunk's own K/V in full precision, for attend's prefill
            "keys": key_states if self.k_layout is not None else None,
            "values": value_states if self.k_layout is not None else None,
        }
        self._next_queries[layer_idx] = None
        self._pending.add(layer_idx)

    def _seen_padding(self, layer_idx: int) -> bool:
        """Whether padding tokens are still stored in the layer."""
        lens = self.lengths[:, layer_idx].reshape(-1)
        slots = self._slots(self.tables[:, layer_idx].reshape(-1), lens)[0]
        return bool((~self.slot_valid[slots] & (slots >= 0)).any()) if slots.numel() else False

    def has_pending_step(self, layer_idx: int) -> bool:
        """Whether :meth:`attend` can read layer ``layer_idx`` now: an :meth:`update` or
        :meth:`append` of the layer recorded a step that :meth:`attend` has not consumed."""
        self._check_layer(layer_idx)
        return self._step[layer_idx] is not None

    def attend(
        self, layer_idx: int, query: torch.Tensor, slot_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Paged attention of the last step's queries of a layer (ragged heads, padding).

        Runs :func:`kvcore.kernels.decode_attention` over the layer's pages (the CUDA kernel
        on CUDA tensors with CuPy, else the torch reference
        :func:`kvcore.attention.paged_attention`). The step's own tokens are read from the
        pages like the prefix, causally; with quantized pages a prefill chunk (``q > 1``)
        attends its own tokens in full precision and the stored prefix dequantized, while a
        decode step reads everything as stored (the fused-dequantization path).

        Args:
            query: ``(B, Hq, q, D)`` the step's (rotated) queries, ``q`` as in the last
                :meth:`update` of the layer.
            slot_bias: optional ``(num_slots,)`` float logit bias per slot (log-count of merged
                slots).

        Returns:
            ``(B, q, Hq, D)``.

        Raises:
            ValueError: no :meth:`update` of this layer since its last attention or
                compression, or a query of another batch or length than that step.
        """
        self._check_layer(layer_idx)
        st = self._step[layer_idx]
        if st is None or layer_idx not in self._pending:
            raise ValueError(f"attend({layer_idx}) must follow update({layer_idx}) of the step")
        if (
            not isinstance(query, torch.Tensor)
            or query.ndim != 4
            or query.shape[0] != self.batch_size
            or query.shape[2] != st["q"]
        ):
            raise ValueError(
                f"query must have shape ({self.batch_size}, num_q_heads, {st['q']}, "
                f"{self.head_dim}) (the step of update({layer_idx})), got "
                f"{tuple(getattr(query, 'shape', ()))}"
            )
        assert self.allocator is not None
        from kvcore import kernels

        tables = self.tables[:, layer_idx].reshape(-1)
        lens = self.lengths[:, layer_idx].reshape(-1)
        # The step's tokens are already stored at the end of every stream: the kernel's
        # contract (token t of a chunk of q sees stored tokens [0, len - q + t + 1)).
        width = -(-int(lens.max()) // self.block_size) if lens.size else 0
        bt, _, _ = self.allocator.vllm_layout(tables)
        block_table = torch.from_numpy(bt[:, :width].astype(np.int64)).to(self.device)
        if slot_bias is None and self.logcount_bias:
            slot_bias = self.slot_count.log()
        lengths = torch.from_numpy(lens.astype(np.int64)).to(self.device)
        # MiKV: the high tier (the step's tokens included, causal) and the low tier (all
        # visible: every demoted token precedes the step), merged by their log-sum-exps.
        mikv = self.lo_allocator is not None and bool(self.lo_lengths[:, layer_idx].any())
        if self.k_layout is not None and int(st["q"]) > 1:
            hi = self._chunk_attend(query, block_table, lengths, slot_bias, st, return_lse=mikv)
        elif self.kivi:
            return self._kivi_attend(query, block_table, lengths, layer_idx, slot_bias)
        else:
            args = (query, self.k_pool, self.v_pool, block_table, lengths)
            kw: dict[str, Any] = {
                "slot_bias": slot_bias,
                "slot_valid": self.slot_valid,
                "scaling": self.scaling,
                "k_layout": self.k_layout,
                "v_layout": self.v_layout,
            }
            if not mikv:
                out: torch.Tensor = kernels.decode_attention(*args, **kw)
                return out
            hi = kernels.decode_attention(*args, **kw, return_lse=True)
        if not mikv:
            assert isinstance(hi, torch.Tensor)
            return hi
        o1, l1 = hi
        o2, l2 = self._lo_attend(query, layer_idx, int(st["q"]))
        return _merge_by_lse(o1, l1, o2, l2, query.dtype)

    def _chunk_attend(
        self,
        query: torch.Tensor,
        block_table: torch.Tensor,
        lengths: torch.Tensor,
        slot_bias: torch.Tensor | None,
        st: dict[str, Any],
        return_lse: bool = False,
    ) -> Any:
        """Attention of a prefill chunk over quantized pages: the stored prefix dequantized,
        the chunk's own tokens in full precision (as given to :meth:`update`), so quantization
        changes what later steps read, not the prefill's own attention (as in KIVI and HF's
        quantized caches; KIVI pages are read through :meth:`_read`, sealed pages dequantized
        and open ones from the residual). The pages the table names are dequantized into a
        small dtype pool, one copy per stream, and the chunk's tokens are written over their
        slots there."""
        from kvcore import kernels

        bs, d = self.block_size, self.head_dim
        n, width = block_table.shape
        q = int(st["q"])
        page_slots = block_table.reshape(-1)[:, None] * bs + torch.arange(bs, device=self.device)
        page_slots = page_slots.reshape(-1)
        k_tmp = self._read(self.k_pool, page_slots).reshape(n * width, bs, d)
        v_tmp = self._read(self.v_pool, page_slots).reshape(n * width, bs, d)
        # the chunk is the last q tokens of every stream: positions [len - q, len)
        pos = lengths[:, None] - q + torch.arange(q, device=self.device)[None, :]
        own = (torch.arange(n, device=self.device)[:, None] * (width * bs) + pos).reshape(-1)
        k_tmp.view(-1, d)[own] = st["keys"].reshape(-1, d).to(self.dtype)
        v_tmp.view(-1, d)[own] = st["values"].reshape(-1, d).to(self.dtype)
        tmp_table = torch.arange(n * width, device=self.device).reshape(n, width)
        args = (query, k_tmp, v_tmp, tmp_table, lengths)
        kw: dict[str, Any] = {
            "slot_bias": None if slot_bias is None else slot_bias[page_slots].contiguous(),
            "slot_valid": self.slot_valid[page_slots].contiguous(),
            "scaling": self.scaling,
        }
        if return_lse:
            return kernels.decode_attention(*args, **kw, return_lse=True)
        return kernels.decode_attention(*args, **kw)

    def _kivi_attend(
        self,
        query: torch.Tensor,
        block_table: torch.Tensor,
        lengths: torch.Tensor,
        layer: int,
        slot_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """KIVI attention: the sealed pages through the fused-dequantization path, the open
        pages (residual rows) as a small dtype pool, merged by their log-sum-exps::

            part 1: pools, k_layout (axis token) / v_layout; open pages' slots masked
            part 2: pool = [zeros page, residual rows of the layer's streams]; stream s reads
                    row s + 1 at its open page's column, the null page (masked) elsewhere
        """
        from kvcore import kernels

        bs, dev = self.block_size, self.device
        n_s = block_table.shape[0]
        sealed_slot = (self.block_row < 0).repeat_interleave(bs)
        o1, l1 = kernels.decode_attention(
            query,
            self.k_pool,
            self.v_pool,
            block_table,
            lengths,
            slot_bias=slot_bias,
            slot_valid=self.slot_valid & sealed_slot,
            scaling=self.scaling,
            k_layout=self.k_layout,
            v_layout=self.v_layout,
            return_lse=True,
        )
        b, h = self.batch_size, self.num_kv_heads
        rows = torch.arange(b * self.num_layers * h, device=dev).reshape(b, self.num_layers, h)
        rows = rows[:, layer].reshape(-1)
        row_of = self.block_row[block_table]  # (S, W)
        mine = (row_of == rows[:, None]) & (block_table > 0)
        small_table = torch.where(mine, torch.arange(1, n_s + 1, device=dev)[:, None], 0)
        zero = torch.zeros(1, bs, self.head_dim, dtype=self.dtype, device=dev)
        k_small = torch.cat([zero, self.res_k[rows]]).to(query.dtype)
        v_small = torch.cat([zero, self.res_v[rows]]).to(query.dtype)
        # the per-slot state of the open pages' slots, in the small pool's slot numbering
        open_block = torch.where(mine, block_table, 0).amax(1)  # (S,) 0: no open page
        src_slots = (open_block[:, None] * bs + torch.arange(bs, device=dev)).reshape(-1)
        valid = torch.cat(
            [torch.zeros(bs, dtype=torch.bool, device=dev), self.slot_valid[src_slots]]
        )
        valid[bs:] &= (open_block > 0).repeat_interleave(bs)
        bias = None
        if slot_bias is not None:
            bias = torch.cat([torch.zeros(bs, device=dev), slot_bias[src_slots].float()])
        o2, l2 = kernels.decode_attention(
            query,
            k_small,
            v_small,
            small_table,
            lengths,
            slot_bias=bias,
            slot_valid=valid,
            scaling=self.scaling,
            return_lse=True,
        )
        return _merge_by_lse(o1, l1, o2, l2, query.dtype)

    # ------------------------------------------------------------------ gathers

    def _slots(
        self, tables: np.ndarray, lengths: np.ndarray, allocator: BlockAllocator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots ``(n, T)`` (-1 past the end) and mask ``(n, T)`` of streams, read from the
        block tables (of ``allocator``, default the high tier's)."""
        alloc = self.allocator if allocator is None else allocator
        assert alloc is not None
        t = int(lengths.max()) if lengths.size else 0
        n = len(tables)
        if t == 0:
            e = torch.zeros((n, 0), dtype=torch.int64, device=self.device)
            return e, e.bool()
        bt, _, _ = alloc.vllm_layout(tables)
        bt_t = torch.from_numpy(bt.astype(np.int64)).to(self.device)
        p = torch.arange(t, device=self.device)
        slots = bt_t[:, p // self.block_size] * self.block_size + p % self.block_size
        mask = p[None, :] < torch.from_numpy(lengths).to(self.device)[:, None]
        return torch.where(mask, slots, torch.full_like(slots, -1)), mask

    def _gather_dense(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self.tables[:, layer_idx].reshape(-1)
        slots, mask = self._slots(tables, self.lengths[:, layer_idx].reshape(-1))
        idx = slots.clamp(min=0).reshape(-1)
        b, h, d = self.batch_size, self.num_kv_heads, self.head_dim
        k = self._read(self.k_pool, idx).reshape(b, h, -1, d)
        v = self._read(self.v_pool, idx).reshape(b, h, -1, d)
        m = mask.reshape(b, h, -1, 1)
        return k * m, v * m

    # ------------------------------------------------------------------ shrinking

    def shrink(self, capacity: int | None = None) -> int:
        """Reallocates the pools smaller once compression has emptied their blocks, and
        returns the bytes given back.

        The pools are sized at the first update, and a compression returns blocks to the
        allocator, not memory to the device: with the default ``Schedule.prefill()`` they
        still span the whole prompt after it. ``shrink`` copies every stream's pages, block by
        block in table order, into pools of ``capacity`` tokens per stream (rounded up to
        whole blocks) with their per-slot state; nothing is re-encoded and no token moves
        within its page, so attention reads the same values. Pending compressions run first.
        The MiKV low tier keeps its own pools.

        Args:
            capacity: tokens per stream after the call, which also fixes the capacity from
                then on (a step past it raises ``OutOfBlocksError``, even when the pools were
                sized on demand); None: the longest stream (at least the policy's budget) plus
                ``max(schedule headroom, 256)`` for the coming steps, and pools sized on demand
                stay so.

        Returns:
            ``memory_bytes()`` before minus after (0 when the pools are already that small, or
            before the first update).

        Raises:
            ValueError: ``capacity`` below the longest stream or the policy's budget (the
                cache is unchanged).
        """
        self.flush()
        if self.allocator is None:
            return 0
        need = self._need()
        if capacity is None:
            capacity = need + self._slack()
        elif not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < need:
            raise ValueError(
                f"capacity must be an int >= {need} tokens per stream (the longest stream "
                f"holds {int(self.lengths.max())}, the policy's budget is "
                f"{self.policy.max_budget() if self.policy is not None else 0}), got {capacity!r}"
            )
        else:
            self._auto_size = False
        per_stream = -(-capacity // self.block_size)
        if per_stream * self.block_size >= self.capacity:
            return 0
        before = self.memory_bytes()
        self._resize(per_stream)
        return before - self.memory_bytes()

    def _need(self) -> int:
        """Tokens per stream the pools must keep: the longest stream, at least the budget."""
        budget = self.policy.max_budget() if self.policy is not None else 0
        return max(int(self.lengths.max()), budget)

    def _slack(self) -> int:
        """Tokens per stream an on-demand pool keeps free beyond its contents."""
        return max(self.schedule.headroom(), 256)

    def _auto_shrink(self, q: int) -> None:
        """On-demand pools, at the start of a step of ``q`` tokens with every layer's
        compressions done: shrink pools at least a third larger than the contents need."""
        if self.allocator is None or len(set(self._seen)) != 1:
            return
        per_stream = -(-(self._need() + q + self._slack()) // self.block_size)
        if 4 * per_stream * self.block_size <= 3 * self.capacity:
            self._resize(per_stream)

    def _resize(self, per_stream: int) -> None:
        """Moves every stream's pages, block by block in table order, into new pools of
        ``per_stream`` blocks a stream, with their per-slot state (contents unchanged)."""
        assert self.allocator is not None
        bs = self.block_size
        before = self.memory_bytes()
        lens = self.lengths.reshape(-1).astype(np.int64)
        old_tables = self.tables.reshape(-1)
        streams = len(old_tables)
        num_blocks = streams * per_stream + 1
        alloc = BlockAllocator(num_blocks=num_blocks, block_size=bs)
        tables = alloc.create_tables(streams)
        alloc.append_batch(tables, lens)
        # block k of stream s holds its tokens [k * bs, (k + 1) * bs) in both allocators
        used = -(-lens // bs)
        width = int(used.max()) if used.size else 0
        old_bt = self.allocator.vllm_layout(old_tables)[0][:, :width]
        new_bt = alloc.vllm_layout(tables)[0][:, :width]
        mask = np.arange(width)[None, :] < used[:, None]
        src = torch.from_numpy(old_bt[mask].astype(np.int64)).to(self.device)
        dst = torch.from_numpy(new_bt[mask].astype(np.int64)).to(self.device)

        def moved(t: torch.Tensor, per_block: int, fill: float = 0.0) -> torch.Tensor:
            old = t.reshape(-1, per_block, *t.shape[1:]) if per_block > 1 else t
            out = torch.full((num_blocks, *old.shape[1:]), fill, dtype=t.dtype, device=t.device)
            out[dst] = old[src]
            return out.reshape(-1, *t.shape[1:]) if per_block > 1 else out

        with torch.inference_mode(False):
            self.k_pool = moved(self.k_pool, 1)
            self.v_pool = moved(self.v_pool, 1)
            self.slot_pos = moved(self.slot_pos, bs)
            self.slot_valid = moved(self.slot_valid, bs)
            self.slot_score = moved(self.slot_score, bs)
            self.slot_count = moved(self.slot_count, bs, 1.0)
            if self.kivi:
                self.block_row = moved(self.block_row, 1, -1)
        self.allocator = alloc
        self.tables = tables.reshape(self.batch_size, self.num_layers, self.num_kv_heads)
        self.capacity = per_stream * bs
        # both generations of pools exist while the pages are copied
        self._peak_bytes = max(self._peak_bytes, before + self.memory_bytes())

    # ------------------------------------------------------------------ snapshots

    def snapshot(self) -> CacheSnapshot:
        """The cache's current contents, to :meth:`restore` after a few more steps.

        Used to ask several questions about one compressed context: snapshot after the
        context, then restore after each question. Pending compressions run first.
        """
        self.flush()
        return CacheSnapshot(
            lengths=self.lengths.copy() if self.allocator is not None else None,
            seen=list(self._seen),
            next_pos=list(self._next_pos),
            compressed_once=list(self._compressed_once),
            decode_steps=list(self._decode_steps),
            num_compressions=self.num_compressions,
        )

    def restore(self, snap: CacheSnapshot) -> None:
        """Drops every token appended since ``snap`` (their blocks go back to the pool).

        Raises:
            ValueError: a compression ran since the snapshot (evicted tokens cannot come
                back), or the snapshot is from before the pools existed. The cache is then
                unchanged.
        """
        if not isinstance(snap, CacheSnapshot):
            raise TypeError(f"snap must be a CacheSnapshot, got {type(snap).__name__}")
        self._pending.clear()  # the steps being dropped must not trigger compressions
        if snap.num_compressions != self.num_compressions:
            raise ValueError(
                "cannot restore: the cache compressed since the snapshot "
                f"({self.num_compressions - snap.num_compressions} time(s)); take snapshots "
                "with a schedule that does not compress the dropped steps (e.g. "
                "Schedule.prefill(multi_turn='once'))"
            )
        if self.allocator is None or snap.lengths is None:
            if self.allocator is None and snap.lengths is None:
                return
            raise ValueError("cannot restore a snapshot taken before the first update")
        if bool((snap.lengths > self.lengths).any()):
            raise ValueError("cannot restore: the snapshot holds tokens the cache no longer has")
        tables = self.tables.reshape(-1)
        old = snap.lengths.reshape(-1)
        indptr = np.zeros(len(tables) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum(old)
        positions = np.concatenate([np.arange(n, dtype=np.int64) for n in old])
        # Keeping each stream's prefix moves nothing; emptied tail blocks are freed.
        src, _, _ = self.allocator.compact_batch(tables, indptr, positions)
        assert len(src) == 0, "a prefix compaction never moves tokens"
        self.lengths = snap.lengths.copy()
        self._seen = list(snap.seen)
        self._next_pos = list(snap.next_pos)
        self._compressed_once = list(snap.compressed_once)
        self._decode_steps = list(snap.decode_steps)
        self._step = [None] * self.num_layers
        self._next_queries = [None] * self.num_layers

    # ------------------------------------------------------------------ compression

    def flush(self) -> None:
        """Run the compressions the schedule decided for the steps already attended."""
        for layer in sorted(self._pending):
            self._finish_step(layer)
        self._pending.clear()

    def compress(self, layer_idx: int | None = None) -> None:
        """Compress now to the policy's budget (one layer, or all), whatever the schedule."""
        self.flush()
        if self.policy is None or self.allocator is None:
            return
        layers = range(self.num_layers) if layer_idx is None else [layer_idx]
        for layer in layers:
            self._check_layer(layer)
            self._compress_layer(layer, None)

    def _finish_step(self, layer: int) -> None:
        st = self._step[layer]
        policy = self.policy
        if st is None or policy is None:
            return
        q = int(st["q"])
        queries = st["queries"]
        obs = None
        if queries is not None:
            w = queries.shape[2]
            pos = st["positions"]
            valid = st["valid"]
            assert isinstance(pos, torch.Tensor) and isinstance(valid, torch.Tensor)
            obs = (queries, pos[q - w :], valid[:, q - w :])
        if policy.accumulates and obs is not None:
            self._accumulate(layer, obs)
        prefill = q > 1
        do = False
        if prefill:
            do = self.schedule.on_prefill and (
                self.schedule.multi_turn == "rescore" or not self._compressed_once[layer]
            )
            if do:
                self._compressed_once[layer] = True
        else:
            self._decode_steps[layer] += 1
            every = self.schedule.decode_every
            do = every is not None and self._decode_steps[layer] % every == 0
        if do:
            self._compress_layer(layer, obs)

    def _score_inputs(
        self,
        layer: int,
        obs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> tuple[ScoreInputs, torch.Tensor, np.ndarray]:
        tables = self.tables[:, layer].reshape(-1)
        lens = self.lengths[:, layer].reshape(-1)
        slots, mask = self._slots(tables, lens)
        idx = slots.clamp(min=0)
        b, h, d = self.batch_size, self.num_kv_heads, self.head_dim
        shape = (b, h, -1)
        inp = ScoreInputs(
            layer_idx=layer,
            keys=self._read(self.k_pool, idx.reshape(-1)).reshape(b, h, -1, d),
            valid=(mask & self.slot_valid[idx]).reshape(shape),
            positions=self.slot_pos[idx].reshape(shape),
            accumulated=self.slot_score[idx].reshape(shape),
            queries=None if obs is None else obs[0],
            query_positions=None if obs is None else obs[1],
            query_valid=None if obs is None else obs[2],
            scaling=self.scaling,
            num_layers=self.num_layers,
        )
        return inp, slots, tables

    def _accumulate(self, layer: int, obs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        from kvcore.scoring import window_attention

        inp, slots, _ = self._score_inputs(layer, obs)
        add = window_attention(inp).reshape(slots.shape)
        ok = slots >= 0
        decay = float(getattr(self.policy, "decay", 1.0))
        if decay != 1.0:
            self.slot_score[slots[ok]] *= decay
        self.slot_score[slots[ok]] += add[ok]

    def _compress_layer(
        self, layer: int, obs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    ) -> None:
        policy = self.policy
        assert policy is not None and self.allocator is not None
        budgets = policy.head_budgets(layer, self.num_kv_heads)
        b, h = self.batch_size, self.num_kv_heads
        lens = self.lengths[:, layer]
        if policy.needs_queries and not policy.accumulates and obs is None:
            raise ValueError(
                f"{policy.name} needs the observed queries of the step (cache.observe) to compress"
            )
        inp, slots, tables = self._score_inputs(layer, obs)
        n_valid = inp.valid.sum(-1).cpu()
        no_padding = bool((torch.from_numpy(lens) == n_valid).all())
        # The policy decides: the statistics it declares, then its (Rust) selection.
        keep, comp = policy.keep(inp, budgets[None, :].expand(b, h))
        if no_padding and bool((keep == inp.valid).all()):
            return  # everything stays: nothing to evict
        if comp is not None:
            keep = self._fold_dropped(keep, comp.to(keep.device), inp.valid, slots)
        if self.merge is not None:
            # Rows that folded their dropped tokens into a compensation slot merge nothing more.
            self._merge_evicted(inp, keep, slots, skip=comp)
        if self.lo_allocator is not None:
            self._demote(layer, inp, keep, slots)  # before the compaction moves slots
        keep_flat = keep.reshape(b * h, -1).cpu()
        counts = keep_flat.sum(-1)
        indptr = np.zeros(b * h + 1, dtype=np.int64)
        indptr[1:] = np.cumsum(counts.numpy())
        positions = torch.nonzero(keep_flat, as_tuple=True)[1].numpy().astype(np.int64)
        kept_pos = inp.positions.reshape(b * h, -1)[keep.reshape(b * h, -1)]
        src_np, dst_np, _ = self.allocator.compact_batch(tables, indptr, positions)
        if len(src_np):
            src = torch.from_numpy(src_np).to(self.device)
            dst = torch.from_numpy(dst_np).to(self.device)
            self._move_slots(src, dst)
        self.lengths[:, layer] = counts.numpy().reshape(b, h)
        self.num_compressions += 1
        if self.positions == "compact":
            self._recompact_positions(layer, tables, counts, kept_pos)

    def _move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Applies a compaction plan: slot ``dst[i]`` takes what slot ``src[i]`` holds, in the
        K and V pools and in every per-slot state tensor (``slot_pos``, ``slot_valid``,
        ``slot_score``, ``slot_count``).

        Args:
            src, dst: ``(num_moves,)`` int64 slots on the cache's device, as
                ``BlockAllocator.compact_batch`` returns them (no move reads a slot that an
                earlier move wrote, so gathering every source first equals running the moves
                in order).

        Native pages (one pool row per slot) move with the state tensors in one
        :func:`kvcore.kernels.compact_pools` call (one CUDA launch on CUDA with CuPy, the torch
        reference otherwise). A quantized token moves as its three pieces of the page (codes,
        scales, zeros), never as a raw row of the page; KIVI reads every source (dequantized)
        and patches and re-seals each destination page (or writes its residual row).
        """
        from kvcore import kernels

        tensors = [self.slot_pos, self.slot_valid, self.slot_score, self.slot_count]
        if self.kivi:
            k_src, v_src = self._read(self.k_pool, src), self._read(self.v_pool, src)
            self._write(self.k_pool, dst, k_src)
            self._write(self.v_pool, dst, v_src)
        elif self.layout is not None:
            self._move_pieces((self.k_pool, self.v_pool), src, dst)
        else:
            tensors = [self.k_pool, self.v_pool, *tensors]
        indptr = torch.tensor([0, len(src)], dtype=torch.int64, device=src.device)
        kernels.compact_pools(
            tensors, [0] * len(tensors), src, dst, indptr, int(self.slot_pos.numel())
        )

    def _rotate_slots(self, slots: torch.Tensor, delta: torch.Tensor, layer: int) -> None:
        """Re-rotates the keys at ``slots`` by ``delta`` positions with the layer's RoPE
        frequencies: :func:`kvcore.kernels.rotate_slots` in place on a native pool of a
        kernel dtype (float32, float16, bfloat16), else read, rotate, write back (quantized
        pages are re-encoded)."""
        from kvcore import kernels

        assert self._rope is not None
        inv_freq = self._rope[layer]
        if self.k_layout is None and self.dtype in (torch.float32, torch.float16, torch.bfloat16):
            kernels.rotate_slots(self.k_pool, slots, delta, inv_freq.to(self.device))
            return
        keys = self._read(self.k_pool, slots)
        self._write(self.k_pool, slots, kernels.rotate_reference(keys, delta, inv_freq))

    def _fold_dropped(
        self, keep: torch.Tensor, comp: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        """Fold each ``comp`` row's dropped tokens into one slot (RazorAttention's
        compensation token): the count-weighted mean of their K and V is written into the
        first dropped token's slot, which is kept and counts them all (``slot_count``)."""
        b, h, t = keep.shape
        dropped = (valid & ~keep & comp[..., None]).reshape(b * h, t)
        rows = torch.nonzero(dropped.any(-1), as_tuple=True)[0]
        if rows.numel() == 0:
            return keep
        keep = keep.clone().reshape(b * h, t)
        flat_slots = slots.reshape(b * h, t)
        for r in rows.tolist():
            idx = torch.nonzero(dropped[r], as_tuple=True)[0]
            s = flat_slots[r, idx]
            w = self.slot_count[s][:, None]
            host = s[:1]
            for pool in (self.k_pool, self.v_pool):
                mean = (self._read(pool, s).float() * w).sum(0, keepdim=True) / w.sum()
                self._write(pool, host, mean.to(self.dtype))
            self.slot_count[host] = w.sum()
            keep[r, idx[0]] = True
        return keep.reshape(b, h, t)

    def _merge_evicted(
        self,
        inp: ScoreInputs,
        keep: torch.Tensor,
        slots: torch.Tensor,
        skip: torch.Tensor | None = None,
    ) -> None:
        """Merges each stream's evicted valid tokens into its kept ones with the cache's
        ``merge`` method (one plan per stream, applied in place by :meth:`_apply_plan`; the
        kept set does not change). ``skip``: ``(B, H)`` rows that merge nothing (they folded
        their dropped tokens into a compensation slot)."""
        b, h, t = keep.shape
        valid = inp.valid.reshape(b * h, t).cpu()
        kept = keep.reshape(b * h, t).cpu()
        flat_slots = slots.reshape(b * h, t)
        if inp.queries is not None:
            from kvcore.scoring import window_attention

            attn = window_attention(inp)
        else:
            attn = inp.accumulated
        attn = attn.reshape(b * h, t).float().clamp(min=0.0).cpu()
        skipped = torch.zeros(b * h, dtype=torch.bool) if skip is None else skip.reshape(-1).cpu()
        for r in range(b * h):
            if skipped[r]:
                continue
            idx = torch.nonzero(valid[r], as_tuple=True)[0]
            retained = torch.nonzero(kept[r][idx], as_tuple=True)[0]
            if len(retained) == len(idx) or len(retained) == 0:
                continue
            s = flat_slots[r, idx]
            keys = self._read(self.k_pool, s).float()
            plan = self._merge_plan(
                np.ascontiguousarray(keys.cpu().numpy()),
                np.ascontiguousarray(attn[r, idx].numpy()),
                retained.numpy().astype(np.int64),
            )
            if len(plan.src) == 0:
                continue
            assert np.array_equal(plan.kept_positions(), retained.numpy())
            self._apply_plan(plan, s, keys, merge_keys=self.merge != "cam")

    def _merge_plan(self, keys: np.ndarray, attn: np.ndarray, retained: np.ndarray) -> MergePlan:
        """The merge plan of one stream: ``keys`` ``(n, D)`` float32, ``attn`` ``(n,)``
        float32 >= 0, ``retained`` the policy's kept positions (increasing). Every plan
        keeps exactly ``retained`` (``kept_positions()``)."""
        from kvcore import _kvcore

        n = len(attn)
        if self.merge == "ems":
            return _kvcore.ems_plan(keys, attn, retained, self.merge_threshold)
        is_kept = np.zeros(n, dtype=bool)
        is_kept[retained] = True
        if self.merge == "cam":
            evicted = np.flatnonzero(~is_kept).astype(np.int64)
            draws = self._merge_rng.random(len(evicted), dtype=np.float32)
            return _kvcore.cam_plan(attn, evicted, draws, self.merge_window)
        # KVMerger: kept tokens outrank evicted ones as pivots (the most attended kept token
        # of a run); a run's other kept tokens stay verbatim, a run without one is dropped.
        boost = (attn + (float(attn.max()) + 1.0) * is_kept).astype(np.float32)
        raw = _kvcore.kvmerger_plan(keys, boost, self.merge_threshold, self.merge_sigma, n)
        src, dst, w = raw.src, raw.dst, raw.weight.astype(np.float64)
        take = ~is_kept[src] | (src == dst)  # evicted members, and the pivot itself
        take &= is_kept[dst]  # a run merged into an evicted pivot has no host: dropped
        total = np.zeros(n)
        np.add.at(total, dst[take], w[take])
        merged = np.zeros(n, dtype=bool)
        merged[src[take & (src != dst)]] = True
        evicted = np.flatnonzero(~is_kept & ~merged).astype(np.int64)
        weight = (w[take] / total[dst[take]]).astype(np.float32)
        return _kvcore.MergePlan(n, src[take], dst[take], weight, evicted)

    def _apply_plan(
        self, plan: MergePlan, s: torch.Tensor, keys: torch.Tensor, *, merge_keys: bool
    ) -> None:
        """Applies a merge plan over one stream's slots ``s`` with
        :func:`kvcore.kernels.apply_merge` (CUDA kernel on CUDA with CuPy, the torch reference
        otherwise): the destination rows of V (and K when ``merge_keys``) are rewritten and
        ``slot_count`` follows ``MergeBook``'s mass rule (a removed source hands its mass to
        its destinations in proportion to the entry weights). The removed slots are left for
        the compaction that follows.

        Args:
            plan: a ``kvcore.MergePlan`` over ``len(s)`` slots.
            s: ``(n,)`` int64 slots of the stream, in stream order.
            keys: ``(n, D)`` float32 keys of those slots (already read).
        """
        from kvcore import kernels

        dev = self.device
        src = torch.from_numpy(plan.src).to(dev)
        dst = torch.from_numpy(plan.dst).to(dev)
        weight = torch.from_numpy(plan.weight).to(dev)
        evicted = torch.from_numpy(plan.evicted).to(dev)
        hosts = torch.unique(dst)
        values = self._read(self.v_pool, s).float()
        merged_v, counts = kernels.apply_merge(
            values, src, dst, weight, self.slot_count[s].contiguous(), evicted
        )
        assert counts is not None
        if merge_keys:
            merged_k, _ = kernels.apply_merge(keys.float().contiguous(), src, dst, weight)
            self._write(self.k_pool, s[hosts], merged_k[hosts].to(self.dtype))
        self._write(self.v_pool, s[hosts], merged_v[hosts].to(self.dtype))
        self.slot_count[s[hosts]] = counts[hosts]

    def _recompact_positions(
        self, layer: int, tables: np.ndarray, counts: torch.Tensor, old_pos: torch.Tensor
    ) -> None:
        n = int(counts[0])
        if bool((counts != n).any()):
            raise ValueError(
                "positions='compact' needs the same kept length in every stream of a layer "
                f"(got {counts.tolist()})"
            )
        assert self._rope is not None
        slots, _ = self._slots(tables, counts.numpy().astype(np.int64))
        flat = slots.reshape(-1)
        new_pos = torch.arange(n, device=self.device).repeat(len(tables))
        delta = new_pos - old_pos.to(self.device)
        self._rotate_slots(flat, delta, layer)
        self.slot_pos[flat] = new_pos
        self._next_pos[layer] = n
