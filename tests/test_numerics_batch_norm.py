"""Batch-norm special values and PyTorch parity, on the NumPy path and the emulated kernels.

Every reproducer of the numerics issue is a test here. Where PyTorch is the oracle it is asked
directly (skipped cleanly without torch); where we differ from it on purpose the test says so.
"""
from __future__ import annotations

import numpy as np
import pytest

import gpu
from gpu._engines import channels
from conftest import assert_close, rel_err, to_numpy


def _torch():
    return pytest.importorskip("torch")


def _native(x, eps=1e-5, momentum=0.1, rm=None, rv=None, training=True):
    """torch.native_batch_norm on an (N, C) float32 array: (y, mean, invstd, rm, rv) as NumPy."""
    torch = _torch()
    C = x.shape[1]
    rm = torch.zeros(C) if rm is None else torch.tensor(rm)
    rv = torch.ones(C) if rv is None else torch.tensor(rv)
    y, mean, invstd = torch.native_batch_norm(torch.tensor(x), None, None, rm, rv, training, momentum, eps)
    return y.numpy(), mean.numpy(), invstd.numpy(), rm.numpy(), rv.numpy()


def _forward(backend, x, **kw):
    C = x.shape[1]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, mean, invstd = backend.call(gpu.batch_norm_forward, x, running_mean=rm, running_var=rv, **kw)
    return to_numpy(y), to_numpy(mean), to_numpy(invstd), rm, rv


