"""``python -m kvcore serve``: transformers' OpenAI-compatible server over kvcore's cache.

``transformers serve --continuous-batching`` runs every model it loads through transformers'
continuous-batching engine. ``kvcore serve`` is the same server, with each model passed through
:func:`kvcore.serving.hf.enable` as it is loaded, so every request's KV lives in kvcore's
blocks and is compressed per request::

    python -m kvcore serve MODEL --policy snapkv --budget 1024 --kv-bytes 2000000000 \
        --kv-format int4 [transformers serve options]

kvcore's options (``--policy``, ``--budget``, ``--kv-bytes``, ``--kv-format``,
``--quant-group``, ``--block-size``, ``--decode-every``) are read first; everything else goes
to ``transformers serve`` unchanged, with ``--continuous-batching`` added. The KV memory is
``--kv-bytes``, or the engine's own ``--cb-num-blocks`` blocks; one of them is required. In
this process only, transformers' ``ModelManager`` is replaced by a subclass whose
``_load_model`` calls ``enable`` on the model it loaded (:func:`patched`); nothing else of
transformers changes.
docs/serving.md, section 4.

Needs transformers' serving extra (fastapi, uvicorn, openai), which ``make setup`` installs.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import transformers
from packaging.version import Version

from kvcore._args import positive
from kvcore.serving.hf import SERVED_FORMATS, Handle, enable, storage

#: The transformers series ``kvcore serve`` is tested on. It replaces
#: ``transformers.cli.serving.model_manager.ModelManager``, which 5.25 rewrote (``ModelLoader``,
#: API server processes, no ``non_blocking``), so every other series is refused at import.
#: :mod:`kvcore.serving.hf` itself supports more (``SUPPORTED_TRANSFORMERS``).
SERVE_TRANSFORMERS: tuple[tuple[int, int], ...] = ((5, 24),)


def check_serve_transformers(version: str) -> None:
    """Raise ImportError naming the series ``kvcore serve`` supports, when ``version`` is not
    one of them."""
    if tuple(Version(version).release[:2]) not in SERVE_TRANSFORMERS:
        names = ", ".join(f"{a}.{b}.x" for a, b in SERVE_TRANSFORMERS)
        raise ImportError(
            f"kvcore serve supports transformers {names}, found {version}: it replaces the "
            "private ModelManager of transformers serve, which changes between releases "
            f"(kvcore.serving.hf.enable itself works on this version). Install transformers "
            f"{names} to serve over HTTP (docs/serving.md, section 7)."
        )


check_serve_transformers(transformers.__version__)

#: ``transformers serve`` options that ``kvcore serve`` sets itself.
_REFUSED = {
    "--no-continuous-batching": "kvcore serve always runs continuous batching",
    "--attn-implementation": "kvcore.serving.hf.enable picks the attention itself",
}


def check_options(
    policy: str | None,
    budget: int | None,
    kv_bytes: int | None,
    block_size: int,
    decode_every: int | None,
) -> None:
    """What ``enable`` would refuse for every model, checked before the server starts.

    Raises:
        ValueError: an unknown policy name, a policy without a budget (or a budget without
            a policy), or a size below 1.
        TypeError: a size that is not an int.
    """
    from kvcore import policies

    if policy is not None and policy not in policies.names():
        raise ValueError(f"--policy {policy!r} is not a registered policy: {policies.names()}")
    if (policy is None) != (budget is None):
        raise ValueError("--policy and --budget go together (neither: no compression)")
    for flag, value in (
        ("--budget", budget),
        ("--kv-bytes", kv_bytes),
        ("--block-size", block_size),
        ("--decode-every", decode_every),
    ):
        if value is not None:
            positive(value, flag)


@contextlib.contextmanager
def patched(**enable_kwargs: Any) -> Iterator[list[Handle]]:
    """Within the block, every model transformers' serving ``ModelManager`` loads is passed
    through ``enable(model, **enable_kwargs)``; the class is put back on exit. Yields the list
    of :class:`~kvcore.serving.hf.Handle` objects, one per model loaded (its ``manager``'s
    ``kvcore_cache.stats()`` tells what the cache did).

    ``Serve.__init__`` imports ``ModelManager`` from its module when it runs, so a ``Serve``
    built inside the block uses the subclass.
    """
    from transformers.cli.serving import model_manager as mm

    base = mm.ModelManager
    handles: list[Handle] = []

    class KVCoreModelManager(base):  # type: ignore[misc, valid-type]
        def _load_model(self, *args: Any, **kwargs: Any) -> Any:
            model = super()._load_model(*args, **kwargs)
            handles.append(enable(model, **enable_kwargs))
            return model

    mm.ModelManager = KVCoreModelManager  # type: ignore[misc]
    try:
        yield handles
    finally:
        mm.ModelManager = base  # type: ignore[misc]


def main(argv: list[str]) -> int:
    """``kvcore serve``: parse kvcore's options, pass the rest to ``transformers serve``."""
    parser = argparse.ArgumentParser(
        prog="python -m kvcore serve",
        description="transformers serve (OpenAI-compatible, continuous batching) over kvcore's "
        "cache; options not listed here go to transformers serve (transformers serve --help)",
    )
    parser.add_argument("--policy", default=None, help="a kvcore.policies name (none: no eviction)")
    parser.add_argument("--budget", type=int, default=None, help="tokens a request keeps")
    parser.add_argument("--kv-bytes", type=int, default=None, help="K/V memory in bytes")
    parser.add_argument(
        "--kv-format",
        default="native",
        help=f"page format, one of {', '.join(SERVED_FORMATS)} (int: per-token quantized pages)",
    )
    parser.add_argument(
        "--quant-group", type=int, default=None, help="channels per group of int pages"
    )
    parser.add_argument("--block-size", type=int, default=16, help="kvcore block size")
    parser.add_argument("--decode-every", type=int, default=None, help="compress while decoding")
    opts, rest = parser.parse_known_args(argv)
    for arg in rest:
        flag = arg.split("=", 1)[0]
        if flag in _REFUSED:
            parser.error(f"{flag}: {_REFUSED[flag]}")
    try:
        check_options(opts.policy, opts.budget, opts.kv_bytes, opts.block_size, opts.decode_every)
        storage(opts.kv_format, opts.quant_group, opts.block_size)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    if opts.kv_bytes is None and not any(a.split("=", 1)[0] == "--cb-num-blocks" for a in rest):
        parser.error(
            "kvcore's cache needs a KV memory budget: --kv-bytes, or --cb-num-blocks (the "
            "engine's blocks of --cb-block-size tokens, every layer)"
        )
    if "--continuous-batching" not in rest:
        rest.append("--continuous-batching")

    import typer
    from transformers.cli.serve import Serve

    app = typer.Typer(add_completion=False)
    app.command()(Serve)
    with patched(
        policy=opts.policy,
        budget=opts.budget,
        kv_bytes=opts.kv_bytes,
        kv_format=opts.kv_format,
        quant_group=opts.quant_group,
        block_size=opts.block_size,
        decode_every=opts.decode_every,
    ):
        app(args=rest, prog_name="python -m kvcore serve")
    return 0
