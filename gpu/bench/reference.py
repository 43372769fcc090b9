"""The reference of every op, written once from the definitions: float64 truth for the tests and
the benchmark's check, and (in float32 on CuPy arrays) the benchmark's "cupy" peer.

Batch norm from Ioffe & Szegedy (2015), cross-entropy from PyTorch's documented semantics; not
from this package's code. Every function takes NumPy or CuPy arrays (the result is of the same
library) and computes in `dtype` (float64 unless asked). Per-feature parameters and statistics
are in keepdims shape (broadcastable against x); `axes` are the reduced axes (batch norm) or
`axis` the class axis (the softmax family).

    >>> mean, var = batch_stats(x, (0,))                    # doctest: +SKIP
    >>> loss, dz = softmax_cross_entropy(z, labels)         # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any

import numpy as np

Array = Any   # a NumPy or CuPy array


def array_module(*arrays: Any):
    """numpy, or cupy when any argument is a CuPy array (CuPy is imported only then)."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            import cupy
            return cupy
    return np


def _as(xp, a, dtype):
    return None if a is None else xp.asarray(a).astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# Batch norm
# ---------------------------------------------------------------------------------------------

def batch_stats(x: Array, axes: tuple[int, ...], *, dtype=np.float64) -> tuple[Array, Array]:
    """(mean, var) over `axes`, biased, in keepdims shape."""
    x = _as(array_module(x), x, dtype)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return mean, var


def _normalize(x, mean, invstd, gamma, beta):
    """The batch-norm formula, y = gamma (x - mean) invstd + beta (gamma, beta optional)."""
    y = (x - mean) * (invstd if gamma is None else invstd * gamma)
    if beta is not None:
        y += beta
    return y


def batch_norm_forward(x: Array, gamma: Array | None, beta: Array | None, axes: tuple[int, ...], eps: float,
                       *, dtype=np.float64) -> tuple[Array, Array, Array, Array]:
    """Training forward: (y, mean, invstd, var) with the batch's statistics."""
    xp = array_module(x, gamma, beta)
    x = _as(xp, x, dtype)
    mean, var = batch_stats(x, axes, dtype=dtype)
    invstd = 1.0 / xp.sqrt(var + eps)
    return _normalize(x, mean, invstd, _as(xp, gamma, dtype), _as(xp, beta, dtype)), mean, invstd, var


def batch_norm_inference(x: Array, gamma: Array | None, beta: Array | None, running_mean: Array,
                         running_var: Array, axes: tuple[int, ...], eps: float, *, dtype=np.float64) -> Array:
    """y with the running statistics in place of the batch's."""
    xp = array_module(x, gamma, beta, running_mean, running_var)
    invstd = 1.0 / xp.sqrt(_as(xp, running_var, dtype) + eps)
    return _normalize(_as(xp, x, dtype), _as(xp, running_mean, dtype), invstd, _as(xp, gamma, dtype),
                      _as(xp, beta, dtype))


def update_running_stats(running_mean: Array, running_var: Array, mean: Array, var: Array, count: int,
                         momentum: float) -> None:
    """PyTorch's update, in place and in the running statistics' dtype: r = (1 - m) r + m stat,
    with the unbiased variance (var * count / (count - 1))."""
    for r, stat in ((running_mean, mean), (running_var, var * (count / (count - 1)))):
        r *= 1 - momentum
        r += momentum * stat.reshape(r.shape).astype(r.dtype)


def batch_norm_backward(dy: Array, x: Array, gamma: Array | None, mean: Array, invstd: Array,
                        axes: tuple[int, ...], *, dtype=np.float64) -> tuple[Array, Array, Array]:
    """(dx, dgamma, dbeta), dgamma and dbeta in keepdims shape; by the chain rule through x_hat,
    the mean and the variance (the textbook derivation, not the folded form of the kernels)."""
    xp = array_module(dy, x, gamma, mean, invstd)
    dy, x, mean, invstd = (_as(xp, a, dtype) for a in (dy, x, mean, invstd))
    m = x.size // mean.size
    xmu = x - mean
    xhat = xmu * invstd
    dxhat = dy if gamma is None else dy * _as(xp, gamma, dtype)
    dvar = (dxhat * xmu).sum(axis=axes, keepdims=True) * -0.5 * invstd ** 3
    dmean = -(dxhat * invstd).sum(axis=axes, keepdims=True) - 2.0 * dvar * xmu.mean(axis=axes, keepdims=True)
    dx = dxhat * invstd + dvar * 2.0 * xmu / m + dmean / m
    return dx, (dy * xhat).sum(axis=axes, keepdims=True), dy.sum(axis=axes, keepdims=True)


# ---------------------------------------------------------------------------------------------
# The softmax family
# ---------------------------------------------------------------------------------------------

