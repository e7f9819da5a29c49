"""The policy protocol: declared needs, the statistics the cache computes for them, a user
policy registered from outside the package (docs/policies.md), and no name switches."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the cache side of the policies needs torch")

from test_docs import python_blocks  # noqa: E402

import kvcore  # noqa: E402
from kvcore import policies as P  # noqa: E402
from kvcore import statistics  # noqa: E402
from kvcore.cache import KVCache  # noqa: E402
from kvcore.policies import Need  # noqa: E402
from kvcore.policies.expected_attention import expected_attention  # noqa: E402
from kvcore.scoring import get  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
L, H, HQ, D, BS = 2, 2, 4, 8, 4
ROPE = 1.0 / (100.0 ** (torch.arange(0, D, 2).float() / D))  # inv_freq, for needs_rope


def kept_positions(c: KVCache, layer: int) -> list[list[int]]:
    """Stored positions of each stream of ``layer`` (row ``b * H + h``), via the page table."""
    _, slots, lens = c.page_table(layer, "vllm")
    pos = c.slot_pos[torch.from_numpy(slots.astype(np.int64))].tolist()
    ends = np.cumsum(lens).tolist()
    return [pos[e - n : e] for e, n in zip(ends, lens.tolist(), strict=True)]


def rows_of(sel: P.Selection, lo: int, hi: int) -> list[list[int]]:
    return [sel.positions[sel.indptr[r] : sel.indptr[r + 1]].tolist() for r in range(lo, hi)]


# ------------------------------------------------------------------ every registry policy

PARAMS: dict[str, dict[str, Any]] = {
    "streaming": {"sinks": 2},
    "h2o": {},
    "snapkv": {"window": 2, "kernel": 3},
    "pyramidkv": {"window": 2},
    "adakv": {"window": 2},
    "tova": {},
    "knorm": {"skip_layers": (1,)},
    "infinipot": {},
    "razor": {
        "sinks": 1,
        "local_capacity": 4,
        "compensation": "none",
        "retrieval": torch.tensor([[True, False], [False, False]]),
    },
    "locret": {"stabilizers": 1},
    "longgen": {"layer_kinds": ("sink", "full"), "sinks": 1},
    "expected_attention": {"n_future_positions": 8, "n_sink": 1},
}


def test_the_protocol_cases_cover_every_policy():
    assert sorted(PARAMS) == sorted(P.names())


def reference_scores(
    pol: P.Policy, k: torch.Tensor, q: torch.Tensor, v: torch.Tensor | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """``(H, n)`` scores and the extra select inputs of one layer, written from each need's
    definition (one sequence, the last ``w`` tokens observed, nothing accumulated before)."""
    n, w = k.shape[2], q.shape[2]
    keys = k.repeat_interleave(HQ // H, dim=1)
    logits = q @ keys.transpose(-1, -2) * D**-0.5  # (1, Hq, w, n)
    causal = torch.arange(n)[None, :] <= torch.arange(n - w, n)[:, None]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    attention = probs.sum(2).reshape(1, H, HQ // H, n).mean(2)[0]  # (H, n)
    inputs: dict[str, Any] = {}
    if Need.NOVELTY in pol.needs:
        cos = torch.nn.functional.cosine_similarity(k, k.mean(2, keepdim=True), dim=-1)
        inputs["nuc"] = (1 - cos).mean(1)[0].numpy().astype(np.float32)
    if pol.config.get("retrieval") is not None:
        inputs["retrieval"] = pol.config["retrieval"].reshape(-1).numpy()
    if Need.VALUES in pol.needs:  # Expected Attention: its scores from the stored state
        # (its formula against explicit RoPE matrices: test_policies_expected_attention.py)
        assert v is not None
        params = {key: val for key, val in pol.config.items() if key != "budget"}
        pos, ok = torch.arange(n).expand(1, H, n), torch.ones(1, H, n, dtype=torch.bool)
        qpos = torch.arange(n - w, n)
        ea = expected_attention(k, v, pos, ok, q, qpos, None, ROPE, D**-0.5, **params)
        return ea[0].numpy(), inputs
    if Need.WINDOW_PROBS in pol.needs:
        return pol.score(probs.numpy(), H)[0], inputs
    if pol.needs & {Need.QUERY_ATTENTION, Need.ACCUMULATED}:
        return attention.numpy(), inputs
    if Need.KEYS in pol.needs:
        return pol.score(k.numpy())[0], inputs
    assert not pol.needs, pol.needs
    return np.zeros((H, n), np.float32), inputs


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_the_cache_keeps_what_the_policy_selects_from_its_statistics(name):
    """Each layer keeps what the registry selects from statistics computed here from their
    definitions: the cache computed what the policy declares and nothing else."""
    pol = get(name, 6, **PARAMS[name])
    rope = ROPE if pol.needs_rope else None
    c = KVCache(L, H, D, block_size=BS, capacity=32, policy=pol, rope=rope)
    g = torch.Generator().manual_seed(11)
    n = 16
    expected = []
    for layer in range(L):
        k, v = torch.randn(1, H, n, D, generator=g), torch.randn(1, H, n, D, generator=g)
        q = torch.randn(1, HQ, 4, D, generator=g)
        c.observe(layer, q)
        c.update(layer, k, v)
        s, inputs = reference_scores(pol, k, q, v)
        rows = np.zeros((L, H, n), np.float32)
        rows[layer] = s
        sel = pol.select(rows, 6, **inputs)
        expected.append(rows_of(sel, layer * H, layer * H + H))
    assert [kept_positions(c, layer) for layer in range(L)] == expected
    assert c.num_compressions > 0


def test_declared_needs_drive_what_the_cache_and_hooks_do():
    for name in P.names():
        pol = get(name, 8, **PARAMS[name])
        statistics.check_needs(pol)
        assert pol.needs_queries == bool(
            pol.needs & {Need.WINDOW_PROBS, Need.QUERY_ATTENTION, Need.ACCUMULATED, Need.QUERIES}
        )
        assert pol.accumulates == (Need.ACCUMULATED in pol.needs)
    locret = get("locret", 8, stabilizers=1, score_fn=lambda inp: inp.accumulated)
    assert locret.needs == {Need.EXTERNAL_SCORES} and not locret.needs_queries
    assert get("locret", 8, stabilizers=1).needs == {Need.ACCUMULATED}


def test_a_registry_policy_is_a_cache_policy():
    """kvcore.policies.get(...) drives the cache directly, as kvcore.scoring.get does."""
    kept = []
    for pol in (P.get("knorm", budget=5, skip_layers=()), get("knorm", 5, skip_layers=())):
        c = KVCache(L, H, D, block_size=BS, capacity=16, policy=pol)
        k = torch.randn(1, H, 12, D, generator=torch.Generator().manual_seed(3))
        c.update(0, k, k)
        kept.append(kept_positions(c, 0))
    assert kept[0] == kept[1] and all(len(r) == 5 for r in kept[0])
    with pytest.raises(ValueError, match="snapkv: a budget is needed"):
        KVCache(L, H, D, policy=P.get("snapkv"))


# ------------------------------------------------------------------ errors of the protocol


class _Scored(P.Policy):
    """A test policy (arXiv 0000.00000): scores are the keys' first channel."""

    name = "first_channel"
    paper = "arXiv 0000.00000"
    phase = ("prefill",)
    granularity = "per head"
    params = {"budget": P.BUDGET}
    needs = frozenset({Need.KEYS})

    def scores_from(self, stats: statistics.Statistics) -> np.ndarray:
        out: np.ndarray = stats[Need.KEYS][..., 0].float().cpu().numpy()
        return out

    def _select(self, scores: np.ndarray, budget: int, **inputs: Any) -> P.Selection:
        return P.select_topk(scores, budget)


