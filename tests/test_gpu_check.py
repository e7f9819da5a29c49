"""tools/gpu_check.py: the prepared GPU check. Its dry run on the CPU (wheel, install into a
temporary target, the smoke script and both benchmarks in their CPU modes, collect) runs here so
the recipe cannot rot; what only a GPU can check (the kernels' speed, the sanitizers, tests/gpu
actually running) is not checked by it, and the summary says so (those steps are "skipped")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402

sys.path.remove(str(ROOT / "tools"))


@pytest.mark.skipif(shutil.which("g++") is None, reason="the dry run emulates kernels with g++")
def test_dry_run_builds_installs_runs_and_collects(tmp_path: Path) -> None:
    if gpu_check.fresh_wheel() is None and not os.environ.get("CI"):
        pytest.skip(
            "no wheel newer than the sources in dist/ or .gpu-check/: run `make wheel` or "
            "`make gpu-check` first (CI's `make test` builds one, and there this test builds)"
        )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the recipe works" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.DRY_OUTPUTS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry-run" and summary["ok"]
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {
        "install": "ok",
        "import": "ok",
        "smoke": "ok",
        "bench_kernels": "ok",
        "memcheck": "skipped",  # a dry run checks no GPU behaviour: said, not hidden
        "racecheck": "skipped",
        "bench_e2e": "ok",
        "tests_gpu": "skipped",
    }
    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke["ok"] and smoke["mode"] == "emulated"
    assert set(smoke["launched"]) == _expected_kernels() and not smoke["never_launched"]
    kern = json.loads((out / "kernels.json").read_text())
    assert kern["device"] == "cpu (emulated)" and not kern["errors"]
    names = [r["kernel"] for r in kern["rows"]]
    assert "compaction (2 layers, K+V, int4 pages)" in names and len(names) == 16
    e2e = json.loads((out / "e2e.json").read_text())
    methods = [c["method"] for c in e2e["cells"]]
    assert methods == ["full", *gpu_check.DRY_E2E.split(",")]
    assert all("error" not in c for c in e2e["cells"])


def _expected_kernels() -> set[str]:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import kernel_smoke
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return set(kernel_smoke.EXPECTED)


def test_a_failing_or_slow_step_is_recorded_and_the_next_one_runs(tmp_path: Path) -> None:
    r = gpu_check.Runner(tmp_path, budget=60, env=dict(os.environ))
    py = sys.executable
    slow = r.step("slow", [py, "-c", "import time; time.sleep(30)"], limit=1)
    bad = r.step("bad", [py, "-c", "print('boom'); raise SystemExit(3)"], limit=30)
    good = r.step("good", [py, "-c", "print('kernel smoke: fine')"], 30, r"^kernel smoke.*$")
    chatty = r.step("chatty", [py, "-c", "print('x' * 10**6, 'THE END')"], limit=30)
    assert (slow["status"], slow["rc"]) == ("timeout", None) and slow["seconds"] < 10
    assert (bad["status"], bad["rc"]) == ("failed", 3)
    assert good["status"] == "ok" and good["summary"] == "kernel smoke: fine"
    r.log.close()
    log = (tmp_path / "gpu_check.log").read_text()
    assert "boom" in log and "----- slow: timeout" in log
    # a step's output is cut to its head and tail: the files that come back stay small
    assert chatty["status"] == "ok" and "THE END" in log and len(log) < gpu_check.LOG_CHARS + 10**4
    r2 = gpu_check.Runner(tmp_path, budget=0, env=dict(os.environ), meta={"mode": "gpu"})
    late = r2.step("late", [py, "-c", "pass"], limit=30)
    assert late["status"] == "skipped" and "budget" in late["reason"]
    # with meta, summary.json is rewritten after every step (a run stopped early keeps it)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "gpu" and summary["steps"] == [late] and not summary["ok"]


def test_collect_names_files_by_the_gpu_and_refuses_dry_runs_in_bench_results(
    tmp_path: Path,
) -> None:
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"mode": "dry-run", "device": "cpu (dry run)"}))
    with pytest.raises(SystemExit, match="never collected into bench/results"):
        gpu_check.collect(run, ROOT / "bench" / "results", tmp_path / "doc.md")


def test_a_wheel_without_the_cuda_sources_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "kvcore-0.0.0-cp310-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("kvcore/__init__.py", "")
        z.writestr("kvcore/_kvcore.abi3.so", "")
    with pytest.raises(SystemExit, match=r"lacks kvcore/cuda/compact\.cu"):
        gpu_check.check_wheel(wheel)
