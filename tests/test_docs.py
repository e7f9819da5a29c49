"""The docs stay true to the code: their examples run, and the quoted messages are exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kvcore

DOCS = Path(__file__).resolve().parents[1] / "docs"


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(info string, body)`` of every fenced block, pairing fences line by line."""
    blocks: list[tuple[str, str]] = []
    info: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        if line.startswith("```"):
            if info is None:
                info, body = line[3:].strip(), []
            else:
                blocks.append((info, "\n".join(body) + "\n"))
                info = None
        elif info is not None:
            body.append(line)
    assert info is None, "unclosed fenced block"
    return blocks


def python_blocks(text: str) -> list[str]:
    return [body for info, body in fenced_blocks(text) if info == "python"]


def test_allocator_md_examples_run_in_order() -> None:
    blocks = python_blocks((DOCS / "allocator.md").read_text())
    assert len(blocks) >= 10, "allocator.md lost its examples"
    ns: dict[str, Any] = {"np": np, "kvcore": kvcore}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"allocator.md block {i}", "exec"), ns)
        except Exception as e:  # pragma: no cover - the message is the point
            pytest.fail(f"allocator.md python block {i} failed: {e!r}\n{block}")


def session_examples(text: str) -> list[tuple[str, str | None]]:
    """Every ``>>> code`` line of the ``` blocks, with the ``Name: message`` line after it."""
    out: list[tuple[str, str | None]] = []
    for info, block in fenced_blocks(text):
        if info:
            continue
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.startswith(">>> "):
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                out.append((line[4:], None if nxt.startswith(">>>") or not nxt else nxt))
    return out


def test_errors_md_messages_are_exact() -> None:
    examples = session_examples((DOCS / "errors.md").read_text())
    assert len(examples) >= 30, "errors.md lost its examples"
    ns: dict[str, Any] = {"np": np, "BlockAllocator": kvcore.BlockAllocator}
    for code, expected in examples:
        code = code.split("  #")[0]
        if expected is None:
            exec(code, ns)
            continue
        name, _, message = expected.partition(": ")
        try:
            exec(code, ns)
        except Exception as e:
            err = e
        else:
            pytest.fail(f"{code!r} raised nothing; errors.md says {expected!r}")
        assert type(err).__name__ == name, f"{code}: got {err!r}"
        assert str(err) == message, f"{code}: message changed"
