"""`KVCache`: paged K/V pools in torch, allocated through `BlockAllocator`, kept within budget.

Layout. One allocator table per (sequence ``b``, layer ``l``, kv-head ``h``) stream, so every
stream can hold a different number of tokens and evicting a head's tokens frees its blocks::

    stream id  = tables[b, l, h]                 (one allocator, one pool for all streams)
    k_pool     : (num_blocks, block_size, head_dim)   one head's key per slot
    slot       = block_id * block_size + offset       (block 0 is the null block, never written)
    per slot   : slot_pos (int64 sequence index), slot_valid (bool, False for padding),
                 slot_score (float32, accumulated attention), slot_count (float32, tokens a
                 merged slot stands for) -- moved with K/V by compaction
    kv_format      : the page format (``cache.format``, :mod:`kvcore.cache.formats`), picked
                     once: quantized pools hold one layout block per page ((num_blocks,
                     layout.nbytes) uint8, docs/cache.md); KIVI's store adds each stream's
                     open page (``cache.store.res_k`` / ``res_v``)

Steps. ``update(layer, k, v)`` appends the step's tokens and returns what dense attention reads.
Compression of layer ``l`` for step ``t`` is decided by the :class:`Schedule` and runs *after*
step ``t``'s attention of that layer, lazily: at the next ``update`` of any layer or the next
query of the cache's lengths. So the pool holds at most ``budget + step`` tokens per stream
(``budget + chunk`` for chunked prefill, ``budget + N`` when compressing every ``N`` decode
steps), and never more than its ``capacity`` when one is given. The pools hold the blocks
all streams hold together plus a spare (grown when a step does not fit, shrunk after
compressions; see ``KVCache``).

Positions. ``positions="original"`` keeps every key at the position it was encoded at and the
logical length grows with every token seen (``get_seq_length``), apart from the stored length.
``positions="compact"`` renumbers the kept tokens ``0..n-1`` after each compression and rotates
each kept key by its position delta with the layer's RoPE frequencies (StreamingLLM, InfiniPot).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvcore._kvcore import OutOfBlocksError
from kvcore.cache.config import CacheConfig, Schedule
from kvcore.cache.dispatch import AttentionDispatch
from kvcore.cache.formats import PageStore, Streams, page_format
from kvcore.cache.state import rope_list
from kvcore.cache.tier import low_tier_format
from kvcore.scoring import TorchPolicy

__all__ = ["KVCache"]

# The defaults of the flat keywords that CacheConfig holds (config= excludes them).
_DEFAULTS: dict[str, Any] = {**CacheConfig().keywords(), "schedule": None}


class KVCache(AttentionDispatch):
    """A fixed-budget paged KV cache for ``num_layers`` layers of ``num_kv_heads`` heads.

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention shape.
        capacity: tokens per (sequence, layer, kv-head) stream, rounded up to whole blocks:
            a step past it raises ``OutOfBlocksError``. The first update reserves the pools
            for every stream at its capacity; :meth:`shrink` fits them to the pages the
            streams hold, and later steps grow them back on demand, never past the capacity.
            None (and no ``capacity_bytes``): no capacity, the pools are sized on demand by
            the blocks all streams hold together. The first update sizes them to the first
            step plus one spare block a stream; a step that needs more blocks than are free
            grows them (by at least one block a stream and an eighth) instead of raising; and
            once every layer has run its compressions, pools at least a third larger than the
            pages held, the step and one spare block a stream are shrunk to that
            (:meth:`shrink`). Either way pools are reallocated, so block ids exported earlier
            (:meth:`page_table`) go stale: a serving stack that keeps them should give a
            fixed ``capacity`` and not call :meth:`shrink`.
        capacity_bytes: alternatively, the total bytes of the K and V pools (null block
            included); the per-stream capacity is what fits, and the pools never grow past
            it. With ``evicted_format`` this bounds the high tier; the low tier is bounded by
            ``evicted_capacity`` (both are counted by :meth:`memory_bytes`).
        block_size: tokens per block.
        dtype, device: of the pools; every update must match them.
        policy: a :class:`kvcore.scoring.TorchPolicy` or None (no compression).
        schedule: when to compress (default: :meth:`Schedule.prefill`).
        positions: ``"original"`` or ``"compact"`` (needs ``rope``).
        rope: the RoPE ``inv_freq`` ``(R / 2,)`` of every layer (one tensor, or one per
            layer), needed by ``positions="compact"``.
        scaling: attention softmax scale for scoring (default ``head_dim ** -0.5``).
        kv_format: ``"native"`` (the pools hold ``dtype`` vectors), ``"int8"``, ``"int4"``,
            ``"int2"`` (quantized pages, keys as ``key_quant`` says), or ``"kivi2"``,
            ``"kivi4"``: KIVI (docs/cache.md): full pages sealed, keys per channel
            (``QuantLayout(bits, block_size, block_size, head_dim, "token")``), values per
            token; each stream's open last page in ``dtype`` in a residual buffer; or
            ``"k4v2"``, ``"k2v4"``, ... (``"k{key bits}v{value bits}"`` of 8, 4, 2): KIVI's
            pages with keys and values at different bits.
        quant_group: channels per quantization group (default ``min(32, head_dim)``; with
            per-channel keys: of the values).
        key_quant: int pages only. ``"channel"`` (default): KIVI's page layout at the
            format's bits (keys per channel, values per token, the open page in ``dtype``).
            ``"token"``: every page is one block of
            ``QuantLayout(bits, quant_group, block_size, head_dim, "channel", "float16")``, a
            token encoded alone (:func:`kvcore.kernels.quantize`) with its codes and metadata
            scattered into its page; it breaks attention on models with outlier key channels
            (docs/cache.md, "Quantized pages").
        merge, merge_threshold, merge_sigma, merge_window, merge_seed, merge_bias: merging
            the tokens the policy evicts into the kept ones: None, ``"ems"``, ``"kvmerger"``
            or ``"cam"`` and their parameters (:class:`~kvcore.cache.MergeConfig`,
            docs/merging.md). The kept set, hence every budget, stays the policy's.
        evicted_format, evicted_capacity: MiKV's low-precision tier of the evicted tokens,
            ``"int8"``, ``"int4"`` or ``"int2"`` pages of at most ``evicted_capacity`` tokens
            per stream, oldest dropped first (:class:`~kvcore.cache.TierConfig`,
            docs/cache.md). :meth:`attend` reads both tiers; :meth:`update`'s dense return is
            the high tier only. Needs a policy without a compensation token, a high tier whose
            tokens are encoded alone (``kv_format="native"``, or int pages with
            ``key_quant="token"``), ``merge=None`` and ``positions="original"``.
        config: a :class:`~kvcore.cache.CacheConfig` holding all of the keywords above
            except ``dtype``, ``device``, ``policy`` and ``rope`` (give either ``config`` or
            those keywords, not both); ``cache.config`` is the one the cache was built with.

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
        key_quant: str | None = None,
        merge: str | None = None,
        merge_threshold: float = 0.5,
        merge_sigma: float | None = None,
        merge_window: int | None = None,
        merge_seed: int | None = None,
        merge_bias: bool | None = None,
        evicted_format: str | None = None,
        evicted_capacity: int | None = None,
        config: CacheConfig | None = None,
    ) -> None:
        for name, v in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        flat = {
            "capacity": capacity,
            "capacity_bytes": capacity_bytes,
            "block_size": block_size,
            "schedule": schedule,
            "positions": positions,
            "scaling": scaling,
            "kv_format": kv_format,
            "quant_group": quant_group,
            "key_quant": key_quant,
            "merge": merge,
            "merge_threshold": merge_threshold,
            "merge_sigma": merge_sigma,
            "merge_window": merge_window,
            "merge_seed": merge_seed,
            "merge_bias": merge_bias,
            "evicted_format": evicted_format,
            "evicted_capacity": evicted_capacity,
        }
        if config is None:
            if schedule is not None and not isinstance(schedule, Schedule):
                raise TypeError(
                    "schedule must be a kvcore.cache.Schedule or None, got "
                    f"{type(schedule).__name__}"
                )
            config = CacheConfig.from_keywords(**flat)
        else:
            if not isinstance(config, CacheConfig):
                raise TypeError(f"config must be a CacheConfig, got {type(config).__name__}")
            given = sorted(k for k, v in flat.items() if v != _DEFAULTS[k])
            if given:
                raise ValueError(
                    f"give config= or the keywords it holds, not both (got {', '.join(given)})"
                )
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if config.positions == "compact" and rope is None:
            raise ValueError("positions='compact' needs rope= (the layers' RoPE inv_freq)")
        if policy is not None and policy.needs_rope and rope is None:
            raise ValueError(
                f"{policy.name} needs rope= (the layers' RoPE inv_freq) to take the observed "
                "queries back before RoPE; kvcore.hf.compressed_cache passes the model's"
            )
        self.config = config
        storage, tier, mc = config.storage, config.tier, config.merge
        block_size = storage.block_size
        # The page format, picked once: the parts call it, never branch on it.
        self.format = page_format(storage, head_dim, dtype)
        # MiKV: the evicted tokens' low-precision tier (its own allocator, format and pools).
        self.evicted_format = tier.evicted_format
        self.lo_format = low_tier_format(config, policy, head_dim, dtype)
        self.store = self.lo_store = PageStore(torch.empty(0), torch.empty(0))
        self._lo_capacity_req = tier.evicted_capacity
        self.lo_capacity = 0
        self.lo_allocator = None
        self._init_merges(mc)
        if policy is not None and not isinstance(policy, TorchPolicy):
            raise TypeError(f"policy must be a kvcore.scoring.TorchPolicy, got {policy!r}")
        if policy is not None:
            policy.check_shape(num_layers, num_kv_heads)
        self.num_layers, self.num_kv_heads, self.head_dim = (
            num_layers,
            num_kv_heads,
            head_dim,
        )
        self.block_size = block_size
        self.dtype, self.device = dtype, torch.device(device)
        self.policy = policy
        self.schedule = config.schedule
        self.positions = config.positions
        self.scaling = head_dim**-0.5 if config.scaling is None else float(config.scaling)
        self._rope = None if rope is None else rope_list(rope, num_layers, head_dim)
        capacity = config.capacity
        if policy is not None and capacity is not None and policy.max_budget() > capacity:
            raise ValueError(
                f"budget ({policy.max_budget()}) is above the capacity ({capacity} tokens)"
            )
        self._capacity_req = capacity
        self._capacity_bytes = config.capacity_bytes
        self._auto_size = capacity is None and config.capacity_bytes is None
        self._peak_bytes = 0
        self.batch_size = 0
        self.capacity = None if self._auto_size else 0  # fixed: set by the first update
        self.allocator = None
        self._reset_steps()
        self.num_compressions = 0
        # log(count) logit bias of merged slots in attend (RazorAttention "mean_logcount").
        self.logcount_bias = mc.logcount_bias or (
            getattr(policy, "compensation", "none") == "mean_logcount"
        )

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
            raise ValueError(
                f"observed queries {tuple(qobs.shape)} do not fit a step of batch {b} and "
                f"{q} tokens (they stay recorded for the step they were observed for)"
            )
        policy = self.policy
        if (
            policy is not None
            and policy.needs_queries
            and not policy.accumulates
            and qobs is None
            and self._will_compress(layer_idx, q)
        ):
            raise ValueError(
                f"{policy.name} needs the observed queries of the step (cache.observe) to "
                f"compress: call observe({layer_idx}, queries) before this update"
            )
        # The values are arguments too: a format that refuses them (NaN, inf, beyond its
        # metadata) does so before the pending compressions run.
        d = self.head_dim
        prepared = self.format.prepare(key_states.reshape(-1, q, d), value_states.reshape(-1, q, d))
        # Compressions decided for earlier steps run first; they are not undone if this
        # step then fails on the capacity.
        self.flush()
        fresh = self.allocator is None
        before = dict(self.__dict__) if fresh else None  # a refused first step leaves no pools
        try:
            if fresh:
                self._init(b, q)
            elif self._auto_size and layer_idx == 0:
                self._auto_shrink(q)
            assert self.allocator is not None
            prev = self.lengths[:, layer_idx].reshape(-1).copy()
            if self.capacity is not None and int(prev.max()) + q > self.capacity:
                raise OutOfBlocksError(
                    f"layer {layer_idx}: {int(prev.max())} stored + {q} new tokens exceed the "
                    f"capacity of {self.capacity} tokens per stream"
                )
            # Pools that hold fewer blocks than the capacity (shrunk, or sized on demand)
            # grow when the step needs more blocks than are free (the contents move unchanged).
            self._reserve(layer_idx, q)
            tables = self.tables[:, layer_idx].reshape(-1)
            streams = Streams(self.allocator, tables, prev, self._stream_rows(layer_idx))
            staged = self.format.stage(self.store, prepared, streams)
            # All or nothing: raises OutOfBlocksError before any change.
            slots_np, _, _, _ = self.allocator.append_batch(tables, q)
        except Exception:
            if before is not None:
                self.__dict__.clear()
                self.__dict__.update(before)
            raise
        slots = torch.from_numpy(slots_np).to(self.device).reshape(b, self.num_kv_heads, q)
        self.format.commit(self.store, staged, slots.reshape(-1, q), streams)
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
            "keys": key_states if self.format.k_layout is not None else None,
            "values": value_states if self.format.k_layout is not None else None,
        }
        self._next_queries[layer_idx] = None
        self._pending.add(layer_idx)
