"""The engine's paged cache answered by kvcore: :class:`KVCorePagedCache` (docs/serving.md 4.4)
and the settings :func:`kvcore.serving.hf.enable` validates. Its per-request compression is
in :mod:`kvcore.serving._compress`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import transformers

from kvcore import _kvcore as _k
from kvcore.cache.config import StorageConfig
from kvcore.cache.formats import PageFormat, PageStore, Side, Streams, page_format
from kvcore.policies import Need, Policy
from kvcore.serving import _compress
from kvcore.serving._version import check_transformers

check_transformers(transformers.__version__)

from transformers.generation.continuous_batching.cache import (  # noqa: E402
    group_layers_by_attn_type,
)
from transformers.generation.continuous_batching.cache_allocators import (  # noqa: E402
    FULL_ATTENTION,
)
from transformers.generation.continuous_batching.requests import (  # noqa: E402
    RequestState,
    RequestStatus,
)
from transformers.generation.continuous_batching.utils import (  # noqa: E402
    find_head_dim,
    find_num_key_value_heads,
)

#: Statistics the serving cache computes from a request's stored keys and observed queries.
_SERVED_NEEDS = frozenset({Need.WINDOW_PROBS, Need.QUERY_ATTENTION, Need.KEYS, Need.NOVELTY})
#: Default batch token budget when the continuous-batching config leaves it unset (the engine's
#: default of 8192 would size its attention mask to 8192 x (cache tokens + 8192) floats).
DEFAULT_MAX_BATCH_TOKENS = 2048
_NO_BUDGET = (
    "kvcore.serving.hf needs a KV memory budget: pass kv_bytes= to enable(), or set num_blocks "
    "in the ContinuousBatchingConfig"
)
#: The page formats served under continuous batching: those whose slots hold their token alone.
SERVED_FORMATS = ("native", "int8", "int4", "int2")


def storage(kv_format: str, quant_group: int | None, block_size: int) -> StorageConfig:
    """The pages of the serving cache, as :func:`kvcore.serving.hf.enable` was asked.

    Int pages are per-token (``key_quant="token"``): the engine writes, reads, copies on write
    and compacts slot by slot, so a slot must hold its token alone. KIVI pages (and int pages
    with per-channel keys, the default of :class:`kvcore.KVCache`) seal a page's keys as one
    group per channel over its tokens and keep each stream's last page open in ``dtype``: a
    slot's bytes depend on its page's other tokens, and the open page is per-stream state that
    forks and prefix sharing would have to copy.

    Raises:
        ValueError: a format not in :data:`SERVED_FORMATS` (naming them and why), or a bad
            group or block size (from :class:`~kvcore.cache.config.StorageConfig`).
    """
    if kv_format not in SERVED_FORMATS:
        raise ValueError(
            f"kv_format must be one of {', '.join(map(repr, SERVED_FORMATS))} under continuous "
            f"batching, got {kv_format!r}: the engine writes, reads and compacts slot by slot, "
            "so a slot must hold its token alone; KIVI pages (and int pages with per-channel "
            "keys) quantize a page's keys per channel over its tokens and keep an open page per "
            "request"
        )
    bits = kv_format != "native"
    if quant_group is not None and not bits:
        raise ValueError(f"quant_group applies to int pages, not kv_format={kv_format!r}")
    return StorageConfig(kv_format, quant_group, block_size, key_quant="token" if bits else None)


def slot_format(config: Any, dtype: torch.dtype, storage: StorageConfig) -> PageFormat:
    """The format of one layer's pages: a slot holds the token's vectors of every kv head of
    the layer side by side (``num_kv_heads * head_dim`` channels), the allocator's slot as it
    is. Quantization groups lie inside one head, so a slot's codes are those of each head's
    vector quantized alone.

    Raises:
        ValueError: a quantization group that does not divide the head size.
    """
    head_dim = int(find_head_dim(config))
    width = int(find_num_key_value_heads(config)) * head_dim
    if storage.bits and head_dim % storage.group(head_dim):
        raise ValueError(
            f"quant_group={storage.group(head_dim)} must divide the head size {head_dim} (a "
            "quantization group lies inside one head)"
        )
    group = storage.group(head_dim) if storage.bits else None
    return page_format(replace(storage, quant_group=group), width, dtype)


@dataclass(frozen=True)
class Settings:
    """What :func:`enable` was given, validated.

    Attributes:
        policy: the policy (None: no compression).
        budget: tokens each request keeps at a compression, adopted prefix tokens not counted.
        kv_bytes: the K/V pool budget in bytes (None: ``num_blocks * page_size`` tokens of the
            continuous-batching config in the model's dtype, the engine's own cache size).
        storage: the page format and block size (:func:`storage`).
        decode_every: also compress every this many generated tokens (None: prefill only).
    """

    policy: Policy | None
    budget: int
    kv_bytes: int | None
    storage: StorageConfig
    decode_every: int | None

    @property
    def block_size(self) -> int:
        """kvcore block size in tokens."""
        return self.storage.block_size


@dataclass
class _Request:
    """kvcore's bookkeeping of one live request."""

    table: int
    state: RequestState | None = None
    delta: int = 0  # logical length minus stored length (tokens evicted so far)
    adopted: int = 0  # tokens adopted from the prefix cache: shared, never evicted
    registered: int = 0  # full blocks registered in the prefix cache
    prompt_done: bool = False  # the prefill compression point was reached
    compressed: bool = False  # at least one compaction happened
    last_compressed_at: int = 0  # generated tokens at the last compression
    queries: list[torch.Tensor | None] = field(default_factory=list)  # per layer (Hq, w, D)


