"""Proves the pure-Python baseline behaves exactly like kvcore, so the speed comparison is
between two implementations of the same thing.

Two checks, both in lock step (every call goes to both allocators and the results must be
identical, including table ids, the free queue order and every ref count):

* ``check_trace``: a short trace from the same generator as the benchmark's;
* ``check_fuzz``: random operations on a tiny pool, which reach the corners a trace rarely
  does (copy-on-write of multi-token appends, compaction of shared tables, masks, prefix
  registration after compaction, reset of the prefix cache, errors).
"""

from __future__ import annotations

import random
from typing import Any

import alloc_trace as tr
import numpy as np
from pyalloc import OutOfBlocks, PyBlockAllocator

import kvcore


class Mismatch(AssertionError):
    pass


def _same(what: str, kv: Any, py: Any) -> None:
    if isinstance(kv, np.ndarray) or isinstance(py, list):
        ok = np.array_equal(np.asarray(kv, dtype=np.int64), np.asarray(py, dtype=np.int64))
    else:
        ok = kv == py
    if not ok:
        raise Mismatch(f"{what}: kvcore gave {kv!r}, pyalloc gave {py!r}")


def _same_state(kv: kvcore.BlockAllocator, py: PyBlockAllocator, where: str) -> None:
    _same(f"free queue ({where})", kv.free_queue(), py.free_queue())
    _same(f"ref counts ({where})", kv.ref_counts(), py.ref_counts())
    s = kv.stats()
    for key, val in py.stats().items():
        _same(f"{key} ({where})", s[key], val)
    kv.check_invariants()


def _both(what: str, f_kv: Any, f_py: Any) -> tuple[Any, Any]:
    """Calls both; they must both succeed, or both raise OutOfBlocks, or both raise another
    error."""
    kv_exc = py_exc = None
    kv_res = py_res = None
    try:
        kv_res = f_kv()
    except kvcore.OutOfBlocksError as e:
        kv_exc = ("oob", e)
    except (kvcore.KVCoreError, ValueError, LookupError) as e:
        kv_exc = ("error", e)
    try:
        py_res = f_py()
    except OutOfBlocks as e:
        py_exc = ("oob", e)
    except (ValueError, LookupError) as e:
        py_exc = ("error", e)
    if (kv_exc and kv_exc[0]) != (py_exc and py_exc[0]):
        raise Mismatch(f"{what}: kvcore -> {kv_exc or kv_res!r}, pyalloc -> {py_exc or py_res!r}")
    return kv_res, py_res


def check_trace(trace: tr.Trace, content: tr.Content, state_every: int = 500) -> int:
    """Replays ``trace`` through both allocators in lock step; returns the events checked."""
    p = trace.params
    inp = tr.prepare(trace, content)
    kv = kvcore.BlockAllocator(p.num_blocks, p.block_size)
    py = PyBlockAllocator(p.num_blocks, p.block_size)
    tid = [0] * inp.num_handles
    pos = [0] * inp.num_handles
    run: list[int] = [0] * inp.max_batch
    run_handle = [0] * inp.max_batch
    n = 0
    dec_off = 0
    for i, (k, a, b) in enumerate(zip(inp.kinds, inp.a, inp.b, strict=True)):
        what = f"event {i} ({tr.KIND_NAMES[k]})"
        if k in (tr.DECODE, tr.DECODE_OOB):
            batch = run[:n]
            toks = inp.decode_pool[dec_off : dec_off + n]
            r_kv, r_py = _both(
                what,
                lambda: kv.append_batch(np.array(batch, dtype=np.int64), 1, token_ids=toks),  # noqa: B023
                lambda: py.append_batch(batch, 1, token_ids=toks.tolist()),  # noqa: B023
            )
            if (r_kv is None) != (k == tr.DECODE_OOB):
                raise Mismatch(f"{what}: the recorded outcome did not happen")
            if r_kv is not None:
                dec_off = tr.next_decode_offset(dec_off, n, p.max_batch)
                for name, x, y in zip(
                    ("slots", "indptr", "cow_src", "cow_dst"), r_kv, r_py, strict=True
                ):
                    _same(f"{what} {name}", x, y)
        elif k == tr.FREE:
            kv.free(tid[a])
            py.free(tid[a])
            j = pos[a]
            n -= 1
            last = run_handle[n]
            run[j] = run[n]
            run_handle[j] = last
            pos[last] = j
        elif k == tr.CREATE:
            ip, toks = tr.wave_prompts(inp, a, b)
            r_kv = kv.admit_batch(ip, toks)
            r_py = py.admit_batch(ip, toks)
            names = ("table ids", "hits", "slots", "indptr")
            for name, x, y in zip(names, r_kv, r_py, strict=True):
                _same(f"{what} {name}", x, y)
            _same(f"{what} recorded hits", r_kv[1], inp.handle_hit[a : a + b])
            for h, t in enumerate(r_kv[0].tolist(), a):
                tid[h] = t
                run[n] = t
                run_handle[n] = h
                pos[h] = n
                n += 1
        elif k == tr.FORK:
            t_kv, t_py = kv.fork(tid[a]), py.fork(tid[a])
            _same(f"{what} table id", t_kv, t_py)
            tid[b] = t_kv
            run[n] = t_kv
            run_handle[n] = b
            pos[b] = n
            n += 1
        elif k in (tr.COMPACT, tr.COMPACT_OOB):
            keep = inp.keeps[b]
            r_kv, r_py = _both(
                what,
                lambda: kv.compact(tid[a], keep),  # noqa: B023
                lambda: py.compact(tid[a], keep),  # noqa: B023
            )
            if (r_kv is None) != (k == tr.COMPACT_OOB):
                raise Mismatch(f"{what}: the recorded outcome did not happen")
            if r_kv is not None:
                _same(f"{what} plan src", r_kv[0], r_py[0])
                _same(f"{what} plan dst", r_kv[1], r_py[1])
        if i % state_every == 0:
            _same_state(kv, py, what)
    _same_state(kv, py, "end of trace")
    return len(inp.kinds)


