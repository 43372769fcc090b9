"""Synchronized batch norm across processes: 2-3 local ranks under mpiexec (mpi4py + the mpich
wheel) and as torch.distributed gloo ranks on 127.0.0.1, against single-process batch norm on the
concatenated batch (a float64 NumPy reference computed here).

One launch of 3 ranks per engine runs every case of tests/_dist_worker.py once (a few seconds;
with gloo also gpu.torch.SyncBatchNorm's); the tests below read its outputs. Every subprocess has a timeout and its own process group, killed on failure.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import gpu.distributed as D
import pytest

from conftest import TOL

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as W  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).parent / "_dist_worker.py"
LAUNCH_TIMEOUT = 90


def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


def mpiexec() -> str | None:
    """The mpiexec next to this Python (the mpich wheel's), else one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


HAVE_MPI = _have("mpi4py") and mpiexec() is not None
HAVE_TORCH = _have("torch.distributed")
ENGINES = [pytest.param("mpi", marks=pytest.mark.skipif(not HAVE_MPI, reason="mpi4py or mpiexec missing")),
           pytest.param("gloo", marks=pytest.mark.skipif(not HAVE_TORCH, reason="torch missing"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra)
    return env


def run_ranks(engine: str, size: int, argv: list[str], timeout: float = LAUNCH_TIMEOUT) -> list[str]:
    """Run `python argv...` as `size` ranks of `engine`; their combined outputs. Each launch is
    its own process group, killed whole on a timeout or failure (no leftover ranks)."""
    if engine == "mpi":
        cmds = [[mpiexec(), "-n", str(size), sys.executable, *argv]]
        envs = [_env()]
    else:
        port = str(free_port())
        cmds = [[sys.executable, *argv] for _ in range(size)]
        envs = [_env(RANK=str(r), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
                for r in range(size)]
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c, e in zip(cmds, envs)]
    outs, failed = [], None
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(out)
            if p.returncode != 0 and failed is None:
                failed = f"exit status {p.returncode}:\n{out[-3000:]}"
    except subprocess.TimeoutExpired:
        failed = f"timed out after {timeout} s"
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    if failed:
        pytest.fail(f"{engine} x {size}: {failed}")
    return outs


_RUNS: dict[object, object] = {}


def launched(engine: str, size: int, tmp_path_factory):
    """Every rank's (arrays, info) of the `size`-rank cases. ONE launch of 3 ranks per engine runs
    them all (the 2-rank cases on a group of ranks 0 and 1): launches dominate the time."""
    if engine not in _RUNS:
        out = tmp_path_factory.mktemp(engine)
        run_ranks(engine, 3, [str(WORKER), "mpi" if engine == "mpi" else "gloo", str(out)])
        _RUNS[f"{engine}-dir"] = out
        _RUNS[engine] = {n: [(dict(np.load(out / str(n) / f"rank{r}.npz")),
                              json.loads((out / str(n) / f"rank{r}.json").read_text())) for r in range(n)]
                         for n in (2, 3)}
    return _RUNS[engine][size]


def reference(x, dy, gamma, beta, axis, eps=1e-5, momentum=0.1):
    """Single-process batch norm on the whole batch in float64: y, mean, invstd, running stats,
    dx, dgamma, dbeta."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    g = gamma.astype(np.float64)
    keep = [1] * x.ndim
    keep[1] = -1
    n = x.size // x.shape[1]
    mean = x.mean(axis=axis)
    var = x.var(axis=axis)
    invstd = 1 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(keep)) * invstd.reshape(keep)
    y = xhat * g.reshape(keep) + beta.astype(np.float64).reshape(keep)
    dbeta = dy.sum(axis=axis)
    dgamma = (dy * xhat).sum(axis=axis)
    dx = (g * invstd).reshape(keep) * (dy - (dbeta / n).reshape(keep) - xhat * (dgamma / n).reshape(keep))
    rm = momentum * mean
    rv = (1 - momentum) + momentum * var * n / (n - 1)
    return dict(y=y, mean=mean, invstd=invstd, rm=rm, rv=rv, dx=dx, dgamma=dgamma, dbeta=dbeta)


def _cases(size):
    return [pytest.param(size, c, id=f"{size}ranks-{c[0]}") for c in W.cases(size)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size,case", _cases(2) + _cases(3))
def test_synchronized_equals_concatenated(engine, size, case, tmp_path_factory):
    # splits [5, 3] (unequal), [8, 0] (a rank with no rows), [4, 4], [1, 1, 1] (one row each),
    # [4, 0, 3]; dense (N, C) and NCHW; float64 to 1e-12, float32 and float16 (statistics in
    # float32) to the dtype's tolerance
    ranks = launched(engine, size, tmp_path_factory)
    name, split, feat, axis, dt = case
    x, dy = W.global_batch(name, split, feat, dt)
    C = feat[0]
    ref = reference(x, dy, np.linspace(0.5, 1.5, C).astype(dt), np.linspace(-1, 1, C).astype(dt), axis)
    tol = TOL[np.dtype(dt)]
    got = [a for a, _ in ranks]
    for k in ("mean", "invstd", "rm", "rv"):       # the same on every rank, bitwise
        for r in range(1, size):
            assert np.array_equal(got[r][f"{name}/{k}"], got[0][f"{name}/{k}"], equal_nan=True), (k, r)
        err = np.linalg.norm(got[0][f"{name}/{k}"] - ref[k]) / np.linalg.norm(ref[k])
        assert err <= tol, (k, err)
    for k in ("y", "dx"):                          # each rank's rows, concatenated
        whole = np.concatenate([g[f"{name}/{k}"].astype(np.float64) for g in got])
        err = np.linalg.norm(whole - ref[k]) / np.linalg.norm(ref[k])
        assert err <= tol, (k, err)
    for k in ("dgamma", "dbeta"):                  # each rank's share; their sum is the gradient
        total = sum(g[f"{name}/{k}"].astype(np.float64) for g in got)
        err = np.linalg.norm(total - ref[k]) / np.linalg.norm(ref[k])
        assert err <= tol * 4, (k, err)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", W.EPILOGUE_CASES, ids=[c[0] for c in W.EPILOGUE_CASES])
def test_synchronized_fused_epilogue_equals_concatenated(engine, case, tmp_path_factory):
    # relu(bn(x) + residual) with comm= on 2 ranks ([5, 3] rows, and [8, 0]: a rank with none)
    # against the whole batch in float64: y, the running statistics, dx, dgamma, dbeta (summed
    # shares) and dresidual (each rank's rows), the relu mask from the y the ranks computed
    ranks = launched(engine, 2, tmp_path_factory)
    name, split, feat, axis, dt = case
    x, dy = W.global_batch(name, split, feat, dt)
    res = W.global_batch(name + "/residual", split, feat, dt)[1].astype(np.float64)
    C = feat[0]
    got = [a for a, _ in ranks]
    ref = reference(x, dy, np.linspace(0.5, 1.5, C).astype(dt), np.linspace(-1, 1, C).astype(dt), axis)
    y = np.concatenate([g[f"{name}/y"].astype(np.float64) for g in got])
    tol = TOL[np.dtype(dt)]
    y_ref = np.maximum(ref["y"] + res, 0)
    assert np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref) <= tol
    for k in ("rm", "rv"):
        assert np.linalg.norm(got[0][f"{name}/{k}"] - ref[k]) / np.linalg.norm(ref[k]) <= tol, k
    dz = dy.astype(np.float64) * (y > 0)               # the chain rule through relu and the add
    ref = reference(x, dz, np.linspace(0.5, 1.5, C).astype(dt), np.linspace(-1, 1, C).astype(dt), axis)
    ref["dres"] = dz
    for k in ("dx", "dres"):
        whole = np.concatenate([g[f"{name}/{k}"].astype(np.float64) for g in got])
        assert np.linalg.norm(whole - ref[k]) / np.linalg.norm(ref[k]) <= tol, k
    for k in ("dgamma", "dbeta"):
        total = sum(g[f"{name}/{k}"].astype(np.float64) for g in got)
        assert np.linalg.norm(total - ref[k]) / np.linalg.norm(ref[k]) <= tol * 4, k


@pytest.mark.kernel
def test_kernel_path_fused_with_one_rank_equals_plain():
    """The synchronized kernel path (inference + two-kernel backward with the epilogue) on a
    one-rank communicator equals the unsynchronized fused call."""
    import gpu
    rng = np.random.default_rng(4)
    x, dy, r = (rng.standard_normal((6, 4, 3, 5)).astype(np.float32) for _ in range(3))
    comm, axis = _OneRank(), (0, 2, 3)
    with gpu.use_backend("emulate"):
        y, mean, invstd = gpu.batch_norm_forward(x, axis=axis, comm=comm, residual=r, activation="relu")
        y0, mean0, invstd0 = gpu.batch_norm_forward(x, axis=axis, residual=r, activation="relu")
        grads = gpu.batch_norm_backward(dy, x, None, mean, invstd, axis=axis, comm=comm, activation="relu", y=y,
                                        residual_grad=True)
        grads0 = gpu.batch_norm_backward(dy, x, None, mean0, invstd0, axis=axis, activation="relu", y=y0,
                                         residual_grad=True)
    assert len(grads) == 4
    for a, b in zip((y, mean, invstd, *grads), (y0, mean0, invstd0, *grads0)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size", [2, 3])
def test_one_collective_per_forward_and_backward(engine, size, tmp_path_factory):
    # counted through the adapter; the first call with a new channel count also exchanges the
    # header alone (the worker subtracts it), so that ranks disagreeing on C fail cleanly
    for _, info in launched(engine, size, tmp_path_factory):
        assert all(c == [1, 1] for c in info["counts"].values()), info["counts"]


def _torch_formula_running_var(x, split, axis, momentum=0.1):
    """The running variance when the ranks' statistics are merged as if their counts were equal
    (the mean of the ranks' means and variances: torch's SyncBatchNorm before pytorch#22192's fix)
    and unbiased with the global count."""
    parts = [p.astype(np.float64) for p in np.split(x, np.cumsum(split)[:-1]) if len(p)]
    means = np.stack([p.mean(axis=axis) for p in parts])
    mean = means.mean(0)
    var = np.stack([p.var(axis=axis) for p in parts]).mean(0) + (means ** 2).mean(0) - mean ** 2
    n = x.size // x.shape[1]
    return (1 - momentum) + momentum * var * n / (n - 1)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size,split", [(2, [5, 3]), (2, [4, 4]), (3, [1, 1, 1]), (3, [4, 0, 3])])
def test_running_stats_use_the_global_count(engine, size, split, tmp_path_factory):
    # equal counts: the equal-count merge is right and ours matches it; unequal counts: it is wrong
    # (the case discriminates) and ours is exact
    name = f"{'-'.join(map(str, split))}_1d_float64"
    x, dy = W.global_batch(name, split, (6,), "float64")
    got = launched(engine, size, tmp_path_factory)[0][0][f"{name}/rv"]
    exact = reference(x, dy, np.ones(6), np.zeros(6), 0)["rv"]
    equal_counts = _torch_formula_running_var(x, split, 0)
    np.testing.assert_allclose(got, exact, rtol=1e-12)
    if len(set(split)) == 1:
        np.testing.assert_allclose(got, equal_counts, rtol=1e-12)
    else:
        assert np.abs(equal_counts - exact).max() > 1e-3


@pytest.mark.parametrize("engine", ENGINES)
def test_mismatch_is_an_error_on_every_rank(engine, tmp_path_factory):
    ranks = launched(engine, 2, tmp_path_factory)
    for r, (_, info) in enumerate(ranks):
        e = info["errors"]
        assert e["channels"] and "channel count differs" in e["channels"], (r, e)
        assert e["dtype"] and "dtype differs" in e["dtype"], (r, e)
        assert e["backward dtype"] and "dtype differs" in e["backward dtype"], (r, e)
    assert ranks[0][1]["errors"]["channels"] == ranks[1][1]["errors"]["channels"]   # the same words


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_timeout_names_the_collective(engine, tmp_path_factory):
    ranks = launched(engine, 2, tmp_path_factory)
    msg = ranks[0][1]["errors"]["timeout"]
    assert msg and "batch_norm_forward" in msg and "allgather" in msg and "0.5" in msg, msg
    # the timed-out collective stays in flight on rank 0 (never dropped) until the late rank joins
    assert [info["abandoned"] for _, info in ranks] == [1, 0]
    assert [info["drained"] for _, info in ranks] == [0, 0]


class _LateEngine(D.Communicator):
    """A one-rank adapter whose collectives complete only after `late` polls: an engine whose
    peer comes late."""

    engine = "late"

    def __init__(self, late: int) -> None:
        super().__init__(0, 1, timeout=0.01)
        self.late, self.order = late, []

    def _allreduce(self, buf, out) -> None:
        req = {"polls": 0, "id": self.collectives}
        self.order.append(("start", req["id"]))
        out[...] = buf
        if not self._finish(req, self.timeout):
            self._abandon(req)
            raise TimeoutError("late")

    def _finish(self, req, timeout) -> bool:
        req["polls"] += 1
        done = timeout is None or timeout >= 1 or req["polls"] > self.late   # a long wait outlasts the peer
        if done:
            self.order.append(("done", req["id"]))
        return done


def test_timed_out_collective_is_kept_and_drained_first(monkeypatch):
    # a timed-out collective is never dropped in flight: the next collective waits for it first,
    # and the interpreter's exit drains what is left (registered once)
    registered = []
    monkeypatch.setattr(D, "_EXIT_DRAIN", [])
    monkeypatch.setattr("atexit.register", registered.append)
    comm = _LateEngine(late=1)
    with pytest.raises(D.CollectiveError, match=r"first: allreduce of 3 float64 values failed on late rank 0 of 1 \(timeout 0.01 s\)"):
        comm.allreduce(np.ones(3), "first")
    assert len(comm.abandoned) == 1 and registered == [D._drain_all] and D._EXIT_DRAIN == [comm]
    comm.late = 0
    np.testing.assert_array_equal(comm.allreduce(np.arange(3.0), "second"), np.arange(3.0))
    assert comm.abandoned == [] and comm.order == [("start", 1), ("done", 1), ("start", 2), ("done", 2)]
    comm.late = 5
    with pytest.raises(D.CollectiveError):
        comm.allreduce(np.ones(3), "third")
    assert not comm.drain(timeout=0.01) and len(comm.abandoned) == 1   # still in flight
    D._drain_all()                                                     # the exit: waits it out
    assert comm.abandoned == [] and registered == [D._drain_all]


def test_import_gpu_imports_no_engine():
    code = ("import sys, gpu, gpu.distributed; "
            "print(any(m in sys.modules for m in ('mpi4py', 'torch', 'cupyx')))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_wrap_rejects_other_objects():
    import gpu.distributed as D
    with pytest.raises(TypeError, match="comm"):
        D.wrap(object())


class _OneRank:
    """A communicator of one rank (in-process): the comm= path against the plain path."""

    def __new__(cls):
        import gpu.distributed as D

        class One(D.Communicator):
            engine = "one"

            def __init__(self):
                super().__init__(0, 1)

            def _allgather(self, buf, out):
                out[0] = buf

            def _allreduce(self, buf, out):
                out[...] = buf
        return One()


@pytest.mark.kernel
@pytest.mark.parametrize("shape,axis", [((9, 4, 3), (0, 2)),   # channels-first view
                                        ((17, 5), 0)])         # channels-last, a prime count
def test_kernel_path_with_one_rank_equals_plain(shape, axis):
    import gpu
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    comm = _OneRank()
    with gpu.use_backend("emulate"):
        y, mean, invstd = gpu.batch_norm_forward(x, axis=axis, comm=comm)
        y0, mean0, invstd0 = gpu.batch_norm_forward(x, axis=axis)
        grads = gpu.batch_norm_backward(dy, x, None, mean, invstd, axis=axis, comm=comm)
        grads0 = gpu.batch_norm_backward(dy, x, None, mean0, invstd0, axis=axis)
    for a, b in zip((y, mean, invstd, *grads), (y0, mean0, invstd0, *grads0)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.skipif(not _have("sklearn"), reason="scikit-learn (digits) missing")
@pytest.mark.parametrize("engine,sync_bn", [pytest.param("mpi", True, marks=ENGINES[0].marks),
                                            pytest.param("gloo", False, marks=ENGINES[1].marks)])
def test_two_process_training_reaches_single_process_accuracy(engine, sync_bn, tmp_path):
    # the same global batch of 64 split over 2 ranks; with --sync-bn the step is the single
    # process's step up to rounding, without it batch norm sees 32 rows: within noise either way
    common = ["-m", "gpu.train", "--dataset", "digits", "--epochs", "3", "--quiet"]
    if "single" not in _RUNS:          # one single-process run for both engines
        one = subprocess.run([sys.executable, *common, "--json", str(tmp_path / "one.json")], env=_env(),
                             capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        assert one.returncode == 0, one.stderr
        _RUNS["single"] = json.loads((tmp_path / "one.json").read_text())["runs"]["with BN"]
    single = _RUNS["single"]
    flags = ["--distributed", "mpi" if engine == "mpi" else "torch"] + (["--sync-bn"] if sync_bn else [])
    outs = run_ranks(engine, 2, [*common, *flags, "--json", str(tmp_path / "two.json")])
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["config"]["ranks"] == 2
    acc = two["runs"]["with BN"]["final_val_acc"]
    assert acc >= single["final_val_acc"] - 0.02, (acc, single["final_val_acc"])
    assert sum(o.count("val acc") for o in outs) == 1      # rank 0 logs, rank 1 does not


# ---------------------------------------------------------------------------------------------
# gpu.torch.SyncBatchNorm (torch's own SyncBatchNorm trains on CUDA only: the references are the
# float64 batch norm of the concatenated batch, and torch's module where it runs on the CPU)
# ---------------------------------------------------------------------------------------------

needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch missing")


def _sbn_cases():
    return [pytest.param(size, c, id=c[0]) for size in (2, 3) for c in W.SBN_CASES[size]]


@needs_torch
@pytest.mark.parametrize("size,case", _sbn_cases())
def test_sync_batchnorm_module_equals_concatenated(size, case, tmp_path_factory):
    # [5, 3] unequal (on a process_group of ranks 0 and 1), float64 and channels_last float32;
    # [8, 0] a rank with no rows; [1, 1, 1] one row per rank (a batch of 3 over the world)
    name, split, feat, dt, last = case
    ranks = launched("gloo", size, tmp_path_factory)
    x, dy = W.global_batch(name, split, feat, dt)
    C = feat[0]
    axis = (0,) + tuple(range(2, x.ndim))
    ref = reference(x, dy, np.linspace(0.5, 1.5, C).astype(dt), np.linspace(-1, 1, C).astype(dt), axis)
    tol = TOL[np.dtype(dt)]
    got = [a for a, _ in ranks]
    for k in ("y", "dx"):
        whole = np.concatenate([g[f"{name}/{k}"].astype(np.float64) for g in got])
        assert np.linalg.norm(whole - ref[k]) <= tol * np.linalg.norm(ref[k]), k
    for k in ("rm", "rv"):                         # the global count's unbiased variance, every rank
        for g in got:
            assert np.linalg.norm(g[f"{name}/{k}"] - ref[k]) <= tol * np.linalg.norm(ref[k]), k
    if len(set(split)) == 1:                       # equal counts: torch's merge, computed here, agrees
        np.testing.assert_allclose(got[0][f"{name}/rv"], _torch_formula_running_var(x, split, axis), rtol=tol)
    # weight and bias gradients: each rank's own rows, as torch's SyncBatchNorm (DDP then averages)
    keep = [1] * x.ndim
    keep[1] = -1
    xhat = (x.astype(np.float64) - ref["mean"].reshape(keep)) * ref["invstd"].reshape(keep)
    bounds = np.cumsum([0] + split)
    for r, g in enumerate(got):
        rows = slice(bounds[r], bounds[r + 1])
        local = {"dbeta": dy[rows].astype(np.float64).sum(axis=axis),
                 "dgamma": (dy[rows].astype(np.float64) * xhat[rows]).sum(axis=axis)}
        for k, v in local.items():
            assert np.linalg.norm(g[f"{name}/{k}"] - v) <= tol * 4 * np.linalg.norm(ref[k]), (r, k)
        assert int(g[f"{name}/nbt"]) == 1
    for _, info in ranks:
        assert info["sbn"]["counts"][name] == [1, 1], info["sbn"]["counts"]     # one forward, one backward
        assert info["sbn"][f"{name}/channels_last"] == last


@needs_torch
def test_convert_sync_batchnorm_model_equals_single_process(tmp_path_factory):
    # torch's BatchNorm2d and BatchNorm1d(momentum=None) converted, two training steps over 2
    # ranks against the unconverted model on the whole batch: outputs, running statistics and
    # num_batches_tracked on every rank, parameter gradients summed over the ranks
    import torch
    ranks = launched("gloo", 2, tmp_path_factory)
    assert ranks[0][1]["sbn"]["converted"] == ["gpu.torch.sync_batchnorm.SyncBatchNorm"] * 2
    model = W.sbn_model()
    x, _ = W.global_batch("sbn-model", [5, 3], (2, 3, 2), "float64")
    for _ in range(2):
        out = model(torch.from_numpy(x))
        (out * torch.arange(1.0, 6.0, dtype=torch.float64)).sum().backward()
    whole = np.concatenate([a["model/out"] for a, _ in ranks])
    np.testing.assert_allclose(whole, out.detach().numpy(), rtol=1e-10, atol=1e-12)
    for k, v in model.state_dict().items():
        for a, _ in ranks:
            np.testing.assert_allclose(a[f"model/{k}"], v.numpy(), rtol=1e-12, atol=1e-14, err_msg=k)
    for k, p in model.named_parameters():
        total = sum(a[f"model/grad/{k}"] for a, _ in ranks)
        np.testing.assert_allclose(total, p.grad.numpy(), rtol=1e-9, atol=1e-10, err_msg=k)


@needs_torch
def test_fused_sync_batchnorm_model_equals_unfused(tmp_path_factory):
    # gpu.torch.fuse on the converted model: its BatchNorm2d + ReLU runs the synchronized fused op
    # over the 2 ranks; outputs, state and gradients equal the unfused synchronized run's
    ranks = launched("gloo", 2, tmp_path_factory)
    assert ranks[0][1]["sbn"]["fused"] == ["SyncBatchNormAct", "SyncBatchNorm"]
    for a, _ in ranks:
        for k in [k for k in a if k.startswith("model/")]:
            np.testing.assert_allclose(a["fused/" + k[6:]], a[k], rtol=1e-10, atol=1e-12, err_msg=k)


@needs_torch
def test_sync_batchnorm_state_dict_and_single_process_fallback():
    # without torch.distributed (and in eval) both modules run plain batch norm: ours against
    # torch's SyncBatchNorm itself, with state_dicts exchanged both ways
    import torch
    import gpu.torch as gt
    torch.manual_seed(1)
    ours, theirs = gt.SyncBatchNorm(5, momentum=None), torch.nn.SyncBatchNorm(5, momentum=None)
    assert repr(ours) == repr(theirs) and list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-1, 1)
    ours.load_state_dict(theirs.state_dict())
    for step in range(2):                          # momentum None: the cumulative average
        x = torch.randn(7, 5, 3) * 2 + 1
        torch.testing.assert_close(ours(x), theirs(x))
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)
    ours.running_var.mul_(1.5)
    theirs.load_state_dict(ours.state_dict())      # and back
    ours.eval(), theirs.eval()
    x = torch.randn(4, 5, 3)
    torch.testing.assert_close(ours(x), theirs(x))
    with pytest.raises(RuntimeError, match="not initialized"):
        gt.sync_batch_norm(x, None, None)
    with pytest.raises(ValueError, match="expected at least 2D"):
        ours(torch.randn(5))


@needs_torch
def test_convert_sync_batchnorm_keeps_tensors():
    # every batch norm becomes ours: torch's BatchNorm1d/2d/3d and SyncBatchNorm (its group kept),
    # gpu.torch's BatchNorm2d; the same parameter and buffer tensors, the training mode kept
    import torch
    import gpu.torch as gt
    group = object()
    sync = torch.nn.SyncBatchNorm(6, process_group=group)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Sequential(gt.BatchNorm2d(4).eval(), sync),
                                torch.nn.BatchNorm3d(5, affine=False, track_running_stats=False))
    before = [(m.weight, m.running_mean, m.num_batches_tracked, m.training)
              for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    out = gt.SyncBatchNorm.convert_sync_batchnorm(model)
    bns = [m for m in out.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert [type(m) for m in bns] == [gt.SyncBatchNorm] * 4
    for m, (w, rm, nbt, training) in zip(bns, before):
        assert m.weight is w and m.running_mean is rm and m.num_batches_tracked is nbt and m.training == training
    assert bns[2].process_group is group and bns[0].process_group is None
    assert type(gt.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(2))) is gt.SyncBatchNorm


@needs_torch
def test_sync_batch_norm_compiles_fullgraph(tmp_path):
    # the custom ops (fake implementations, autograd) under torch.compile(fullgraph=True), on a
    # group of one rank in this process: the same numbers as eager
    import torch
    import torch.distributed as dist
    import gpu.torch as gt
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch._dynamo.reset()
        x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
        w = torch.rand(3, dtype=torch.float64, requires_grad=True)
        f = torch.compile(lambda x, w: gt.sync_batch_norm(x, None, None, w), backend="aot_eager", fullgraph=True)
        y = f(x, w)
        grads = torch.autograd.grad(y, (x, w), torch.ones_like(y) + x.detach())
        y0 = torch.nn.functional.batch_norm(x, None, None, w, training=True)
        grads0 = torch.autograd.grad(y0, (x, w), torch.ones_like(y0) + x.detach())
        torch.testing.assert_close(y, y0)
        for a, b in zip(grads, grads0):
            torch.testing.assert_close(a, b)
    finally:
        dist.destroy_process_group()


@needs_torch
def test_bench_distributed(tmp_path_factory):
    # gpu-bench --distributed's run on the gloo launch's 3 ranks: every peer checked, then timed
    launched("gloo", 3, tmp_path_factory)
    rows = json.loads((_RUNS["gloo-dir"] / "bench.json").read_text())["rows"]
    assert [r["peer"] for r in rows] == ["ours", "ours-torch", "torch-algo"], rows
    assert all(r["status"] == "ok" and 0 <= r["share"] <= 1.5 for r in rows), rows


def test_bench_distributed_launcher_drops_ranks():
    # --ranks P launches P ranks of the same command line, less --ranks
    from gpu.bench.distributed import _without_ranks
    assert _without_ranks(["--distributed", "--ranks", "2", "--repeat", "3", "--ranks=4"]) == \
        ["--distributed", "--repeat", "3"]
