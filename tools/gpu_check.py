"""The GPU check: one prepared command that runs kvcore's whole GPU half on a lent machine.

The GPU machine (docs/kernels.md, "The GPU check") has Python 3.12, torch, CuPy, transformers,
pytest and hypothesis, reaches no package registry, and receives only the working tree plus
the paths named in ``carry``. So the extension travels as a wheel built here.

    python tools/gpu_check.py prepare           # here: the abi3 release wheel into .gpu-check/
    python tools/gpu_check.py run --out DIR     # there: everything below, files into DIR ($OUT)
    python tools/gpu_check.py collect DIR       # here: DIR's files into bench/results/ (named
                                                # by the GPU) and docs/benchmarks.md regenerated
    python tools/gpu_check.py --dry-run         # here, on the CPU: prepare, run and collect
                                                # into a temporary folder, every file checked

``run`` (each step under its own time limit, all of them inside ``--budget`` seconds; a step
that fails or runs out of time is recorded and the next one still runs):

1. installs the wheel with ``pip install --no-index --no-deps --target`` and checks that
   ``import kvcore`` is that release build;
2. ``tools/kernel_smoke.py``: every kernel once, small shapes, against its torch reference;
3. ``bench/bench_kernels.py --quick`` -> ``kernels.json``;
4. the smoke script under ``compute-sanitizer --tool memcheck`` and ``--tool racecheck``
   (only the kernels named ``kv_*`` are instrumented) -> ``memcheck.log``, ``racecheck.log``;
5. ``bench/bench_e2e.py --quick`` -> ``e2e.json`` (rewritten after each cell);
6. ``pytest tests/gpu``;

and writes ``summary.json`` (each step's command, status, seconds and summary line) and
``gpu_check.log`` (every step's output). Seven files: the device tool brings back at most eight.

``--dry-run`` runs the same steps with their CPU modes (the smoke script and the kernel
benchmark with the kernels emulated by g++, the end-to-end benchmark's tiny ``--smoke``
model, tests/gpu collected and skipped; no sanitizer, which needs a GPU), then ``collect``
into a temporary results folder and document, and fails unless every file appeared and
parsed. It checks the recipe, not the GPU: a dry run measures nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / ".gpu-check"  # git-ignored; the device tool's `carry` takes it along
# What the wheel is built from: a wheel newer than every one of these files is fresh.
WHEEL_INPUTS = ("rust", "python/kvcore", "Cargo.toml", "Cargo.lock", "pyproject.toml")
OUTPUTS = (
    "summary.json",
    "gpu_check.log",
    "smoke.json",
    "kernels.json",
    "e2e.json",
    "memcheck.log",
    "racecheck.log",
)
DRY_OUTPUTS = ("summary.json", "gpu_check.log", "smoke.json", "kernels.json", "e2e.json")
# The dry run's end-to-end methods: one evicting cache and one with int4 pages, at 8x.
DRY_E2E = "kvcore:streaming@0.125,kvcore:snapkv@0.125+int4"
PYTEST_SUMMARY = r"^=*\s*\d+ (?:passed|failed|skipped|errors?|deselected).*$"
LOG_CHARS = 400_000  # per step in gpu_check.log: its head and its tail
# Step time limits in seconds on the GPU machine (all of them also inside --budget).
LIMITS = {
    "install": 60,
    "smoke": 90,
    "bench_kernels": 120,
    "memcheck": 90,
    "racecheck": 90,
    "bench_e2e": 180,
    "tests_gpu": 150,
}


def _newest_input() -> float:
    newest = 0.0
    for name in WHEEL_INPUTS:
        p = ROOT / name
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            if "target" in f.parts or f.suffix in (".so", ".pyc") or "__pycache__" in f.parts:
                continue
            newest = max(newest, f.stat().st_mtime)
    return newest


def fresh_wheel() -> Path | None:
    """The newest kvcore wheel in .gpu-check/ or dist/ built after its last input changed."""
    newest = _newest_input()
    wheels = [*WHEEL_DIR.glob("kvcore-*.whl"), *(ROOT / "dist").glob("kvcore-*.whl")]
    wheels = [w for w in wheels if w.stat().st_mtime > newest]
    return max(wheels, key=lambda w: w.stat().st_mtime) if wheels else None


def check_wheel(wheel: Path) -> None:
    """The wheel holds the extension and every CUDA source the loader reads."""
    names = set(zipfile.ZipFile(wheel).namelist())
    want = [f"kvcore/cuda/{p.name}" for p in sorted((ROOT / "cuda").glob("*.cu"))]
    want.append("kvcore/cuda/kvcore_common.cuh")
    missing = [n for n in want if n not in names]
    if not any(n.startswith("kvcore/_kvcore") and n.endswith(".so") for n in names):
        missing.append("kvcore/_kvcore*.so")
    if missing:
        raise SystemExit(f"gpu_check.py: {wheel.name} lacks {', '.join(missing)}")


def prepare(rebuild: bool = False) -> Path:
    """Builds (or reuses a fresh) abi3 release wheel into .gpu-check/, with build.json."""
    wheel = None if rebuild else fresh_wheel()
    WHEEL_DIR.mkdir(exist_ok=True)
    if wheel is None:
        for old in WHEEL_DIR.glob("kvcore-*.whl"):
            old.unlink()
        print("gpu_check.py: building the release wheel (maturin build --release)", flush=True)
        maturin = shutil.which("maturin", path=str(Path(sys.executable).parent)) or "maturin"
        subprocess.run(
            [maturin, "build", "--release", "-q", "-o", str(WHEEL_DIR)], cwd=ROOT, check=True
        )
        wheel = max(WHEEL_DIR.glob("kvcore-*.whl"), key=lambda w: w.stat().st_mtime)
    elif wheel.parent != WHEEL_DIR:
        for old in WHEEL_DIR.glob("kvcore-*.whl"):
            old.unlink()
        wheel = Path(shutil.copy2(wheel, WHEEL_DIR / wheel.name))
    else:
        print(f"gpu_check.py: reusing {wheel.name} (newer than every input)")
    check_wheel(wheel)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", *WHEEL_INPUTS, "bench", "tests", "tools"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    build = {"wheel": wheel.name, "commit": commit, "uncommitted_changes": bool(dirty)}
    (WHEEL_DIR / "build.json").write_text(json.dumps(build, indent=1) + "\n")
    print(f"gpu_check.py: {wheel.relative_to(ROOT)} ({wheel.stat().st_size // 1024} KiB) ready")
    return wheel


# ---------------------------------------------------------------------------------------- run


class Runner:
    """Runs steps under time limits inside one budget, logging everything to ``out``."""

    def __init__(
        self, out: Path, budget: float, env: dict[str, str], meta: dict[str, Any] | None = None
    ) -> None:
        self.out, self.env, self.meta = out, env, meta
        self.deadline = time.monotonic() + budget
        self.steps: list[dict[str, Any]] = []
        self.log = (out / "gpu_check.log").open("a")

    def summary(self, dry: bool = False) -> dict[str, Any]:
        """``meta`` with the steps so far; written to summary.json after every step, so a run
        stopped from outside still says how far it got."""
        ok = all(s["status"] == "ok" or (dry and s["status"] == "skipped") for s in self.steps)
        out = {**(self.meta or {}), "steps": self.steps, "ok": ok}
        (self.out / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
        return out

    def step(
        self,
        name: str,
        cmd: Sequence[str],
        limit: float,
        summary: str | None = None,
        skip_rc: tuple[int, str] | None = None,
    ) -> dict[str, Any]:
        """Runs ``cmd``; ``summary`` is a regex whose last match in the output is recorded;
        ``skip_rc``: an exit status that means "skipped", and the reason."""
        left = self.deadline - time.monotonic()
        rec: dict[str, Any] = {"step": name, "command": " ".join(cmd)}
        if left < 5:
            rec.update(status="skipped", reason="the check's time budget is spent", seconds=0)
            return self._done(rec, "")
        timeout = min(limit, left)
        t0 = time.monotonic()
        self.log.write(f"\n===== {name}: {rec['command']} (limit {timeout:.0f} s)\n")
        self.log.flush()
        proc = subprocess.Popen(
            list(cmd),
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a timeout kills the whole group (sanitizer + python)
        )
        try:
            text, _ = proc.communicate(timeout=timeout)
            rec["rc"] = proc.returncode
            rec["status"] = "ok" if proc.returncode == 0 else "failed"
            if skip_rc and proc.returncode == skip_rc[0]:
                rec.update(status="skipped", reason=skip_rc[1])
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
            rec.update(rc=None, status="timeout")
        rec["seconds"] = round(time.monotonic() - t0, 1)
        if summary:
            found = re.findall(summary, text or "", flags=re.MULTILINE)
            rec["summary"] = found[-1] if found else None
        return self._done(rec, text or "")

    def skip(self, name: str, reason: str) -> None:
        self._done({"step": name, "status": "skipped", "reason": reason, "seconds": 0}, "")

    def _done(self, rec: dict[str, Any], text: str) -> dict[str, Any]:
        if len(text) > LOG_CHARS:  # the device tool brings back files of at most 16 MiB
            cut = len(text) - LOG_CHARS
            text = (
                f"{text[: LOG_CHARS // 5]}\n[... {cut} characters left out ...]\n"
                + text[-(LOG_CHARS - LOG_CHARS // 5) :]
            )
        self.log.write(text)
        self.log.write(f"----- {rec['step']}: {rec['status']} ({rec['seconds']} s)\n")
        self.log.flush()
        print(f"[gpu_check] {rec['step']}: {rec['status']} ({rec['seconds']} s)", flush=True)
        self.steps.append(rec)
        if self.meta is not None:
            self.summary(self.meta.get("mode") == "dry-run")
        return rec


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    for cand in (found, "/usr/local/cuda/bin/compute-sanitizer"):
        if cand and Path(cand).is_file():
            return cand
    return None


def _gpu_report() -> Any:
    """``bench/gpu_report.py`` (stdlib only): the report, and the sanitizer-summary rule that
    ``run`` records and the report falls back on."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return gpu_report


