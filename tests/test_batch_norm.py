"""Batch statistics and batch norm on every backend, against the float64 formulas of gpu/bench/reference.py."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

import gpu
from gpu import _cpu
from gpu.bench import reference as ref
from conftest import DTYPES, TOL, assert_close, dtype_id, random, rel_err, to_numpy

# (shape, axis): the layouts users have, and the awkward sizes, each with its reason.
CASES = [
    ((64, 10), 0),               # dense (N, C): reduce over the batch
    ((1, 5), 0),                 # one row: variance 0, y = beta
    ((2, 3), 0),                 # two rows: the smallest unbiased running-variance update
    ((7, 1), 0),                 # one channel, a prime number of rows
    ((33, 65), 0),               # just past a warp in both dimensions
    ((10, 37), 1),               # the seed's Z[l] of shape (n_units, m), reduced over examples
    ((4, 6, 5, 3), (0, 2, 3)),   # NCHW activations
    ((4, 5, 3, 6), (0, 1, 2)),   # NHWC activations
    ((3, 1, 7, 1), (0, 2, 3)),   # NCHW with one channel and width 1
    ((5, 4, 3), 1),              # kept axes not adjacent: (5, 3) features over a middle axis
    ((13,), 0),                  # 1-D: a single feature
    ((6, 2, 5), (-1, 0)),        # negative and unsorted axes
]
CASE_IDS = [f"{s}-ax{a}" for s, a in CASES]


def _axes(axis):
    return tuple(axis) if isinstance(axis, tuple) else (axis,)


def _kept(shape, axis):
    axes = {a % len(shape) for a in _axes(axis)}
    return tuple(n for i, n in enumerate(shape) if i not in axes)


def _keepdims(shape, axis):
    axes = {a % len(shape) for a in _axes(axis)}
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def _params(rng, shape, axis, dtype=np.float64):
    kept = _kept(shape, axis)
    gamma = (rng.standard_normal(kept) + 1.5).astype(dtype)
    beta = rng.standard_normal(kept).astype(dtype)
    return gamma, beta


# ---------------------------------------------------------------------------------------------
# Correctness against the reference, every backend, dtype and layout
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_batch_stats(backend, rng, shape, axis, dtype):
    x, x64 = random(rng, shape, dtype, scale=2.0, offset=3.0)
    mean, var = backend.call(gpu.batch_stats, x, axis=axis)
    rmean, rvar = ref.batch_stats(x64, _axes(axis))
    assert to_numpy(mean).dtype == dtype and to_numpy(var).dtype == dtype
    assert_close(mean, rmean.reshape(_kept(shape, axis)), dtype, "mean")
    assert_close(var, rvar.reshape(_kept(shape, axis)), dtype, "var", factor=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_forward_with_running_stats(backend, rng, shape, axis, dtype):
    x, x64 = random(rng, shape, dtype, scale=2.0, offset=-1.0)
    gamma, beta = _params(rng, shape, axis)
    kept, m = _kept(shape, axis), x.size // max(1, int(np.prod(_kept(shape, axis))))
    rm0 = np.asarray(rng.standard_normal(kept), np.float32)
    rv0 = np.asarray(rng.random(kept) + 0.5, np.float32)
    rm, rv = backend.array(rm0.copy()), backend.array(rv0.copy())
    momentum, eps = 0.3, 1e-3
    kw = dict(axis=axis, eps=eps, momentum=momentum)
    if m == 1:  # PyTorch refuses to update running stats from one value per feature
        with pytest.raises(ValueError, match="more than 1 value"):
            backend.call(gpu.batch_norm_forward, x, gamma, beta, running_mean=rm, running_var=rv, **kw)
        rm = rv = None
    y, mean, invstd = backend.call(gpu.batch_norm_forward, x, gamma, beta, running_mean=rm,
                                   running_var=rv, **kw)
    keep = _keepdims(shape, axis)
    ry, rmean, rinvstd, rvar = ref.batch_norm_forward(x64, gamma.reshape(keep), beta.reshape(keep), _axes(axis), eps)
    assert to_numpy(y).dtype == dtype
    acc = np.float64 if dtype == np.float64 else np.float32
    assert to_numpy(mean).dtype == acc and to_numpy(invstd).dtype == acc
    assert_close(y, ry, dtype, "y")
    assert_close(mean, rmean.reshape(kept), dtype, "mean")
    assert_close(invstd, rinvstd.reshape(kept), dtype, "invstd", factor=4)
    if rm is not None:
        want_rm = (1 - momentum) * rm0 + momentum * rmean.reshape(kept)
        want_rv = (1 - momentum) * rv0 + momentum * rvar.reshape(kept) * m / (m - 1)
        assert to_numpy(rm).dtype == np.float32
        assert rel_err(rm, want_rm) <= max(TOL[np.dtype(dtype)], 1e-6)
        assert rel_err(rv, want_rv) <= max(4 * TOL[np.dtype(dtype)], 1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_backward(backend, rng, shape, axis, dtype):
    x, x64 = random(rng, shape, dtype, scale=1.5, offset=2.0)
    dy, dy64 = random(rng, shape, dtype)
    gamma, _ = _params(rng, shape, axis)
    keep, kept = _keepdims(shape, axis), _kept(shape, axis)
    _, rmean, rinvstd, _ = ref.batch_norm_forward(x64, None, None, _axes(axis), 1e-5)
    # the saved statistics as the forward returns them, in the accumulation dtype
    acc = np.float64 if dtype == np.float64 else np.float32
    mean, invstd = rmean.reshape(kept).astype(acc), rinvstd.reshape(kept).astype(acc)
    dx, dgamma, dbeta = backend.call(gpu.batch_norm_backward, dy, x, gamma.astype(np.float32), mean,
                                     invstd, axis=axis)
    rdx, rdgamma, rdbeta = ref.batch_norm_backward(dy64, x64, gamma.astype(np.float32).astype(np.float64).reshape(keep),
                                           mean.astype(np.float64).reshape(keep),
                                           invstd.astype(np.float64).reshape(keep), _axes(axis))
    assert to_numpy(dx).dtype == dtype
    assert to_numpy(dgamma).dtype == np.float32 and to_numpy(dbeta).dtype == np.float32
    # dx = k * (dy - ...) cancels to ~0 when a feature has 1 or 2 values (then y is 0 or +-1 for
    # any x): there the error is measured against the size of the terms, k * dy. dx = k dy + a (x -
    # mean) + b sums terms of that size, so its absolute error is a few ulp of k * dy: a relative
    # check on dx is meaningful only where dx is well above that (1e-2 of the terms)
    terms = np.linalg.norm(dy64 * gamma.reshape(keep) * invstd.astype(np.float64).reshape(keep))
    if np.linalg.norm(rdx) > 1e-2 * terms:
        assert_close(dx, rdx, dtype, "dx", factor=8)
    else:
        err = np.linalg.norm(to_numpy(dx).astype(np.float64) - rdx) / terms
        assert err <= 8 * TOL[np.dtype(dtype)], f"dx: error {err:.3g} relative to k * dy"
    # dgamma and dbeta come back in gamma's dtype, float32 here
    assert_close(dgamma, rdgamma.reshape(kept), np.float32, "dgamma", factor=8)
    assert_close(dbeta, rdbeta.reshape(kept), np.float32, "dbeta", factor=8)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_inference(backend, rng, shape, axis, dtype):
    x, x64 = random(rng, shape, dtype, scale=2.0)
    gamma, beta = _params(rng, shape, axis, np.float32)
    kept, keep = _kept(shape, axis), _keepdims(shape, axis)
    rm = rng.standard_normal(kept).astype(np.float32)
    rv = (rng.random(kept) + 0.2).astype(np.float32)
    y = backend.call(gpu.batch_norm_inference, x, gamma, beta, rm, rv, axis=axis, eps=1e-4)
    want = (x64 - rm.reshape(keep)) / np.sqrt(rv.reshape(keep).astype(np.float64) + 1e-4) \
        * gamma.reshape(keep) + beta.reshape(keep)
    assert to_numpy(y).dtype == dtype
    assert_close(y, want, dtype, "y")
    y2 = backend.call(gpu.batch_norm, x, gamma, beta, axis=axis, eps=1e-4, running_mean=rm,
                      running_var=rv, training=False)
    np.testing.assert_array_equal(to_numpy(y2), to_numpy(y))


def test_batch_norm_training_is_forward_y(backend, rng):
    x, _ = random(rng, (16, 5), np.float32)
    y = backend.call(gpu.batch_norm, x)
    y_fwd = backend.call(gpu.batch_norm_forward, x)[0]
    np.testing.assert_array_equal(to_numpy(y), to_numpy(y_fwd))


def test_gamma_beta_default_to_one_and_zero(backend, rng):
    x, _ = random(rng, (9, 4), np.float32)
    y_none = backend.call(gpu.batch_norm_forward, x)[0]
    y_ones = backend.call(gpu.batch_norm_forward, x, np.ones(4, np.float32), np.zeros(4, np.float32))[0]
    np.testing.assert_allclose(to_numpy(y_none), to_numpy(y_ones), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------

def test_variance_stable_at_large_offset(backend, rng):
    # data at an offset of 1e4 with unit variance, float32: a naive E[x^2] - E[x]^2 loses it all
    x = (rng.standard_normal((4096, 8)) + 1e4).astype(np.float32)
    _, var = backend.call(gpu.batch_stats, x, axis=0)
    want = x.astype(np.float64).var(axis=0)
    assert np.abs(to_numpy(var) / want - 1).max() < 1e-3


def test_backward_matches_finite_differences(rng):
    # float64 central differences of L = sum(w * y) through the whole forward (NCHW layout)
    shape, axis = (3, 2, 2, 3), (0, 2, 3)
    x = rng.standard_normal(shape)
    gamma, beta = rng.standard_normal(2) + 1, rng.standard_normal(2)
    w = rng.standard_normal(shape)

    def loss(x, gamma, beta):
        return float((w * gpu.batch_norm_forward(x, gamma, beta, axis=axis, eps=1e-3)[0]).sum())

    _, mean, invstd = gpu.batch_norm_forward(x, gamma, beta, axis=axis, eps=1e-3)
    dx, dgamma, dbeta = gpu.batch_norm_backward(w, x, gamma, mean, invstd, axis=axis)
    h = 1e-6
    for arr, grad in ((x, dx), (gamma, dgamma), (beta, dbeta)):
        num = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + h
            up = loss(x, gamma, beta)
            arr[i] = old - h
            down = loss(x, gamma, beta)
            arr[i] = old
            num[i] = (up - down) / (2 * h)
        assert rel_err(grad, num) < 1e-7


def test_nan_in_one_channel_leaves_others_finite(backend, rng):
    x, _ = random(rng, (16, 6, 3, 3), np.float32)
    x[5, 2, 1, 1] = np.nan
    axis = (0, 2, 3)
    y, mean, invstd = (to_numpy(a) for a in backend.call(gpu.batch_norm_forward, x, axis=axis))
    others = [0, 1, 3, 4, 5]
    assert np.isfinite(y[:, others]).all() and np.isnan(y[:, 2]).all()
    assert np.isfinite(mean[others]).all() and np.isfinite(invstd[others]).all()
    dx, dgamma, dbeta = (to_numpy(a) for a in backend.call(
        gpu.batch_norm_backward, np.ones_like(x), x, None, mean, invstd, axis=axis))
    assert np.isfinite(dx[:, others]).all() and np.isfinite(dgamma[others]).all()
    rv = np.ones(6, np.float32)
    rv[2] = np.inf
    y = to_numpy(backend.call(gpu.batch_norm_inference, x, None, None, np.zeros(6, np.float32), rv, axis=axis))
    assert np.isfinite(y[:, [0, 1, 3, 4, 5]]).all()


# ---------------------------------------------------------------------------------------------
# Layouts and views
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("view", ["transposed", "strided", "negative-stride"])
def test_non_contiguous_inputs(backend, rng, view):
    base, _ = random(rng, (12, 20), np.float32, offset=1.0)
    x = {"transposed": base.T, "strided": base[::2, 1::3], "negative-stride": base[::-1]}[view]
    x64 = np.ascontiguousarray(x).astype(np.float64)
    y, mean, invstd = backend.call(gpu.batch_norm_forward, x, axis=0)
    assert_close(y, ref.batch_norm_forward(x64, None, None, (0,), 1e-5)[0], np.float32, "y")
    dy, dy64 = random(rng, x.shape, np.float32)
    dx = backend.call(gpu.batch_norm_backward, dy[::1], x, None, mean, invstd, axis=0)[0]
    rdx = ref.batch_norm_backward(dy64, x64, None, to_numpy(mean).astype(np.float64)[None],
                          to_numpy(invstd).astype(np.float64)[None], (0,))[0]
    assert_close(dx, rdx, np.float32, "dx", factor=8)


def test_seed_layout_with_column_parameters(backend, rng):
    # the seed's notation: Z of shape (n_units, m), gamma and beta as (n_units, 1) columns
    z, z64 = random(rng, (5, 32), np.float32)
    gamma, beta = rng.standard_normal((5, 1)).astype(np.float32), rng.standard_normal((5, 1)).astype(np.float32)
    y, mean, invstd = backend.call(gpu.batch_norm_forward, z, gamma, beta, axis=1)
    assert to_numpy(mean).shape == (5,)
    assert_close(y, ref.batch_norm_forward(z64, gamma, beta, (1,), 1e-5)[0], np.float32, "y")


def test_inputs_are_not_modified(backend, rng):
    x, _ = random(rng, (8, 3), np.float32)
    dy, _ = random(rng, (8, 3), np.float32)
    x0, dy0 = x.copy(), dy.copy()
    _, mean, invstd = backend.call(gpu.batch_norm_forward, x)
    backend.call(gpu.batch_norm_backward, dy, x, None, to_numpy(mean), to_numpy(invstd))
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dy, dy0)


def test_zero_channels_gives_empty_outputs(rng):
    x = np.empty((4, 0), np.float32)
    y, mean, invstd = gpu.batch_norm_forward(x)
    assert y.shape == (4, 0) and mean.shape == (0,)


# ---------------------------------------------------------------------------------------------
# PyTorch as an extra oracle (optional)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis,chan", [((8, 3, 4, 5), (0, 2, 3), 1), ((32, 7), 0, 1),
                                              ((6, 40), 1, 0)])
def test_matches_torch(backend, rng, shape, axis, chan):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, x64 = random(rng, shape, np.float64, offset=0.5)
    dy, _ = random(rng, shape, np.float64)
    C = shape[chan]
    gamma, beta = rng.standard_normal(C) + 1, rng.standard_normal(C)
    rm, rv = np.zeros(C), np.ones(C)
    rmd, rvd = backend.array(rm), backend.array(rv)
    y, mean, invstd = backend.call(gpu.batch_norm_forward, x, gamma, beta, axis=axis, running_mean=rmd,
                                   running_var=rvd, momentum=0.2)
    dx, dgamma, dbeta = backend.call(gpu.batch_norm_backward, dy, x, gamma, mean, invstd, axis=axis)

    to_t = lambda a: torch.tensor(np.moveaxis(a, chan, 1))  # noqa: E731  torch wants channels at dim 1
    xt, gt, bt = to_t(x).requires_grad_(), torch.tensor(gamma).requires_grad_(), torch.tensor(beta).requires_grad_()
    trm, trv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    yt = F.batch_norm(xt, trm, trv, gt, bt, training=True, momentum=0.2)
    yt.backward(to_t(dy))
    back = lambda t: np.moveaxis(t.detach().numpy(), 1, chan)  # noqa: E731
    assert rel_err(y, back(yt)) < 1e-12
    assert rel_err(rmd, trm.numpy()) < 1e-12 and rel_err(rvd, trv.numpy()) < 1e-12
    assert rel_err(dx, back(xt.grad)) < 1e-10
    assert rel_err(dgamma, gt.grad.numpy()) < 1e-12 and rel_err(dbeta, bt.grad.numpy()) < 1e-12


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before anything runs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,exc,match", [
    (lambda x: gpu.batch_norm_forward(x, gamma=np.ones(3)), ValueError, "gamma: shape"),
    (lambda x: gpu.batch_norm_forward(x, beta=np.ones((4, 1))), ValueError, "beta: shape"),
    (lambda x: gpu.batch_norm_forward(x.astype(np.int32)), TypeError, "x: dtype int32"),
    (lambda x: gpu.batch_norm_forward(x.astype(np.complex64)), TypeError, "x: dtype complex64"),
    (lambda x: gpu.batch_stats(x[:0]), ValueError, "x: empty reduction"),
    (lambda x: gpu.batch_stats(x, axis=2), ValueError, "axis: axis 2 is out of bounds"),
    (lambda x: gpu.batch_stats(x, axis=(0, 0)), ValueError, "axis: repeated"),
    (lambda x: gpu.batch_stats(x, axis=1.5), TypeError, "axis"),
    (lambda x: gpu.batch_stats(np.float32(1.0)), ValueError, "x: expected an array with at least one"),
    (lambda x: gpu.batch_norm_forward(x, eps=-1), ValueError, "eps"),
    (lambda x: gpu.batch_norm_forward(x, running_mean=np.zeros(4)), ValueError, "pass both"),
    (lambda x: gpu.batch_norm_forward(x, running_mean=np.zeros(5), running_var=np.ones(4)), ValueError,
     "running_mean: shape"),
    (lambda x: gpu.batch_norm_forward(x, running_mean=np.zeros(4, np.int64), running_var=np.ones(4)),
     TypeError, "running_mean: dtype"),
    (lambda x: gpu.batch_norm_forward(x[:1], running_mean=np.zeros(4), running_var=np.ones(4)), ValueError,
     "more than 1 value"),
    (lambda x: gpu.batch_norm_forward(x, running_mean=[0.0] * 4, running_var=np.ones(4)), TypeError,
     "running_mean: expected an array"),
    (lambda x: gpu.batch_norm_backward(x[:3], x, None, np.zeros(4), np.ones(4)), ValueError, "dy: shape"),
    (lambda x: gpu.batch_norm_backward(x, x, None, np.zeros(3), np.ones(4)), ValueError, "mean: shape"),
    (lambda x: gpu.batch_norm_backward(x, x, None, None, np.ones(4)), TypeError, "mean, invstd"),
    (lambda x: gpu.batch_norm_inference(x, None, None, None, np.ones(4)), TypeError, "running_mean"),
    (lambda x: gpu.batch_norm(x, training=False), TypeError, "running_mean"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(call, exc, match):
    x = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    with pytest.raises(exc, match=match):
        call(x)


def test_read_only_running_stats_rejected():
    x = np.random.default_rng(2).standard_normal((6, 4))
    rm, rv = np.zeros(4), np.ones(4)
    rm.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean: must be writeable"):
        gpu.batch_norm_forward(x, running_mean=rm, running_var=rv)


@pytest.mark.parametrize("shape,axis", [((37, 12), 0), ((9, 5, 4), (0, 2)), ((11, 30), 1)],
                         ids=["reduced-axis0", "nchw-like", "kept-axis0"])
def test_numpy_path_row_blocks(monkeypatch, rng, shape, axis):
    # the NumPy path works on row blocks sized for the cache; force many tiny blocks (2 rows each),
    # both where blocks share features (axis 0 reduced) and where each holds whole ones (kept);
    # past the small-x path, without the compiled loops
    numpy_path = importlib.import_module("gpu.ops.batch_norm.numpy_path")
    monkeypatch.setattr(_cpu, "BLOCK_BYTES", 2 * 4 * int(np.prod(shape[1:])))
    monkeypatch.setattr(numpy_path, "SMALL_ELEMENTS", 0)
    monkeypatch.setenv("GPU_CPU_JIT", "0")
    x, x64 = random(rng, shape, np.float32, offset=100.0)
    dy, dy64 = random(rng, shape, np.float32)
    keep = _keepdims(shape, axis)
    gamma, beta = _params(rng, shape, axis, np.float32)
    y, mean, invstd = gpu.batch_norm_forward(x, gamma, beta, axis=axis)
    ry, rmean, rinvstd, _ = ref.batch_norm_forward(x64, gamma.reshape(keep), beta.reshape(keep), _axes(axis), 1e-5)
    assert_close(y, ry, np.float32, "y")
    dx, dgamma, dbeta = gpu.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis)
    rdx, rdg, rdb = ref.batch_norm_backward(dy64, x64, gamma.reshape(keep), rmean, rinvstd, _axes(axis))
    assert_close(dx, rdx, np.float32, "dx", factor=8)
    assert_close(dgamma, rdg.reshape(gamma.shape), np.float32, "dgamma", factor=8)
    rm, rv = np.zeros(gamma.shape), np.ones(gamma.shape)
    y_inf = gpu.batch_norm_inference(x, gamma, beta, rm, rv, axis=axis)
    assert_close(y_inf, x64 / np.sqrt(1 + 1e-5) * gamma.reshape(keep) + beta.reshape(keep), np.float32, "y")


@pytest.mark.parametrize("shape,axis", [((512, 64), 0), ((8, 16, 16, 16), (0, 2, 3)), ((8, 16, 16, 16), (0, 1, 2)),
                                        ((3, 1, 5), (0, 2)), ((32768,), 0)],
                         ids=["nc", "nchw", "nhwc", "one-channel", "1-d"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
def test_numpy_small_path_switch(monkeypatch, rng, shape, axis, dtype):
    # x of at most SMALL_ELEMENTS takes the small path (BLAS sums, one thread): the limit set to
    # x's size (small path) and one below it (the direct path) give the reference's answer both,
    # at an offset where an uncorrected two-pass variance would lose digits (NumPy only: the
    # compiled loops of the cpu-jit extra have their own tests)
    numpy_path = importlib.import_module("gpu.ops.batch_norm.numpy_path")
    monkeypatch.setenv("GPU_CPU_JIT", "0")
    x, x64 = random(rng, shape, dtype, scale=2.0, offset=300.0)
    keep, kept = _keepdims(shape, axis), _kept(shape, axis)
    gamma, beta = _params(rng, shape, axis, dtype)
    m = x.size // int(np.prod(kept))
    ry, rmean, rinvstd, rvar = ref.batch_norm_forward(x64, gamma.reshape(keep), beta.reshape(keep), _axes(axis), 1e-5)
    for limit in (x.size, x.size - 1):
        monkeypatch.setattr(numpy_path, "SMALL_ELEMENTS", limit)
        assert (numpy_path.strategy("forward", x, axis) == "small") == (limit == x.size)
        mean, var = gpu.batch_stats(x, axis=axis)
        assert_close(mean, rmean.reshape(kept), dtype, "mean")
        assert_close(var, rvar.reshape(kept), dtype, "var", factor=4)
        rm, rv = np.full(kept, 0.5, dtype), np.full(kept, 2.0, dtype)
        y, mean, invstd = gpu.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv)
        assert_close(y, ry, dtype, "y")
        assert_close(invstd, rinvstd.reshape(kept), dtype, "invstd", factor=4)
        assert rel_err(rm, 0.9 * 0.5 + 0.1 * rmean.reshape(kept)) <= TOL[np.dtype(dtype)]
        assert rel_err(rv, 0.9 * 2.0 + 0.1 * rvar.reshape(kept) * m / (m - 1)) <= 4 * TOL[np.dtype(dtype)]
        y = gpu.batch_norm_inference(x, gamma, beta, rm, rv, axis=axis)
        want = (x64 - rm.reshape(keep)) / np.sqrt(rv.reshape(keep) + 1e-5) * gamma.reshape(keep) + beta.reshape(keep)
        assert_close(y, want, dtype, "y inference")


def test_cpu_engine_map_ordered(monkeypatch):
    # the NumPy path's engine: the caller and the pool take items as they come; results in item
    # order whoever computed them, the caller among them, and an item's error raised after all
    import threading
    import time
    monkeypatch.setenv("GPU_CPU_THREADS", "2")
    who = {}

    def work(i):
        who[i] = threading.current_thread()
        time.sleep(0.002)               # releases the GIL, as NumPy's loops do
        return i * i

    assert _cpu.map_ordered(work, range(20)) == [i * i for i in range(20)]
    assert threading.current_thread() in who.values()

    def fail(i):
        if i == 7:
            raise KeyError(i)
        return i

    with pytest.raises(KeyError):
        _cpu.map_ordered(fail, range(20))
    assert _cpu.map_ordered(lambda i: _cpu.map_ordered(lambda j: i + j, range(3)), range(4)) == \
        [[i + j for j in range(3)] for i in range(4)]      # nested: inline, no waiting on the pool