class _NoSectors:
    """The engine's ``cache.pool``: kvcore has no sectors, so there is nothing to free."""

    def try_to_free_sectors(self) -> None:
        return None


class _GroupAllocator:
    """The engine's view of the one full-attention group (``cache.cache_allocators``).

    The IOs read its trash indices and ``get_seqlen_k``; the offloading manager asks
    ``needs_new_blocks`` and copies ``block_table`` (empty: kvcore's tables are its own).
    """

    index = 0
    layer_type = FULL_ATTENTION
    read_trash_index = 0  # slots of kvcore's null block 0, never handed out
    write_trash_index = 0

    def __init__(self, cache: KVCorePagedCache) -> None:
        self._cache = cache
        self.tokens_per_page = cache.block_size
        self.block_table: dict[str, list[int]] = {}

    def get_seqlen_k(self, past_length: int, query_length: int) -> int:
        return past_length + query_length

    def needs_new_blocks(self, request_id: str, past_length: int, query_length: int) -> int:
        return self._cache.blocks_needed(request_id, query_length)


class KVCorePagedCache:
    """The engine's ``PagedAttentionCache`` contract, answered by kvcore (docs/serving.md 4.4).

    Duck-typed on purpose: ``PagedAttentionCache.__init__`` would allocate the engine's own
    tensor. Memory: one :class:`kvcore.BlockAllocator` of ``capacity`` blocks of
    ``block_size`` tokens, and one :class:`~kvcore.cache.formats.PageStore` per layer in the
    page format ``format`` (:func:`slot_format`: a slot holds every kv head of its token), as
    many blocks as ``kv_bytes`` pays for at the format's real page bytes (scales and zero
    points included), plus the null block.
    """

    def __init__(
        self,
        config: Any,
        cb_config: Any,
        device: torch.device,
        dtype: torch.dtype,
        settings: Settings,
        scaling: float,
    ) -> None:
        groups = group_layers_by_attn_type(config)
        if list(groups) != [FULL_ATTENTION]:
            raise ValueError(
                "kvcore.serving.hf supports full-attention models only, this one has layer "
                f"types {sorted(groups)} (sliding and hybrid models are future work)"
            )
        self.config = config
        self.device = device
        self.dtype = dtype
        self.settings = settings
        self.scaling = scaling
        self.num_layers = int(config.num_hidden_layers)
        self.num_kv_heads = int(find_num_key_value_heads(config))
        self.head_dim = int(find_head_dim(config))
        self.block_size = settings.block_size
        self.format = slot_format(config, dtype, settings.storage)
        itemsize = torch.empty((), dtype=dtype).element_size()
        # What the engine's own cache spends per token (the default budget is its size)
        self.dtype_bytes_per_token = (
            2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize
        )
        kv_bytes = settings.kv_bytes
        if kv_bytes is None:
            if cb_config.num_blocks is None:
                raise ValueError(_NO_BUDGET)
            pages = int(cb_config.num_blocks) * int(cb_config.page_size)
            kv_bytes = pages * self.dtype_bytes_per_token
        self.bytes_per_block = self.num_layers * self.format.page_bytes
        usable = kv_bytes // self.bytes_per_block
        if usable < 1:
            raise ValueError(
                f"kv_bytes={kv_bytes} holds no block of {self.block_size} tokens "
                f"({self.bytes_per_block} bytes each for this model in "
                f"{self.format.name!r} pages)"
            )
        self.kv_bytes = usable * self.bytes_per_block
        self.allocator = _k.BlockAllocator(usable + 1, self.block_size)  # + the null block
        self.stores: list[PageStore] = [
            self.format.alloc(usable + 1, 0, device) for _ in range(self.num_layers)
        ]
        # Per-token formats keep no state per stream: one empty Streams serves every commit.
        empty = np.zeros(0, dtype=np.int64)
        self._streams = Streams(self.allocator, empty, empty, torch.zeros(0, dtype=torch.int64))

        # The engine-facing attributes (docs/serving.md, table of 4.4)
        self.cache_allocators = {FULL_ATTENTION: _GroupAllocator(self)}
        self.pool = _NoSectors()
        self.max_batch_tokens = int(cb_config.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS)
        self.max_tokens_read = self.allocator.capacity * self.block_size
        self.max_blocks_per_request = 0
        self.max_decode_fast_path_length = 0
        self.read_cache_limit = None
        self.allow_block_sharing = bool(cb_config.allow_block_sharing)
        self.use_prefix_sharing = self.allow_block_sharing
        self.num_blocks = self.allocator.capacity
        self.bytes_per_sector = self.bytes_per_block
        self.num_sectors = self.allocator.capacity

        self._salt = f"kvcore.serving:{type(config).__name__}:{dtype}:{self.format.name}"
        self._requests: dict[str, _Request] = {}
        self._pending: dict[str, RequestState] = {}
        self._plan: list[tuple[str, int]] = []
        self._obs_rows: torch.Tensor | None = None
        self._counters = dict(
            preemptions=0,
            compressions=0,
            tokens_evicted=0,
            compressions_skipped=0,
            blocks_freed=0,
            prefix_hit_tokens=0,
            peak_used_blocks=0,
            peak_requests=0,
            peak_decoding=0,
        )

    # -- kvcore's own API ----------------------------------------------------------------------

    def stats(self) -> dict[str, int | float]:
        """The allocator's counters plus ``preemptions``, ``compressions``, ``tokens_evicted``,
        ``compressions_skipped`` (a compaction that ran out of blocks), ``blocks_freed`` (blocks
        compressions gave back), ``prefix_hit_tokens``, ``peak_used_blocks``,
        ``peak_requests`` (requests holding blocks at once), ``peak_decoding`` (requests past
        their prompt after one step, the requests in flight), ``peak_kv_bytes``, ``kv_bytes``
        (the usable blocks' bytes, at most the budget), ``pool_bytes`` (the page tensors: the
        usable blocks plus the null block) and ``bytes_per_block`` (every layer, K and V)."""
        out: dict[str, int | float] = dict(self.allocator.stats())
        out.update(self._counters)
        out["peak_kv_bytes"] = self._counters["peak_used_blocks"] * self.bytes_per_block
        out["kv_bytes"] = self.kv_bytes
        out["pool_bytes"] = sum(store.nbytes for store in self.stores)
        out["bytes_per_block"] = self.bytes_per_block
        return out

    def read(self, layer: int, side: Side, slots: torch.Tensor) -> torch.Tensor:
        """``(N, kv_heads, head_dim)`` vectors in the model's dtype at ``(N,)`` int64 slots of
        one layer (dequantized from quantized pages). The slots come from kvcore's own tables,
        so the format's unchecked read serves them."""
        flat = self.format._read(self.stores[layer], side, slots)
        return flat.view(len(slots), self.num_kv_heads, self.head_dim)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """A compaction plan on every layer's pages: slot ``dst[i]`` takes what ``src[i]``
        holds (the format's ``move``: a quantized token moves as its codes, scales and zero
        points)."""
        for store in self.stores:
            self.format._move(store, src, dst, ())

    def position_delta(self, request_id: str) -> int:
        """Tokens the request has evicted: its logical length minus its stored length."""
        r = self._requests.get(request_id)
        return 0 if r is None else r.delta

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        r = self._requests.get(request_id)
        if r is None:
            return -(-num_tokens // self.block_size)
        return int(self.allocator.blocks_needed(r.table, num_tokens))

    def check_invariants(self) -> None:
        """The allocator's invariants, and every live request's table length equal to its
        ``position_offset`` (raises ``InvariantError`` / ``AssertionError``)."""
        self.allocator.check_invariants()
        for rid, r in self._requests.items():
            if r.state is not None and r.state.status != RequestStatus.FINISHED:
                n = self.allocator.num_tokens(r.table)
                assert n == r.state.position_offset, (rid, n, r.state.position_offset)

    # -- engine contract: memory ------------------------------------------------------------------

    def _ensure(self, request_id: str) -> _Request:
        r = self._requests.get(request_id)
        if r is None:
            r = _Request(table=self.allocator.create_table())
            r.queries = [None] * self.num_layers
            self._requests[request_id] = r
        return r

    def _note_peak(self) -> None:
        c = self._counters
        c["peak_used_blocks"] = max(c["peak_used_blocks"], self.allocator.num_used_blocks)
        live = sum(1 for r in self._requests.values() if self.allocator.num_tokens(r.table))
        c["peak_requests"] = max(c["peak_requests"], live)

    def _copy_block(self, src_block: int, dst_block: int) -> None:
        bs = self.block_size
        offsets = torch.arange(bs, device=self.device)
        self.move(src_block * bs + offsets, dst_block * bs + offsets)

    def can_store_request_tokens(
        self, state: RequestState, request_len: int, dry_run: bool = False
    ) -> bool:
        if dry_run:
            need = self.blocks_needed(state.request_id, request_len)
            return need <= self.allocator.num_available_blocks
        r = self._ensure(state.request_id)
        stored = self.allocator.num_tokens(r.table)
        if stored != state.position_offset:
            raise RuntimeError(
                f"kvcore.serving: request {state.request_id} stores {stored} tokens but the "
                f"engine counts {state.position_offset} (a bug in the integration)"
            )
        try:
            _, cow = self.allocator.append(r.table, request_len)
        except _k.OutOfBlocksError:
            return False
        if cow is not None:
            self._copy_block(*cow)
        r.state = state
        self._note_peak()
        return True

    def count_storable_requests(self, list_blocks_needed: list[dict[str, int]]) -> int:
        free = self.allocator.num_available_blocks
        for i, needed in enumerate(list_blocks_needed):
            need = needed.get(FULL_ATTENTION, 0)
            if need > free:
                return i
            free -= need
        return len(list_blocks_needed)

    def compute_free_capacity(self, relative: bool = True) -> int | float:
        free = self.allocator.num_available_blocks
        return free / self.allocator.capacity if relative else free * self.bytes_per_block

    def evict_cached_blocks(self) -> bool:
        return int(self.allocator.reset_prefix_cache()) > 0

    def free_blocks(self, request_id: str, no_cache: bool = False) -> None:
        r = self._requests.pop(request_id, None)
        self._pending.pop(request_id, None)
        if r is None:
            return
        self.allocator.free(r.table)
        if no_cache:  # only the offloading manager's soft reset frees with no_cache
            self._counters["preemptions"] += 1

    def free_all_requests(self, clear_ledgers: bool = False) -> None:
        tables = np.array([r.table for r in self._requests.values()], dtype=np.int64)
        if len(tables):
            self.allocator.free_batch(tables)
        self._requests.clear()
        self._pending.clear()
        if clear_ledgers:
            self.allocator.reset_prefix_cache()

    def reset(self) -> None:
        self.free_all_requests(clear_ledgers=True)

    # -- engine contract: prefix sharing and forks -------------------------------------------------

    def search_prefix_match(self, request_id: str, prompt_ids: list[int]) -> int:
        if not self.use_prefix_sharing or len(prompt_ids) < 2:
            return 0
        r = self._ensure(request_id)
        if self.allocator.num_tokens(r.table):
            return 0
        ids = np.asarray(prompt_ids[:-1], dtype=np.int64)  # one token is always computed
        hit = int(self.allocator.adopt_prefix(r.table, ids, self._salt))
        r.adopted = hit
        r.registered = hit // self.block_size
        if hit:
            self._counters["prefix_hit_tokens"] += hit
            self._note_peak()
        return hit

    def count_new_complete_blocks(self, state: RequestState, request_len: int) -> dict[str, int]:
        return {}  # mark_complete_blocks reads the table itself

    def mark_complete_blocks(self, state: RequestState, complete_blocks: dict[str, int]) -> None:
        if state.status == RequestStatus.FINISHED:
            return
        r = self._requests.get(state.request_id)
        if r is None:
            return
        r.state = state
        n = self.allocator.num_tokens(r.table)
        if self.use_prefix_sharing and not r.compressed and n // self.block_size > r.registered:
            ids = (state.initial_tokens + state.generated_tokens)[:n]
            self.allocator.register_prefix(r.table, np.asarray(ids, dtype=np.int64), self._salt)
            r.registered = n // self.block_size
        if self.settings.policy is None:
            return
        left = len(state.remaining_prefill_tokens)
        if not r.prompt_done and (left == 0 or (state.num_children > 0 and left == 1)):
            r.prompt_done = True
            self._pending[state.request_id] = state
        elif r.prompt_done and self.settings.decode_every is not None:
            if state.generated_len() - r.last_compressed_at >= self.settings.decode_every:
                self._pending[state.request_id] = state

    def prepare_fork_request(
        self, src_state: RequestState, dst_req_ids: list[str], copy_src_and_dst: Any
    ) -> list[str]:
        self.flush_compressions()  # children share the parent's compressed blocks
        src = self._requests[src_state.request_id]
        for rid in dst_req_ids:
            table = self.allocator.fork(src.table)
            self._requests[rid] = replace(src, table=table, state=None, queries=list(src.queries))
        return list(dst_req_ids)

    def perform_cache_copy(self, copy_src_and_dst: Any) -> None:
        return None  # kvcore forks share blocks; partial blocks are copied on write

    def fill_block_table(self, *args: Any) -> None:
        raise NotImplementedError(
            "kvcore.serving: the decode fast path reads the engine's block table; it is off "
            "(max_blocks_per_request=0) under kvcore"
        )

    # -- engine contract: one forward --------------------------------------------------------------

    def extend_read_and_write_indices(
        self,
        request_id: str,
        past_length: int,
        query_length: int,
        read_index: list[list[int]] | None,
        write_index: list[list[int]],
    ) -> None:
        r = self._requests[request_id]
        slots = self.allocator.slot_mapping(r.table)
        total = past_length + query_length
        if len(slots) > total:
            # A fork parent: the scheduler reserved its whole prompt, then held the last token
            # back for the children. Dropping the tail of the table moves nothing.
            self.allocator.compact(r.table, np.arange(total, dtype=np.int64))
            slots = slots[:total]
        if len(slots) != total:
            raise RuntimeError(
                f"kvcore.serving: request {request_id} holds {len(slots)} slots, the engine "
                f"reads {past_length} + {query_length} (a bug in the integration)"
            )
        write_index[0].extend(slots[past_length:].tolist())
        if read_index is not None:
            read_index[0].extend(slots.tolist())
        self._plan.append((request_id, query_length))

    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the step's ``[1, H, T, D]`` K/V at the slots of the plan in the page format,
        then returns every request's stored K/V in plan order, as the engine's own cache does
        (quantized pages: dequantized, the step's own tokens included, so attention sees what
        later steps will read)."""
        kwargs["cu_seq_lens_k"] = kwargs["cu_seq_lens_k"][FULL_ATTENTION].to(torch.int32)
        kwargs["max_length_k"] = kwargs["max_length_k"][FULL_ATTENTION]
        read_index = kwargs["read_index"][0]
        write_index = kwargs["write_index"][0]
        t = key_states.shape[2]
        k_new, v_new = (
            x.squeeze(0).transpose(0, 1).reshape(t, -1) for x in (key_states, value_states)
        )
        fmt, store = self.format, self.stores[layer_idx]
        encoded = fmt.prepare(k_new, v_new)  # both sides encoded before either is written
        fmt.commit(store, encoded, write_index, self._streams)
        # A batch with no past to read (every request in its first chunk) passes no read
        # index: its attention reads the step's own tokens, read back from the pages.
        if read_index.numel() == 0:
            read_index = write_index
        k_all = self.read(layer_idx, "k", read_index)
        v_all = self.read(layer_idx, "v", read_index)
        return k_all.transpose(0, 1).unsqueeze(0), v_all.transpose(0, 1).unsqueeze(0)

    def begin_step(self) -> None:
        self._plan.clear()
        self._obs_rows = None

    def observe(self, layer_idx: int, queries: torch.Tensor) -> None:
        """Keeps the last ``window`` rotated queries ``[1, Hq, T, D]`` of each request of the
        plan (query-aware policies score from them)."""
        policy = self.settings.policy
        assert policy is not None
        w = policy.observe_window or 32
        q = queries[0]
        start = 0
        for rid, n in self._plan:
            r = self._requests.get(rid)
            if r is not None and n:
                rows = q[:, start + max(0, n - w) : start + n].detach()
                old = r.queries[layer_idx]
                both = rows if old is None else torch.cat([old, rows], dim=1)
                r.queries[layer_idx] = both[:, -w:].clone()
            start += n

    # -- compression ------------------------------------------------------------------------------

    def flush_compressions(self) -> None:
        """Compresses every request whose schedule fired, frees the blocks it emptied, and moves
        its ``position_offset`` to the stored length."""
        pending, self._pending = self._pending, {}
        for rid in sorted(pending):
            state = pending[rid]
            r = self._requests.get(rid)
            if r is None or state.status == RequestStatus.FINISHED:
                continue
            self._compress(r, state)
        decoding = sum(
            1
            for r in self._requests.values()
            if r.state is not None and r.state.status == RequestStatus.DECODING
        )
        c = self._counters
        c["peak_decoding"] = max(c["peak_decoding"], decoding)

    def _compress(self, r: _Request, state: RequestState) -> None:
        _compress.compress(self, r, state)
