"""scripts/gpu_check.sh --dry-run: the lent-GPU check's own flow on the CPU (emulated kernels, tiny
shapes), so the script is tested where there is no GPU: every step reported, the summary written,
the benchmark's rows in bench.jsonl, a missing compute-sanitizer SKIPPED, and a TERM mid-run
still leaving a summary."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["device", "deps", "tests", "memcheck", "nccl", "bench"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def env() -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable}


def statuses(summary: str) -> dict[str, str]:
    """step -> status, from the table of summary.txt."""
    out = {}
    for line in summary.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in STEPS and parts[2].isdigit():
            out[parts[0]] = parts[1]
    return out


def test_dry_run_reports_every_step_and_writes_its_outputs(tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run"], env=env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=150)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert "gpu_check summary" in summary and "dry run on the CPU" in summary
    assert summary in proc.stdout   # printed last, as written
    got = statuses(summary)
    assert list(got) == STEPS, summary
    assert set(got.values()) <= {"ok", "SKIPPED"}, summary
    assert got["tests"] == "ok" and got["bench"] == "ok", summary
    if shutil.which("compute-sanitizer") is None:
        assert "compute-sanitizer not found" in summary
    for name in ("device.txt", "deps.txt", "tests.log", "memcheck.log", "bench.log", "bench.json"):
        assert (out / name).is_file(), name
    assert " passed" in (out / "tests.log").read_text()
    records = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    kinds = [r["record"] for r in records]
    assert kinds[0] == "run" and kinds[-1] == "end" and set(kinds[1:-1]) == {"row"}
    assert all(r["status"] == "ok" for r in records[1:-1])
    assert "headline:" in summary and f"{len(records) - 2} rows, {len(records) - 2} ok" in summary
    assert took < 120, f"the dry run took {took:.0f} s"


def test_a_term_mid_run_leaves_a_summary_with_the_step_interrupted(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT), str(out), "--dry-run"], env=env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "tests.log").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "the dry run ended before its test step"
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stdout[-2000:]
    summary = (out / "summary.txt").read_text()
    got = statuses(summary)
    assert got["device"] == "ok" and got["tests"] == "INTERRUPTED", summary
    assert "bench" not in got
    assert "gpu_check summary" in stdout


def test_a_bad_option_is_a_usage_error(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "--no-such-option"], env=env(),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown option" in proc.stderr
