"""Which transformers release :mod:`kvcore.hf` runs on: the lowest it supports (refused at
import below it) and the forward keyword that carries the cache (``cache`` since 5.24, the
older ``past_key_values`` before). :mod:`kvcore.hf` re-exports the public names."""

from __future__ import annotations

import inspect
from typing import Any

import transformers
from packaging.version import Version

#: The lowest transformers release kvcore.hf supports (``get_query_offset`` appeared in 5.14).
MIN_TRANSFORMERS = (5, 14)
#: The forward keywords that carry the cache: ``cache`` since transformers 5.24, and the older
#: ``past_key_values`` (still accepted, deprecated, until 5.40).
CACHE_KWARGS = ("cache", "past_key_values")


def _release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string (``"5.15.0rc1"`` -> ``(5, 15, 0)``)."""
    return tuple(Version(version).release)


if _release(transformers.__version__) < MIN_TRANSFORMERS:
    raise ImportError(
        f"kvcore.hf needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))}, found "
        f"{transformers.__version__}: older releases build attention masks from the cache's "
        "logical length, which is wrong once tokens are evicted. Upgrade transformers "
        "(docs/cache.md lists the tested versions)."
    )


def cache_kwarg(model: Any) -> str:
    """The keyword ``model``'s forward takes its cache by: ``"cache"`` (transformers >= 5.24)
    or ``"past_key_values"`` (earlier releases)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{cache_kwarg(model): cache}``: pass a cache to ``model(...)`` or
    ``model.generate(...)`` by the keyword this transformers release expects."""
    return {cache_kwarg(model): cache}


def cache_of(output: Any) -> Any:
    """The cache a model output carries: its ``cache`` field (transformers >= 5.24) or its
    ``past_key_values`` field (earlier releases); None when it carries neither."""
    for name in CACHE_KWARGS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def _cache_from(kwargs: dict[str, Any]) -> Any:
    for name in CACHE_KWARGS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None
