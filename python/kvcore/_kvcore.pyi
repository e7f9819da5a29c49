"""Rust core of kvcore (PyO3 bindings). Import the public names from ``kvcore``.

Arrays cross the boundary as numpy arrays without per-element Python objects (int32 id and
position arrays are accepted wherever int64 is, at the cost of one copy). Table ids and
counts may be Python ints or numpy integer scalars. Every method is safe to call from several
threads; methods whose work grows with their input (batch calls, compaction, prefix hashing,
exports, ``slot_mapping``, ``check_invariants``) release the GIL while the core works.
``append``, ``append_batch`` and ``create_tables`` release it from 1024 tokens (rows plus
tokens for ``append_batch``, tables for ``create_tables``) on: a decode step of a few hundred
rows costs less than releasing and retaking the GIL.
"""

from collections.abc import Sequence
from typing import Final, TypeAlias, final

import numpy as np
from numpy.typing import NDArray

__version__: Final[str]
build_profile: Final[str]
#: The most bytes one buffer may take: the machine's physical memory (``MemTotal`` on Linux,
#: else the address-space limit). Every size argument and every array copy is checked
#: against it before anything is allocated (docs/errors.md, "Argument rules").
max_alloc_bytes: Final[int]
"""``"release"`` or ``"debug"``: benchmarks refuse to run on a debug build."""

_Salt: TypeAlias = int | str | bytes
_IdArray: TypeAlias = NDArray[np.int64] | NDArray[np.int32]
# An engine's own block hashes: rows of bytes, one row per full block.
_BlockHashes: TypeAlias = list[bytes] | NDArray[np.uint8] | NDArray[np.uint64] | NDArray[np.int64]
_F32: TypeAlias = NDArray[np.float32]
_Weights: TypeAlias = NDArray[np.float64] | NDArray[np.float32]
_Csr: TypeAlias = tuple[NDArray[np.int64], NDArray[np.int64]]
_Spans: TypeAlias = Sequence[tuple[int, int]]
_FloatArray: TypeAlias = NDArray[np.float32] | NDArray[np.float16] | NDArray[np.uint16]

__all__ = [
    "BlockAllocator",
    "KiviCache",
    "MergeBook",
    "MergePlan",
    "MiniCachePair",
    "MixedPrecisionStore",
    "QuantLayout",
    "cam_plan",
    "dequantize",
    "ems_plan",
    "kivi_nbytes",
    "kvmerger_plan",
    "minicache_layer_pairs",
    "minicache_merge",
    "quantize",
    "razor_plan",
    "InvalidPositionsError",
    "InvariantError",
    "KVCoreError",
    "OutOfBlocksError",
    "TableFreedError",
    "UnknownTableError",
    "ScoreState",
    "budget_adakv",
    "budget_head_weighted",
    "budget_pyramid",
    "budget_split",
    "budget_uniform",
    "group_reduce",
    "key_norm_scores",
    "plan_infinipot",
    "plan_longgen",
    "plan_razor",
    "plan_streaming",
    "pool1d",
    "razor_head_scores",
    "razor_retrieval_heads",
    "select_adakv",
    "select_per_layer",
    "select_topk",
    "tova_scores",
    "window_reduce",
    "__version__",
    "build_profile",
    "max_alloc_bytes",
]

class KVCoreError(Exception):
    """Base class of every error raised by kvcore's core."""

class OutOfBlocksError(KVCoreError):
    """The pool cannot supply the blocks a request needs. An expected outcome, not a bug:
    the allocator is left exactly as it was before the call."""

class UnknownTableError(KVCoreError, LookupError):
    """A table id that this allocator never handed out."""

class TableFreedError(KVCoreError, LookupError):
    """A table id that was already freed (double free or use after free)."""

class InvalidPositionsError(KVCoreError, ValueError):
    """Keep positions out of range, unsorted or duplicated, or a mask of the wrong length."""

class InvariantError(KVCoreError):
    """``check_invariants`` found an inconsistency: a bug in kvcore, never a user error."""

