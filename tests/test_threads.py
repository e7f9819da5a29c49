"""The allocator is safe to share between threads, and batch work releases the GIL."""

from __future__ import annotations

import threading
import time

import numpy as np

from kvcore import BlockAllocator, OutOfBlocksError


def test_batch_calls_release_the_gil() -> None:
    """While one thread is inside a long batch call, another thread keeps running Python.

    If the GIL were held for the whole call, the counting thread could not record a single
    tick strictly inside the call's time window.
    """
    a = BlockAllocator(1 << 18, 16)
    tables = a.create_tables(100_000)
    a.append_batch(tables, 30)  # ~200k blocks in use: check_invariants walks all of them
    windows: list[tuple[float, float]] = []
    ticks: list[float] = []
    stop = threading.Event()
    started = threading.Event()

    def count() -> None:
        started.set()
        while not stop.is_set():
            ticks.append(time.perf_counter())

    t = threading.Thread(target=count)
    t.start()
    started.wait()
    for _ in range(5):
        t0 = time.perf_counter()
        a.check_invariants()
        a.free_batch(tables[:1000])
        tables = tables[1000:]
        windows.append((t0, time.perf_counter()))
    stop.set()
    t.join()
    inside = sum(1 for x in ticks if any(s < x < e for s, e in windows))
    assert inside > 0, "no Python code ran while the allocator worked: the GIL was held"


def test_threads_sharing_one_allocator_stay_consistent() -> None:
    """Eight threads hammer one allocator with batch appends, forks, compactions and frees.

    Each thread owns its tables and writes its own marks into a shared slot-indexed memory
    array; afterwards every live table must read back exactly what its thread wrote, and the
    allocator's invariants must hold.

    A compaction plan must be applied before any other call allocates (freed blocks still
    hold its sources), so `apply_lock` makes "compact, then apply" atomic with respect to
    "append, then write", exactly as a multi-threaded engine must. Forks, frees and reads
    run without it and overlap freely with everything else.
    """
    num_blocks, bs = 2048, 8
    a = BlockAllocator(num_blocks, bs)
    mem = np.full(num_blocks * bs, -1, dtype=np.int64)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []
    expected: dict[int, list[int]] = {}
    lock = threading.Lock()  # guards `expected`
    apply_lock = threading.Lock()

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        mine: dict[int, list[int]] = {}
        mark = seed * 1_000_000
        try:
            barrier.wait()
            for _ in range(300):
                op = rng.integers(0, 5)
                if op <= 1 or not mine:
                    ids = list(mine) + [a.create_table() for _ in range(2)]
                    for t in ids:
                        mine.setdefault(t, [])
                    n = rng.integers(0, 5, size=len(ids)).astype(np.int64)
                    with apply_lock:
                        try:
                            slots, indptr, cs, cd = a.append_batch(np.array(ids, dtype=np.int64), n)
                        except OutOfBlocksError:
                            continue
                        for s, d in zip(cs.tolist(), cd.tolist(), strict=True):
                            mem[d * bs : (d + 1) * bs] = mem[s * bs : (s + 1) * bs]
                        for i, t in enumerate(ids):
                            seg = slots[indptr[i] : indptr[i + 1]]
                            vals = list(range(mark, mark + len(seg)))
                            mark += len(seg)
                            mem[seg] = vals
                            mine[t].extend(vals)
                elif op == 2:
                    t = int(rng.choice(list(mine)))
                    child = a.fork(t)
                    mine[child] = list(mine[t])
                elif op == 3:
                    t = int(rng.choice(list(mine)))
                    keep = np.flatnonzero(rng.random(len(mine[t])) < 0.6).astype(np.int64)
                    with apply_lock:
                        try:
                            src, dst = a.compact(t, keep)
                        except OutOfBlocksError:
                            continue
                        mem[dst] = mem[src]
                    mine[t] = [mine[t][k] for k in keep.tolist()]
                else:
                    t = int(rng.choice(list(mine)))
                    a.free(t)
                    del mine[t]
            with lock:
                expected.update(mine)
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s + 1,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    a.check_invariants()
    assert a.num_tables == len(expected)
    for t, vals in expected.items():
        assert mem[a.slot_mapping(t)].tolist() == vals


def test_quantize_releases_the_gil() -> None:
    """Same check for the quantization codec: Python keeps running inside quantize and
    dequantize calls, and threads quantizing concurrently get the single-thread bytes."""
    from kvcore import QuantLayout, dequantize, quantize

    layout = QuantLayout(2, 32, 32, 128)
    x = np.random.default_rng(0).standard_normal((512, 32, 128)).astype(np.float32)
    want = quantize(x, layout)
    ticks: list[float] = []
    windows: list[tuple[float, float]] = []
    stop = threading.Event()
    started = threading.Event()

    def count() -> None:
        started.set()
        while not stop.is_set():
            ticks.append(time.perf_counter())

    t = threading.Thread(target=count)
    t.start()
    started.wait()
    for _ in range(3):
        t0 = time.perf_counter()
        got = quantize(x, layout)
        dequantize(got, layout)
        windows.append((t0, time.perf_counter()))
        assert np.array_equal(got, want)
    stop.set()
    t.join()
    inside = sum(1 for v in ticks if any(s < v < e for s, e in windows))
    assert inside > 0, "no Python code ran while quantize worked: the GIL was held"

    results: list[np.ndarray] = []
    workers = [
        threading.Thread(target=lambda: results.append(quantize(x[:128], layout))) for _ in range(4)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(results) == 4 and all(np.array_equal(r, want[:128]) for r in results)
