"""Issue 13's size limits on the Python library: no file in python/kvcore longer than 600 lines,
no class longer than 400 (a class that grows past them is doing more than one part's job)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 600
MAX_CLASS_LINES = 400


def test_no_file_over_600_lines_and_no_class_over_400() -> None:
    files = sorted((ROOT / "python" / "kvcore").rglob("*.py"))
    assert len(files) > 20  # the walk found the library
    too_long = []
    for path in files:
        text = path.read_text()
        name = str(path.relative_to(ROOT))
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                n = node.end_lineno - node.lineno + 1
                if n > MAX_CLASS_LINES:
                    too_long.append(f"{name}: class {node.name}: {n} lines")
    assert too_long == []
