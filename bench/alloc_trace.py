"""A recorded, realistic allocator trace: generation, storage and replay.

The trace is what a continuous-batching serving engine asks of its KV block allocator while
it serves ``num_requests`` requests arriving over time:

* admission, one wave per engine step (FIFO, at most ``max_batch`` running tables, and only
  while the wave's prompts fit above a watermark): ``create_tables`` for the wave,
  ``adopt_prefix_batch`` of the prompts minus their last token (many prompts start with one
  of a few system prompts, so prefix hits happen), one ``append_batch`` of the missed prompt
  tokens with their ids (prefill), which registers every full prompt block;
* parallel sampling: some requests ``fork`` their table into 2 or 4 samples after prefill;
* one decode step per engine step: ``append_batch`` of 1 token to every running table with
  the sampled token ids, which registers every block that fills (as vLLM caches full blocks
  as they fill); sampled ids come from a fixed pseudo-random stream;
* KV compression: some requests keep their tables under a token budget by ``compact``-ing
  them to half the budget (attention sinks + a recent window + a random subset of the rest);
* ``free`` when a sample finishes;
* preemption: when a decode step or a compaction raises OutOfBlocks, the most recently
  admitted other request is freed and re-queued (recompute), then the call is retried.

Every event is one allocator call. The replay (``Replayer``) folds a wave's three recorded
calls into the one call an engine makes, ``admit_batch`` over the wave's prompt CSR, which does
the same (the equivalence check compares it with the pure-Python allocator's). The engine
decisions that depend on the allocator (hits, OutOfBlocks) are taken once, at generation
time, by simulating against kvcore; the recorded events then replay identically on any
allocator with the same semantics (the replay checks that every recorded OutOfBlocks happens
again, and no other).

Storage: the events and per-request parameters go to a compressed ``.npz``; token contents
and keep positions are regenerated from the seed (a SHA-256 over everything is recorded, so a
changed RNG stream is detected instead of silently benchmarking another trace).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Event kinds. `a` and `b` are the two integer arguments of an event. A wave is the `b`
# handles a, a + 1, ..., a + b - 1 admitted together; handle_req names their requests.
DECODE = 0  # append_batch(running tables, 1, token_ids=the next sampled ids)
FREE = 1  # free(table of handle a)
CREATE = 2  # handles a .. a+b-1 = create_tables(b)
ADOPT = 3  # adopt_prefix_batch(the wave's tables, their prompts without the last token)
APPEND = 4  # append_batch(the wave's tables, missed prompt tokens, token_ids=those tokens)
FORK = 6  # handle b = fork(table a)
COMPACT = 7  # compact(table a, keep positions number b)
DECODE_OOB = 8  # like DECODE, recorded as raising OutOfBlocks
COMPACT_OOB = 9  # like COMPACT, recorded as raising OutOfBlocks

KIND_NAMES = {
    DECODE: "decode_step(append_batch+register)",
    FREE: "free",
    CREATE: "create_tables(wave)",
    ADOPT: "adopt_prefix_batch(wave)",
    APPEND: "prefill(append_batch+register, wave)",
    FORK: "fork",
    COMPACT: "compact",
    DECODE_OOB: "decode_step(OutOfBlocks)",
    COMPACT_OOB: "compact(OutOfBlocks)",
}

# The replay folds a wave's three recorded calls into one ``admit_batch`` at its CREATE
# event (the engine's admission step); these names are the replay's events.
FOLDED = (ADOPT, APPEND)
REPLAY_KIND_NAMES = {
    **{k: v for k, v in KIND_NAMES.items() if k not in FOLDED},
    CREATE: "admit_batch(wave)",
}

FORMAT_VERSION = 2
# Length of the stream of sampled token ids that decode steps read, wrapping around.
DECODE_POOL = 1 << 20


@dataclasses.dataclass(frozen=True)
class TraceParams:
    seed: int = 20260509
    num_requests: int = 100_000
    block_size: int = 16
    # Sized so the pool, not the batch limit, is what usually binds (see the JSON stats).
    num_blocks: int = 6144
    max_batch: int = 256
    # Requests per engine step; a little above the service rate, so a backlog builds and the
    # pool stays near full.
    arrival_rate: float = 1.6
    vocab: int = 32_000
    num_system_prompts: int = 32
    system_len_median: float = 384.0
    system_len_sigma: float = 0.6
    share_prob: float = 0.75
    user_len_median: float = 128.0
    user_len_sigma: float = 1.0
    max_user_len: int = 8192
    output_len_median: float = 96.0
    output_len_sigma: float = 0.9
    max_output_len: int = 4096
    fork_prob: float = 0.1
    compress_prob: float = 0.25
    budget: int = 1024
    keep: int = 512
    sinks: int = 4
    window: int = 128
    # Admission leaves this many blocks free for decode growth (vLLM's watermark).
    watermark: int = 64
    user_pool_size: int = 1 << 20

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Content:
    """Token ids of every prompt and keep positions of every compaction, from the seed."""

    system: list[np.ndarray]
    user_pool: np.ndarray
    # Sampled token ids: decode step after step reads the next len(batch) of them.
    decode_pool: np.ndarray

    def prompt(self, sys_id: int, user_off: int, user_len: int) -> np.ndarray:
        user = self.user_pool[user_off : user_off + user_len]
        if sys_id < 0:
            return user
        return np.concatenate((self.system[sys_id], user))


def make_content(p: TraceParams) -> Content:
    rng = np.random.default_rng([p.seed, 1])
    lens = np.clip(
        np.rint(
            rng.lognormal(np.log(p.system_len_median), p.system_len_sigma, p.num_system_prompts)
        ),
        32,
        4096,
    ).astype(np.int64)
    system = [rng.integers(0, p.vocab, int(n), dtype=np.int64) for n in lens]
    pool = rng.integers(0, p.vocab, p.user_pool_size, dtype=np.int64)
    decode = np.random.default_rng([p.seed, 4]).integers(0, p.vocab, DECODE_POOL, dtype=np.int64)
    return Content(system, pool, decode)


def next_decode_offset(off: int, n: int, max_batch: int) -> int:
    """Where the decode step after one of ``n`` tables at ``off`` reads its sampled ids."""
    off += n
    return 0 if off + max_batch > DECODE_POOL else off


def csr(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list of 1-D int64 arrays."""
    indptr = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in parts], out=indptr[1:])
    values = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return indptr, values


