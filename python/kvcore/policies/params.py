"""Policy parameters: a default with its source and a check, and the shared checks.

No torch here: ``import kvcore.policies`` works without it. A per-head budget tensor is
recognised by looking for ``torch`` among the loaded modules (a caller holding a tensor has
imported it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
from numpy.typing import NDArray

from kvcore import _args

if TYPE_CHECKING:
    import torch

F32 = NDArray[np.float32]


@dataclass(frozen=True)
class Param:
    """One policy parameter: its default, where the default comes from, and a check."""

    default: Any
    source: str
    check: Callable[[Any], bool]
    expected: str
    unverified: bool = False


def nonneg_int(x: Any) -> bool:
    return bool(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0)


def pos_int(x: Any) -> bool:
    return nonneg_int(x) and x > 0


def odd_int(x: Any) -> bool:
    return bool(pos_int(x) and x % 2 == 1)


def unit(x: Any) -> bool:
    return bool(
        isinstance(x, (int, float, np.floating)) and not isinstance(x, bool) and 0.0 <= x <= 1.0
    )


def one_of(*opts: str) -> Callable[[Any], bool]:
    return lambda x: x in opts


def int_tuple(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and all(nonneg_int(v) for v in x)


def is_tensor(x: Any) -> TypeGuard[torch.Tensor]:
    """Whether ``x`` is a torch tensor (without importing torch)."""
    mod = sys.modules.get("torch")
    return mod is not None and isinstance(x, mod.Tensor)


def opt_budget(x: Any) -> bool:
    # A tensor is a per-head budget; Policy checks its shape, dtype and sign.
    return x is None or nonneg_int(x) or is_tensor(x)


def opt_callable(x: Any) -> bool:
    return x is None or callable(x)


BUDGET = Param(None, "given at select time when None", opt_budget, "None or an int >= 0")

GQA = Param(
    "mean",
    "AdaKV pred.py gqa_func=mean; kvpress mean per group",
    one_of("mean", "max"),
    "'mean' or 'max'",
)


def scores3(scores: Any) -> F32:
    """``scores`` checked as float32 ``(num_layers, num_heads, n)``."""
    if not isinstance(scores, np.ndarray):
        raise TypeError(
            "scores must be a numpy float32 array of shape (num_layers, num_heads, n), "
            f"got {type(scores).__name__}"
        )
    if scores.dtype != np.float32:
        raise TypeError(
            "scores must be a numpy float32 array of shape (num_layers, num_heads, n), "
            f"got dtype {scores.dtype}"
        )
    if isinstance(scores, np.ma.MaskedArray):
        raise TypeError("scores must be a numpy float32 array, got a masked array")
    if scores.ndim != 3:
        raise ValueError(
            f"scores must have shape (num_layers, num_heads, n), got shape {scores.shape}"
        )
    _args.size(scores.size, "scores", scores.itemsize)  # a broadcast view is copied below
    return scores


def check_nd(a: Any, name: str, dims: str) -> None:
    """TypeError unless a float32 numpy array, ValueError unless it has ``dims``."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        got = f"dtype {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"{name} must be a numpy float32 array of shape ({dims}), got {got}")
    if a.ndim != len(dims.split(",")):
        raise ValueError(f"{name} must have shape ({dims}), got shape {a.shape}")


def rows(scores: F32) -> F32:
    """``(L, H, n)`` -> ``(L * H, n)`` contiguous, row ``layer * H + head``."""
    L, H, n = scores.shape
    return np.ascontiguousarray(scores.reshape(L * H, n))