def _compress(pol: P.Policy) -> KVCache:
    c = KVCache(1, H, D, block_size=BS, capacity=16, policy=pol)
    c.update(0, torch.randn(1, H, 10, D), torch.randn(1, H, 10, D))
    c.flush()
    return c


def test_a_need_the_cache_cannot_compute_fails_at_construction():
    class Unknown(_Scored):
        needs = frozenset({"keys"})  # type: ignore[arg-type]

    class External(_Scored):
        needs = frozenset({Need.EXTERNAL_SCORES})

    with pytest.raises(TypeError, match=r"first_channel: unknown need 'keys'; valid needs: "):
        KVCache(1, H, D, policy=Unknown(budget=4))
    with pytest.raises(ValueError, match=r"cannot compute the 'external_scores' statistic"):
        KVCache(1, H, D, policy=External(budget=4))
    with pytest.raises(TypeError, match=r"needs must be a frozenset of kvcore.policies.Need"):
        P.register(Unknown)


def test_statistics_are_only_what_was_declared_and_of_the_right_shape():
    class Undeclared(_Scored):
        needs = frozenset({Need.NOVELTY})

    class BadScores(_Scored):
        def scores_from(self, stats: statistics.Statistics) -> np.ndarray:
            return np.zeros(stats.shape, np.float64)

    class NoScores(_Scored):
        scores_from = P.Policy.scores_from  # type: ignore[assignment]

    with pytest.raises(KeyError, match=r"'keys' statistic was not computed: add Need.KEYS"):
        _compress(Undeclared(budget=4))
    with pytest.raises(ValueError, match=r"scores_from must return a numpy float32 array"):
        _compress(BadScores(budget=4))
    with pytest.raises(NotImplementedError, match="implement scores_from"):
        _compress(NoScores(budget=4))
    bad_fn = get("locret", 4, stabilizers=1, score_fn=lambda inp: torch.zeros(3))
    with pytest.raises(ValueError, match=r"'external_scores' statistic has shape \(3,\)"):
        _compress(bad_fn)
    assert _compress(_Scored(budget=4)).stored_lengths().max() == 4