def log_softmax(z: Array, axis: int, *, dtype=np.float64) -> Array:
    """z - max - log(sum(exp(z - max))) along `axis`."""
    xp = array_module(z)
    z = _as(xp, z, dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = z - z.max(axis=axis, keepdims=True)
        return s - xp.log(xp.exp(s).sum(axis=axis, keepdims=True))


def softmax(z: Array, axis: int, *, dtype=np.float64) -> Array:
    """exp(log_softmax(z))."""
    xp = array_module(z)
    with np.errstate(invalid="ignore"):
        return xp.exp(log_softmax(z, axis, dtype=dtype))


def hardmax(z: Array, axis: int, *, dtype=np.float64) -> Array:
    """One-hot of the argmax along `axis` (the first index on ties)."""
    xp = array_module(z)
    z = xp.moveaxis(_as(xp, z, dtype), axis, -1)
    onehot = (xp.arange(z.shape[-1]) == xp.argmax(z, axis=-1)[..., None]).astype(dtype)
    return xp.moveaxis(onehot, -1, axis)


def softmax_cross_entropy(z: Array, target: Array, axis: int = -1, reduction: str = "mean",
                          ignore_index: int = -100, label_smoothing: float = 0.0, weight: Array | None = None,
                          dloss: float | Array = 1.0, *, grad: bool = True,
                          dtype=np.float64) -> tuple[Array, Array | None]:
    """(loss, dz) of torch.nn.functional.cross_entropy semantics (dz None when not `grad`).

    Every case is one formula over a target distribution Y per row:
    loss_row = -sum_c w_c Y_c log p_c and d loss_row / dz_j = p_j sum_c w_c Y_c - w_j Y_j,
    with Y = (1 - ls) onehot(t) + ls / C for class indices (Y = 0 on ignored rows) and
    Y = (1 - ls) target + ls / C for probabilities. 'mean' divides by the summed class weight of
    the non-ignored targets (indices) or by the number of rows (probabilities). A class with no
    target mass adds 0 to the loss, even where log p = -inf. Class indices are gathered, not
    expanded to a one-hot Y, so the formula stays cheap on large vocabularies.
    """
    xp = array_module(z, target, weight)
    ls = label_smoothing
    logp = xp.moveaxis(log_softmax(z, axis, dtype=dtype), axis, -1)
    C = logp.shape[-1]
    w = xp.ones(C, dtype) if weight is None else _as(xp, weight, dtype)
    target = xp.asarray(target)

    def masked(wy, logp_):   # wy * log p, 0 where wy == 0
        with np.errstate(invalid="ignore"):
            return xp.where(wy != 0, wy * logp_, 0.0)

    if target.dtype.kind in "iu":
        valid = target != ignore_index
        t = xp.where(valid, target, 0)
        w_hit = (1 - ls) * w[t] * valid                         # w_t Y_t's one-hot part, per row
        rows_loss = -masked(w_hit, xp.take_along_axis(logp, t[..., None], -1)[..., 0])
        smooth = (ls / C) * w                                   # w_c Y_c's uniform part
        if ls:
            rows_loss = rows_loss - xp.where(valid, masked(smooth, logp).sum(-1), 0.0)
        denom = (w[t] * valid).sum()
        wy_sum = w_hit + valid * smooth.sum()
    else:
        Y = (1 - ls) * xp.moveaxis(_as(xp, target, dtype), axis, -1) + ls / C
        rows_loss = -masked(w * Y, logp).sum(-1)
        denom = float(logp[..., 0].size)
        wy_sum = (w * Y).sum(-1)

    dloss = xp.broadcast_to(_as(xp, dloss, dtype), rows_loss.shape)
    if reduction == "none":
        loss, scale = rows_loss, dloss
    elif reduction == "sum":
        loss, scale = rows_loss.sum(), dloss
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = rows_loss.sum() / denom                      # a mean over nothing: NaN
            # as PyTorch: every target ignored gives a gradient of 0; target weights summing to 0
            # give NaN on the rows that are not ignored (dloss / 0) and 0 on those that are
            live = valid if target.dtype.kind in "iu" else True
            scale = xp.where(denom != 0, dloss / denom, xp.where(live, np.nan, 0.0))
    if not grad:
        return loss, None

    g = xp.exp(logp) * wy_sum[..., None]
    if target.dtype.kind in "iu":
        # w Y is summed before it is subtracted, so that a row with one class gets dz = 0 exactly
        wy = xp.where(valid[..., None], smooth, 0.0) if ls else xp.zeros(logp.shape, dtype)
        wy = xp.ascontiguousarray(wy).reshape(-1, C)
        wy[xp.arange(wy.shape[0]), t.reshape(-1)] += w_hit.reshape(-1)
        g = g - wy.reshape(logp.shape)
    else:
        g = g - w * Y
    return loss, xp.moveaxis(g * scale[..., None], -1, axis)
