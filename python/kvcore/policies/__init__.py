"""Registry of training-free KV-cache policies: which tokens stay.

Build a policy with :func:`get`::

    policy = kvcore.policies.get("snapkv", window=32, kernel=7)
    scores = policy.score(window_probs, num_kv_heads=8)   # (layers, kv_heads, n) float32
    sel = policy.select(scores, budget=512)               # CSR ready for compact_batch
    allocator.compact_batch(tables, sel.indptr, sel.positions)

Every policy works on numpy arrays; the torch layer computes the heavy statistics (softmax of
a few query rows against the keys) and hands them over as float32 arrays. Scores are laid out
``(num_layers, num_heads, n)``; rows of the returned CSR are ``row = layer * num_heads + head``.

One file per policy in this package; each declares its parameters, the statistics it needs
(:class:`Need`) and its call into the Rust selection. The same object drives
:class:`kvcore.KVCache` (``policy=kvcore.policies.get("snapkv", budget=256)``). A policy
written outside the package joins with :func:`register` (docs/policies.md).

Each parameter has a default and the source it was read from
(``shared/research/seed_algorithms.md``); defaults marked *unverified* were recalled from a
paper body and not checked against it, so they are parameters with the recommended value.
"""

from __future__ import annotations

from typing import Any, TypeVar

from kvcore.policies.adakv import AdaKVPolicy
from kvcore.policies.base import HeadGroup, Need, Policy, Selection, select_topk
from kvcore.policies.expected_attention import ExpectedAttentionPolicy
from kvcore.policies.h2o import H2OPolicy
from kvcore.policies.infinipot import InfiniPotPolicy
from kvcore.policies.knorm import KNormPolicy
from kvcore.policies.locret import LocretPolicy
from kvcore.policies.longgen import LongGenPolicy
from kvcore.policies.params import BUDGET, Param
from kvcore.policies.pyramidkv import PyramidKVPolicy
from kvcore.policies.razor import RazorPolicy
from kvcore.policies.snapkv import SnapKVPolicy
from kvcore.policies.streaming import StreamingPolicy
from kvcore.policies.tova import TOVAPolicy

__all__ = [
    "BUDGET",
    "AdaKVPolicy",
    "ExpectedAttentionPolicy",
    "H2OPolicy",
    "HeadGroup",
    "InfiniPotPolicy",
    "KNormPolicy",
    "LocretPolicy",
    "LongGenPolicy",
    "Need",
    "Param",
    "Policy",
    "PyramidKVPolicy",
    "REGISTRY",
    "RazorPolicy",
    "Selection",
    "SnapKVPolicy",
    "StreamingPolicy",
    "TOVAPolicy",
    "get",
    "names",
    "register",
    "select_topk",
    "unregister",
]

REGISTRY: dict[str, type[Policy]] = {}

P = TypeVar("P", bound=type[Policy])

_CLASS_ATTRS = ("name", "paper", "phase", "granularity", "params")


def register(cls: P, *, replace: bool = False) -> P:
    """Adds a policy class to the registry under ``cls.name`` (usable as a decorator).

    Raises:
        TypeError: ``cls`` is not a :class:`Policy` subclass, lacks one of ``name``,
            ``paper``, ``phase``, ``granularity``, ``params``, declares a need that is not a
            :class:`Need`, or has no ``budget`` parameter.
        ValueError: the name is taken (pass ``replace=True``), or a parameter's default
            fails its own check.
    """
    if not isinstance(cls, type) or not issubclass(cls, Policy):
        raise TypeError(f"register takes a kvcore.policies.Policy subclass, got {cls!r}")
    missing = [a for a in _CLASS_ATTRS if not hasattr(cls, a)]
    if missing:
        raise TypeError(f"{cls.__name__} must set {', '.join(missing)}")
    if not isinstance(cls.name, str) or not cls.name:
        raise TypeError(f"{cls.__name__}.name must be a non-empty str, got {cls.name!r}")
    if not isinstance(cls.needs, frozenset) or not all(isinstance(n, Need) for n in cls.needs):
        raise TypeError(
            f"{cls.__name__}.needs must be a frozenset of kvcore.policies.Need, got {cls.needs!r}"
        )
    if "budget" not in cls.params:
        raise TypeError(f"{cls.__name__}.params needs a 'budget' entry (kvcore.policies.BUDGET)")
    for key, p in cls.params.items():
        if not p.check(p.default):
            raise ValueError(f"{cls.__name__}.params[{key!r}]'s default fails its own check")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls and not replace:
        raise ValueError(
            f"a policy named {cls.name!r} is registered already ({REGISTRY[cls.name].__name__}); "
            "pass replace=True to replace it"
        )
    REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> type[Policy]:
    """Removes ``name`` from the registry and returns its class (KeyError if absent)."""
    return REGISTRY.pop(name)


for _cls in (
    StreamingPolicy,
    H2OPolicy,
    SnapKVPolicy,
    PyramidKVPolicy,
    AdaKVPolicy,
    TOVAPolicy,
    KNormPolicy,
    InfiniPotPolicy,
    RazorPolicy,
    LocretPolicy,
    LongGenPolicy,
    ExpectedAttentionPolicy,
):
    register(_cls)


def names() -> list[str]:
    """The registered policy names."""
    return list(REGISTRY)


def get(name: str, **params: Any) -> Policy:
    """Builds the policy ``name`` with ``params`` over its defaults.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or an invalid value.
        TypeError: unknown parameter (the message lists the valid ones).
    """
    try:
        cls = REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown policy {name!r}; valid policies: {', '.join(REGISTRY)}"
        ) from None
    return cls(**params)