def _same_specials(a, b, what):
    """The same NaN / inf pattern (and signs of the infs)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.array_equal(np.isnan(a), np.isnan(b)), f"{what}: NaN pattern {a} vs {b}"
    assert np.array_equal(np.where(np.isinf(a), a, 0), np.where(np.isinf(b), b, 0)), f"{what}: inf {a} vs {b}"


# ---------------------------------------------------------------------------------------------
# Overflow-safe statistics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((1024, 2), 0),             # the reproducer
                                        ((96, 3, 5, 4), (0, 2, 3)),  # channels-first: folded lanes
                                        ((200, 8), 0)])              # vector lanes, channels-last
def test_variance_that_fits_float32_is_finite(backend, rng, shape, axis):
    # std 3e18: var ~9e36 fits float32, but sum((x - mean)^2) over 1024 values (~1e40) does not:
    # torch's BN gives var inf here (its var_mean gets it right); we keep it finite
    x = (rng.standard_normal(shape) * 3e18).astype(np.float32)
    x64 = x.astype(np.float64)
    mean, var = backend.call(gpu.batch_stats, x, axis=axis)
    assert_close(var, x64.var(axis=axis), np.float32, "var", factor=4)
    assert_close(mean, x64.mean(axis=axis), np.float32, "mean", factor=1e3)  # mean ~ 1e-2 std: relative
    y, _, invstd = backend.call(gpu.batch_norm_forward, x, axis=axis)
    ry = (x64 - x64.mean(axis=axis, keepdims=True)) / np.sqrt(x64.var(axis=axis, keepdims=True))
    assert_close(y, ry, np.float32, "y", factor=4)
    assert np.all(to_numpy(invstd) > 0)


def test_large_and_small_channels_side_by_side(backend, rng):
    # a lane that must rescale next to lanes that must not: each channel keeps its own unit
    x = rng.standard_normal((64, 8)).astype(np.float32)
    x[:, 1] *= np.float32(1e19)
    x[:, 2] *= np.float32(1e-15)
    x[:, 3] += np.float32(1e4)                              # the large-offset case next to them
    x[17, 5] = np.float32(3e17)                              # one outlier: rescale mid-stream
    mean, var = backend.call(gpu.batch_stats, x)
    x64 = x.astype(np.float64)
    for c in range(8):
        assert rel_err(to_numpy(var)[c], x64[:, c].var()) < 1e-4, c


def test_variance_past_float32_is_inf(backend, rng):
    # std 1e30: the true variance 1e60 does not fit: var inf, invstd 0, y = beta (0), as torch;
    # the mean is finite and right (the numpy path used to give NaN/inf, the kernels all NaN)
    x = (rng.standard_normal((1024, 2)) * 1e30).astype(np.float32)
    y, mean, invstd, rm, rv = _forward(backend, x)
    assert_close(mean, x.astype(np.float64).mean(0), np.float32, "mean", factor=1e3)
    assert np.all(invstd == 0) and np.all(y == 0) and np.all(np.isposinf(rv))
    assert np.all(np.isfinite(rm))
    ty, tmean, tinvstd, trm, trv = _native(x)
    _same_specials(invstd, tinvstd, "invstd")
    _same_specials(rv, trv, "running_var")
    assert np.array_equal(y, ty)


def test_deviation_past_float32_range(backend):
    # |x - mean| itself overflows (values near +-FLT_MAX): var inf, mean still finite
    big = np.finfo(np.float32).max
    x = np.array([[big], [-big], [big / 2], [-big / 2]], np.float32)
    mean, var = (to_numpy(a) for a in backend.call(gpu.batch_stats, x))
    assert np.isposinf(var[0]) and np.isfinite(mean[0]) and abs(mean[0]) < big / 4


# ---------------------------------------------------------------------------------------------
# inf and NaN: PyTorch's answers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values,name", [([np.inf], "inf"), ([-np.inf], "-inf"), ([np.inf, -np.inf], "+-inf"),
                                         ([np.nan], "nan")], ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("shape", [(16, 3), (40, 8)])   # scalar lanes; vector lanes with a grid merge
def test_non_finite_in_one_feature_matches_torch(backend, rng, values, name, shape):
    # an inf: torch gives mean inf, var NaN (so invstd and y NaN), running_mean inf, running_var
    # NaN; -inf and inf together, or a NaN, give NaN. Other features stay untouched.
    x = rng.standard_normal(shape).astype(np.float32)
    for i, v in enumerate(values):
        x[3 + 5 * i, 1] = v
    y, mean, invstd, rm, rv = _forward(backend, x)
    ty, tmean, tinvstd, trm, trv = _native(x)
    for a, b, what in ((mean, tmean, "mean"), (invstd, tinvstd, "invstd"), (rm, trm, "running_mean"),
                       (rv, trv, "running_var"), (y, ty, "y")):
        _same_specials(a, b, what)
    others = [c for c in range(shape[1]) if c != 1]
    assert_close(y[:, others], ty[:, others], np.float32, "y")


def test_non_finite_with_the_kernel_paths(dev, rng):
    # the grid merge and the persistent forward merge a partial whose mean is inf
    x = rng.standard_normal((48, 8)).astype(np.float32)
    x[40, 2] = np.inf
    for knobs in (dict(path="twopass", threads=32, grid_rows=3), dict(path="persistent", threads=32, grid_rows=3)):
        with channels.tuned(**knobs):
            mean, var = (to_numpy(a) for a in dev.call(gpu.batch_stats, x))
            assert np.isposinf(mean[2]) and np.isnan(var[2])
            assert np.isfinite(mean[[0, 1, 3]]).all() and np.isfinite(var[[0, 1, 3]]).all()


# ---------------------------------------------------------------------------------------------
# eps = 0
# ---------------------------------------------------------------------------------------------

def test_eps_zero_constant_feature(backend, rng):
    # var + eps == 0: torch's native op gives invstd 0 and y = beta; we do the same (the seed gave
    # y NaN, invstd inf). torch's functional API (2.13) refuses eps <= 0 in training; we accept it.
    x = rng.standard_normal((16, 3)).astype(np.float32)
    x[:, 1] = 2.5
    g, b = np.full(3, 2, np.float32), np.full(3, 0.5, np.float32)
    y, mean, invstd = (to_numpy(a) for a in backend.call(gpu.batch_norm_forward, x, g, b, eps=0.0))
    assert invstd[1] == 0 and np.all(y[:, 1] == 0.5)
    torch = _torch()
    ty, _, tinvstd = torch.native_batch_norm(torch.tensor(x), torch.tensor(g), torch.tensor(b), None, None,
                                             True, 0.1, 0.0)
    np.testing.assert_array_equal(invstd[1], tinvstd.numpy()[1])
    assert_close(y, ty.numpy(), np.float32, "y")


def test_eps_zero_inference_zero_variance(backend):
    # deliberate: inference with running_var 0 and eps 0 gives y = beta like training (torch: NaN)
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    y = to_numpy(backend.call(gpu.batch_norm_inference, x, None, np.array([0.5, 0.5], np.float32),
                              np.zeros(2, np.float32), np.array([1, 0], np.float32), eps=0.0))
    np.testing.assert_array_equal(y[:, 1], 0.5)
    np.testing.assert_allclose(y[:, 0], x[:, 0] + 0.5)


# ---------------------------------------------------------------------------------------------
# momentum=None: the cumulative average
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((8, 3), 0), ((4, 3, 2, 2), (0, 2, 3))])
def test_momentum_none_matches_torch_module(backend, rng, shape, axis):
    torch = _torch()
    C = 3
    m = torch.nn.BatchNorm1d(C, momentum=None) if len(shape) == 2 else torch.nn.BatchNorm2d(C, momentum=None)
    m.double()
    rm, rv, nbt = np.zeros(C), np.ones(C), np.zeros((), np.int64)
    for k in range(4):
        x = rng.standard_normal(shape) * (k + 1) + k
        backend.call(gpu.batch_norm_forward, x, axis=axis, running_mean=rm, running_var=rv, momentum=None,
                     num_batches_tracked=nbt)
        m(torch.tensor(x))
    assert int(nbt) == int(m.num_batches_tracked) == 4
    assert rel_err(rm, m.running_mean.numpy()) < 1e-12
    assert rel_err(rv, m.running_var.numpy()) < 1e-12


def test_num_batches_tracked_counts_with_float_momentum(backend, rng):
    nbt = np.array([5], np.int64)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    backend.call(gpu.batch_norm_forward, x, running_mean=np.zeros(3, np.float32),
                 running_var=np.ones(3, np.float32), num_batches_tracked=nbt)
    assert nbt[0] == 6


@pytest.mark.parametrize("kw,exc,match", [
    (dict(momentum=None, running_mean=np.zeros(3), running_var=np.ones(3)), TypeError, "needs num_batches_tracked"),
    (dict(momentum=None, running_mean=np.zeros(3), running_var=np.ones(3), num_batches_tracked=3), TypeError,
     "num_batches_tracked: expected an int64 array"),
    (dict(num_batches_tracked=np.zeros(1, np.int64)), ValueError, "pass running_mean"),
    (dict(momentum=None, running_mean=np.zeros(3), running_var=np.ones(3),
          num_batches_tracked=np.zeros(1, np.int32)), TypeError, "int64"),
], ids=["missing", "python-int", "no-running-stats", "int32"])
def test_momentum_none_bad_input(kw, exc, match):
    x = np.random.default_rng(3).standard_normal((6, 3))
    with pytest.raises(exc, match=match):
        gpu.batch_norm_forward(x, **kw)


def test_momentum_none_without_running_stats(backend, rng):
    # nothing to average: momentum=None is accepted and changes nothing
    x = rng.standard_normal((8, 3))
    y = backend.call(gpu.batch_norm_forward, x, momentum=None)[0]
    assert np.isfinite(to_numpy(y)).all()


# ---------------------------------------------------------------------------------------------
# Empty batches, read-only statistics, byte order
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((0, 3), 0), ((0, 3, 4, 4), (0, 2, 3)), ((3, 0), 1)])
def test_empty_batch_inference(backend, shape, axis):
    # torch returns an empty y; so do we (training on an empty batch still raises: no statistics)
    x = np.empty(shape, np.float32)
    C = 3
    y = backend.call(gpu.batch_norm_inference, x, None, None, np.zeros(C, np.float32), np.ones(C, np.float32),
                     axis=axis)
    assert to_numpy(y).shape == shape and to_numpy(y).dtype == np.float32
    with pytest.raises(ValueError, match="empty reduction"):
        backend.call(gpu.batch_norm_forward, x, axis=axis)


def test_read_only_running_stats_in_inference(backend, rng):
    # torch accepts read-only statistics; inference only reads them, so do we
    x = rng.standard_normal((8, 3)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.full(3, 4.0, np.float32)
    rm.flags.writeable = rv.flags.writeable = False
    y = backend.call(gpu.batch_norm_inference, x, None, None, rm, rv, eps=0.0)
    np.testing.assert_allclose(to_numpy(y), x / 2, rtol=1e-6)


def test_read_only_running_stats_rejected_when_updated(backend, rng):
    # deliberate: torch writes into a read-only NumPy buffer (with a warning); we refuse to
    x = rng.standard_normal((8, 3)).astype(np.float32)
    rv = np.ones(3, np.float32)
    rv.flags.writeable = False
    with pytest.raises(ValueError, match="running_var: must be writeable"):
        backend.call(gpu.batch_norm_forward, x, running_mean=np.zeros(3, np.float32), running_var=rv)


def test_big_endian_input(backend, rng):
    # torch refuses non-native byte order; we compute on a native copy (results native-endian)
    x = rng.standard_normal((16, 3)).astype(">f4")
    y, mean, invstd = backend.call(gpu.batch_norm_forward, x)
    y0, mean0, invstd0 = backend.call(gpu.batch_norm_forward, x.astype(np.float32))
    assert to_numpy(y).dtype == np.float32
    np.testing.assert_array_equal(to_numpy(y), to_numpy(y0))
    mean, var = backend.call(gpu.batch_stats, x.astype(">f8"))
    assert to_numpy(var).dtype == np.float64


def test_big_endian_input_again(backend, rng):
    # a second call like the first (the validated-call cache) converts x again: the same
    # native-endian result (the cache once kept the converted call's signature and skipped it)
    x = rng.standard_normal((16, 3)).astype(">f4")
    y0 = to_numpy(backend.call(gpu.batch_norm_forward, x.astype(np.float32))[0])
    for _ in range(2):
        y = to_numpy(backend.call(gpu.batch_norm_forward, x)[0])
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, y0)
