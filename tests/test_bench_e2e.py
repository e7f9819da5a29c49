"""bench/bench_e2e.py: the GPU decode-throughput benchmark's code path, run on a tiny CPU
model (``--smoke``), and its refusal to measure without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_e2e.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_smoke_run_measures_every_method(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    methods = "kvcore:snapkv@0.25,kvcore:snapkv@0.25+int4,kvcore:streaming@0.125"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--smoke",
            "--contexts",
            "256",
            "--new-tokens",
            "2",
            "--methods",
            methods,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["device"] == "cpu (smoke)"
    cells = {c["method"]: c for c in data["cells"]}
    assert list(cells) == ["full", *methods.split(",")]
    for c in cells.values():
        assert "error" not in c, c
        assert c["context"] == 256 and c["decode_tokens_per_s"] > 0
    full = cells["full"]["kv_bytes"]
    # 2 layers x 2 kv heads x 16 dims, K and V, float32: the prompt, the warm-up step, 2 steps
    assert full == 2 * 2 * 2 * 16 * 4 * (256 + 1 + 2)
    # the budget (64 tokens, block rounding) plus at most one chunk, never the whole prompt
    assert cells["kvcore:snapkv@0.25"]["kv_bytes"] < full / 2
    assert cells["kvcore:snapkv@0.25+int4"]["kv_bytes"] < cells["kvcore:snapkv@0.25"]["kv_bytes"]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_refuses_without_a_gpu() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert proc.returncode == 2
    assert "needs a CUDA device" in proc.stderr and "nothing was measured" in proc.stderr