def run(out: Path, budget: float, dry: bool, wheel: Path | None = None) -> int:
    """The check itself (``dry``: the CPU modes). Returns 0 when every step passed."""
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if wheel is None:
        wheels = sorted(WHEEL_DIR.glob("kvcore-*.whl"))
        if not wheels:
            raise SystemExit("gpu_check.py: no wheel in .gpu-check/: run `make gpu-check` here")
        wheel = wheels[-1]
    site = Path(tempfile.mkdtemp(prefix="kvcore_site_"))
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.setdefault("KVCORE_EMU_CACHE", str(Path(tempfile.gettempdir()) / "kvcore_emu_cache"))
    build_file = WHEEL_DIR / "build.json"
    meta: dict[str, Any] = {
        "device": "cpu (dry run)" if dry else "unknown",
        "mode": "dry-run" if dry else "gpu",
        "started_utc": started,
        "build": json.loads(build_file.read_text()) if build_file.exists() else None,
        "wheel": wheel.name,
        "budget_s": budget,
    }
    r = Runner(out, budget, env, meta)
    pip = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    inst = r.step("install", [*pip, "--target", str(site), str(wheel)], LIMITS["install"])
    probe = (
        "import sys, kvcore; from pathlib import Path; "
        f"assert Path(kvcore.__file__).is_relative_to({str(site)!r}), kvcore.__file__; "
        "assert kvcore.build_profile == 'release', kvcore.build_profile; "
        "print('kvcore', kvcore.__file__, kvcore.build_profile)"
    )
    if inst["status"] == "ok":
        inst = r.step("import", [py, "-c", probe], 60)
    emulate = ["--emulate"] if dry else []
    smoke = [py, "tools/kernel_smoke.py"]
    if inst["status"] != "ok":
        for name in ("smoke", "bench_kernels", "memcheck", "racecheck", "bench_e2e", "tests_gpu"):
            r.skip(name, "the wheel did not install or import")
    else:
        if not dry:
            name_cmd = [py, "-c", "import torch; print(torch.cuda.get_device_name())"]
            try:
                got = subprocess.run(name_cmd, env=env, capture_output=True, text=True, timeout=120)
                meta["device"] = got.stdout.strip() or f"unknown ({got.stderr.strip()[-200:]})"
            except subprocess.TimeoutExpired:
                meta["device"] = "unknown (torch.cuda.get_device_name() did not answer)"
        r.step(
            "smoke",
            [*smoke, *emulate, "--out", str(out / "smoke.json")],
            LIMITS["smoke"],
            r"^kernel smoke: .*$",
        )
        bench_k = [py, "bench/bench_kernels.py", "--out", str(out / "kernels.json")]
        r.step(
            "bench_kernels",
            [*bench_k, *(["--emulate"] if dry else ["--quick"])],
            LIMITS["bench_kernels"],
            r"^target .*$",
        )
        san, report = _sanitizer(), _gpu_report()
        for tool in ("memcheck", "racecheck"):
            if dry:
                r.skip(tool, "dry run: compute-sanitizer needs a GPU")
                continue
            if san is None:
                r.skip(tool, "compute-sanitizer is not on this machine")
                continue
            log = out / f"{tool}.log"
            base = [san, "--tool", tool, "--error-exitcode", "3", "--log-file", str(log)]
            rec = r.step(
                tool, [*base, "--kernel-name", "kns=kv_", *smoke], LIMITS[tool], r"^kernel smoke.*$"
            )
            text = log.read_text(errors="replace") if log.exists() else ""
            if rec["status"] == "failed" and report.sanitizer_summary(text) is None:
                # the kernel filter's syntax differs between releases: all kernels, once more
                r.steps.pop()
                rec = r.step(tool, [*base, *smoke], LIMITS[tool], r"^kernel smoke.*$")
                text = log.read_text(errors="replace") if log.exists() else ""
            rec["sanitizer"] = report.sanitizer_summary(text)
        e2e = [py, "bench/bench_e2e.py", "--out", str(out / "e2e.json")]
        tiny = ["--smoke", "--contexts", "256", "--new-tokens", "2", "--methods", DRY_E2E]
        e2e += tiny if dry else ["--quick"]
        r.step("bench_e2e", e2e, LIMITS["bench_e2e"], r"^saved .*$")
        pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"]
        # pytest's 5: no test ran, as on the CPU where tests/gpu skip; on a GPU that is a failure
        no_gpu = (5, "dry run: tests/gpu skip without a GPU") if dry else None
        r.step("tests_gpu", pytest, LIMITS["tests_gpu"], PYTEST_SUMMARY, skip_rc=no_gpu)
    summary = r.summary(dry)
    r.log.close()
    shutil.rmtree(site, ignore_errors=True)
    print(f"[gpu_check] {'all steps passed' if summary['ok'] else 'SOME STEPS FAILED'}; files:")
    for f in sorted(out.iterdir()):
        print(f"  {f.name} ({f.stat().st_size} bytes)")
    return 0 if summary["ok"] else 1


