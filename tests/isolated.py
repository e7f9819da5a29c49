"""Run a snippet of Python in a fresh interpreter and report how it ended.

A call that aborts the process (SIGABRT from a failed allocation), hangs or lets a
``PanicException`` escape must fail one test and name the call, not take the test run down with
it. :func:`outcome` runs the snippet in a subprocess with a time limit and returns what happened:
``"ok"``, the name of the exception it raised with its message, ``"timeout"`` or
``"signal N"``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

_RUNNER = r"""
import json, sys, traceback
src = sys.stdin.read()
try:
    exec(compile(src, "<case>", "exec"), {"__name__": "__case__"})
    print(json.dumps({"kind": "ok"}))
except BaseException as e:  # PanicException is a BaseException: report it, do not die
    print(json.dumps({"kind": type(e).__name__, "module": type(e).__module__,
                      "message": str(e), "mro": [c.__name__ for c in type(e).__mro__]}))
"""


@dataclass(frozen=True)
class Outcome:
    kind: str  # "ok", an exception class name, "timeout" or "signal N"
    message: str = ""
    mro: tuple[str, ...] = ()

    def raised(self, name: str) -> bool:
        """True when the snippet raised an exception that is an instance of class ``name``."""
        return name in self.mro

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}" if self.message else self.kind


def outcome(source: str, timeout: float = 30.0) -> Outcome:
    """Runs ``source`` (with ``numpy as np`` and ``kvcore`` imported) in a fresh interpreter."""
    prelude = "import numpy as np\nimport kvcore\nfrom kvcore import _kvcore as k\n"
    try:
        r = subprocess.run(
            [sys.executable, "-c", _RUNNER],
            input=prelude + source,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return Outcome("timeout")
    if r.returncode < 0:
        return Outcome(f"signal {-r.returncode}", r.stderr.strip()[-300:])
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        return Outcome(f"exit {r.returncode}", r.stderr.strip()[-300:])
    d = json.loads(lines[-1])
    return Outcome(d["kind"], d.get("message", ""), tuple(d.get("mro", ())))
