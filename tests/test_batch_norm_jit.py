"""The compiled NumPy-path loops (gpu/ops/batch_norm/jit.py, the optional ``cpu-jit`` extra) against float64 and
against the NumPy path they stand in for. Skipped without Numba."""
from __future__ import annotations

import numpy as np
import pytest

import gpu
from gpu import _cpu
from gpu.bench import reference as ref
from gpu.ops.batch_norm import jit, numpy_path
from conftest import assert_close, dtype_id, random

pytestmark = pytest.mark.skipif(not jit.available(), reason="needs Numba (pip install '.[cpu-jit]')")


@pytest.fixture(autouse=True)
def _past_small_path(monkeypatch):
    # the compiled loops take x past the small-x path; its switch and the row blocks (16 KiB)
    # lowered, so that small shapes run many blocks and their merges
    monkeypatch.setattr(numpy_path, "SMALL_ELEMENTS", 4096)
    monkeypatch.setattr(_cpu, "BLOCK_BYTES", 1 << 14)


# (shape, axis), each past the (lowered) small-path switch, with why
CASES = [
    ((30011, 9), 0),                # channels-last, C prime: 66 blocks of 455 rows, the last 436
    ((40000, 1), 0),                # one channel: channels-first view of one plane (outer 1)
    ((3, 7, 41, 43), (0, 2, 3)),    # NCHW, odd planes
    ((5, 17, 13, 31), (0, 1, 2)),   # NHWC: channels-last rows of 31
    ((2, 20000), 1),                # the seed's (n, m) layout: one plane per unit
    ((1, 5000), 0),                 # one row: var 0 everywhere, y = beta
]
IDS = [f"{s}-ax{a}" for s, a in CASES]


def _axes(axis):
    return axis if isinstance(axis, tuple) else (axis,)


def _kept(shape, axis):
    axes = {a % len(shape) for a in _axes(axis)}
    return tuple(n for i, n in enumerate(shape) if i not in axes), tuple(1 if i in axes else n for i, n in enumerate(shape))


def _numpy_path(monkeypatch):
    monkeypatch.setenv("GPU_CPU_JIT", "0")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
def test_forward_backward_match_reference_and_numpy_path(monkeypatch, rng, shape, axis, dtype):
    x, x64 = random(rng, shape, dtype, scale=2.0, offset=50.0)   # an offset: the two-pass matters
    dy, dy64 = random(rng, shape, dtype)
    kept, keep = _kept(shape, axis)
    gamma = (rng.standard_normal(kept) + 1.5).astype(dtype)
    beta = rng.standard_normal(kept).astype(dtype)
    m = x.size // int(np.prod(kept))
    # the compiled loops take this call
    assert numpy_path.strategy("forward", x, axis) == numpy_path.strategy("backward", x, axis, dy) == "jit"
    outs = {}
    for path in ("jit", "numpy"):
        if path == "numpy":
            _numpy_path(monkeypatch)
        rm, rv = np.zeros(kept, dtype), np.ones(kept, dtype)
        y, mean, invstd = gpu.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv) \
            if m > 1 else gpu.batch_norm_forward(x, gamma, beta, axis=axis)
        outs[path] = (y, mean, invstd, rm, rv) + gpu.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis)
    ry, rmean, rinvstd, rvar = ref.batch_norm_forward(x64, gamma.reshape(keep), beta.reshape(keep), _axes(axis), 1e-5)
    rdx, rdg, rdb = ref.batch_norm_backward(dy64, x64, gamma.reshape(keep), rmean, rinvstd, _axes(axis))
    want = (ry, rmean.reshape(kept), rinvstd.reshape(kept), 0.1 * rmean.reshape(kept),
            0.9 + 0.1 * rvar.reshape(kept) * m / max(m - 1, 1), rdx, rdg.reshape(kept), rdb.reshape(kept))
    names = ("y", "mean", "invstd", "running_mean", "running_var", "dx", "dgamma", "dbeta")
    for path, got in outs.items():
        for name, a, w in zip(names, got, want):
            if name.startswith("running") and m == 1:
                continue
            assert a.dtype == (np.dtype(dtype) if name != "dgamma" and name != "dbeta" else gamma.dtype)
            assert_close(a, w, dtype, f"{path} {name}", factor=8 if name in ("dx", "dgamma", "invstd") else 1)


def test_thread_count_does_not_change_a_bit(monkeypatch, rng):
    # partials per chunk, merged in chunk order: the same bits on 1 thread as on all
    x, _ = random(rng, (5000, 24), np.float32, offset=3.0)
    dy, _ = random(rng, (5000, 24), np.float32)
    runs = []
    for threads in ("1", "2"):
        monkeypatch.setenv("GPU_CPU_THREADS", threads)
        y, mean, invstd = gpu.batch_norm_forward(x)
        runs.append((y, mean, invstd) + gpu.batch_norm_backward(dy, x, None, mean, invstd))
    for a, b in zip(*runs):
        assert a.tobytes() == b.tobytes()


def test_non_finite_statistics_fall_back_to_the_numpy_path(rng):
    # an inf in one channel, and a variance past float32's sum of squares in another: the NumPy
    # path's answers (torch's special values; the overflow-safe variance)
    x, _ = random(rng, (20000, 3), np.float32)
    x[7, 0] = np.inf
    x[:, 2] *= np.float32(3e18)
    y, mean_f, invstd = gpu.batch_norm_forward(x)
    assert np.isinf(mean_f[0]) and np.isfinite(mean_f[1:]).all()
    assert np.isfinite(invstd[2]) and invstd[2] > 0
    want = x[:, 2].astype(np.float64).var()
    assert abs(1 / float(invstd[2]) ** 2 - want) <= 1e-4 * want


