"""The Python side of kvcore's argument rules (docs/errors.md, "Argument rules").

The Rust bindings apply the same rules in ``rust/kvcore-py/src/convert.rs``; this module holds
them for the torch-side modules, so both languages accept and refuse the same values:

* an **id or count** is a Python ``int``, a numpy integer scalar or a 0-d integer numpy array;
  ``bool`` (Python, numpy or torch), floats, masked arrays and anything else raise
  ``TypeError`` (:func:`count`);
* a **size** (a count that decides how much is allocated or how long a loop runs) must also
  fit the machine's memory, :data:`MAX_ALLOC_BYTES`, the same limit the Rust core uses
  (:func:`size`);
* an **argument of a public function** of the torch-side modules has the type its annotation
  names (a ``torch.Tensor``, an ``int``, a ``QuantLayout``, ...): anything else raises
  ``TypeError`` naming the function and the argument before the function runs, and a torch
  shape error inside becomes a ``ValueError`` naming the function (:func:`check_arguments`).

Unknown keywords raise ``TypeError`` by Python's own rule, since no public function of these
modules takes ``**kwargs`` (``Policy.select`` checks its extra inputs by name).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from kvcore._kvcore import max_alloc_bytes

#: The most bytes one buffer may take: the machine's physical memory (the Rust core's limit).
MAX_ALLOC_BYTES: int = max_alloc_bytes


def count(x: Any, name: str) -> int:
    """``x`` as a non-negative int by the id/count rule, or ``TypeError`` / ``ValueError``."""
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got bool")
    if isinstance(x, np.ndarray):
        if isinstance(x, np.ma.MaskedArray):
            raise TypeError(f"{name} must be an int, got a masked array")
        if x.ndim != 0:
            raise TypeError(f"{name} must be an int, got an array of shape {list(x.shape)}")
        if x.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an int, got a 0-d array of dtype {x.dtype}")
        v = int(x)
    elif isinstance(x, (int, np.integer)):
        v = int(x)
    else:
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if v < 0:
        raise ValueError(f"{name} must be non-negative, got {v}")
    return v


def positive(x: Any, name: str) -> int:
    """A :func:`count` that must also be at least 1 (``ValueError`` otherwise)."""
    v = count(x, name)
    if v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v}")
    return v


def size(x: Any, name: str, bytes_each: int) -> int:
    """A :func:`count` whose ``bytes_each``-byte entries must fit :data:`MAX_ALLOC_BYTES`."""
    v = count(x, name)
    if v * max(bytes_each, 1) > MAX_ALLOC_BYTES:
        raise ValueError(
            f"{name} is too large: {v} entries of {max(bytes_each, 1)} bytes exceed the "
            f"{MAX_ALLOC_BYTES} bytes of memory this machine has"
        )
    return v


F = TypeVar("F", bound=Callable[..., Any])


def _strip_optional(ann: str) -> tuple[str, bool]:
    parts = [p.strip() for p in ann.split("|")]
    optional = "None" in parts
    rest = [p for p in parts if p != "None"]
    return (rest[0] if len(rest) == 1 else ""), optional


def _checker(ann: Any, namespace: dict[str, Any]) -> tuple[str, Callable[[Any], bool]] | None:
    """(what is expected, test) for an annotation this module knows how to check, else None."""
    import torch

    if not isinstance(ann, str):
        return None
    base, optional = _strip_optional(ann)
    tests: dict[str, tuple[str, Callable[[Any], bool]]] = {
        "torch.Tensor": ("a torch.Tensor", lambda x: isinstance(x, torch.Tensor)),
        "torch.dtype": ("a torch.dtype", lambda x: isinstance(x, torch.dtype)),
        "int": ("an int", _is_int),
        "float": (
            "a float",
            lambda x: (
                isinstance(x, (int, float, np.floating, np.integer))
                and not isinstance(x, (bool, np.bool_))
            ),
        ),
        "bool": ("a bool", lambda x: isinstance(x, (bool, np.bool_))),
        "str": ("a str", lambda x: isinstance(x, str)),
    }
    if base in ("Sequence[torch.Tensor]", "list[torch.Tensor]"):
        found: tuple[str, Callable[[Any], bool]] | None = (
            "a sequence of torch.Tensor",
            lambda x: isinstance(x, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in x),
        )
    elif base in tests:
        found = tests[base]
    else:
        cls = namespace.get(base)
        if not isinstance(cls, type):
            return None
        if getattr(cls, "_is_protocol", False):
            attrs = [a for a in getattr(cls, "__annotations__", {})] + [
                a for a, v in vars(cls).items() if not a.startswith("_") and callable(v)
            ]
            found = (
                f"a {base} (with {', '.join(attrs)})",
                lambda x, attrs=attrs: all(hasattr(x, a) for a in attrs),
            )
        else:
            found = (f"a {cls.__name__}", lambda x, cls=cls: isinstance(x, cls))
    if found is None:
        return None
    what, test = found
    if optional:
        return f"{what} or None", lambda x: x is None or test(x)
    return what, test


def _is_int(x: Any) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, np.ndarray):
        return x.ndim == 0 and x.dtype.kind in "iu" and not isinstance(x, np.ma.MaskedArray)
    return isinstance(x, (int, np.integer))


def _on_gpu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    import torch

    values = list(args) + list(kwargs.values())
    return any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in values)


def check_arguments(fn: F) -> F:
    """Wraps a public function of a stateless torch-side module so that it fails cleanly.

    * Each argument whose annotation is a type this module knows (``torch.Tensor``,
      ``torch.dtype``, ``int``, ``float``, ``bool``, ``str``, ``Sequence[torch.Tensor]``, a
      class or protocol of the module, any of them ``| None``) is checked first: a wrong type
      raises ``TypeError`` naming the function, the argument and the expected type, instead of
      an ``AttributeError`` from deep inside.
    * For a function of tensors, on CPU, a ``RuntimeError``, ``IndexError`` or ``KeyError``
      raised inside (torch's shape and dtype checks, a lookup of an unsupported value) means
      the arguments do not fit together: it is re-raised as ``ValueError`` naming the function,
      with the original as ``__cause__``. On a GPU it is left alone: it can be a device
      failure instead.
    """
    params = []
    for i, p in enumerate(inspect.signature(fn).parameters.values()):
        check = _checker(p.annotation, fn.__globals__)
        if check is not None:
            pos = i if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else -1
            params.append((pos, p.name, *check))

    # Only a function of tensors turns torch's errors into ValueError: a helper such as
    # ``nvrtc_compile`` raises its own documented RuntimeError.
    takes_tensors = any("Tensor" in what for _, _, what, _ in params)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for pos, name, what, test in params:
            if 0 <= pos < len(args):
                x = args[pos]
            elif name in kwargs:
                x = kwargs[name]
            else:
                continue  # a default, or a missing argument Python reports itself
            if not test(x):
                raise TypeError(f"{fn.__name__}: {name} must be {what}, got {type(x).__name__}")
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, IndexError, KeyError) as e:
            if not takes_tensors or isinstance(e, NotImplementedError) or _on_gpu(args, kwargs):
                raise
            raise ValueError(f"{fn.__name__}: the arguments do not fit together: {e}") from e

    return wrapper  # type: ignore[return-value]


def check_module(namespace: dict[str, Any], module: str) -> None:
    """Applies :func:`check_arguments` to every public function defined in ``module``."""
    for key, value in list(namespace.items()):
        if not key.startswith("_") and inspect.isfunction(value) and value.__module__ == module:
            namespace[key] = check_arguments(value)