def test_register_checks_the_class_and_refuses_a_taken_name():
    with pytest.raises(TypeError, match="register takes a kvcore.policies.Policy subclass"):
        P.register(int)  # type: ignore[type-var]
    with pytest.raises(ValueError, match=r"a policy named 'snapkv' is registered already"):

        class Twin(_Scored):
            name = "snapkv"

        P.register(Twin)

    class NoBudget(_Scored):
        params: dict[str, P.Param] = {}

    with pytest.raises(TypeError, match=r"params needs a 'budget' entry"):
        P.register(NoBudget)
    assert "first_channel" not in P.names()
    P.register(_Scored)
    try:
        assert P.get("first_channel", budget=3).max_budget() == 3
    finally:
        assert P.unregister("first_channel") is _Scored
    assert "first_channel" not in P.names()


# ------------------------------------------------------------------ the docs' user policy


def _docs_example() -> tuple[str, str]:
    text = (ROOT / "docs" / "policies.md").read_text()
    section = text[text.index("## Writing your own policy") :]
    section = section[: section.index("\n## ")]
    define, generate = python_blocks(section)
    return define, generate


def _keydiff_keep(k: torch.Tensor, budget: int, window: int) -> list[list[int]]:
    """KeyDiff's rule, written here: the newest ``window`` tokens, then the keys with the
    lowest cosine to the mean unit key of their head (ties: the lower position)."""
    out = []
    for h in range(k.shape[1]):
        unit = torch.nn.functional.normalize(k[0, h], dim=-1)
        cos = unit @ unit.mean(0) / unit.mean(0).norm()
        n = k.shape[2]
        forced = list(range(n - window, n))
        order = [int(i) for i in torch.argsort(cos, stable=True) if int(i) not in forced]
        out.append(sorted(forced + order[: budget - window]))
    return out


def test_the_docs_user_policy_runs_through_the_cache_and_generate():
    transformers = pytest.importorskip("transformers", reason="the second block uses kvcore.hf")
    assert transformers is not None
    from tiny_llama import tiny

    from kvcore import hf

    define, generate = _docs_example()
    ns: dict[str, Any] = {}
    try:
        exec(compile(define, "policies.md user policy", "exec"), ns)
        assert "keydiff" in P.names()
        # the example's cache kept what KeyDiff's rule keeps
        c = ns["cache"]
        assert [kept_positions(c, 0)] == [_keydiff_keep(ns["keys"], 6, 1)]
        # and a fresh cache with window=2 through the policy's own parameter check
        with pytest.raises(ValueError, match=r"keydiff: window \(8\) is larger than the budget"):
            P.get("keydiff", budget=6, window=8)
        model = tiny("kvcore")
        ids = torch.randint(1, 64, (2, 20), generator=torch.Generator().manual_seed(4))
        ns.update(model=model, input_ids=ids)
        exec(compile(generate, "policies.md generate", "exec"), ns)
        out, cache = ns["out"], ns["cache"]
        assert out.shape == (2, 24)
        kv = cache.kv
        assert kv.num_compressions == kv.num_layers  # compressed once, after the prompt
        # 6 kept prompt tokens + the 3 generated tokens that were fed back
        assert (kv.stored_lengths() == 6 + 3).all()
        for layer in range(kv.num_layers):
            for row in kept_positions(kv, layer):
                assert row[-5:] == [18, 19, 20, 21, 22]  # the window and the new tokens
        # a budget the prompt fits in evicts nothing: the tokens of the full cache
        roomy = hf.compressed_cache(model, "keydiff", budget=20, window=2)
        full = hf.compressed_cache(model, None, budget=0)
        outs = [
            model.generate(ids, max_new_tokens=4, do_sample=False, **hf.cache_kwargs(model, c))
            for c in (roomy, full)
        ]
        assert torch.equal(outs[0], outs[1]) and roomy.kv.num_compressions == 0
    finally:
        P.REGISTRY.pop("keydiff", None)
    assert "keydiff" not in P.names()


# ------------------------------------------------------------------ no name switches


def test_no_policy_name_is_compared_as_a_string_in_the_library():
    """Policies are chosen by the registry's lookup only: no ``name == "snapkv"`` and no
    ``name in ("tova", ...)`` anywhere in python/kvcore."""
    names = "|".join(P.names())
    quoted = rf"""["']({names})["']"""
    compare = re.compile(
        rf"(==|!=)\s*{quoted}|{quoted}\s*(==|!=)|\bin\s*[\(\[{{]\s*{quoted}"
        rf"|\.name\s*(==|!=)|\.name\s+in\s*[\(\[{{]|frozenset\(\{{\s*{quoted}"
    )
    hits = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in sorted((ROOT / "python" / "kvcore").rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if compare.search(line)
    ]
    assert hits == []
    assert kvcore.policies.REGISTRY["snapkv"] is P.SnapKVPolicy