def test_noncontiguous_or_half_inputs_take_the_numpy_path(rng):
    x = random(rng, (5000, 4), np.float16)[0]
    assert numpy_path.strategy("forward", x, 0) != "jit"
    xt = random(rng, (8, 5000), np.float32)[0].T
    assert numpy_path.strategy("forward", xt, 0) != "jit"


# (shape, axis) at most the small-path switch: one serial compiled call per op, with why
SMALL_CASES = [
    ((256, 64), 0),                 # the --quick dense shape: channels-last rows
    ((8, 16, 8, 8), (0, 2, 3)),     # --quick NCHW: planes of 64, merged by Chan's formula
    ((8, 8, 8, 16), (0, 1, 2)),     # --quick NHWC: rows of 16
    ((3, 5, 7), (0, 2)),            # odd planes, fewer than a vector
    ((5, 1), 0),                    # one channel, one value per row
    ((2, 9), 1),                    # the seed's (n, m) layout: one plane per unit
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
@pytest.mark.parametrize("shape,axis", SMALL_CASES, ids=[f"{s}-ax{a}" for s, a in SMALL_CASES])
def test_small_x_one_call_matches_reference_and_numpy_path(monkeypatch, rng, shape, axis, dtype):
    monkeypatch.setattr(numpy_path, "SMALL_ELEMENTS", 1 << 17)
    x, x64 = random(rng, shape, dtype, scale=2.0, offset=50.0)   # an offset: the two-pass matters
    kept, keep = _kept(shape, axis)
    gamma = (rng.standard_normal(kept) + 1.5).astype(dtype)
    beta = rng.standard_normal(kept).astype(dtype)
    m = x.size // int(np.prod(kept))
    assert numpy_path.strategy("forward", x, axis) == "small-jit"     # the small compiled call takes it
    outs = {}
    for path in ("jit", "numpy"):
        if path == "numpy":
            _numpy_path(monkeypatch)
        rm, rv = np.full(kept, 0.5, dtype), np.full(kept, 2.0, dtype)
        y, mean, invstd = gpu.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv)
        rm64, rv64 = np.zeros(kept), np.ones(kept)      # float64 running stats: updated outside the call
        gpu.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=rm64, running_var=rv64)
        y_inf = gpu.batch_norm_inference(x, gamma, beta, rm, rv, axis=axis)
        outs[path] = (y, mean, invstd, rm, rv, rm64, rv64, y_inf) + gpu.batch_stats(x, axis=axis)
    ry, rmean, rinvstd, rvar = ref.batch_norm_forward(x64, gamma.reshape(keep), beta.reshape(keep), _axes(axis), 1e-5)
    rmean, rinvstd, rvar = rmean.reshape(kept), rinvstd.reshape(kept), rvar.reshape(kept)
    rm_want, rv_want = 0.9 * 0.5 + 0.1 * rmean, 0.9 * 2.0 + 0.1 * rvar * m / (m - 1)
    for path, (y, mean, invstd, rm, rv, rm64, rv64, y_inf, smean, svar) in outs.items():
        assert_close(y, ry, dtype, f"{path} y")
        assert_close(mean, rmean, dtype, f"{path} mean")
        assert_close(invstd, rinvstd, dtype, f"{path} invstd", factor=4)
        assert_close(rm, rm_want, dtype, f"{path} running_mean")
        assert_close(rv, rv_want, dtype, f"{path} running_var", factor=4)
        assert_close(rm64, 0.1 * rmean, dtype, f"{path} running_mean float64")
        assert_close(rv64, 0.9 + 0.1 * rvar * m / (m - 1), dtype, f"{path} running_var float64", factor=4)
        want = (x64 - rm.reshape(keep)) / np.sqrt(rv.reshape(keep) + 1e-5) * gamma.reshape(keep) + beta.reshape(keep)
        assert_close(y_inf, want, dtype, f"{path} inference")
        assert_close(smean, rmean, dtype, f"{path} batch_stats mean")
        assert_close(svar, rvar, dtype, f"{path} batch_stats var", factor=4)
        assert all(a.dtype == np.dtype(dtype) for a in (y, mean, invstd, rm, rv, y_inf, smean, svar))


def test_small_x_special_values(monkeypatch, rng):
    # the small compiled call: eps = 0 with a constant feature gives invstd 0 and y = beta; an inf
    # or a variance past float32 falls back to the NumPy path (torch's special values, the
    # overflow-safe variance) and leaves the running statistics to it
    monkeypatch.setattr(numpy_path, "SMALL_ELEMENTS", 1 << 17)
    x, _ = random(rng, (64, 3), np.float32)
    x[:, 1] = 2.5
    beta = np.array([0.0, 7.0, 0.0], np.float32)
    y, mean, invstd = gpu.batch_norm_forward(x, None, beta, eps=0.0)
    assert invstd[1] == 0 and (y[:, 1] == 7.0).all() and np.isfinite(y).all()
    x[5, 0] = np.inf
    x[:, 2] *= np.float32(3e18)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, mean, invstd = gpu.batch_norm_forward(x, running_mean=rm, running_var=rv)
    assert np.isinf(mean[0]) and np.isinf(rm[0]) and np.isnan(rv[0])
    want = x[:, 2].astype(np.float64).var()
    assert abs(1 / float(invstd[2]) ** 2 - want) <= 1e-4 * want
    mean, var = gpu.batch_stats(x)
    assert np.isinf(mean[0]) and np.isnan(var[0]) and abs(float(var[2]) - want) <= 1e-4 * want
