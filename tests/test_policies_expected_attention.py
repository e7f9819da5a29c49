"""Expected Attention (arXiv 2510.00636): the scores against the formula written out here with
explicit RoPE matrices, the cache keeping their top tokens, and the checks."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch", reason="the policy's statistics need torch")

from cache_view import stream_slots  # noqa: E402
from tiny_llama import tiny  # noqa: E402

import kvcore.hf as kh  # noqa: E402
from kvcore import policies as P  # noqa: E402
from kvcore.cache import KVCache  # noqa: E402
from kvcore.policies import Need  # noqa: E402
from kvcore.policies.expected_attention import expected_attention  # noqa: E402

H, HQ, D, T = 2, 4, 8, 24
INV_FREQ = 1.0 / (100.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))


def rope_matrix(p: int) -> torch.Tensor:
    """``(D, D)`` float64: RoPE at position ``p`` as a matrix (rotate_half convention)."""
    h = D // 2
    m = torch.zeros(D, D, dtype=torch.float64)
    for i in range(h):
        a = p * float(INV_FREQ[i])
        m[i, i], m[i, i + h] = math.cos(a), -math.sin(a)
        m[i + h, i], m[i + h, i + h] = math.sin(a), math.cos(a)
    return m


def direct(k, v, q_pre, n_future, n_sink, cov=True, vnorm=True, eps=0.0):
    """The formula, one query head at a time: ``(H, T)`` float64 scores, sinks ``inf``."""
    t = k.shape[1]
    r_bar = sum(rope_matrix(p) for p in range(t, t + n_future)) / n_future
    out = torch.zeros(HQ, t, dtype=torch.float64)
    for hq in range(HQ):
        qs = q_pre[hq, n_sink:]  # the queries past the sinks (query j is at position j)
        mu = r_bar @ qs.mean(0)
        sigma = r_bar @ torch.cov(qs.T, correction=0) @ r_bar.T
        kk = k[hq // (HQ // H)]
        a = kk @ mu / math.sqrt(D)
        if cov:
            a = a + torch.stack([x @ sigma @ x for x in kk]) / (2 * D)
        e = a[n_sink:].exp()
        out[hq, n_sink:] = e / e.sum()
    s = out.reshape(H, HQ // H, t).mean(1)
    if vnorm:
        s = (s + eps) * v.norm(dim=-1)
    s[:, :n_sink] = float("inf")
    return s


def data(seed: int):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(H, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(H, T, D, generator=g, dtype=torch.float64)
    q_pre = torch.randn(HQ, T, D, generator=g, dtype=torch.float64) + 0.7
    rot = torch.stack([rope_matrix(p) for p in range(T)])  # (T, D, D)
    q_rot = torch.einsum("tij,htj->hti", rot, q_pre)
    return k, v, q_pre, q_rot


def ours(k, v, q_rot, **kw):
    pos = torch.arange(T).expand(1, H, T)
    args = dict(n_future_positions=16, n_sink=2, use_covariance=True, use_vnorm=True, epsilon=0.0)
    args.update(kw)
    return expected_attention(
        k[None],
        v[None],
        pos,
        torch.ones(1, H, T, dtype=torch.bool),
        q_rot[None],
        torch.arange(T),
        None,
        INV_FREQ.float(),
        D**-0.5,
        **args,
    )[0]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "kw",
    [{}, {"use_covariance": False}, {"use_vnorm": False}, {"epsilon": 0.01}, {"n_sink": 0}],
)
def test_scores_equal_the_formula_written_with_rope_matrices(seed, kw):
    k, v, q_pre, q_rot = data(seed)
    n_sink = kw.get("n_sink", 2)
    want = direct(
        k,
        v,
        q_pre,
        16,
        n_sink,
        cov=kw.get("use_covariance", True),
        vnorm=kw.get("use_vnorm", True),
        eps=kw.get("epsilon", 0.0),
    )
    got = ours(k, v, q_rot, **kw).double()
    sinks = torch.isinf(want)
    assert bool((got[sinks] == torch.finfo(torch.float32).max).all())
    torch.testing.assert_close(got[~sinks], want[~sinks], rtol=1e-5, atol=1e-9)


def test_the_covariance_and_the_future_rotation_change_the_ranking():
    k, v, _, q_rot = data(2)
    base = ours(k, v, q_rot)
    assert not torch.equal(base.argsort(), ours(k, v, q_rot, use_covariance=False).argsort())
    assert not torch.equal(base.argsort(), ours(k, v, q_rot, n_future_positions=1).argsort())


def test_the_cache_keeps_the_top_scores_and_the_sinks():
    k, v, _, q_rot = data(3)
    pol = P.get("expected_attention", budget=10, n_future_positions=16, n_sink=2)
    c = KVCache(1, H, D, block_size=4, capacity=32, policy=pol, rope=INV_FREQ.float())
    c.observe(0, q_rot[None].float())
    c.update(0, k[None].float(), v[None].float())
    c.flush()
    want = ours(k.float().double(), v.float().double(), q_rot.float().double())
    for h in range(H):
        slots = stream_slots(c, 0)
        kept = sorted(c.slot_pos[slots[h]].tolist())
        top = sorted(want[h].topk(10).indices.tolist())
        assert kept == top and {0, 1} <= set(kept)


def test_needs_and_refusals():
    pol = P.get("expected_attention", budget=8)
    assert pol.needs == {Need.KEYS, Need.VALUES, Need.QUERIES}
    assert pol.needs_queries and pol.observe_window is None and pol.needs_rope
    with pytest.raises(ValueError, match="expected_attention needs rope="):
        KVCache(1, H, D, policy=pol)
    for bad, match in (
        ({"n_future_positions": 0}, "n_future_positions must be an int > 0"),
        ({"n_sink": -1}, "n_sink must be an int >= 0"),
        ({"use_covariance": 1}, "use_covariance must be a bool"),
        ({"epsilon": float("nan")}, "epsilon must be a float >= 0"),
    ):
        with pytest.raises(ValueError, match=match):
            P.get("expected_attention", **bad)


def test_compressed_cache_runs_it_on_a_model():
    """Through transformers: the hooks observe every prompt query, the cache gets the model's
    RoPE frequencies, each head keeps its budget and generation goes on."""
    model = tiny("sdpa")
    cache = kh.compressed_cache(model, "expected_attention", 12, n_future_positions=32)
    ids = torch.randint(1, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model(input_ids=ids, **kh.cache_kwargs(model, cache))
        nxt = out.logits[:, -1:].argmax(-1)
        model(input_ids=nxt, **kh.cache_kwargs(model, cache))
    lengths = cache.kv.stored_lengths()
    assert (lengths == 13).all(), lengths
    # the cache refuses a policy that needs RoPE without rope=: compressed_cache passed it
    assert cache.kv.policy.needs_rope and cache.kv.num_compressions > 0