def keep_positions(rng: np.random.Generator, ntok: int, p: TraceParams) -> np.ndarray:
    """Sinks + recent window + a random subset of the middle, ``p.keep`` positions in all."""
    middle = ntok - p.sinks - p.window
    k = p.keep - p.sinks - p.window
    chosen = np.sort(rng.choice(middle, size=k, replace=False)) + p.sinks
    return np.concatenate(
        (
            np.arange(p.sinks, dtype=np.int64),
            chosen.astype(np.int64),
            np.arange(ntok - p.window, ntok, dtype=np.int64),
        )
    )


@dataclasses.dataclass
class Trace:
    params: TraceParams
    kinds: np.ndarray  # int8
    a: np.ndarray  # int32
    b: np.ndarray  # int32
    req_sys: np.ndarray  # int16, -1: no system prompt
    req_user_off: np.ndarray  # int32
    req_user_len: np.ndarray  # int32
    compact_ntok: np.ndarray  # int32: table length at each compaction, in event order
    handle_req: np.ndarray  # int32: the request of each handle a wave created (-1: a fork)
    handle_hit: np.ndarray  # int32: prompt tokens each wave handle hit in the prefix cache
    num_handles: int
    stats: dict[str, Any]

    def digest(self, content: Content) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self.params.to_json(), sort_keys=True).encode())
        for arr in (
            self.kinds,
            self.a,
            self.b,
            self.req_sys,
            self.req_user_off,
            self.req_user_len,
            self.compact_ntok,
            self.handle_req,
            self.handle_hit,
            content.user_pool,
            content.decode_pool,
            *content.system,
        ):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def prefix(self, num_events: int) -> Trace:
        """The first ``num_events`` events: still a valid trace (events are causal)."""
        return dataclasses.replace(
            self, kinds=self.kinds[:num_events], a=self.a[:num_events], b=self.b[:num_events]
        )


