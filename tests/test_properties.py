"""Property tests: random shapes, axes, dtypes and options against the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import gpu  # noqa: E402
from gpu.bench import reference as ref  # noqa: E402
from conftest import DTYPES, assert_close  # noqa: E402
from gpu._backend import BFLOAT16  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def arrays_and_axes(draw, max_dims=4, min_reduced=1):
    ndim = draw(st.integers(1, max_dims))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    axes = tuple(sorted(draw(st.sets(st.integers(0, ndim - 1), min_size=min_reduced, max_size=ndim))))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**32 - 1))
    x = (np.random.default_rng(seed).standard_normal(shape) * 2 + 1).astype(dtype)
    return x, axes


@SETTINGS
@given(arrays_and_axes(), st.floats(1e-5, 1e-1), st.booleans())
def test_batch_norm_forward_backward(case, eps, affine):
    x, axes = case
    x64 = x.astype(np.float64)
    kept = tuple(n for i, n in enumerate(x.shape) if i not in axes)
    keep = tuple(1 if i in axes else n for i, n in enumerate(x.shape))
    rng = np.random.default_rng(x.size)
    gamma = rng.standard_normal(kept) + 1 if affine else None
    beta = rng.standard_normal(kept) if affine else None
    y, mean, invstd = gpu.batch_norm_forward(x, gamma, beta, axis=axes, eps=eps)
    g_k = None if gamma is None else gamma.reshape(keep)
    b_k = None if beta is None else beta.reshape(keep)
    want, rmean, rinvstd, _ = ref.batch_norm_forward(x64, g_k, b_k, axes, eps)
    assert y.dtype == x.dtype and mean.shape == kept
    assert_close(y, want, x.dtype, "y", factor=2)
    dy = rng.standard_normal(x.shape)
    dx, dgamma, dbeta = gpu.batch_norm_backward(dy, x64, gamma, rmean.reshape(kept), rinvstd.reshape(kept),
                                                axis=axes)
    rdx, rdg, rdb = ref.batch_norm_backward(dy, x64, g_k, rmean, rinvstd, axes)
    assert np.allclose(dx, rdx, atol=1e-9 * (1 + np.abs(dy).max() / eps ** 0.5))
    assert np.allclose(dgamma, rdg.reshape(kept)) and np.allclose(dbeta, rdb.reshape(kept))


@SETTINGS
@given(arrays_and_axes(min_reduced=1), st.sampled_from(["mean", "sum", "none"]), st.floats(0, 1),
       st.booleans(), st.booleans())
def test_cross_entropy_options(case, reduction, ls, weighted, probs):
    z, axes = case
    axis = axes[0]
    C = z.shape[axis]
    rows = z.shape[:axis] + z.shape[axis + 1:]
    rng = np.random.default_rng(z.size + C)
    if probs:
        t = rng.random(z.shape)
        target = t / t.sum(axis=axis, keepdims=True)
    else:
        target = rng.integers(-1, C, rows)
        target[target < 0] = -100
    weight = rng.random(C) + 0.5 if weighted else None
    kw = dict(axis=axis, reduction=reduction, label_smoothing=ls, weight=weight)
    loss, dz = gpu.softmax_cross_entropy(z, target, return_grad=True, **kw)
    want, want_dz = ref.softmax_cross_entropy(z.astype(np.float64), target, **kw)
    assert loss.dtype == z.dtype and dz.dtype == z.dtype and dz.shape == z.shape
    if np.all(np.isnan(want)):
        assert np.all(np.isnan(loss.astype(np.float64)))
    else:
        assert np.allclose(loss.astype(np.float64), want, rtol=50 * _eps(z.dtype), atol=50 * _eps(z.dtype))
    assert np.allclose(dz.astype(np.float64), want_dz, rtol=50 * _eps(z.dtype), atol=50 * _eps(z.dtype))


@SETTINGS
@given(arrays_and_axes(min_reduced=1))
def test_softmax_rows_sum_to_one(case):
    z, axes = case
    p = gpu.softmax(z, axis=axes[0]).astype(np.float64)
    assert np.allclose(p.sum(axis=axes[0]), 1, atol=20 * _eps(z.dtype) * z.shape[axes[0]])
    assert_close(gpu.log_softmax(z, axis=axes[0]), ref.log_softmax(z.astype(np.float64), axes[0]), z.dtype,
                 "log_softmax", factor=4)


def _eps(dtype) -> float:
    """Machine epsilon of the storage dtype (bfloat16's from ml_dtypes)."""
    if np.dtype(dtype) == BFLOAT16:
        import ml_dtypes
        return float(ml_dtypes.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)
