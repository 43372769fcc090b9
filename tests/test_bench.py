"""gpu-bench on the CPU: it runs end to end, its JSON has the documented fields, and a wrong
result is reported as WRONG (never timed), whichever peer returns it."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import gpu
from gpu import bench

# A fast CPU run: the quick suite, our NumPy path and the seed's formulas, two timed calls a row.
FAST = ["--quick", "--device", "cpu", "--peer", "ours,seed", "--repeat", "2", "--warmup", "0"]


def run(tmp_path, *extra: str) -> tuple[int, dict]:
    path = tmp_path / "bench.json"
    rc = bench.main(FAST + ["--json", str(path), *extra])
    return rc, json.loads(path.read_text())


def rows_of(report: dict, **match) -> list[dict]:
    return [r for r in report["rows"] if all(r[k] == v for k, v in match.items())]


def test_quick_suite_runs_and_writes_the_documented_json(tmp_path):
    rc, report = run(tmp_path)
    assert rc == 0
    assert {"schema", "date", "commit", "device", "versions", "peers", "settings", "rows"} <= set(report)
    assert {"kind", "name", "copy_gbps", "spec_gbps"} <= set(report["device"])
    assert report["device"]["kind"] == "cpu" and report["device"]["copy_gbps"] > 0
    assert {r["op"] for r in report["rows"]} == set(bench.OPS)
    assert {r["peer"] for r in report["rows"]} == {"ours", "seed"}
    for r in report["rows"]:
        assert r["status"] == "ok", r
        assert r["time_ms"] > 0 and r["gbps"] > 0 and r["pct_copy"] > 0 and r["speedup"] > 0
        assert r["pct_spec"] is None  # no datasheet bandwidth for a CPU
        assert r["max_rel_err"] <= bench.TOLERANCE[np.dtype(r["dtype"])]
        assert r["samples"] == 2
    # the bytes model is the one written next to the op: BN forward reads x and writes y once
    (fwd,) = rows_of(report, op="bn_forward", layout="nchw", peer="ours")
    elements, channels = math.prod(fwd["shape"]), fwd["shape"][1]
    assert fwd["axis"] == [0, 2, 3]
    assert fwd["bytes"] == 2 * 4 * elements + 32 * channels


def test_a_wrong_result_from_this_library_is_reported_wrong_not_timed(tmp_path, monkeypatch):
    right = gpu.softmax
    monkeypatch.setattr(gpu, "softmax", lambda z, axis=-1: right(z, axis=axis) * np.float32(1.01))
    rc, report = run(tmp_path, "--op", "softmax_forward,log_softmax")
    assert rc == 1
    (ours,) = rows_of(report, op="softmax_forward", peer="ours")
    assert ours["status"] == "WRONG" and "relative error" in ours["detail"]
    assert ours["time_ms"] is None and ours["gbps"] is None
    (seed,) = rows_of(report, op="softmax_forward", peer="seed")
    assert seed["status"] == "ok" and seed["speedup"] is None  # nothing correct to compare with
    assert all(r["status"] == "ok" for r in rows_of(report, op="log_softmax"))


@pytest.mark.parametrize("broken, detail", [
    (lambda c, i: lambda: (gpu.softmax_cross_entropy(i["z"], i["target"]), None), None),  # dz missing: fine
    (lambda c, i: lambda: gpu.softmax_cross_entropy(i["z"], i["target"], reduction="sum", return_grad=True),
     "relative error"),
    (lambda c, i: lambda: (np.float32(np.nan), i["z"]), "non-finite"),
    (lambda c, i: lambda: (gpu.softmax_cross_entropy(i["z"], i["target"]), i["z"][:, :-1]), "shape"),
    (lambda c, i: lambda: gpu.softmax_cross_entropy(i["z"], i["target"]), "items"),
])
def test_an_injected_peer_is_checked_before_it_is_timed(tmp_path, monkeypatch, broken, detail):
    monkeypatch.setattr(bench, "PEERS", bench.PEERS + [bench.FunctionPeer("broken", "any", {"ce_train": broken})])
    rc, report = run(tmp_path, "--op", "ce_train", "--peer", "ours,broken")
    (row,) = rows_of(report, peer="broken")
    if detail is None:
        assert rc == 0 and row["status"] == "ok"
    else:
        assert rc == 1 and row["status"] == "WRONG" and detail in row["detail"], row
        assert row["time_ms"] is None
    assert rows_of(report, peer="ours")[0]["status"] == "ok"


def test_a_peer_that_raises_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    def missing(c, i):
        raise NotImplementedError("no kernel yet")

    def failing(c, i):
        def run_():
            raise RuntimeError("launch failed")
        return run_
    monkeypatch.setattr(bench, "PEERS", bench.PEERS + [
        bench.FunctionPeer("missing", "any", {"batch_norm_stats": missing}),
        bench.FunctionPeer("failing", "any", {"batch_norm_stats": failing})])
    rc, report = run(tmp_path, "--op", "batch_norm_stats", "--peer", "ours,missing,failing")
    assert rc == 0  # only WRONG results and failures of this library fail the run
    assert {r["status"] for r in rows_of(report, peer="missing")} == {"unavailable"}
    assert {r["detail"] for r in rows_of(report, peer="failing")} == {"RuntimeError: launch failed"}
    assert {r["status"] for r in rows_of(report, peer="ours")} == {"ok"}


def test_time_limit_skips_rows_and_still_reports(tmp_path):
    rc, report = run(tmp_path, "--op", "batchnorm", "--time-limit", "0")
    assert rc == 0 and report["rows"]
    assert {r["status"] for r in report["rows"]} == {"skipped"}


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert bench.main(FAST + ["--op", "softmax_forward,bn_inference", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shape_option_and_layouts():
    assert bench.parse_shape("32x112x112x64:nhwc") == ((32, 112, 112, 64), "nhwc")
    assert bench.parse_shape("4096,1000") == ((4096, 1000), None)
    for bad in ("4096", "0x3", "axb", "8x8:nhwc", "8x8x8:nc"):
        with pytest.raises(Exception):
            bench.parse_shape(bad)
    args = bench.parse_args(["--op", "bn_forward,ce_train", "--shape", "8x16x4x4", "--shape", "8x4x4x16:nhwc",
                             "--dtype", "float16"])
    cases = bench.build_cases(args, "cpu")
    assert [(c.op.name, c.layout, c.axes) for c in cases] == [
        ("bn_forward", "nchw", (0, 2, 3)), ("bn_forward", "nhwc", (0, 1, 2)),
        ("ce_train", "", (3,)), ("ce_train", "", (3,))]
    assert {c.dtype for c in cases} == {np.dtype(np.float16)}


def test_spec_bandwidth_by_device_name():
    assert bench.spec_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350
    assert bench.spec_bandwidth_gbps("NVIDIA H100 PCIe") == 2000
    assert bench.spec_bandwidth_gbps("NVIDIA H200") == 4800
    assert bench.spec_bandwidth_gbps("NVIDIA GH200 480GB") is None
    assert bench.spec_bandwidth_gbps("Some Future GPU") is None


def test_cpu_check_report_states_the_targets():
    def row(op, shape, peer, ms):
        return bench.Row(op, "", shape, "", (0,), "float32", "cpu", peer, time_ms=ms)
    rows = [row("bn_train", (4096, 1024), "ours", 5.0), row("bn_train", (4096, 1024), "seed", 30.0),
            row("bn_train", (4096, 1024), "torch-cpu", 1.0),
            row("ce_train", (4096, 1000), "ours", 7.0), row("ce_train", (4096, 1000), "seed", 12.6)]
    text, summary = bench.cpu_check_report(rows)
    bn, ce = summary
    assert bn["seed_over_ours"] == 6.0 and bn["ours_over_torch"] == 5.0
    assert ce["ours_over_torch"] is None  # PyTorch is optional
    assert "6.00x ok" in text and "5.00x MISSED" in text and "n/a" in text
