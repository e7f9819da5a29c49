"""Memory presets: ask for a share of the full cache's bytes, get the measured best recipe.

A user has a memory target, not a recipe (policy, kept fraction, page format, tier, merge).
:func:`pick` answers one from :data:`MEASURED`, the kvcore methods of the committed quality
grid (``bench/results/quality_qwen4k.json``: Qwen2.5-Coder-0.5B-Instruct, 4k-token contexts,
query-agnostic protocol) that no other kvcore method beats: none holds at most as many bytes
with at least the same accuracy. The preset for ``memory=m`` is the most accurate of them
holding at most ``m`` of the full cache's K/V bytes (ties: fewer bytes), which is how
``bench/quality_report.py`` picks kvcore's best at equal memory. ``tests/test_presets.py``
checks both against the JSON, so a rerun of the grid that changes the answer fails the
tests until this table is regenerated (``bench/presets_table.py`` prints it).

``kvcore.hf.compressed_cache(model, memory=0.25, prompt_tokens=n)`` builds the cache of
:func:`pick`'s preset, ``memory_bytes=`` does the same from a byte budget (see
:func:`fraction_of`). The share is the one measured at 4k on that model: on another model or
length the bytes held differ somewhat (KIVI keeps its newest tokens in a full-precision
residual of a fixed size, so that share grows as the prompt shrinks).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from kvcore._args import positive
from kvcore.cache import Schedule

__all__ = ["MEASURED", "SOURCE", "Preset", "check_prompt_tokens", "fraction_of", "pick"]

#: The committed grid the table comes from (path in the repository).
SOURCE = "bench/results/quality_qwen4k.json"


@dataclasses.dataclass(frozen=True)
class Preset:
    """One measured recipe.

    Attributes:
        method: its name in the benchmark (``"infinipot+kivi2"``; ``"full+kivi2"`` keeps every
            token).
        keep: the kept fraction of the prompt's tokens (1.0: no eviction).
        policy: the eviction policy's registry name, or None.
        kv_format: the page format (``"kivi2"``, ``"int4"``, ...), or None (the model's dtype).
        merge: the merge of evicted tokens into kept ones, or None.
        evicted_format: the format of MiKV's tier for evicted tokens, or None.
        bytes_frac: K/V bytes it held over the full cache's, as measured.
        accuracy: the share of the grid's questions it answered.
        block_size: tokens per page (``+bs64`` in the method's name), or None (the default).
        quant_group: channels per quantization group (``+g64``), or None (the default).
    """

    method: str
    keep: float
    policy: str | None
    kv_format: str | None
    merge: str | None
    evicted_format: str | None
    bytes_frac: float
    accuracy: float
    block_size: int | None = None
    quant_group: int | None = None

    def keywords(self, prompt_tokens: int) -> dict[str, Any]:
        """The ``kvcore.hf.compressed_cache`` keywords of this recipe for a prompt of
        ``prompt_tokens`` tokens: ``policy``, ``budget`` (``round(keep * prompt_tokens)``, at
        least 1, per layer and kv-head, as the grid did), the schedule it was measured with
        (compress once, at the prefill) and its storage keywords.

        Raises:
            TypeError: ``prompt_tokens`` is not an int (kvcore's id/count rule).
            ValueError: ``prompt_tokens`` is below 1.
        """
        check_prompt_tokens(prompt_tokens)
        out: dict[str, Any] = {
            "policy": self.policy,
            "budget": max(1, round(self.keep * prompt_tokens)),
            "schedule": Schedule.prefill(multi_turn="once"),
        }
        for key in ("kv_format", "merge", "evicted_format", "block_size", "quant_group"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


# kvcore's Pareto front in SOURCE (protocol "agnostic"), fewest bytes first, accuracy
# strictly rising. Printed by `bench/presets_table.py bench/results/quality_qwen4k.json`.
# Preset(method, keep, policy, kv_format, merge, evicted_format, bytes_frac, accuracy)
MEASURED: tuple[Preset, ...] = (
    Preset("infinipot+kivi2", 0.5, "infinipot", "kivi2", None, None, 0.10961839610978323, 0.25),
    Preset("infinipot+kivi2", 0.75, "infinipot", "kivi2", None, None, 0.16442759416467487, 0.375),
    Preset("full+kivi2", 1.0, None, "kivi2", None, None, 0.22113244869364543, 0.75),
    Preset(
        "infinipot+k4v2+bs32",
        0.95,
        "infinipot",
        "k4v2",
        None,
        None,
        0.23868787604055056,
        0.875,
        block_size=32,
    ),
    Preset("full+k4v2", 1.0, None, "k4v2", None, None, 0.2834418527981538, 1.0),
)


def check_prompt_tokens(prompt_tokens: Any) -> None:
    """Raises TypeError unless ``prompt_tokens`` is an int (kvcore's id/count rule), and
    ValueError if it is below 1."""
    positive(prompt_tokens, "prompt_tokens")


def pick(memory: float, table: tuple[Preset, ...] = MEASURED) -> Preset:
    """The most accurate measured recipe holding at most ``memory`` of the full cache's bytes
    (ties: the one holding fewer bytes).

    Args:
        memory: a share of the full cache's K/V bytes, in (0, 1].
        table: the measured recipes (default: :data:`MEASURED`).

    Raises:
        TypeError: ``memory`` is not a real number.
        ValueError: ``memory`` is outside (0, 1], or no measured recipe fits in it (the
            message names the smallest one).
    """
    if not isinstance(memory, numbers.Real) or isinstance(memory, bool):
        raise TypeError(f"memory must be a real number in (0, 1], got {memory!r}")
    if not (math.isfinite(memory) and 0.0 < memory <= 1.0):
        raise ValueError(
            f"memory must be in (0, 1] (a share of the full cache's bytes), got {memory!r}"
        )
    fits = [p for p in table if p.bytes_frac <= memory]
    if not fits:
        if not table:
            raise ValueError(f"no measured presets: {SOURCE} has no kvcore result")
        least = min(table, key=lambda p: p.bytes_frac)
        raise ValueError(
            f"no measured recipe holds at most {memory:.1%} of the full cache's bytes; the "
            f"smallest, {least.method} at keep {least.keep}, held {least.bytes_frac:.1%} "
            f"({SOURCE})"
        )
    return max(fits, key=lambda p: (p.accuracy, -p.bytes_frac))


def fraction_of(memory_bytes: int, full_bytes: int) -> float:
    """``memory_bytes`` as a share of a full cache of ``full_bytes`` bytes, at most 1 (a budget
    that holds the whole cache gets the best measured recipe).

    Raises:
        TypeError: either is not an int (kvcore's id/count rule).
        ValueError: either is below 1.
    """
    used = positive(memory_bytes, "memory_bytes")
    full = positive(full_bytes, "full_bytes")
    return min(1.0, used / full)
