"""A recorded, realistic allocator trace: generation, storage and replay.

The trace is what a continuous-batching serving engine asks of its KV block allocator while
it serves ``num_requests`` requests arriving over time:

* admission (FIFO, at most ``max_batch`` running tables, and only if the prompt fits above a
  watermark): ``create_table``, ``adopt_prefix`` of the prompt minus its last token (many
  prompts start with one of a few system prompts, so prefix hits happen), ``append`` of the
  rest of the prompt (prefill), ``register_prefix`` of the prompt;
* parallel sampling: some requests ``fork`` their table into 2 or 4 samples after prefill;
* one decode step per engine step: ``append_batch`` of 1 token to every running table;
* KV compression: some requests keep their tables under a token budget by ``compact``-ing
  them to half the budget (attention sinks + a recent window + a random subset of the rest);
* ``free`` when a sample finishes;
* preemption: when a decode step or a compaction raises OutOfBlocks, the most recently
  admitted other request is freed and re-queued (recompute), then the call is retried.

Every event is one allocator call. The engine decisions that depend on the allocator (hits,
OutOfBlocks) are taken once, at generation time, by simulating against kvcore; the recorded
events then replay identically on any allocator with the same semantics (the replay checks
that every recorded OutOfBlocks happens again, and no other).

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

# Event kinds. `a` and `b` are the two integer arguments of an event.
DECODE = 0  # append_batch(running tables, 1)
FREE = 1  # free(table of handle a)
CREATE = 2  # handle a = create_table()
ADOPT = 3  # adopt_prefix(table a, prompt of request b without its last token)
APPEND = 4  # append(table a, b)   (prefill of the prompt minus the hit)
REGISTER = 5  # register_prefix(table a, prompt of request b)
FORK = 6  # handle b = fork(table a)
COMPACT = 7  # compact(table a, keep positions number b)
DECODE_OOB = 8  # like DECODE, recorded as raising OutOfBlocks
COMPACT_OOB = 9  # like COMPACT, recorded as raising OutOfBlocks

KIND_NAMES = {
    DECODE: "decode_step(append_batch)",
    FREE: "free",
    CREATE: "create_table",
    ADOPT: "adopt_prefix",
    APPEND: "append(prefill)",
    REGISTER: "register_prefix",
    FORK: "fork",
    COMPACT: "compact",
    DECODE_OOB: "decode_step(OutOfBlocks)",
    COMPACT_OOB: "compact(OutOfBlocks)",
}

FORMAT_VERSION = 1


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
    return Content(system, pool)


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
            content.user_pool,
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

    def admit(r: int) -> None:
        nonlocal hit_tokens, prompt_tokens
        toks = content.prompt(int(req_sys[r]), int(user_off[r]), int(user_len[r]))
        plen = len(toks)
        t = alloc.create_table()
        h = new_handle(t, r, 0, int(out_len[r, 0]))
        emit(CREATE, h)
        hit = alloc.adopt_prefix(t, toks[:-1])
        emit(ADOPT, h, r)
        alloc.append(t, plen - hit)
        emit(APPEND, h, plen - hit)
        alloc.register_prefix(t, toks)
        emit(REGISTER, h, r)
        h_ntok[h] = plen
        hit_tokens += hit
        prompt_tokens += plen
        live_reqs[r] = [h]
        if compress[r] and plen > p.budget:
            compact(h)
        for s in range(1, int(n_samples[r])):
            child = new_handle(alloc.fork(t), r, h_ntok[h], int(out_len[r, s]))
            emit(FORK, h, child)
            live_reqs[r].append(child)

    while done < n_req:
        while next_arrival < n_req and arrival[next_arrival] <= step:
            waiting.append(next_arrival)
            next_arrival += 1
        while waiting:
            r = waiting[0]
            if nrun + int(n_samples[r]) > p.max_batch:
                break
            need = -(-int(prompt_len[r]) // bs)
            if alloc.num_available_blocks - need < p.watermark:
                break
            waiting.popleft()
            admit(r)
        if nrun == 0:
            if waiting:
                raise RuntimeError("a request cannot be admitted into an empty pool")
            step = int(arrival[next_arrival])
            continue

        while True:
            try:
                alloc.append_batch(run_tid[:nrun], 1)
            except oob:
                emit(DECODE_OOB)
                if not preempt_one(-1):
                    raise RuntimeError("one decode step does not fit an empty pool") from None
                continue
            emit(DECODE)
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
    """Everything a replay needs, prepared outside the timed region."""

    kinds: list[int]
    a: list[int]
    b: list[int]
    keeps: list[np.ndarray]
    prompt: Callable[[int], np.ndarray]
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

    return ReplayInputs(
        kinds=trace.kinds.tolist(),
        a=trace.a.tolist(),
        b=trace.b.tolist(),
        keeps=keeps,
        prompt=prompt,
        num_handles=trace.num_handles,
        max_batch=p.max_batch,
    )


def replay(
    alloc: Any,
    inp: ReplayInputs,
    oob: type[BaseException],
    numpy_batch: bool,
    kind_ns: list[int] | None = None,
) -> int:
    """Runs every event on ``alloc``; returns the number of events.

    The engine-side bookkeeping (handle -> table id, the running batch) is the same for both
    allocators; only the container of the running batch differs: a numpy int64 array for
    kvcore, a list for the pure-Python allocator (each side gets its natural input).
    """
    tid = [0] * inp.num_handles
    pos = [0] * inp.num_handles
    run: Any = np.zeros(inp.max_batch, dtype=np.int64) if numpy_batch else [0] * inp.max_batch
    run_handle = [0] * inp.max_batch
    n = 0
    keeps = inp.keeps
    prompt = inp.prompt
    tokens = prompt(0)
    tokens_req = -1
    append_batch = alloc.append_batch
    free = alloc.free
    clock = time.perf_counter_ns
    t0 = 0
    for k, a, b in zip(inp.kinds, inp.a, inp.b, strict=True):
        if kind_ns is not None:
            t0 = clock()
        if k == DECODE:
            append_batch(run[:n], 1)
        elif k == FREE:
            free(tid[a])
            i = pos[a]
            n -= 1
            last = run_handle[n]
            run[i] = run[n]
            run_handle[i] = last
            pos[last] = i
        elif k == CREATE:
            t = alloc.create_table()
            tid[a] = t
            run[n] = t
            run_handle[n] = a
            pos[a] = n
            n += 1
        elif k == ADOPT:
            tokens = prompt(b)
            tokens_req = b
            alloc.adopt_prefix(tid[a], tokens[:-1])
        elif k == APPEND:
            alloc.append(tid[a], b)
        elif k == REGISTER:
            if b != tokens_req:
                tokens = prompt(b)
                tokens_req = b
            alloc.register_prefix(tid[a], tokens)
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
                append_batch(run[:n], 1)
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
    return len(inp.kinds)
