"""Run snippets of Python in a fresh interpreter and report how each ended.

A call that aborts the process (SIGABRT from a failed allocation), hangs or lets a
``PanicException`` escape must fail one test and name the call, not take the test run down with
it. :func:`outcome` runs one snippet in a subprocess with a time limit and returns what
happened: ``"ok"``, the name of the exception it raised with its message, ``"timeout"`` or
``"signal N"``. :func:`outcomes` runs many snippets in as few interpreters as possible: one
runs them in order and reports each as it ends; when it dies or stalls, the snippet it was
running is the one to blame and a new interpreter goes on with the next.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

_PRELUDE = "import numpy as np\nimport kvcore\nfrom kvcore import _kvcore as k\n"

# Reads a JSON list of snippets and prints one JSON line per snippet as soon as it ends.
_RUNNER = r"""
import json, sys
for src in json.loads(sys.stdin.read()):
    try:
        exec(compile(src, "<case>", "exec"), {"__name__": "__case__"})
        d = {"kind": "ok"}
    except BaseException as e:  # PanicException is a BaseException: report it, do not die
        d = {"kind": type(e).__name__, "message": str(e)[:2000],
             "mro": [c.__name__ for c in type(e).__mro__]}
    print(json.dumps(d), flush=True)
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


def _parse(line: str) -> Outcome:
    d = json.loads(line)
    return Outcome(d["kind"], d.get("message", ""), tuple(d.get("mro", ())))


def _run(sources: list[str], timeout: float) -> tuple[list[Outcome], Outcome | None]:
    """Runs ``sources`` in one interpreter, each within ``timeout`` seconds: the outcomes of
    those that ended, and how the interpreter ended if it did not finish them all (the next
    source, the one it was running, is to blame)."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _RUNNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True)
        reader.start()
        proc.stdin.write(json.dumps([_PRELUDE + s for s in sources]))
        proc.stdin.close()
        done: list[Outcome] = []
        died = None
        # The first snippet also pays for the interpreter's start and imports.
        limit = timeout + 30
        while len(done) < len(sources):
            try:
                line = lines.get(timeout=limit)
            except queue.Empty:
                if proc.poll() is None:
                    proc.kill()
                    died = Outcome("timeout")
                break
            done.append(_parse(line))
            limit = timeout
        proc.wait()
        reader.join(5)
        while len(done) < len(sources) and not lines.empty():
            done.append(_parse(lines.get()))
        if died is None and len(done) < len(sources):
            rc = proc.returncode
            err.seek(0)
            tail = err.read()[-300:].strip()
            died = Outcome(f"signal {-rc}" if rc < 0 else f"exit {rc}", tail)
    return done, died


def outcome(source: str, timeout: float = 30.0) -> Outcome:
    """Runs ``source`` (with ``numpy as np``, ``kvcore`` and ``kvcore._kvcore as k`` imported)
    in a fresh interpreter."""
    done, died = _run([source], timeout)
    return done[0] if done else died or Outcome("exit ?")


def outcomes(sources: list[str], timeout: float = 30.0) -> list[Outcome]:
    """Runs every source, in order, each within ``timeout`` seconds, in as few fresh
    interpreters as possible."""
    results: list[Outcome] = []
    while len(results) < len(sources):
        done, died = _run(sources[len(results) :], timeout)
        results.extend(done)
        if died is not None:
            results.append(died)
    return results