# ----------------------------------------------------------------------------- generation


def generate(p: TraceParams, progress: Callable[[str], None] | None = None) -> Trace:
    """Simulates the engine against kvcore and records every allocator call."""
    import kvcore

    rng = np.random.default_rng([p.seed, 2])
    keep_rng = np.random.default_rng([p.seed, 3])
    content = make_content(p)
    n_req = p.num_requests

    arrival = np.floor(np.cumsum(rng.exponential(1.0 / p.arrival_rate, n_req))).astype(np.int64)
    weights = 1.0 / np.arange(1, p.num_system_prompts + 1)
    sys_choice = rng.choice(p.num_system_prompts, size=n_req, p=weights / weights.sum())
    req_sys = np.where(rng.random(n_req) < p.share_prob, sys_choice, -1).astype(np.int16)
    user_len = np.clip(
        np.rint(rng.lognormal(np.log(p.user_len_median), p.user_len_sigma, n_req)),
        4,
        p.max_user_len,
    ).astype(np.int32)
    user_off = rng.integers(0, p.user_pool_size - user_len).astype(np.int32)
    n_samples = np.where(rng.random(n_req) < p.fork_prob, rng.choice([2, 4], n_req), 1)
    out_len = np.clip(
        np.rint(rng.lognormal(np.log(p.output_len_median), p.output_len_sigma, (n_req, 4))),
        1,
        p.max_output_len,
    ).astype(np.int64)
    compress = rng.random(n_req) < p.compress_prob
    sys_len = [len(s) for s in content.system]
    prompt_len = user_len.astype(np.int64) + np.where(
        req_sys >= 0, np.array(sys_len)[np.maximum(req_sys, 0)], 0
    )

    alloc = kvcore.BlockAllocator(p.num_blocks, p.block_size)
    oob = kvcore.OutOfBlocksError
    bs = p.block_size
    kinds: list[int] = []
    ev_a: list[int] = []
    ev_b: list[int] = []
    compact_ntok: list[int] = []
    handle_req: list[int] = []
    handle_hit: list[int] = []
    dec_off = 0
    waves = 0

    # Engine state, kept exactly as the replay keeps it: the running batch is an array with
    # append on create/fork and swap-remove on free.
    run_tid = np.zeros(p.max_batch, dtype=np.int64)
    run_handle = [0] * p.max_batch
    nrun = 0
    pos: list[int] = []
    tid: list[int] = []
    h_req: list[int] = []
    h_ntok: list[int] = []
    h_left: list[int] = []  # decode tokens still to generate
    h_alive: list[bool] = []
    live_reqs: dict[int, list[int]] = {}  # admission order: the last one is preempted first
    waiting: deque[int] = deque()
    next_arrival = 0
    done = 0
    step = 0
    usage_sum = 0.0
    occupied_sum = 0.0
    running_sum = 0
    decode_steps = 0
    hit_tokens = 0
    prompt_tokens = 0
    preemptions = 0

    def emit(kind: int, a: int = 0, b: int = 0) -> None:
        kinds.append(kind)
        ev_a.append(a)
        ev_b.append(b)

    def new_handle(t: int, r: int, ntok: int, left: int) -> int:
        nonlocal nrun
        h = len(tid)
        tid.append(t)
        handle_req.append(-1)
        handle_hit.append(0)
        h_req.append(r)
        h_ntok.append(ntok)
        h_left.append(left)
        h_alive.append(True)
        pos.append(nrun)
        run_tid[nrun] = t
        run_handle[nrun] = h
        nrun += 1
        return h

    def free_handle(h: int) -> None:
        nonlocal nrun
        alloc.free(tid[h])
        emit(FREE, h)
        h_alive[h] = False
        i = pos[h]
        nrun -= 1
        last = run_handle[nrun]
        run_tid[i] = run_tid[nrun]
        run_handle[i] = last
        pos[last] = i

    def preempt_one(exclude: int) -> bool:
        nonlocal preemptions
        for r in reversed(live_reqs):
            if r != exclude:
                break
        else:
            return False
        for h in live_reqs.pop(r):
            if h_alive[h]:
                free_handle(h)
        waiting.appendleft(r)
        preemptions += 1
        return True

    def compact(h: int) -> None:
        ntok = h_ntok[h]
        keep = keep_positions(keep_rng, ntok, p)
        c = len(compact_ntok)
        compact_ntok.append(ntok)
        while True:
            try:
                alloc.compact(tid[h], keep)
            except oob:
                emit(COMPACT_OOB, h, c)
                if not preempt_one(h_req[h]):
                    raise RuntimeError("compaction cannot fit even alone") from None
                continue
            emit(COMPACT, h, c)
            h_ntok[h] = p.keep
            return

    def admit(wave: list[int]) -> None:
        """One admission wave: create, adopt and prefill (registering) in one call each,
        then per request the compaction of a long prompt and the forks of its samples."""
        nonlocal hit_tokens, prompt_tokens, waves
        waves += 1
        k = len(wave)
        ts = alloc.create_tables(k)
        first = len(tid)
        for t, r in zip(ts.tolist(), wave, strict=True):
            h = new_handle(t, r, 0, int(out_len[r, 0]))
            handle_req[h] = r
            live_reqs[r] = [h]
        emit(CREATE, first, k)
        prompts = [
            content.prompt(int(req_sys[r]), int(user_off[r]), int(user_len[r])) for r in wave
        ]
        hits = alloc.adopt_prefix_batch(ts, *csr([x[:-1] for x in prompts]))
        emit(ADOPT, first, k)
        counts, rest = csr([x[hit:] for x, hit in zip(prompts, hits.tolist(), strict=True)])
        try:
            alloc.append_batch(ts, np.diff(counts), token_ids=rest)
        except oob:
            raise RuntimeError("admission let in a wave that does not fit") from None
        emit(APPEND, first, k)
        for i, (x, hit) in enumerate(zip(prompts, hits.tolist(), strict=True)):
            h = first + i
            handle_hit[h] = hit
            h_ntok[h] = len(x)
            hit_tokens += hit
            prompt_tokens += len(x)
        for i, r in enumerate(wave):
            h = first + i
            if r not in live_reqs:
                continue  # preempted by the compaction of an earlier request of the wave
            if compress[r] and h_ntok[h] > p.budget:
                compact(h)
            for s in range(1, int(n_samples[r])):
                child = new_handle(alloc.fork(tid[h]), r, h_ntok[h], int(out_len[r, s]))
                emit(FORK, h, child)
                live_reqs[r].append(child)

    while done < n_req:
        while next_arrival < n_req and arrival[next_arrival] <= step:
            waiting.append(next_arrival)
            next_arrival += 1
        wave: list[int] = []
        avail = alloc.num_available_blocks
        seats = p.max_batch - nrun
        while waiting:
            r = waiting[0]
            if int(n_samples[r]) > seats:
                break
            need = -(-int(prompt_len[r]) // bs)
            if avail - need < p.watermark:
                break
            waiting.popleft()
            wave.append(r)
            avail -= need
            seats -= int(n_samples[r])
        if wave:
            admit(wave)
        if nrun == 0:
            if waiting:
                raise RuntimeError("a request cannot be admitted into an empty pool")
            step = int(arrival[next_arrival])
            continue

        while True:
            try:
                alloc.append_batch(
                    run_tid[:nrun], 1, token_ids=content.decode_pool[dec_off : dec_off + nrun]
                )
            except oob:
                emit(DECODE_OOB)
                if not preempt_one(-1):
                    raise RuntimeError("one decode step does not fit an empty pool") from None
                continue
            emit(DECODE)
            dec_off = next_decode_offset(dec_off, nrun, p.max_batch)
            break
        decode_steps += 1
        running_sum += nrun
        usage_sum += alloc.usage
        occupied_sum += 1.0 - alloc.num_free_blocks / (p.num_blocks - 1)

        for h in run_handle[:nrun]:
            if not h_alive[h]:
                continue  # preempted by a compaction earlier in this loop
            h_ntok[h] += 1
            h_left[h] -= 1
            r = h_req[h]
            if h_left[h] == 0:
                free_handle(h)
                hs = live_reqs[r]
                hs.remove(h)
                if not hs:
                    del live_reqs[r]
                    done += 1
            elif compress[r] and h_ntok[h] >= p.budget:
                compact(h)
        step += 1
        if progress is not None and step % 10_000 == 0:
            progress(f"  generating: step {step}, {done}/{n_req} requests done")

    kinds_arr = np.array(kinds, dtype=np.int8)
    counts = {KIND_NAMES[k]: int((kinds_arr == k).sum()) for k in KIND_NAMES}
    stats = {
        "num_events": len(kinds),
        "events_by_kind": counts,
        "engine_steps": step,
        "decode_steps": decode_steps,
        "mean_running_tables": running_sum / decode_steps,
        # Referenced blocks, and referenced or cached (cached ones are reclaimable).
        "mean_usage": usage_sum / decode_steps,
        "mean_used_or_cached": occupied_sum / decode_steps,
        "prompt_tokens": prompt_tokens,
        "prefix_hit_tokens": hit_tokens,
        "prefix_hit_rate": hit_tokens / prompt_tokens,
        "decode_tokens": int(running_sum),
        "preemptions": preemptions,
        "num_tables": len(tid),
        "admission_waves": waves,
        "mean_wave_size": sum(r >= 0 for r in handle_req) / max(waves, 1),
    }
    return Trace(
        params=p,
        kinds=kinds_arr,
        a=np.array(ev_a, dtype=np.int32),
        b=np.array(ev_b, dtype=np.int32),
        req_sys=req_sys,
        req_user_off=user_off,
        req_user_len=user_len,
        compact_ntok=np.array(compact_ntok, dtype=np.int32),
        handle_req=np.array(handle_req, dtype=np.int32),
        handle_hit=np.array(handle_hit, dtype=np.int32),
        num_handles=len(tid),
        stats=stats,
    )


def save(trace: Trace, path: Path, digest: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "params": trace.params.to_json(),
        "num_handles": trace.num_handles,
        "stats": trace.stats,
        "sha256": digest,
    }
    np.savez_compressed(
        path,
        meta=np.array(json.dumps(meta)),
        kinds=trace.kinds,
        a=trace.a,
        b=trace.b,
        req_sys=trace.req_sys,
        req_user_off=trace.req_user_off,
        req_user_len=trace.req_user_len,
        compact_ntok=trace.compact_ntok,
        handle_req=trace.handle_req,
        handle_hit=trace.handle_hit,
    )


def load(path: Path, p: TraceParams) -> tuple[Trace, Content] | None:
    """The stored trace if it was recorded with ``p`` and its content still hashes the same."""
    if not path.exists():
        return None
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format_version") != FORMAT_VERSION or meta["params"] != p.to_json():
            return None
        trace = Trace(
            params=p,
            kinds=z["kinds"],
            a=z["a"],
            b=z["b"],
            req_sys=z["req_sys"],
            req_user_off=z["req_user_off"],
            req_user_len=z["req_user_len"],
            compact_ntok=z["compact_ntok"],
            handle_req=z["handle_req"],
            handle_hit=z["handle_hit"],
            num_handles=int(meta["num_handles"]),
            stats=meta["stats"],
        )
    content = make_content(p)
    if trace.digest(content) != meta["sha256"]:
        return None
    return trace, content


def load_or_generate(
    path: Path | None, p: TraceParams, progress: Callable[[str], None] | None = None
) -> tuple[Trace, Content, str, bool]:
    """Returns (trace, content, sha256, whether it was freshly generated)."""
    if path is not None:
        got = load(path, p)
        if got is not None:
            trace, content = got
            return trace, content, trace.digest(content), False
    trace = generate(p, progress)
    content = make_content(p)
    digest = trace.digest(content)
    if path is not None:
        save(trace, path, digest)
    return trace, content, digest, True


# ----------------------------------------------------------------------------- replay


@dataclasses.dataclass
class ReplayInputs:
    """Everything a replay needs besides the per-wave token arrays (see ``Replayer``)."""

    kinds: list[int]
    a: list[int]
    b: list[int]
    keeps: list[np.ndarray]
    prompt: Callable[[int], np.ndarray]
    handle_req: list[int]
    handle_hit: list[int]
    decode_pool: np.ndarray
    num_handles: int
    max_batch: int


def prepare(trace: Trace, content: Content) -> ReplayInputs:
    p = trace.params
    keep_rng = np.random.default_rng([p.seed, 3])
    # Same draws in the same order as generation.
    keeps = [keep_positions(keep_rng, int(n), p) for n in trace.compact_ntok]
    req_sys = trace.req_sys.tolist()
    off = trace.req_user_off.tolist()
    ulen = trace.req_user_len.tolist()

    def prompt(r: int) -> np.ndarray:
        return content.prompt(req_sys[r], off[r], ulen[r])

    # One event per allocator call of the replay: a wave's adoption and prefill are part of
    # its admit_batch call (at its CREATE event).
    kept = ~np.isin(trace.kinds, FOLDED)
    return ReplayInputs(
        kinds=trace.kinds[kept].tolist(),
        a=trace.a[kept].tolist(),
        b=trace.b[kept].tolist(),
        keeps=keeps,
        prompt=prompt,
        handle_req=trace.handle_req.tolist(),
        handle_hit=trace.handle_hit.tolist(),
        decode_pool=content.decode_pool,
        num_handles=trace.num_handles,
        max_batch=p.max_batch,
    )


def wave_prompts(inp: ReplayInputs, first: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What an engine holds for an admission wave before it calls the allocator: the CSR
    (indptr, token ids) of the wave's prompts."""
    return csr([inp.prompt(inp.handle_req[h]) for h in range(first, first + k)])


class Replayer:
    """Replays a trace on one allocator, a chunk of events at a time.

    The token arrays an engine already holds when it calls the allocator (a wave's prompt
    CSR, the sampled ids of a decode step) are built per chunk outside
    the timed region, in the side's natural container: numpy arrays for kvcore, lists for the
    pure-Python allocator. The engine's own bookkeeping (handle -> table id, the running
    batch) is the same code for both sides and is timed.
    """

    CHUNK = 4096

    def __init__(self, alloc: Any, inp: ReplayInputs, oob: type[BaseException], numpy_side: bool):
        self.alloc = alloc
        self.inp = inp
        self.oob = oob
        self.numpy_side = numpy_side
        self.tid = [0] * inp.num_handles
        self.pos = [0] * inp.num_handles
        self.run: Any = (
            np.zeros(inp.max_batch, dtype=np.int64) if numpy_side else [0] * inp.max_batch
        )
        self.run_handle = [0] * inp.max_batch
        self.n = 0
        self.dec_off = 0
        self.decode_pool: Any = inp.decode_pool if numpy_side else inp.decode_pool.tolist()
        self.hits: list[Any] = []

    def _side(self, x: np.ndarray) -> Any:
        return x if self.numpy_side else x.tolist()

    def chunk_inputs(self, start: int, stop: int) -> list[Any]:
        """Per-event arguments of events ``start..stop`` (None where an event needs none)."""
        inp = self.inp
        args: list[Any] = [None] * (stop - start)
        for i in range(start, stop):
            if inp.kinds[i] == CREATE:
                ip, toks = wave_prompts(inp, inp.a[i], inp.b[i])
                args[i - start] = (self._side(ip), self._side(toks))
        return args

    def run_chunk(
        self, start: int, stop: int, args: list[Any], kind_ns: list[int] | None = None
    ) -> None:
        inp = self.inp
        alloc = self.alloc
        oob = self.oob
        tid = self.tid
        pos = self.pos
        run = self.run
        run_handle = self.run_handle
        n = self.n
        dec_off = self.dec_off
        pool = self.decode_pool
        max_batch = inp.max_batch
        numpy_side = self.numpy_side
        keeps = inp.keeps
        hits_out = self.hits
        append_batch = alloc.append_batch
        admit_batch = alloc.admit_batch
        free = alloc.free
        # Per-kind breakdown: CPU time of this thread, like the whole-trace figure.
        clock = time.thread_time_ns
        t0 = 0
        for i in range(start, stop):
            k = inp.kinds[i]
            a = inp.a[i]
            b = inp.b[i]
            if kind_ns is not None:
                t0 = clock()
            if k == DECODE:
                append_batch(run[:n], 1, token_ids=pool[dec_off : dec_off + n])
                dec_off += n
                if dec_off + max_batch > DECODE_POOL:
                    dec_off = 0
            elif k == FREE:
                free(tid[a])
                j = pos[a]
                n -= 1
                last = run_handle[n]
                run[j] = run[n]
                run_handle[j] = last
                pos[last] = j
            elif k == CREATE:
                # An admission wave in one call: new tables, their cached prefixes, the
                # prefill's slots (registering the full prompt blocks).
                ip, toks = args[i - start]
                wave, hits, _, _ = admit_batch(ip, toks)
                hits_out.append(hits)
                for h, t in enumerate(wave.tolist() if numpy_side else wave, a):
                    tid[h] = t
                    run[n] = t
                    run_handle[n] = h
                    pos[h] = n
                    n += 1
            elif k == FORK:
                t = alloc.fork(tid[a])
                tid[b] = t
                run[n] = t
                run_handle[n] = b
                pos[b] = n
                n += 1
            elif k == COMPACT:
                alloc.compact(tid[a], keeps[b])
            elif k == DECODE_OOB:
                try:
                    append_batch(run[:n], 1, token_ids=pool[dec_off : dec_off + n])
                except oob:
                    pass
                else:
                    raise RuntimeError("replay diverged: a recorded OutOfBlocks did not happen")
            elif k == COMPACT_OOB:
                try:
                    alloc.compact(tid[a], keeps[b])
                except oob:
                    pass
                else:
                    raise RuntimeError("replay diverged: a recorded OutOfBlocks did not happen")
            else:
                raise ValueError(f"unknown event kind {k}")
            if kind_ns is not None:
                kind_ns[k] += clock() - t0
        self.n = n
        self.dec_off = dec_off

    def check_hits(self) -> None:
        """Every wave hit what the recorded trace says (checked after the timed replay)."""
        got = [int(x) for h in self.hits for x in h]
        want = [x for x, r in zip(self.inp.handle_hit, self.inp.handle_req, strict=True) if r >= 0]
        if got != want[: len(got)]:
            raise RuntimeError("replay diverged: prefix hits differ from the recorded ones")


def replay(
    alloc: Any,
    inp: ReplayInputs,
    oob: type[BaseException],
    numpy_side: bool,
    kind_ns: list[int] | None = None,
) -> tuple[float, float]:
    """Runs every event on ``alloc``; returns the (wall, CPU) seconds spent in the timed
    chunks: the allocator calls and the engine bookkeeping, not the input preparation. CPU
    time (``time.process_time``) leaves out the time the process waited for a core, which
    dominates wall time on a shared, overloaded machine."""
    r = Replayer(alloc, inp, oob, numpy_side)
    wall = cpu = 0.0
    num = len(inp.kinds)
    for start in range(0, num, Replayer.CHUNK):
        stop = min(num, start + Replayer.CHUNK)
        args = r.chunk_inputs(start, stop)
        t0, c0 = time.perf_counter(), time.process_time()
        r.run_chunk(start, stop, args, kind_ns)
        cpu += time.process_time() - c0
        wall += time.perf_counter() - t0
    r.check_hits()
    return wall, cpu
