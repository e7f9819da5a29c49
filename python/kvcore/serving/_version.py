"""The transformers series :mod:`kvcore.serving.hf` supports, checked before any of its
modules imports transformers' private continuous-batching classes."""

from __future__ import annotations

from packaging.version import Version

#: The transformers release series this integration is tested on. It subclasses private
#: classes of ``transformers.generation.continuous_batching``, which change between minor
#: releases, so every other series is refused at import.
SUPPORTED_TRANSFORMERS: tuple[tuple[int, int], ...] = ((5, 24), (5, 25))


def check_transformers(version: str) -> None:
    """Raise ImportError naming the supported series when ``version`` is not one of them."""
    series = tuple(Version(version).release[:2])
    if series not in SUPPORTED_TRANSFORMERS:
        names = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_TRANSFORMERS)
        raise ImportError(
            f"kvcore.serving.hf supports transformers {names}, found {version}: it subclasses "
            "the private continuous-batching classes (PagedAttentionCache, "
            "ContinuousBatchProcessor, ContinuousBatchingManager), which change between "
            f"releases. Install transformers {names} (docs/serving.md, section 7)."
        )