# ------------------------------------------------------------------------------------ collect


def slug(device: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``: the suffix of the collected files."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def collect(src: Path, results: Path, doc: Path) -> list[Path]:
    """Copies a run's files into ``results`` named by the GPU, then regenerates the GPU
    section of ``doc`` from every GPU check in ``results``."""
    summary = json.loads((src / "summary.json").read_text())
    if summary["mode"] != "gpu" and results.resolve() == (ROOT / "bench" / "results").resolve():
        raise SystemExit(
            "gpu_check.py: these files come from a dry run, which measures nothing; "
            "they are never collected into bench/results/"
        )
    tag = slug(summary["device"])
    results.mkdir(parents=True, exist_ok=True)
    copied = []
    names = {
        "summary.json": f"gpu_check_{tag}.json",
        "kernels.json": f"kernels_{tag}.json",
        "e2e.json": f"e2e_{tag}.json",
        "smoke.json": f"kernel_smoke_{tag}.json",
        "memcheck.log": f"memcheck_{tag}.log",
        "racecheck.log": f"racecheck_{tag}.log",
        "gpu_check.log": f"gpu_check_{tag}.log",
    }
    for name, target in names.items():
        if (src / name).exists():
            copied.append(Path(shutil.copy2(src / name, results / target)))
    _gpu_report().update_doc(doc, results)
    for p in copied:
        print(f"gpu_check.py: wrote {p}")
    print(f"gpu_check.py: regenerated the GPU section of {doc}")
    return copied


# ------------------------------------------------------------------------------------ dry run


def dry_run(out: Path | None, budget: float) -> int:
    """prepare + run (CPU modes) + collect into a temporary place; every file must appear."""
    wheel = prepare()
    tmp = Path(tempfile.mkdtemp(prefix="kvcore_gpu_check_dry_"))
    out = out or tmp / "out"
    rc = run(out, budget, dry=True, wheel=wheel)
    missing = [n for n in DRY_OUTPUTS if not (out / n).is_file()]
    problems = [f"{n} did not appear" for n in missing]
    for n in DRY_OUTPUTS:
        if n.endswith(".json") and n not in missing:
            try:
                json.loads((out / n).read_text())
            except json.JSONDecodeError as e:
                problems.append(f"{n} is not JSON: {e}")
    if not problems:
        doc = tmp / "benchmarks.md"
        shutil.copy2(ROOT / "docs" / "benchmarks.md", doc)
        copied = collect(out, tmp / "results", doc)
        if len(copied) != len(DRY_OUTPUTS):
            problems.append(f"collect copied {len(copied)} files: {[p.name for p in copied]}")
        if "cpu (dry run)" not in doc.read_text():
            problems.append("the regenerated section does not show the dry run's results")
    for p in problems:
        print(f"gpu_check.py --dry-run: {p}")
    ok = rc == 0 and not problems
    print(f"gpu_check.py --dry-run: {'the recipe works' if ok else 'FAILED'} (files in {out})")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="prepare, run, collect on the CPU")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all steps")
    ap.add_argument("--out", type=Path, default=None, help="where run writes its files")
    ap.add_argument("--rebuild", action="store_true", help="prepare: build even if fresh")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("command", nargs="?", choices=("prepare", "run", "collect"))
    ap.add_argument("source", nargs="?", type=Path, help="collect: the folder of a run's files")
    args = ap.parse_args(argv)
    if args.dry_run:
        return dry_run(args.out, args.budget or 900)
    if args.command == "prepare":
        prepare(args.rebuild)
        print(
            'On the GPU machine (device tool `run`, carry [".gpu-check"], timeout_s 570):\n'
            '  python3 tools/gpu_check.py run --out "$OUT"\n'
            "then here: make gpu-check-collect FROM=<files_at of that run>"
        )
        return 0
    if args.command == "run":
        out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
        if out is None:
            ap.error("run needs --out or $OUT")
        return run(out, args.budget or 500, dry=False)
    if args.command == "collect":
        if args.source is None:
            ap.error("collect needs the folder of a run's files")
        collect(args.source, args.results, args.doc)
        return 0
    ap.error("give a command (prepare, run, collect) or --dry-run")
    return 2


if __name__ == "__main__":
    sys.exit(main())