@final
class BlockAllocator:
    """A fixed budget of ``num_blocks`` physical KV blocks of ``block_size`` token slots.

    Block 0 is the null block: never handed out, used as padding in exported tables, so
    ``capacity == num_blocks - 1``. A *table* is the ordered list of blocks holding one
    stream of tokens (a sequence, or one (sequence, layer, kv-head) stream). Token ``p`` of a
    table lives in slot ``block_table[p // block_size] * block_size + p % block_size``.

    Outcomes: running out of blocks raises :class:`OutOfBlocksError` and changes nothing;
    a bad table id raises :class:`UnknownTableError` or :class:`TableFreedError`; wrong
    argument types raise ``TypeError`` and wrong values ``ValueError`` (or a
    :class:`KVCoreError` subclass that is also a ``ValueError``). Any call that raises leaves
    the allocator unchanged.

    Reuse order: blocks that hold no cached prefix are handed out first (the most recently
    freed first); cached blocks are reclaimed only when those run out, least recently freed
    first. A table frees its blocks tail first.

    Args:
        num_blocks: physical blocks in the pool, including the null block (>= 2).
        block_size: token slots per block (>= 1).

    Raises:
        ValueError: a size is zero, negative or too large for int32 block ids / int64 slots.
        TypeError: a size is not an int.
    """

    def __new__(cls, num_blocks: int, block_size: int) -> BlockAllocator: ...
    @property
    def num_blocks(self) -> int:
        """Physical blocks, including the null block."""
    @property
    def block_size(self) -> int:
        """Token slots per block."""
    @property
    def capacity(self) -> int:
        """Usable blocks: ``num_blocks - 1``."""
    @property
    def num_free_blocks(self) -> int:
        """Unreferenced blocks that hold no cached prefix."""
    @property
    def num_cached_blocks(self) -> int:
        """Unreferenced blocks that still hold a cached prefix (reclaimable)."""
    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one table."""
    @property
    def num_shared_blocks(self) -> int:
        """Blocks referenced by two or more tables."""
    @property
    def num_available_blocks(self) -> int:
        """Blocks an allocation can take now: ``num_free_blocks + num_cached_blocks``."""
    @property
    def num_tables(self) -> int:
        """Live tables."""
    @property
    def usage(self) -> float:
        """``num_used_blocks / capacity``."""
    def stats(self) -> dict[str, int | float]:
        """All counters above in one dict (one lock acquisition, a consistent snapshot)."""
    def create_table(self) -> int:
        """Creates an empty table and returns its id. Never fails (an empty table holds no
        blocks). Ids of freed tables are never handed out again."""
    def create_tables(self, n: int) -> NDArray[np.int64]:
        """Creates ``n`` empty tables; returns their ids, shape ``(n,)`` int64."""
    def num_tokens(self, table: int) -> int:
        """Tokens held by ``table``."""
    def block_table(self, table: int) -> NDArray[np.int32]:
        """Block ids of ``table`` in order, shape ``(ceil(num_tokens / block_size),)`` int32."""
    def slot_mapping(self, table: int) -> NDArray[np.int64]:
        """Slot id of every token of ``table`` in order, shape ``(num_tokens,)`` int64."""
    def blocks_needed(self, table: int, num_tokens: int) -> int:
        """Blocks ``append(table, num_tokens)`` would take from the pool right now, counting
        a copy-on-write block."""
    def append(
        self, table: int, num_tokens: int
    ) -> tuple[NDArray[np.int64], tuple[int, int] | None]:
        """Appends ``num_tokens`` slots to ``table``.

        If the table's last block is partially filled and shared with another table, the
        table first moves onto a private copy: the second element is then
        ``(src_block, dst_block)``, and the caller must copy block ``src_block`` to
        ``dst_block`` in its K/V pools before writing the new slots. Otherwise it is None.

        Returns:
            ``(slots, cow)``: ``slots`` has shape ``(num_tokens,)`` int64.

        Raises:
            OutOfBlocksError: not enough blocks (expected outcome; nothing changed).
            UnknownTableError, TableFreedError: bad ``table``.
            ValueError: ``num_tokens`` is negative.
        """
    def append_batch(
        self,
        tables: _IdArray,
        num_tokens: _IdArray | int,
        token_ids: _IdArray | None = None,
    ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int32], NDArray[np.int32]]:
        """Appends ``num_tokens[i]`` slots to ``tables[i]`` for every ``i``, all or nothing,
        with the GIL released from 1024 rows plus tokens on. ``num_tokens`` may be one int
        for every table (a decode step).

        With ``token_ids`` this is the engine's whole step in one call: every block that the
        appended tokens fill is hashed (chained under the table's salt, as
        ``register_prefix`` would) and registered in the prefix cache. A table's chain is
        known from creation, ``adopt_prefix`` or ``register_prefix`` on; an append without
        ids or a compaction that changes the table stops it until the next
        ``register_prefix``, and such tables take their slots but register nothing.

        Args:
            tables: ``(n,)`` int64 table ids, each at most once.
            num_tokens: ``(n,)`` int64 counts, or an int.
            token_ids: ``(sum(num_tokens),)`` int64 or int32, the ids of the appended tokens
                table after table (for a decode step: the sampled ids, one per table).

        Returns:
            ``(slots, indptr, cow_src, cow_dst)``: ``slots`` int64, table ``i``'s slots being
            ``slots[indptr[i]:indptr[i+1]]``; ``indptr`` ``(n + 1,)`` int64; the copy-on-write
            block pairs as two int32 arrays of equal length.

        Raises:
            OutOfBlocksError: the batch does not fit (nothing changed).
            UnknownTableError, TableFreedError: a bad id (nothing changed).
            ValueError: lengths differ (``token_ids`` included), a table is listed twice, or a
                count is negative.
        """
    def admit_batch(
        self,
        indptr: _IdArray,
        token_ids: NDArray[np.int64] | NDArray[np.int32],
        salt: _Salt | None = None,
    ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
        """Admits a wave of new requests in one call, all or nothing: the scheduler's
        admission step. Prompt ``i`` is ``token_ids[indptr[i]:indptr[i+1]]``. Each prompt
        gets a new table, which adopts the longest cached prefix of the prompt without its
        last token (the engine needs that token's logits, as vLLM caps hits at
        ``num_tokens - 1``) and then takes slots for the rest of the prompt, registering
        every block that fills under ``salt``. The same as ``create_tables`` +
        ``adopt_prefix_batch`` (every prompt but its last token) + ``append_batch`` (the
        rest, with its ids), except that a wave that does not fit changes nothing. GIL
        released from 1024 tokens on.

        ::

            prompt i:  [ t0 ............................................ t(L-1) ]
            lookup:    [ block 0 | block 1 | ... full blocks of t0..t(L-2) ]
            hit:       [ block 0 | block 1 ]                 hits[i] = 2 * block_size
            new slots:                     [ t(2 * block_size) ...... t(L-1) ]

        Args:
            indptr: ``(n + 1,)`` int64 offsets into ``token_ids``, from 0 to its length.
            token_ids: ``(indptr[n],)`` int64 or int32, the prompts' ids one after another.
            salt: the chain's salt for every table of the wave (e.g. a LoRA or cache key).

        Returns:
            ``(tables, hits, slots, slot_indptr)``, all int64: the ``(n,)`` new table ids;
            the ``(n,)`` tokens hit per prompt (multiples of ``block_size``); the slots of the
            tokens past the hit, prompt ``i``'s being
            ``slots[slot_indptr[i]:slot_indptr[i+1]]`` (``slot_indptr`` ``(n + 1,)``). A new
            table adopts full blocks only, so admission never copies on write.

        Raises:
            OutOfBlocksError: the wave does not fit: the blocks its appends take plus the
                cached blocks its hits take out of the free queue (nothing changed).
            ValueError: ``indptr`` is empty, does not start at 0 and end at
                ``len(token_ids)``, or decreases (nothing changed).
            TypeError: an argument is not an integer array.
        """
    def fork(self, table: int) -> int:
        """Creates a table that shares every block of ``table`` (ref counts go up; no block is
        taken, so it never runs out). Returns the new id."""
    def free(self, table: int) -> None:
        """Frees ``table``: each block loses one reference, tail first.

        Raises:
            TableFreedError: double free.
            UnknownTableError: never created.
        """
    def free_batch(self, tables: _IdArray) -> None:
        """Frees every table of ``tables`` ``(n,)`` int64, all or nothing.

        Raises:
            UnknownTableError, TableFreedError: a bad id (nothing is freed).
            ValueError: a table is listed twice (nothing is freed).
        """
    def register_prefix(
        self,
        table: int,
        token_ids: NDArray[np.int64] | NDArray[np.int32] | None = None,
        salt: _Salt | None = None,
        *,
        block_hashes: _BlockHashes | None = None,
    ) -> int:
        """Registers the full blocks of ``table`` that are not registered yet under the chained
        hash of (parent hash, the block's token ids, salt), so later tables can adopt them.
        Afterwards the table's chain is known: ``append_batch(..., token_ids=...)`` registers
        the blocks it fills.

        Args:
            table: the table.
            token_ids: ``(num_tokens(table),)`` int64 or int32: the token id of every position.
            salt: separates equal token ids with different K/V, e.g. a LoRA adapter id or the
                compression policy that produced the blocks. Use one salt per table.
            block_hashes: instead of ``token_ids``, the engine's own hash of each full block
                (``num_tokens(table) // block_size`` rows: a list of equally long ``bytes``,
                or a 2-D uint8 / uint64 / int64 array, e.g. ``(n, 2)`` uint64 for 128 bits).
                Chained and salted the same way; never equal to a token-id block.

        Returns:
            Blocks newly registered. A block whose hash already names another block is not
            registered again (no de-duplication), but the chain continues through it.

        Raises:
            TypeError: neither or both of ``token_ids`` and ``block_hashes``.
            ValueError: the wrong number of ids or rows.
        """
    def register_prefix_batch(
        self,
        tables: _IdArray,
        indptr: _IdArray,
        token_ids: NDArray[np.int64] | NDArray[np.int32] | None = None,
        salt: _Salt | None = None,
        *,
        block_hashes: _BlockHashes | None = None,
    ) -> NDArray[np.int64]:
        """``register_prefix`` for many tables in one call, all or nothing, GIL released:
        table ``tables[i]`` gets ``token_ids[indptr[i]:indptr[i+1]]`` (or those rows of
        ``block_hashes``), under one ``salt``.

        Returns:
            ``(n,)`` int64: blocks newly registered per table.

        Raises:
            ValueError: ``indptr`` is not ``n + 1`` non-decreasing offsets from 0 to the number
                of ids (rows), a table is listed twice, or a table's part has the wrong length.
        """
    def adopt_prefix(
        self,
        table: int,
        token_ids: NDArray[np.int64] | NDArray[np.int32] | None = None,
        salt: _Salt | None = None,
        *,
        block_hashes: _BlockHashes | None = None,
    ) -> int:
        """Makes an empty ``table`` adopt the longest cached prefix of ``token_ids`` (or of
        ``block_hashes``, one row per block): leading full blocks whose chained hash is
        registered join the table, ref counts up. Takes no block from the pool. Pass
        ``token_ids[:-1]`` to keep the last token uncached, as vLLM does to get its logits.
        Hit or miss, the table's chain is then known under ``salt``.

        Returns:
            Tokens hit, a multiple of ``block_size``.

        Raises:
            ValueError: ``table`` is not empty.
            TypeError: neither or both of ``token_ids`` and ``block_hashes``.
        """
    def adopt_prefix_batch(
        self,
        tables: _IdArray,
        indptr: _IdArray,
        token_ids: NDArray[np.int64] | NDArray[np.int32] | None = None,
        salt: _Salt | None = None,
        *,
        block_hashes: _BlockHashes | None = None,
    ) -> NDArray[np.int64]:
        """``adopt_prefix`` for a wave of empty tables in one call, all or nothing, GIL
        released: table ``tables[i]`` looks up ``token_ids[indptr[i]:indptr[i+1]]`` (or those
        rows of ``block_hashes``). Nothing is registered, so no table of the wave hits another.

        Returns:
            ``(n,)`` int64: tokens hit per table.

        Raises:
            ValueError: bad ``indptr``, a table listed twice, or a table that is not empty.
        """
    def reset_prefix_cache(self) -> int:
        """Forgets every cached prefix held by unreferenced blocks; returns how many."""
    def compact(
        self, table: int, keep: NDArray[np.int64] | NDArray[np.int32] | NDArray[np.bool_]
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Keeps only the tokens ``keep`` of ``table``, packed in order into its leading slots,
        and frees every block that became empty.

        Contract of the returned plan ``(src, dst)`` (slot ids, int64, equal length): copy
        slot ``src[i]`` to slot ``dst[i]`` in every per-slot array (K, V, scores, merge
        counts). Apply the moves sequentially in order, or as one gather followed by one
        scatter (``pool[dst] = pool[src]``): both are correct, because no move reads a slot
        that an earlier move wrote. Apply the plan before the next call that allocates (from
        any thread): freed blocks still hold sources. Destinations are never in shared
        blocks; shared blocks in the rewritten range are replaced by private ones (so this can
        run out of blocks). A kept token already in place does not move.

        Args:
            table: the table.
            keep: strictly ascending positions ``(m,)`` int64/int32 in ``[0, num_tokens)``, or a
                ``(num_tokens,)`` bool mask.

        Raises:
            InvalidPositionsError: positions out of range, unsorted or duplicated; a mask of
                the wrong length.
            OutOfBlocksError: shared blocks need replacing and the pool is short.
        """
    def compact_batch(
        self,
        tables: _IdArray,
        keep_indptr: _IdArray,
        keep_positions: _IdArray,
    ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
        """Compacts many tables at once, all or nothing, with the GIL released. Table
        ``tables[i]`` keeps ``keep_positions[keep_indptr[i]:keep_indptr[i+1]]`` (the CSR
        layout selection produces).

        Returns:
            ``(src, dst, plan_indptr)``: one plan for all tables, table after table, with the
            contract of :meth:`compact`; table ``i``'s moves are
            ``[plan_indptr[i], plan_indptr[i+1])``.

        Raises:
            OutOfBlocksError: conservative check: the blocks every table would need on its
                own, before anything changes, exceed the available blocks.
            InvalidPositionsError: a table's positions are out of range, unsorted or
                duplicated.
            UnknownTableError, TableFreedError: a bad id.
            ValueError: ``keep_indptr`` does not have ``len(tables) + 1`` non-decreasing
                entries from 0 to ``len(keep_positions)``, or a table is listed twice.
        Nothing changes when it raises.
        """
    def flashinfer_layout(
        self, tables: _IdArray
    ) -> tuple[NDArray[np.int32], NDArray[np.int32], NDArray[np.int32]]:
        """FlashInfer's paged-KV layout for ``tables``: ``(indptr (n+1,), indices
        (indptr[-1],), last_page_len (n,))``, all int32. An empty table has
        ``last_page_len`` 0."""
    def vllm_layout(
        self,
        tables: _IdArray,
        num_new_tokens: _IdArray | None = None,
        width: int | None = None,
    ) -> tuple[NDArray[np.int32], NDArray[np.int64], NDArray[np.int32]]:
        """vLLM's layout for ``tables``.

        Returns:
            ``(block_table, slot_mapping, seq_lens)``: ``block_table`` ``(n, width)`` int32
            padded with the null block 0 (``width`` defaults to the longest table);
            ``slot_mapping`` int64, the slots of the last ``num_new_tokens[i]`` tokens of each
            table (all tokens by default), concatenated; ``seq_lens`` ``(n,)`` int32.
        """
    def ref_counts(self) -> NDArray[np.int32]:
        """Reference count of every block, ``(num_blocks,)`` int32 (entry 0: null block)."""
    def free_queue(self) -> NDArray[np.int32]:
        """Unreferenced blocks from the next one handed out to the last, int32."""
    def check_invariants(self) -> None:
        """Verifies every internal invariant (O(blocks + table entries)).

        Raises:
            InvariantError: a violation, with a description.
        """

# --- Selection: which tokens stay (kvcore_core::select) -------------------------------------
#
# Rows are (layer, kv-head) pairs in layer-major order, ``row = layer * num_heads + head``.
# Scores are float32, higher means keep, and must be finite (NaN or inf: ValueError naming the
# row and position). Selection order: higher score first; equal scores: the lower position
# wins (``-0.0 == 0.0``). Force-keep priority when a budget is smaller than the forced set:
# sinks first (from position 0), then the window (from the newest token backwards), then the
# protected spans in the order given. A budget >= n keeps every token. Results are CSR
# ``(indptr (num_rows + 1,), positions)`` int64 with ascending positions per row: exactly the
# ``keep_indptr`` / ``keep_positions`` of :meth:`BlockAllocator.compact_batch`. All of these
# release the GIL while the core works.

def select_topk(
    scores: _F32,
    budgets: int | _IdArray,
    *,
    sinks: int | None = None,
    window: int | None = None,
    protected: _Spans | None = None,
    num_threads: int = 1,
) -> _Csr:
    """Per-row top-k with force-keep ranges, O(n) per row (histogram + selection, no sort).

    Args:
        scores: ``(num_rows, n)`` float32.
        budgets: kept tokens per row: one int for every row or ``(num_rows,)`` int64.
        sinks: the first ``sinks`` tokens are kept (default 0).
        window: the newest ``window`` tokens are kept (default 0).
        protected: half-open ``(start, end)`` spans kept as well (clipped to ``n``).
        num_threads: rows are split over this many threads (1: serial; 0 raises ValueError).

    Returns:
        ``(indptr, positions)`` int64 CSR; row ``r`` keeps ``min(budgets[r], n)`` tokens.

    Raises:
        TypeError: ``scores`` is not a float32 array, ``budgets`` not ints.
        ValueError: wrong shapes, negative budgets, non-finite scores, bad spans.
    """

def select_per_layer(
    scores: _F32,
    num_heads: int,
    budgets: int | _IdArray,
    *,
    sinks: int | None = None,
    window: int | None = None,
    protected: _Spans | None = None,
) -> _Csr:
    """One index set per layer (TOVA): ``scores`` ``(num_layers, n)`` float32, ``budgets``
    per layer; each layer's positions are repeated for its ``num_heads`` rows."""

def budget_uniform(total: int, num_rows: int, n: int) -> NDArray[np.int64]:
    """``total`` tokens over ``num_rows`` rows of ``n`` tokens: ``(num_rows,)`` int64 summing
    to ``min(total, num_rows * n)``. Rounding: rows are capped at ``n``, the rest is split
    again (water-filling); the remainder goes one token each to the lowest rows (e.g. 10
    over 4 rows is ``[3, 3, 2, 2]``)."""

def budget_split(total: int, weights: _Weights, caps: int | _IdArray) -> NDArray[np.int64]:
    """Exact split of ``total`` in proportion to ``weights`` ``(num_rows,)`` with per-row
    ``caps``: capped rows are water-filled, the others get ``floor(share)`` and the rest
    goes to the largest fractional parts (ties: lower row). Sums to ``min(total,
    sum(caps))``. All-zero weights split uniformly."""

def budget_pyramid(
    num_layers: int, n: int, capacity: int, window: int, beta: int = 20
) -> NDArray[np.int64]:
    """PyramidKV per-layer budgets (including the window), ``(num_layers,)`` int64.

    ``capacity`` is the average per-layer budget ``C`` including the window ``w``. ``n < C``:
    every layer keeps ``n``. ``n < 2 (C - w)``: uniform ``C``. Otherwise the linear schedule
    of PyramidKV (``min = (C - w) // beta``, ``max = 2 (C - w) - min``, clipped to ``n - w``),
    with the floored step's excess taken back one token per layer from layer 0, so that the
    budgets sum to exactly ``num_layers * C`` and never increase with depth.
    """

def budget_head_weighted(
    capacity: int, weights: _Weights, n: int, head_beta: float = 1.01
) -> NDArray[np.int64]:
    """HeadKV budgets over all ``(layer, head)`` rows: base ``C - C // head_beta`` each,
    plus the pool ``(C // head_beta) * num_rows`` split by ``weights`` ``(num_rows,)`` with
    the exact rounding of :func:`budget_split`; capped at ``n``; sums to
    ``min(C, n) * num_rows``."""

def budget_adakv(
    scores: _F32,
    budget: int,
    alpha: float = 0.2,
    *,
    sinks: int | None = None,
    window: int | None = None,
    protected: _Spans | None = None,
) -> NDArray[np.int64]:
    """Ada-KV per-head budgets, ``(num_layers * num_heads,)`` int64 including forced tokens.

    ``scores`` ``(num_layers, num_heads, n)`` float32. Each layer keeps exactly
    ``num_heads * min(budget, n)`` tokens: each head its forced tokens and its own top
    ``floor(alpha * (budget - forced))``, the rest by a global top-k over the layer's heads
    (ties: lower head, then lower position). Feed the result to :func:`select_topk` with the
    same force-keep arguments.
    """

def select_adakv(
    scores: _F32,
    budget: int,
    alpha: float = 0.2,
    *,
    sinks: int | None = None,
    window: int | None = None,
    protected: _Spans | None = None,
) -> _Csr:
    """:func:`budget_adakv` and the selection it implies in one pass: the same result as
    ``select_topk(scores.reshape(-1, n), budget_adakv(...), ...)``, computed once."""

def window_reduce(probs: _F32, how: str = "sum") -> _F32:
    """SnapKV observation-window scores: ``probs`` ``(num_rows, w, n)`` float32 (softmax of
    the last ``w`` queries) reduced over the ``w`` queries by ``"sum"``, ``"mean"`` or
    ``"max"``: ``(num_rows, n)``. Sums are taken in float64 and rounded once."""

def group_reduce(scores: _F32, num_kv_heads: int, how: str = "mean") -> _F32:
    """GQA: ``(num_q_heads, n)`` reduced over groups of consecutive query heads to
    ``(num_kv_heads, n)`` by ``"mean"`` (default), ``"max"`` or ``"sum"``."""

def pool1d(scores: _F32, kernel: int, how: str = "avg") -> _F32:
    """SnapKV pooling along tokens: ``(num_rows, n)``, odd ``kernel``, stride 1, padding
    ``kernel // 2``; ``"avg"`` divides by ``kernel`` (zero padding, torch ``avg_pool1d``),
    ``"max"`` ignores the padding."""

def tova_scores(last_attn: _F32) -> _F32:
    """TOVA: last-query attention ``(num_layers, num_heads, n)`` averaged over heads:
    ``(num_layers, n)``."""

def key_norm_scores(keys: _F32) -> _F32:
    """K-norm: ``-||k||_2`` of keys ``(num_rows, n, head_dim)`` float32: ``(num_rows, n)``."""

def razor_head_scores(attn_map: _F32, period: int, prefix: int = 1) -> tuple[float, float]:
    """RazorAttention ``(echo, induction)`` of one head from its calibration attention
    ``(s, s)`` float32 (query rows). The input is ``prefix`` tokens then a random block of
    ``period`` tokens repeated; for ``i > j >= prefix`` with ``i - j`` a multiple of
    ``period``, echo sums ``P[i, j]`` and induction ``P[i, j + 1]``; both divided by ``s*s``."""

def razor_retrieval_heads(
    echo: _F32, induction: _F32, echo_ratio: float = 0.01, induction_ratio: float = 0.14
) -> NDArray[np.bool_]:
    """Retrieval heads over all ``(layer, head)`` rows: the top ``ceil(echo_ratio * rows)``
    by echo plus the top ``ceil(induction_ratio * rows)`` by induction (ties: lower row).
    The product is rounded to 1e-9 before the ceiling, so 0.14 * 100 heads gives 14."""

def plan_streaming(num_rows: int, n: int, sinks: int, window: int) -> _Csr:
    """StreamingLLM: every row keeps ``[0, sinks)`` and ``[n - window, n)``."""

def plan_longgen(
    layer_kinds: Sequence[str],
    num_heads: int,
    n: int,
    *,
    sinks: int,
    window: int,
    block: int = 64,
    stride: int = 4,
    local_blocks: int = 1,
) -> _Csr:
    """LongGen static pattern, one kind per layer: ``"full"`` (keep all), ``"sink"`` (sinks +
    window) or ``"block_sparse"`` (sinks, blocks with ``index % stride == 0`` and the
    ``local_blocks`` newest blocks of ``block`` tokens)."""

def plan_razor(
    retrieval: NDArray[np.bool_],
    n: int,
    sinks: int,
    local_capacity: int,
    compensation: bool = True,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """RazorAttention: retrieval rows keep all; others (with ``n > local_capacity``) keep the
    sinks and the newest ``local_capacity - sinks - 1`` tokens, the last slot being the
    compensation token (``compensation=False``: no token, the window takes the slot).
    Returns ``(indptr, positions, num_dropped)``, ``num_dropped`` ``(num_rows,)`` the tokens
    dropped from each row (folded into its compensation token when there is one)."""

def plan_infinipot(
    cap_scores: _F32,
    nuc_scores: _F32,
    compressed: int,
    nuc_ratio: float = 0.5,
    *,
    sinks: int | None = None,
    window: int | None = None,
    protected: _Spans | None = None,
) -> _Csr:
    """InfiniPot distillation to ``compressed`` tokens per row: the top
    ``floor(nuc_ratio * compressed)`` tokens by novelty ``nuc_scores`` ``(n,)`` (shared by
    all rows), then each row's best by catalyst score ``cap_scores`` ``(num_rows, n)``."""

@final
class ScoreState:
    """Per-token scores that live with the cache (H2O accumulators, Locret's CIS, external
    scores), one row per ``(layer, head)``, compacted by the same CSR plan as the tokens."""
    def __new__(cls, num_rows: int) -> ScoreState: ...
    @property
    def num_rows(self) -> int: ...
    def lengths(self) -> NDArray[np.int64]:
        """Tokens held by each row, ``(num_rows,)`` int64."""
    def accumulate(self, scores: _F32, decay: float = 1.0) -> None:
        """H2O step: ``scores`` ``(num_rows, m)`` float32 is the attention mass received by
        the ``m`` tokens cached now (``m`` >= every row's length). Existing tokens become
        ``decay * old + new``; the others start at ``new``."""
    def append(self, scores: _F32) -> None:
        """Appends ``(num_rows, q)`` float32 scores of ``q`` new tokens (Locret, external)."""
    def compact(self, keep_indptr: _IdArray, keep_positions: _IdArray) -> None:
        """Keeps only the CSR positions (one row per state row), as the cache does.

        Raises:
            InvalidPositionsError: positions unsorted, duplicated or out of range.
            ValueError: ``keep_indptr`` malformed or with the wrong number of rows.
        """
    def to_csr(self) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """``(indptr, values)``: every row's scores, concatenated."""
    def row(self, row: int) -> NDArray[np.float32]:
        """A copy of row ``row``'s scores."""

# ---------------------------------------------------------------------------------------------
# Quantized storage (kvcore_core::quant). The bit-exact format is in docs/layouts.md.

@final
class QuantLayout:
    """The low-precision format of one block of ``num_tokens x head_dim`` values.

    Asymmetric quantization with one scale and one zero point per group of ``group_size``
    elements. A block is one byte buffer: packed codes at offset 0 (code ``i`` in byte
    ``i * bits // 8``, least significant bits first), zero padding up to ``scales_offset``
    (a multiple of the metadata size), ``num_groups`` scales, then ``num_groups`` zero points
    at ``zeros_offset``, little-endian. ``nbytes`` is the exact size, metadata included.

    Args:
        bits: 2, 4 or 8.
        group_size: elements per group; must divide the grouped dimension and fill whole bytes
            (a multiple of 4 at 2 bits, of 2 at 4 bits).
        num_tokens: tokens per block.
        head_dim: channels per token.
        axis: ``"channel"``: groups of consecutive channels inside a token (per-token
            quantization, KIVI values); ``"token"``: groups of consecutive tokens inside a
            channel (per-channel quantization, KIVI keys).
        meta_dtype: ``"float16"`` or ``"float32"`` scale and zero point.

    Raises:
        ValueError: a bad layout, e.g. a group size that does not divide the dimension.
        TypeError: a size that is not an int.
    """

    def __new__(
        cls,
        bits: int,
        group_size: int,
        num_tokens: int,
        head_dim: int,
        axis: str = "channel",
        meta_dtype: str = "float16",
    ) -> QuantLayout: ...
    @property
    def bits(self) -> int:
        """Bits per code."""
    @property
    def group_size(self) -> int:
        """Elements per group."""
    @property
    def num_tokens(self) -> int:
        """Tokens per block."""
    @property
    def head_dim(self) -> int:
        """Channels per token."""
    @property
    def axis(self) -> str:
        """``"channel"`` or ``"token"``."""
    @property
    def meta_dtype(self) -> str:
        """``"float16"`` or ``"float32"``."""
    @property
    def num_groups(self) -> int:
        """Groups per block: ``num_tokens * head_dim // group_size``."""
    @property
    def codes_bytes(self) -> int:
        """Bytes of packed codes: ``num_tokens * head_dim * bits // 8``."""
    @property
    def scales_offset(self) -> int:
        """Byte offset of the scales."""
    @property
    def zeros_offset(self) -> int:
        """Byte offset of the zero points."""
    @property
    def nbytes(self) -> int:
        """Exact bytes of one block, metadata and padding included."""
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

def quantize(x: _FloatArray, layout: QuantLayout) -> NDArray[np.uint8]:
    """Quantizes blocks, with the GIL released.

    Per group: ``zero = M(min) + 0``, ``scale = M(max(max - zero, 0) / (2**bits - 1)) + 0`` where
    ``M`` rounds to the metadata dtype (ties to even); ``code = 0`` if ``scale == 0`` else
    ``round_half_even(clip((x - zero) / scale, 0, 2**bits - 1))``, all in float32.

    Args:
        x: ``(..., num_tokens, head_dim)`` float32, float16, or uint16 holding bfloat16 bits.

    Returns:
        ``(..., layout.nbytes)`` uint8, one block per leading index.

    Raises:
        ValueError: a NaN or infinite value, a group whose scale or zero point does not fit
            the metadata dtype, or a shape that does not end in ``(num_tokens, head_dim)``.
        TypeError: ``x`` is not a numpy array of a supported dtype.
    """

def dequantize(blocks: NDArray[np.uint8], layout: QuantLayout) -> NDArray[np.float32]:
    """Dequantizes blocks (``code * scale + zero`` in float32), with the GIL released.

    Args:
        blocks: ``(..., layout.nbytes)`` uint8, as returned by :func:`quantize`.

    Returns:
        ``(..., num_tokens, head_dim)`` float32.
    """

def kivi_nbytes(
    num_tokens: int,
    head_dim: int,
    bits: int = 2,
    group_size: int = 32,
    residual: int = 32,
    meta_dtype: str = "float16",
) -> int:
    """Exact bytes a :class:`KiviCache` of one head holds after ``num_tokens`` tokens:
    ``num_tokens // residual`` key blocks and ``max(num_tokens - residual, 0)`` value tokens
    quantized (metadata included), the rest as float16."""

@final
class KiviCache:
    """KIVI storage for one (layer, kv-head).

    Keys are quantized per channel (groups of ``group_size`` tokens, a whole block of
    ``residual`` tokens at a time, when the float16 key tail reaches ``residual`` tokens);
    values per token (groups of ``group_size`` channels), one token at a time, when the
    float16 FIFO of the last ``residual`` values overflows. Appended values are rounded to
    float16 first. Defaults from KIVI's ``example.py``: 2 bits, group 32, residual 32.

    Raises:
        ValueError: ``residual`` not a positive multiple of ``group_size``, or a bad layout.
    """

    def __new__(
        cls,
        head_dim: int,
        bits: int = 2,
        group_size: int = 32,
        residual: int = 32,
        meta_dtype: str = "float16",
    ) -> KiviCache: ...
    def append(self, keys: NDArray[np.float32], values: NDArray[np.float32]) -> None:
        """Appends tokens; ``keys`` and ``values`` are ``(n, head_dim)`` float32. On error
        (NaN/inf, a value beyond float16) nothing is appended."""
    def keys(self) -> NDArray[np.float32]:
        """All keys, dequantized: ``(num_tokens, head_dim)`` float32."""
    def values(self) -> NDArray[np.float32]:
        """All values, dequantized: ``(num_tokens, head_dim)`` float32."""
    @property
    def nbytes(self) -> int:
        """Exact bytes held (quantized blocks with metadata plus the float16 windows)."""
    @property
    def num_tokens(self) -> int:
        """Tokens appended."""
    @property
    def num_quantized_keys(self) -> int:
        """Keys held quantized (a multiple of ``residual``)."""
    @property
    def num_quantized_values(self) -> int:
        """Values held quantized."""
    @property
    def key_layout(self) -> QuantLayout:
        """Layout of one key block: ``(residual, head_dim)``, axis ``"token"``."""
    @property
    def value_layout(self) -> QuantLayout:
        """Layout of one value token: ``(1, head_dim)``, axis ``"channel"``."""

@final
class MixedPrecisionStore:
    """MiKV-style mixed precision for one (layer, kv-head): each token is held in a tier
    (``"float16"``, ``"int8"``, ``"int4"``, ``"int2"``; per-token groups of ``group_size``
    channels) and can be demoted later instead of being evicted. A demotion re-quantizes the
    current reconstruction, so the error is at most the sum of the half-scales of the tiers
    the token went through, plus metadata rounding.
    """

    def __new__(
        cls, head_dim: int, group_size: int = 32, meta_dtype: str = "float16"
    ) -> MixedPrecisionStore: ...
    def append(self, x: NDArray[np.float32], tier: str) -> None:
        """Appends ``(n, head_dim)`` float32 tokens in ``tier``."""
    def demote(self, positions: _IdArray, tier: str) -> None:
        """Moves the tokens at ``positions`` to the less precise ``tier``.

        Raises:
            ValueError: a position out of range or a promotion (nothing changes then).
        """
    def read(self) -> NDArray[np.float32]:
        """Every token reconstructed: ``(num_tokens, head_dim)`` float32."""
    def tiers(self) -> list[str]:
        """The tier of every token."""
    def token_nbytes(self, tier: str) -> int:
        """Bytes one token takes in ``tier``, metadata included."""
    @property
    def nbytes(self) -> int:
        """Exact bytes held by the token data."""
    @property
    def num_tokens(self) -> int:
        """Tokens held."""

# ---------------------------------------------------------------------------------------------
# Merge bookkeeping (kvcore_core::merge). Inputs are host arrays for one (layer, kv-head).

@final
class MergePlan:
    """A merge plan over the ``num_slots`` slots of one (layer, kv-head) stream.

    Entries ``(src[i], dst[i], weight[i])``: applying the plan sets
    ``x'[d] = sum(weight[i] * x[src[i]] for entries with dst[i] == d)`` for every destination
    ``d``; other slots keep their rows. A slot that is a source but never a destination, or is
    listed in ``evicted`` (the zero class), is removed: ``kept_positions()`` lists the
    survivors in order, ready for the allocator's order-preserving compaction.

    Raises:
        ValueError: mismatched lengths, a slot out of range, a negative or non-finite weight,
            or a slot that is both evicted and a destination.
    """

    def __new__(
        cls,
        num_slots: int,
        src: _IdArray,
        dst: _IdArray,
        weight: NDArray[np.float32],
        evicted: _IdArray | None = None,
    ) -> MergePlan: ...
    @property
    def num_slots(self) -> int:
        """Slots the plan is over."""
    @property
    def src(self) -> NDArray[np.int64]:
        """Source slot of each entry."""
    @property
    def dst(self) -> NDArray[np.int64]:
        """Destination slot of each entry."""
    @property
    def weight(self) -> NDArray[np.float32]:
        """Coefficient of each entry."""
    @property
    def evicted(self) -> NDArray[np.int64]:
        """Slots dropped without merging (zero class), increasing."""
    def kept_positions(self) -> NDArray[np.int64]:
        """Surviving slots, increasing."""
    def apply(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """Applies the plan to ``(num_slots, dim)`` float32 rows (float32 sums in entry order);
        returns new ``(num_slots, dim)`` rows. Compact them with ``kept_positions()``."""
    def __len__(self) -> int:
        """Number of entries."""

@final
class MergeBook:
    """Per-slot mass (original tokens a slot stands for; 1 at first) of one stream, kept in
    step with merge plans and compaction. A removed slot hands its mass to its destinations in
    proportion to the entry weights; an evicted slot's mass goes to ``evicted_mass``, so
    ``total_mass + evicted_mass`` never changes."""

    def __new__(cls, num_slots: int) -> MergeBook: ...
    def apply(self, plan: MergePlan) -> NDArray[np.int64]:
        """Moves mass as ``plan`` moves rows and compacts; returns the kept positions."""
    def compact(self, positions: _IdArray) -> None:
        """Keeps only ``positions`` (strictly increasing); the rest counts as evicted.

        Raises:
            InvalidPositionsError: unsorted, duplicated or out-of-range positions.
        """
    def extend(self, n: int) -> None:
        """Appends ``n`` new slots of mass 1."""
    @property
    def mass(self) -> NDArray[np.float64]:
        """Mass of every slot."""
    @property
    def evicted_mass(self) -> float:
        """Mass that left through evictions."""
    @property
    def total_mass(self) -> float:
        """Sum of the slots' mass."""
    @property
    def num_slots(self) -> int:
        """Slots."""
    def log_count_bias(self) -> NDArray[np.float32]:
        """``ln(mass)`` per slot, float32: added to a slot's attention logit, a merged slot
        weighs as much as the tokens it replaced (RazorAttention's ``N_d`` weighting)."""

def kvmerger_plan(
    keys: NDArray[np.float32],
    attn: NDArray[np.float32],
    eps: float,
    sigma: float | None = None,
    mergeable: int | None = None,
) -> MergePlan:
    """KVMerger: maximal runs of consecutive tokens (below ``mergeable``) whose adjacent keys
    have cosine >= ``eps`` merge into their pivot, the most attended token (first on ties),
    with Gaussian weights ``exp(-|k_p - k_i|^2 / (2 sigma^2))`` normalised to 1.

    Args:
        keys: ``(num_tokens, head_dim)`` float32.
        attn: ``(num_tokens,)`` float32 accumulated attention, non-negative.
        eps: cosine threshold.
        sigma: kernel width; None uses the RMS distance of the set to its pivot
            (**unverified** default).
        mergeable: tokens from this index on are never merged (the recent window).
    """

def ems_plan(
    keys: NDArray[np.float32], attn: NDArray[np.float32], retained: _IdArray, threshold: float
) -> MergePlan:
    """EMS evict-then-merge: every token outside ``retained`` (increasing positions) merges
    into the retained token with the most similar key (cosine) if it is >= ``threshold``,
    else it is evicted (zero class). A center becomes the attention-weighted mean of itself
    and its members. **Unverified** weighting and threshold rule (no official code)."""

def razor_plan(num_tokens: int, sink: int = 4, local_capacity: int = 256) -> MergePlan:
    """RazorAttention compensation token for one non-retrieval head: keep ``sink`` tokens and
    the last ``local_capacity - sink - 1``; the tokens between become their plain mean (keys
    and values alike) in the slot of the first of them. Empty while
    ``num_tokens <= local_capacity``. Defaults from golden-stick ``RAConfig``. Retrieval heads
    keep everything: do not call this for them."""

def cam_plan(
    attn: NDArray[np.float32], evicted: _IdArray, draws: NDArray[np.float32], window: int
) -> MergePlan:
    """CaM (one-shot form, **unverified** simplification of the sliding port): evicted token
    ``e`` is merged with probability ``clip(attn[e] / max(attn[kept]), 0, 1)`` (merged when
    ``draws[i] < p``) into the next ``window`` kept tokens, each adding ``V[e] / r``. Apply
    the plan to values only; keys are just compacted with ``kept_positions()``."""

@final
class MiniCachePair:
    """One merged pair of adjacent layers of one kv-head (see :func:`minicache_merge`)."""

    @property
    def direction(self) -> NDArray[np.float32]:
        """Shared unit directions, ``(num_tokens, head_dim)``."""
    @property
    def mag_a(self) -> NDArray[np.float32]:
        """Per-token norms of layer a."""
    @property
    def mag_b(self) -> NDArray[np.float32]:
        """Per-token norms of layer b."""
    @property
    def angle(self) -> NDArray[np.float32]:
        """Angle between the two layers' directions, per token (radians)."""
    @property
    def retained(self) -> NDArray[np.int64]:
        """Tokens kept verbatim (the largest angles), increasing."""
    @property
    def num_stored_elements(self) -> int:
        """Elements stored instead of ``2 * num_tokens * head_dim``."""
    def restore(self, which: int) -> NDArray[np.float32]:
        """Layer a (``which=0``) or b (``1``): ``direction * magnitude``, then the retained
        rows verbatim. Error per non-retained token <= ``mag * t * angle`` (a) or
        ``mag * (1 - t) * angle`` (b)."""

def minicache_merge(
    a: NDArray[np.float32], b: NDArray[np.float32], t: float = 0.6, retention_ratio: float = 0.05
) -> MiniCachePair:
    """MiniCache: SLERP (``t`` towards ``b``) of the per-token directions of layers ``a``
    (l-1) and ``b`` (l), both ``(num_tokens, head_dim)`` float32, keeping each layer's norms
    and the ``ceil(retention_ratio * num_tokens)`` most distinct tokens verbatim."""

def minicache_layer_pairs(num_layers: int, start: int | None = None) -> list[tuple[int, int]]:
    """Adjacent pairs ``(l, l+1)`` from ``start`` (default ``num_layers // 2``, the deeper
    half; **unverified**) in steps of 2."""