def check_fuzz(seed: int, num_ops: int) -> int:
    """Random operations on a tiny pool, in lock step; returns the operations run."""
    rnd = random.Random(seed)
    bs = rnd.choice([1, 2, 4])
    nb = rnd.randint(4, 48)
    kv = kvcore.BlockAllocator(nb, bs)
    py = PyBlockAllocator(nb, bs)
    live: list[int] = []
    freed: list[int] = []
    toks: dict[int, list[int]] = {}
    salt: dict[int, str | None] = {}

    def pick() -> int:
        return rnd.choice(live)

    for i in range(num_ops):
        op = rnd.random()
        what = f"fuzz seed {seed} op {i}"
        if (op < 0.12 or not live) and toks and rnd.random() < 0.3:
            # An admission wave in one call: other tables' tokens (cut) with a new tail.
            sources = list(toks.values())
            prompts = []
            for _ in range(rnd.randint(1, 3)):
                src = rnd.choice(sources)
                tail = [rnd.randint(0, 1) for _ in range(rnd.randint(0, 2 * bs))]
                prompts.append(src[: rnd.randint(0, len(src))] + tail)
            wave_salt = rnd.choice([None, "a"])
            ip = np.cumsum([0] + [len(x) for x in prompts])
            flat = np.array([x for part in prompts for x in part], dtype=np.int64)
            r_kv, r_py = _both(
                f"{what} admit_batch",
                lambda: kv.admit_batch(ip, flat, wave_salt),  # noqa: B023
                lambda: py.admit_batch(ip, flat, wave_salt),  # noqa: B023
            )
            if r_kv is not None:
                for name, x, y in zip(
                    ("tables", "hits", "slots", "indptr"), r_kv, r_py, strict=True
                ):
                    _same(f"{what} admit_batch {name}", x, y)
                for t, prompt in zip(r_kv[0].tolist(), prompts, strict=True):
                    live.append(t)
                    toks[t] = prompt
                    salt[t] = wave_salt
        elif op < 0.12 or not live:
            t_kv, t_py = kv.create_table(), py.create_table()
            _same(f"{what} create", t_kv, t_py)
            live.append(t_kv)
            toks[t_kv] = []
            salt[t_kv] = rnd.choice([None, "a"])
            if rnd.random() < 0.5 and toks:
                # Adopt the tokens of some other table, to make prefix hits likely.
                src = rnd.choice(list(toks.values()))
                cut = src[: rnd.randint(0, len(src))]
                arr = np.array(cut, dtype=np.int64)
                if rnd.random() < 0.5:
                    h_kv, h_py = (
                        kv.adopt_prefix(t_kv, arr, salt[t_kv]),
                        py.adopt_prefix(t_py, arr, salt[t_kv]),
                    )
                else:
                    ip = np.array([0, len(cut)])
                    h_kv = int(kv.adopt_prefix_batch(np.array([t_kv]), ip, arr, salt[t_kv])[0])
                    h_py = py.adopt_prefix_batch([t_py], ip, arr, salt[t_kv])[0]
                _same(f"{what} adopt", h_kv, h_py)
                toks[t_kv] = cut[:h_kv]
        elif op < 0.35:
            t = pick()
            n = rnd.randint(0, 3 * bs)
            r_kv, r_py = _both(f"{what} append", lambda: kv.append(t, n), lambda: py.append(t, n))  # noqa: B023
            if r_kv is not None:
                _same(f"{what} append slots", r_kv[0], r_py[0])
                _same(f"{what} append cow", r_kv[1], r_py[1])
                toks[t] += [rnd.randint(0, 1) for _ in range(n)]
        elif op < 0.45:
            batch = rnd.sample(live, rnd.randint(1, len(live)))
            counts = [rnd.randint(0, bs + 1) for _ in batch]
            new = [[rnd.randint(0, 1) for _ in range(c)] for c in counts]
            # With the ids, blocks that fill are registered (decode-time registration).
            ids = np.array([x for part in new for x in part], dtype=np.int64)
            with_ids = rnd.random() < 0.6
            r_kv, r_py = _both(
                f"{what} append_batch",
                lambda: kv.append_batch(  # noqa: B023
                    np.array(batch),  # noqa: B023
                    np.array(counts),  # noqa: B023
                    token_ids=ids if with_ids else None,  # noqa: B023
                ),
                lambda: py.append_batch(batch, counts, ids if with_ids else None),  # noqa: B023
            )
            if r_kv is not None:
                for x, y in zip(r_kv, r_py, strict=True):
                    _same(f"{what} append_batch", x, y)
                for t, part in zip(batch, new, strict=True):
                    toks[t] += part
        elif op < 0.55:
            t = pick()
            c_kv, c_py = kv.fork(t), py.fork(t)
            _same(f"{what} fork", c_kv, c_py)
            live.append(c_kv)
            toks[c_kv] = list(toks[t])
            salt[c_kv] = salt[t]
        elif op < 0.67:
            t = pick()
            kv.free(t)
            py.free(t)
            live.remove(t)
            freed.append(t)
            del toks[t]
        elif op < 0.77:
            t = pick()
            arr = np.array(toks[t], dtype=np.int64)
            if rnd.random() < 0.5:
                _same(
                    f"{what} register",
                    kv.register_prefix(t, arr, salt[t]),
                    py.register_prefix(t, arr, salt[t]),
                )
            else:
                group = [u for u in live if salt[u] == salt[t]]
                group = rnd.sample(group, rnd.randint(1, len(group)))
                ip = np.cumsum([0] + [len(toks[u]) for u in group])
                flat = np.array([x for u in group for x in toks[u]], dtype=np.int64)
                _same(
                    f"{what} register_prefix_batch",
                    kv.register_prefix_batch(np.array(group), ip, flat, salt[t]),
                    py.register_prefix_batch(group, ip, flat, salt[t]),
                )
        elif op < 0.92:
            t = pick()
            ntok = len(toks[t])
            keep_list = sorted(rnd.sample(range(ntok), rnd.randint(0, ntok)))
            if rnd.random() < 0.3:
                keep_list = list(range(min(ntok, rnd.randint(0, ntok)))) + [
                    p for p in keep_list if p > ntok // 2
                ]
                keep_list = sorted(set(keep_list))
            if rnd.random() < 0.3:
                keep: Any = np.zeros(ntok, dtype=bool)
                keep[keep_list] = True
            else:
                keep = np.array(keep_list, dtype=np.int64)
            r_kv, r_py = _both(
                f"{what} compact",
                lambda: kv.compact(t, keep),  # noqa: B023
                lambda: py.compact(t, keep),  # noqa: B023
            )
            if r_kv is not None:
                _same(f"{what} plan src", r_kv[0], r_py[0])
                _same(f"{what} plan dst", r_kv[1], r_py[1])
                toks[t] = [toks[t][p] for p in keep_list]
        elif op < 0.94:
            _same(f"{what} reset", kv.reset_prefix_cache(), py.reset_prefix_cache())
        elif op < 0.97 and freed:
            t = rnd.choice(freed)
            _both(f"{what} use after free", lambda: kv.append(t, 1), lambda: py.append(t, 1))  # noqa: B023
        else:
            t = pick()
            n = rnd.randint(0, 3 * bs)
            _same(f"{what} blocks_needed", kv.blocks_needed(t, n), py.blocks_needed(t, n))
        _same_state(kv, py, what)
        for t in live:
            _same(f"{what} block table", kv.block_table(t), py.block_table(t))
    return num_ops
