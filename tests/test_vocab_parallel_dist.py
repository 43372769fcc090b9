"""Vocabulary-parallel cross-entropy and fused linear CE across processes: 2 and 3 local ranks
under mpiexec and as torch.distributed gloo ranks on 127.0.0.1, against the single-process
functions on the concatenated logits (float64 references computed here).

One launch of 3 ranks per engine runs every case of tests/_vp_worker.py (the 2-rank cases on
ranks {0, 1}); the tests below read its outputs. The launch has a timeout and its own process
group, killed on failure (tests/test_distributed.py's run_ranks).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import gpu

sys.path.insert(0, str(Path(__file__).parent))
import _vp_worker as W  # noqa: E402
from test_distributed import ENGINES, run_ranks  # noqa: E402

WORKER = Path(__file__).parent / "_vp_worker.py"
#: relative tolerance against the float64 reference, by dtype
TOL = {"float64": 1e-12, "float32": 3e-5, "bfloat16": 3e-2}

_RUNS: dict = {}


def launched(engine: str, size: int, tmp_path_factory):
    """Every rank's (arrays, info) of the `size`-rank cases, from ONE launch of 3 ranks."""
    if engine not in _RUNS:
        out = tmp_path_factory.mktemp(f"vp-{engine}")
        run_ranks(engine, 3, [str(WORKER), engine, str(out)], timeout=150)
        _RUNS[engine] = {n: [(dict(np.load(out / str(n) / f"rank{r}.npz")),
                              json.loads((out / str(n) / f"rank{r}.json").read_text())) for r in range(n)]
                         for n in (2, 3)}
    return _RUNS[engine][size]


def close(got, ref, dtype, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, what
    assert np.array_equal(np.isnan(got), np.isnan(ref)), what
    keep = ~np.isnan(ref)
    if keep.any():
        err = float(np.abs(got - ref)[keep].max()) / max(1.0, float(np.abs(ref[keep]).max()))
        assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g}"


def reference(name, split, dt, key):
    V = sum(split)
    z, t, w, h, Wt, b = W.problem(name, V, dt, W.OPTIONS[key].get("ignore_index", -100))
    o = dict(W.OPTIONS[key])
    wl = w if o.pop("weight", False) else None
    ce = gpu.softmax_cross_entropy(z.astype(np.float64), t, weight=wl, return_grad=True, return_z_loss=True, **o)
    fl = gpu.fused_linear_cross_entropy(h.astype(np.float64), Wt.astype(np.float64), t, b.astype(np.float64),
                                        weight=wl, return_grad=True, return_z_loss=True, **o)
    return dict(loss=ce[0], zt=ce[1], dz=ce[2], fl_loss=fl[0], fl_zt=fl[1], dh=fl[2], dW=fl[3], db=fl[4])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size", [2, 3])
def test_equals_concatenated_and_same_bits_on_every_rank(engine, size, tmp_path_factory):
    """Every case of the size: unequal, empty and one-class slices; every option and reduction;
    float64/float32/bfloat16; the NumPy and kernel paths; the loss bitwise equal on every rank;
    dz, dW, dbias each rank's slice, dh the full gradient on every rank; the collective counts."""
    ranks = launched(engine, size, tmp_path_factory)
    for name, split, dt, key, _ in W.cases(size):
        ref = reference(name, split, dt, key)
        arrs = [a for a, _ in ranks]
        for k in ("loss", "zt", "fl_loss", "fl_zt"):
            for a in arrs[1:]:
                assert np.array_equal(a[f"{name}/{k}"], arrs[0][f"{name}/{k}"], equal_nan=True), (name, k)
            close(arrs[0][f"{name}/{k}"], ref[k], dt, f"{name} {k}")
        for a in arrs:
            close(a[f"{name}/dh"], ref["dh"], dt, f"{name} dh")
        for k, axis in (("dz", 1), ("dW", 0), ("db", 0)):
            close(np.concatenate([a[f"{name}/{k}"] for a in arrs], axis=axis), ref[k], dt, f"{name} {k}")
        # CE: a header exchange on the configuration's first call (the '_ignored' and '_emulate'
        # cases repeat a configuration), then ONE allgather a call; FLCE: one allgather per chunk
        # of 3 rows and ONE all-reduce for dh
        fresh = int(not name.endswith(("_ignored", "_emulate")))
        for r, (_, info) in enumerate(ranks):
            assert info["counts"][name] == [fresh + 1, 1, fresh + -(-W.ROWS // 3) + 1], (name, r, info["counts"][name])
            assert info["same"][name], name


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_input_is_an_error_on_every_rank(engine, tmp_path_factory):
    ranks = launched(engine, 2, tmp_path_factory)
    e0, e1 = (info["errors"] for _, info in ranks)
    assert e0["rows"] == e1["rows"] and "z: the number of rows differs across ranks" in e0["rows"]
    assert e0["options"] == e1["options"] and "label_smoothing differs across ranks" in e0["options"]
    assert e0["dtype"] == e1["dtype"] and "z: the dtype differs across ranks" in e0["dtype"]
    for e in (e0, e1):
        assert "target: class index 12" in e["target"] and "[0, 12)" in e["target"], e["target"]
        assert "target: class index 12" in e["target emulate"], e["target emulate"]
        assert "h: the hidden size differs across ranks" in e["hidden"], e["hidden"]
    assert "rank 1 rejected its arguments" in e0["bias"] and "bias: expected shape (3,)" in e1["bias"]


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_timeout_names_the_collective(engine, tmp_path_factory):
    ranks = launched(engine, 2, tmp_path_factory)
    msg = ranks[0][1]["errors"]["timeout"]
    assert msg and "softmax_cross_entropy" in msg and "allgather" in msg and "0.5" in msg, msg
    assert ranks[1][1]["errors"]["timeout"] is None
    assert [info["drained"] for _, info in ranks] == [0, 0]
