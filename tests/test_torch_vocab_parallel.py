"""gpu.torch's vocabulary-parallel heads (``process_group=`` of cross_entropy,
fused_linear_cross_entropy and FusedLinearCrossEntropyLoss) on 2 gloo ranks on 127.0.0.1,
against the float64 references of gpu.bench.reference on the whole vocabulary.

ONE launch of tests/_vp_torch_worker.py runs every case (a few seconds; the launch dominates)
and ONE test checks them all: unequal, empty and one-class shares, every option and reduction,
float64/float32/bfloat16, the NumPy path and the kernel path (on the emulator), autograd,
torch.compile(fullgraph=True), the collectives of a warm call, and bad input on every rank.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gpu.bench import reference as R  # noqa: E402

from conftest import TOL, rel_err  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import _vp_torch_worker as W  # noqa: E402
from test_distributed import ENGINES, run_ranks  # noqa: E402

pytestmark = list(ENGINES[1].marks)        # gloo: torch.distributed
WORKER = Path(__file__).parent / "_vp_torch_worker.py"


def launched(tmp_path) -> list:
    """Every rank's (arrays, info) of one launch of 2 ranks running every case."""
    run_ranks("gloo", 2, [str(WORKER), str(tmp_path)], timeout=120)
    return [(dict(np.load(tmp_path / f"rank{r}.npz")), json.loads((tmp_path / f"rank{r}.json").read_text()))
            for r in range(2)]


def tol(dtype: str) -> float:
    return TOL[np.dtype(dtype)]


def reference(name: str) -> dict:
    """The case's float64 results on the whole vocabulary (inputs rounded to the case's dtype)."""
    kind, dtype, N, H, split, opts = W.CASES[name]
    d = W.problem(name)
    rnd = lambda a: None if a is None else torch.tensor(a).to(getattr(torch, dtype)).double().numpy()  # noqa: E731
    kw = W.options(name)
    ce = dict(reduction=kw["reduction"], label_smoothing=kw.get("label_smoothing", 0.0),
              weight=rnd(d["w"]) if dtype != "bfloat16" else d["w"], dloss=d["dloss"],
              z_loss=kw.get("z_loss", 0.0), softcap=kw.get("softcap"))
    if kind == "ce":
        loss, z_term, dz = R.softmax_cross_entropy(rnd(d["z"]), d["t"], 1, ce.pop("reduction"), -100,
                                                   ce.pop("label_smoothing"), ce.pop("weight"), ce.pop("dloss"),
                                                   return_z_loss=True, **ce)
        return {"loss": loss, "z_term": z_term, "dz": dz}
    loss, z_term, dh, dW, db = R.linear_cross_entropy(rnd(d["h"]), rnd(d["W"]), d["t"], rnd(d["b"]),
                                                      ce.pop("reduction"), -100, ce.pop("label_smoothing"),
                                                      ce.pop("weight"), ce.pop("dloss"), **ce)
    return {"loss": loss, "z_term": z_term, "dh": dh, "dW": dW, "db": db}


def close(out, ref, dtype, what):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, f"{what}: shape {out.shape}, expected {ref.shape}"
    if np.isnan(ref).all():
        assert np.isnan(out).all(), f"{what}: expected NaN, got {out}"
        return
    err = rel_err(out, ref)
    assert err <= tol(dtype), f"{what}: relative error {err:.3g} > {tol(dtype):.3g} ({dtype})"


def test_two_gloo_ranks(tmp_path):
    # ONE test for the launch (under pytest-xdist a file's tests may land on two workers, and
    # the launch dominates the time); every problem found is reported, not only the first
    ranks = launched(tmp_path)
    problems = []

    def check(what, fn, *args):
        try:
            fn(*args)
        except AssertionError as e:
            problems.append(f"{what}: {e}")

    for name in W.CASES:
        check(name, check_case, name, ranks)
    for name in W.COMPILED:
        check(f"{name} compiled", compiled_equals_eager, name, ranks)
    check("collectives", collectives_of_a_warm_call, ranks)
    for case, error in BAD:
        check(f"bad input {case}", fails_on_every_rank, case, error, ranks)
    assert not problems, "\n".join(problems)


def check_case(name: str, ranks) -> None:
    """Every rank's results of case `name` against the whole vocabulary's, the losses bitwise
    the same on every rank."""
    kind, dtype, N, H, split, opts = W.CASES[name]
    ref = reference(name)
    for key in ("loss", "z_term"):
        a, b = (arrays[f"{name}/{key}"] for arrays, _ in ranks)
        assert a.tobytes() == b.tobytes(), f"{key}: the ranks differ: {a} vs {b}"      # bitwise, NaN included
        close(a, ref[key], dtype, key)
    for r, (arrays, _) in enumerate(ranks):
        mine = W.share(split, r)
        if kind == "ce":            # the logits' gradient: this rank's slice of the classes
            close(arrays[f"{name}/dz"], ref["dz"][:, mine], dtype, f"rank {r} dz")
        else:                       # the hidden states' gradient whole, the head's its rows
            close(arrays[f"{name}/dh"], ref["dh"], dtype, f"rank {r} dh")
            close(arrays[f"{name}/dW"], ref["dW"][mine], dtype, f"rank {r} dW")
            if ref["db"] is not None:
                close(arrays[f"{name}/db"], ref["db"][mine], dtype, f"rank {r} dbias")


def compiled_equals_eager(name: str, ranks) -> None:
    """torch.compile(fullgraph=True): the same numbers as eager."""
    for arrays, _ in ranks:
        for key in [k for k in arrays if k.startswith(f"{name}/") and "/compiled/" not in k]:
            np.testing.assert_allclose(arrays[key.replace(f"{name}/", f"{name}/compiled/")], arrays[key],
                                       rtol=1e-13, atol=0, err_msg=key)


def collectives_of_a_warm_call(ranks) -> None:
    # cross_entropy: one packed collective forward, none backward (dz comes from the forward);
    # fused linear CE, 7 rows in chunks of 3: one per chunk and one all-reduce of dh
    for _, info in ranks:
        assert info["collectives"] == {"ce": 1, "flce": 3 + 1}, info["collectives"]


#: (bad input of tests/_vp_torch_worker.py, the start of the exception every rank must raise)
BAD = [("rows", "ValueError"), ("options", "ValueError"), ("target", "IndexError: target"),
       ("bias", "RuntimeError: bias"), ("group", "TypeError: process_group"), ("probs", "ValueError: target")]


def fails_on_every_rank(case: str, error: str, ranks) -> None:
    for r, (_, info) in enumerate(ranks):
        msg = info["errors"][case]
        assert msg is not None and msg.startswith(error), f"rank {r}: {msg}"


@pytest.mark.gpu
def test_nccl_two_gpus(tmp_path):
    # CUDA tensors on 2 GPUs over NCCL (the kernels and the device-side merge): the same cases
    # (scripts/gpu_check.sh runs this on a machine with 2 or more GPUs)
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
    run_ranks("gloo", 2, [str(WORKER), str(tmp_path), "nccl"], timeout=300)
    ranks = [(dict(np.load(tmp_path / f"rank{r}.npz")), None) for r in range(2)]
    for name in W.CASES:
        check_case(name, ranks)
