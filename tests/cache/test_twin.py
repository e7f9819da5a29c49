"""Twin caches: one also receives failing calls, the other does not; they must stay equal.

A hypothesis state machine drives two caches built alike through the same valid calls (steps
of every layer: observe, update, attend; snapshots and restores; shrinks; flushes). Cache
``a`` also receives calls that must fail (bad layers, shapes, dtypes, batch sizes,
capacities, layouts, snapshots, values beyond a quantized format's range, missing or
misfit observed queries). After every step their dense K/V, attention outputs, lengths,
memory and compression counts must be bit-identical, so a failed call changed nothing and
did not run pending work early.

CI runs at least 10,000 steps (a fixed seed); ``--slow`` runs ten times more with fresh seeds.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch cache needs torch (pip install .[torch])")

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvcore.cache import CacheSnapshot, KVCache, Schedule  # noqa: E402
from kvcore.scoring import get  # noqa: E402

L, H, D, BS, B = 2, 2, 8, 4, 2
STEPS = [0]

POLICIES = {
    "none": lambda: None,
    "snapkv": lambda: get("snapkv", 6, window=2, kernel=3),
    "h2o": lambda: get("h2o", 6),
    "streaming": lambda: get("streaming", 6, sinks=2),
}
SCHEDULES = {
    "prefill": Schedule.prefill(),
    "once": Schedule.prefill(multi_turn="once"),
    "decode2": Schedule.decode(2),
}
FORMATS = ("native", "int4", "kivi2")


def rnd(seed: int, n: int, heads: int = H, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, heads, n, D, generator=g) * scale


class TwinCaches(RuleBasedStateMachine):
    @initialize(
        policy=st.sampled_from(sorted(POLICIES)),
        schedule=st.sampled_from(sorted(SCHEDULES)),
        kv_format=st.sampled_from(FORMATS),
        mikv=st.booleans(),
    )
    def build(self, policy: str, schedule: str, kv_format: str, mikv: bool) -> None:
        kw: dict[str, object] = {"kv_format": kv_format, "block_size": BS}
        if kv_format == "int4":
            kw["quant_group"] = 4
        if mikv and policy != "none" and kv_format != "kivi2":
            kw["evicted_format"] = "int2"
            kw["quant_group"] = 4
            if kv_format == "int4":  # a MiKV high tier of int pages: keys per token
                kw["key_quant"] = "token"
        self.policy = policy
        self.kv_format = kv_format
        self.caches = [
            KVCache(L, H, D, policy=POLICIES[policy](), schedule=SCHEDULES[schedule], **kw)
            for _ in range(2)
        ]
        self.snaps: list[CacheSnapshot] = []
        self.seed = 0
        self.stored = False

    def both(self, fn):  # noqa: ANN001, ANN201
        return [fn(c) for c in self.caches]

    def fails(self, fn) -> None:  # noqa: ANN001
        """A call that must fail, on cache ``a`` only."""
        with pytest.raises((ValueError, TypeError, IndexError)):
            fn(self.caches[0])

    def equal(self, xs: list[object]) -> None:
        x, y = xs
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and torch.equal(x, y)
        elif isinstance(x, np.ndarray):
            assert np.array_equal(x, y)  # type: ignore[arg-type]
        elif isinstance(x, (tuple, list)):
            for u, v in zip(x, y, strict=True):  # type: ignore[call-overload]
                self.equal([u, v])
        else:
            assert x == y

    # ------------------------------------------------------------------ valid calls

    @rule(q=st.sampled_from([1, 1, 1, 3, 8]))
    def step(self, q: int) -> None:
        """One step of every layer, as a model runs it: observe, update, attend."""
        STEPS[0] += 1
        self.seed += 1
        s = self.seed * 100
        for layer in range(L):
            query = rnd(s + layer, q, heads=2 * H)
            self.both(lambda c, query=query, layer=layer: c.observe(layer, query[:, :, -2:]))
            k, v = rnd(s + 10 + layer, q), rnd(s + 20 + layer, q)
            self.equal(self.both(lambda c, layer=layer, k=k, v=v: c.update(layer, k, v)))
            self.equal(self.both(lambda c, layer=layer, query=query: c.attend(layer, query)))
        self.stored = True

    @rule()
    def take_snapshot(self) -> None:
        STEPS[0] += 1
        a, b = self.both(lambda c: c.snapshot())
        self.equal([a.lengths, b.lengths])
        self.snaps.append(a)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        """Restores the same snapshot on both (taken on ``a``; the caches are equal)."""
        STEPS[0] += 1
        snap = data.draw(st.sampled_from(self.snaps))
        results = []
        for c in self.caches:
            try:
                c.restore(snap)
                results.append("ok")
            except ValueError as e:
                results.append(str(e))
        assert results[0] == results[1]

    @rule()
    def shrink(self) -> None:
        STEPS[0] += 1
        self.equal(self.both(lambda c: c.shrink()))

    @rule()
    def check_lengths(self) -> None:
        """Runs the pending compressions of both, then compares what they hold."""
        STEPS[0] += 1
        self.equal(self.both(lambda c: c.stored_lengths()))
        self.equal(self.both(lambda c: c.evicted_lengths()))
        self.equal(self.both(lambda c: c.used_bytes()))
        if self.stored:
            for layer in range(L):
                self.equal(self.both(lambda c, layer=layer: c.page_table(layer, "vllm")))

    # ------------------------------------------------------------------ failing calls (a only)

    @rule(
        call=st.sampled_from(
            [
                "shrink-neg",
                "shrink-float",
                "page_table",
                "stored_lengths",
                "evicted_lengths",
                "compress",
                "update-layer",
                "update-heads",
                "update-dtype",
                "update-shape",
                "observe",
                "attend",
                "restore",
            ]
        )
    )
    def refused(self, call: str) -> None:
        STEPS[0] += 1
        k = rnd(7, 1)
        calls = {
            "shrink-neg": lambda c: c.shrink(-1),
            "shrink-float": lambda c: c.shrink(2.5),
            "page_table": lambda c: c.page_table(0, "x"),
            "stored_lengths": lambda c: c.stored_lengths("x"),
            "evicted_lengths": lambda c: c.evicted_lengths(L),
            "compress": lambda c: c.compress(L),
            "update-layer": lambda c: c.update(L, k, k),
            "update-heads": lambda c: c.update(0, k[:, :1], k[:, :1]),
            "update-dtype": lambda c: c.update(0, k.double(), k.double()),
            "update-shape": lambda c: c.update(0, k, rnd(8, 2)),
            "observe": lambda c: c.observe(0, rnd(9, 1, heads=3)),
            "attend": lambda c: c.attend(0, rnd(9, 5, heads=2 * H)),
            "restore": lambda c: c.restore(KVCache(L + 1, H, D).snapshot()),
        }
        self.fails(calls[call])

    @precondition(lambda self: self.stored)
    @rule()
    def refused_batch(self) -> None:
        STEPS[0] += 1
        k = torch.zeros(B + 1, H, 1, D)
        self.fails(lambda c: c.update(0, k, k))

    @precondition(lambda self: self.kv_format != "native")
    @rule(big=st.sampled_from([1e5, -3e5, 1e30]))
    def refused_values(self, big: float) -> None:
        """Values beyond the float16 metadata of quantized pages."""
        STEPS[0] += 1
        self.fails(lambda c: c.update(0, rnd(11, 1, scale=big), rnd(12, 1)))

    @rule()
    def refused_misfit_queries(self) -> None:
        """Two observed queries and a one-token step: refused, the queries stay recorded
        (both caches observe them; the next step's observe replaces them on both)."""
        STEPS[0] += 1
        q = rnd(13, 2, heads=2 * H)
        self.both(lambda c: c.observe(L - 1, q))
        self.fails(lambda c: c.update(L - 1, rnd(14, 1), rnd(15, 1)))

    @precondition(lambda self: self.policy == "snapkv")
    @rule()
    def refused_without_queries(self) -> None:
        """SnapKV's prefill without observed queries, under a schedule that compresses it."""
        STEPS[0] += 1
        a = self.caches[0]
        if a.schedule.multi_turn == "rescore":
            self.fails(lambda c: c.update(0, rnd(16, 8), rnd(17, 8)))

    # ------------------------------------------------------------------ invariants

    @invariant()
    def same_without_flushing(self) -> None:
        """What can be read without running pending work is equal."""
        if not hasattr(self, "caches"):
            return
        self.equal(self.both(lambda c: c.memory_bytes()))
        self.equal(self.both(lambda c: c.peak_memory_bytes()))
        self.equal(self.both(lambda c: c.num_compressions))
        for layer in range(L):
            self.equal(self.both(lambda c, layer=layer: c.has_pending_step(layer)))


def test_twin_caches_stay_equal() -> None:
    base = settings.default
    slow = base.max_examples > 1000  # the --slow profile
    STEPS[0] = 0
    run_state_machine_as_test(
        TwinCaches,
        settings=settings(
            base,
            # 400 runs of up to 40 steps: about 13k steps, so the 10k floor holds with margin
            max_examples=base.max_examples * 2 if slow else 400,
            stateful_step_count=60 if slow else 40,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    print(f"twin caches: {STEPS[0]} steps")
    assert STEPS[0] >= 10_000, f"only {STEPS[0]} steps ran"
