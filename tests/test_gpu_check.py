"""scripts/gpu_check.sh --dry-run: the lent-GPU check's own flow on the CPU (emulated kernels, tiny
shapes), so the script is tested where there is no GPU: every step reported, the summary written,
the benchmark's rows in bench.jsonl, a missing compute-sanitizer SKIPPED, a TERM mid-run still
leaving a summary, and the precompile list proved complete against the modules the run built (a
module planted missing from the list is named)."""
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

from gpu.bench import precompile

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["device", "deps", "compile", "tests", "memcheck", "nccl", "bench", "modules"]

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
    # every listed module was resolved; every module the tests built is in the list
    listed = subprocess.run([sys.executable, "-m", "gpu.bench.precompile", "list"], env=env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=60).stdout.split()
    assert f"{len(listed)} modules resolved" in (out / "compile.log").read_text()
    assert got["compile"] == "ok" and got["modules"] == "ok", summary
    built = precompile.built(out / "modules.jsonl")
    assert built and set(built) <= set(listed), built
    assert f"all {len(built)} modules built" in summary

    # the failure mode: the same check over this run's log, one module it built left out of the list
    planted = built[0]
    check = subprocess.run([sys.executable, "-m", "gpu.bench.precompile", "check", str(out / "modules.jsonl"),
                            "--exclude", planted], env=env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert check.returncode == 1, check.stdout + check.stderr
    assert "not in the precompile list" in check.stdout and f": {planted}." in check.stdout, check.stdout


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


def test_precompile_labels_round_trip_and_a_module_outside_the_list_is_named(tmp_path):
    """Every listed label resolves to the module `get_kernel` would build; a logged module of an
    undeclared variant (what a kernel edit that bypassed the list would build) is named by label."""
    from gpu import _kernels
    listed = precompile.modules()
    assert "softmax:float32" in listed and "batch_norm:bfloat16:BN_VECTOR=1" in listed
    assert all(precompile.label(*precompile.parse(m)) == m for m in listed if ".cu" not in m)
    log = tmp_path / "modules.jsonl"
    softmax = str(_kernels.family("softmax").path)
    lines = [{"family": softmax, "defines": _kernels.module_defines("softmax", "float32"), "backend": "emulator"},
             {"family": softmax, "defines": {**_kernels.module_defines("softmax", "float16"), "SOFTMAX_FLAGS": "3"},
              "backend": "cuda"}]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"family": "cut sho')
    assert precompile.built(log) == ["softmax:float16:SOFTMAX_FLAGS=3", "softmax:float32"]
    assert precompile.missing(log, listed) == (["softmax:float16:SOFTMAX_FLAGS=3"], 2)
