"""gpu-bench on the CPU: it runs end to end, its JSON has the documented fields, a wrong result
is reported as WRONG (never timed) whichever peer returns it, every op record's reference agrees
with this library, and `--host` measures every host case."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import gpu
from gpu.bench import cli, devices, harness, main, peers, records
from gpu.bench.report import cpu_check_report

# A fast CPU run: the quick suite, our NumPy path and the seed's formulas, two timed calls a row.
FAST = ["--quick", "--device", "cpu", "--peer", "ours,seed", "--repeat", "2", "--warmup", "0"]


def run(tmp_path, *extra: str) -> tuple[int, dict]:
    path = tmp_path / "bench.json"
    rc = main(FAST + ["--json", str(path), *extra])
    return rc, json.loads(path.read_text())


def rows_of(report: dict, **match) -> list[dict]:
    return [r for r in report["rows"] if all(r[k] == v for k, v in match.items())]


def test_quick_suite_runs_and_writes_the_documented_json(tmp_path):
    rc, report = run(tmp_path)
    assert rc == 0
    assert {"schema", "date", "commit", "device", "versions", "peers", "settings", "rows"} <= set(report)
    assert {"kind", "name", "copy_gbps", "spec_gbps"} <= set(report["device"])
    assert report["device"]["kind"] == "cpu" and report["device"]["copy_gbps"] > 0
    assert {r["op"] for r in report["rows"]} == set(records.OPS)
    assert {r["peer"] for r in report["rows"]} == {"ours", "seed"}
    for r in report["rows"]:
        assert r["status"] == "ok", r
        assert r["time_ms"] > 0 and r["gbps"] > 0 and r["pct_copy"] > 0 and r["speedup"] > 0
        assert r["pct_spec"] is None  # no datasheet bandwidth for a CPU
        assert r["max_rel_err"] <= harness.TOLERANCE[np.dtype(r["dtype"])]
        assert r["samples"] == 2
    # the bytes model is the one written next to the op: BN forward reads x and writes y once
    (fwd,) = rows_of(report, op="batch_norm_forward", layout="nchw", peer="ours")
    elements, channels = math.prod(fwd["shape"]), fwd["shape"][1]
    assert fwd["axis"] == [0, 2, 3]
    assert fwd["bytes"] == 2 * 4 * elements + 32 * channels


def test_a_wrong_result_from_this_library_is_reported_wrong_not_timed(tmp_path, monkeypatch):
    right = gpu.softmax
    monkeypatch.setattr(gpu, "softmax", lambda z, axis=-1: right(z, axis=axis) * np.float32(1.01))
    rc, report = run(tmp_path, "--op", "softmax.softmax,log_softmax")
    assert rc == 1
    (ours,) = rows_of(report, op="softmax", peer="ours")
    assert ours["status"] == "WRONG" and "relative error" in ours["detail"]
    assert ours["time_ms"] is None and ours["gbps"] is None
    (seed,) = rows_of(report, op="softmax", peer="seed")
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
    monkeypatch.setattr(peers, "PEERS", peers.PEERS + [peers.FunctionPeer("broken", "any", {"softmax_cross_entropy_train": broken})])
    rc, report = run(tmp_path, "--op", "softmax_cross_entropy_train", "--peer", "ours,broken")
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
    monkeypatch.setattr(peers, "PEERS", peers.PEERS + [
        peers.FunctionPeer("missing", "any", {"batch_stats": missing}),
        peers.FunctionPeer("failing", "any", {"batch_stats": failing})])
    rc, report = run(tmp_path, "--op", "batch_stats", "--peer", "ours,missing,failing")
    assert rc == 0  # only WRONG results and failures of this library fail the run
    assert {r["status"] for r in rows_of(report, peer="missing")} == {"unavailable"}
    assert {r["detail"] for r in rows_of(report, peer="failing")} == {"RuntimeError: launch failed"}
    assert {r["status"] for r in rows_of(report, peer="ours")} == {"ok"}


def test_time_limit_skips_rows_and_still_reports(tmp_path):
    rc, report = run(tmp_path, "--op", "batch_norm", "--time-limit", "0")
    assert rc == 0 and report["rows"]
    assert {r["status"] for r in report["rows"]} == {"skipped"}


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert main(FAST + ["--op", "softmax.softmax,batch_norm_inference", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shape_option_and_layouts():
    assert cli.parse_shape("32x112x112x64:nhwc") == ((32, 112, 112, 64), "nhwc")
    assert cli.parse_shape("4096,1000") == ((4096, 1000), None)
    for bad in ("4096", "0x3", "axb", "8x8:nhwc", "8x8x8:nc"):
        with pytest.raises(Exception):
            cli.parse_shape(bad)
    args = cli.parse_args(["--op", "batch_norm_forward,softmax_cross_entropy_train", "--shape", "8x16x4x4", "--shape", "8x4x4x16:nhwc",
                             "--dtype", "float16"])
    cases = cli.build_cases(args, "cpu")
    assert [(c.op.name, c.layout, c.axes) for c in cases] == [
        ("batch_norm_forward", "nchw", (0, 2, 3)), ("batch_norm_forward", "nhwc", (0, 1, 2)),
        ("softmax_cross_entropy_train", "", (3,)), ("softmax_cross_entropy_train", "", (3,))]
    assert {c.dtype for c in cases} == {np.dtype(np.float16)}


def test_spec_bandwidth_by_device_name():
    assert devices.spec_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350
    assert devices.spec_bandwidth_gbps("NVIDIA H100 PCIe") == 2000
    assert devices.spec_bandwidth_gbps("NVIDIA H200") == 4800
    assert devices.spec_bandwidth_gbps("NVIDIA GH200 480GB") is None
    assert devices.spec_bandwidth_gbps("Some Future GPU") is None


def test_cpu_check_report_states_the_targets():
    def row(op, shape, peer, ms):
        return harness.Row(op, "", shape, "", (0,), "float32", "cpu", peer, time_ms=ms)
    rows = [row("batch_norm_train", (4096, 1024), "ours", 5.0), row("batch_norm_train", (4096, 1024), "seed", 30.0),
            row("batch_norm_train", (4096, 1024), "torch-cpu", 1.0),
            row("softmax_cross_entropy_train", (4096, 1000), "ours", 7.0), row("softmax_cross_entropy_train", (4096, 1000), "seed", 12.6)]
    text, summary = cpu_check_report(rows)
    bn, ce = summary
    assert bn["seed_over_ours"] == 6.0 and bn["ours_over_torch"] == 5.0
    assert ce["ours_over_torch"] is None  # PyTorch is optional
    assert "6.00x ok" in text and "5.00x MISSED" in text and "n/a" in text


# ---------------------------------------------------------------------------------------------
# The op records
# ---------------------------------------------------------------------------------------------

SMALL = {"batch_norm": [((33, 8), "nc"), ((4, 6, 3, 5), "nchw"), ((4, 3, 5, 6), "nhwc")],
         "softmax": [((17, 50), "")]}


def test_every_op_is_named_after_its_public_function_and_has_a_family():
    for name, op in records.OPS.items():
        public = op.public or (name[:-len("_train")] if name.endswith("_train") else name)   # fwd + bwd
        assert public in gpu.__all__, name
        assert name in records.FAMILIES[op.family]
    assert set(records.FAMILIES) == {"batch_norm", "softmax"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(records.OPS))
def test_every_record_has_a_bytes_formula_and_a_reference_that_agrees_with_gpu(name, dtype):
    op = records.OPS[name]
    for shape, layout in SMALL[op.family]:
        case = records.Case(op, shape, layout, np.dtype(dtype))
        # the minimum bytes read every input element and write at least one output of them
        # (8: a fused training step's forward and backward, x and y read again by the backward)
        assert case.elements * case.itemsize <= op.min_bytes(case) <= 8 * case.elements * case.itemsize + 64 * (
            case.channels + case.rows)
        inputs = records.make_inputs(np, np.random.default_rng(1), case)
        reference = op.reference(case, {k: v.copy() for k, v in inputs.items()}, np.float64)
        assert len(reference) == len(op.outputs)
        ours = op.ours(case, inputs)()
        assert harness.check(ours, reference, case, np) <= harness.TOLERANCE[case.dtype]


def test_reference_is_one_module_for_numpy_and_the_tests():
    from gpu.bench import reference as ref
    z = np.random.default_rng(0).standard_normal((6, 5))
    t = np.array([0, 4, 2, -100, 1, 3])
    loss, dz = ref.softmax_cross_entropy(z, t)
    assert ref.softmax_cross_entropy(z, t, grad=False) == (loss, None)
    assert ref.array_module(z) is np and dz.shape == z.shape


# ---------------------------------------------------------------------------------------------
# Command line: op names, output paths, --host
# ---------------------------------------------------------------------------------------------

def test_op_names_and_families():
    assert cli.parse_ops("batch_norm") == list(records.FAMILIES["batch_norm"])
    assert cli.parse_ops("softmax") == list(records.FAMILIES["softmax"])     # the family wins
    assert cli.parse_ops("softmax.softmax,log_softmax,softmax.softmax") == ["softmax", "log_softmax"]
    with pytest.raises(Exception):
        cli.parse_ops("bn_forward")


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_unwritable_output_paths_fail_before_any_work(tmp_path, flag, capsys):
    for path in (tmp_path / "missing" / "out", tmp_path):
        with pytest.raises(SystemExit) as e:
            main(["--quick", flag, str(path)])
        assert e.value.code == 2
        assert flag in capsys.readouterr().err


def test_host_measures_every_host_case(tmp_path):
    path = tmp_path / "host.json"
    assert main(["--host", "--repeat", "3", "--warmup", "1", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["mode"] == "host" and report["goal_us_per_call"] == 25
    ops = {r["op"]: r for r in report["ops"]}
    assert set(ops) == {n for n, op in records.OPS.items() if op.host_shape}
    assert {"batch_norm_forward", "batch_norm_backward", "batch_norm_inference", "softmax",
            "softmax_cross_entropy_train"} <= set(ops)
    for r in ops.values():
        assert r["status"] == "ok", r
        assert r["us_per_call"] > 0 and r["launches_per_call"] > 0
        assert isinstance(r["meets_goal"], bool)
        assert r["torch_status"] == "ok" or r["torch_status"].startswith("unavailable")
    assert ops["softmax"]["shape"] == [64, 1000] and ops["batch_norm_forward"]["shape"] == [64, 256]


def test_json_is_written_when_the_plot_fails(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from gpu.bench import report

    def broken_plot(rows, device, path):
        raise RuntimeError("no display")
    monkeypatch.setattr(report, "plot", broken_plot)
    rc, written = run(tmp_path, "--op", "batch_stats", "--plot", str(tmp_path / "bench.png"))
    assert rc == 1   # a report that could not be written fails the run
    assert {r["op"] for r in written["rows"]} == {"batch_stats"}


def test_no_runnable_peer_fails_before_any_work_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peers.TorchPeer, "unavailable", lambda self: "No module named 'torch'")
    path = tmp_path / "bench.json"
    assert main(["--quick", "--device", "cpu", "--peer", "torch-cpu", "--json", str(path)]) == 2
    captured = capsys.readouterr()
    assert "nothing to run on the cpu: peer torch-cpu is unavailable: No module named 'torch'" in captured.err
    assert "torch extra" in captured.err
    assert "rows in" not in captured.out and not path.exists()
    assert main(["--quick", "--device", "cpu", "--peer", "cupy"]) == 2
    assert "peer cupy runs on the gpu only" in capsys.readouterr().err


def test_cpu_rows_are_explained_under_the_table(tmp_path, capsys):
    rc, _ = run(tmp_path, "--op", "batch_stats")
    out = capsys.readouterr().out
    assert rc == 0
    assert "`ours` is this library's NumPy path" in out and "%spec is empty: a CPU has no datasheet bandwidth" in out


def test_bad_gpu_backend_is_a_command_line_error(monkeypatch, capsys):
    monkeypatch.setenv("GPU_BACKEND", "cuda")
    with pytest.raises(SystemExit) as e:
        main(["--quick"])
    assert e.value.code == 2
    assert "GPU_BACKEND='cuda': expected one of" in capsys.readouterr().err


def test_jsonl_has_the_run_then_each_row_as_it_is_done(tmp_path, monkeypatch):
    path = tmp_path / "bench.jsonl"
    path.write_text("a stale line of an earlier run\n")
    seen = []   # the lines on disk when each case starts: the rows before it are already written
    real = cli.run_case
    monkeypatch.setattr(cli, "run_case", lambda *a, **k: (seen.append(len(path.read_text().splitlines())),
                                                          real(*a, **k))[1])
    rc, report = run(tmp_path, "--op", "batch_norm_train,softmax_cross_entropy_train", "--jsonl", str(path))
    assert rc == 0
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["record"] for r in lines] == ["run"] + ["row"] * len(report["rows"]) + ["end"]
    assert lines[0]["device"]["copy_gbps"] > 0 and lines[0]["peers"] == report["peers"]
    assert [{k: v for k, v in r.items() if k != "record"} for r in lines[1:-1]] == report["rows"]
    assert seen == [1 + 2 * i for i in range(len(seen))]   # two peers a case
    assert lines[-1]["interrupted"] is False


def test_headline_suite_is_the_documented_shapes():
    args = cli.parse_args(["--headline", "--device", "cpu", "--op", "batch_norm_train,softmax_cross_entropy_train"])
    cases = cli.build_cases(args, "gpu")
    assert [(c.shape, c.layout) for c in cases if c.dtype == np.float32] == [
        ((4096, 1024), "nc"), ((32, 64, 56, 56), "nchw"), ((4096, 1000), ""), ((8192, 32000), "")]
    with pytest.raises(SystemExit):
        cli.parse_args(["--headline", "--quick"])


def test_cpu_check_targets_are_per_workload():
    # BN within 1.2x of PyTorch, CE at or better: 1.1x passes the one and misses the other
    def row(op, shape, peer, ms):
        return harness.Row(op, "", shape, "", (0,), "float32", "cpu", peer, time_ms=ms)
    rows = [row("batch_norm_train", (4096, 1024), "ours", 11.0), row("batch_norm_train", (4096, 1024), "torch-cpu", 10.0),
            row("softmax_cross_entropy_train", (4096, 1000), "ours", 11.0),
            row("softmax_cross_entropy_train", (4096, 1000), "torch-cpu", 10.0)]
    text, _ = cpu_check_report(rows)
    bn_line, ce_line = (line for line in text.splitlines()[1:])
    assert "1.10x ok (<= 1.2)" in bn_line and "1.10x MISSED (<= 1)" in ce_line
