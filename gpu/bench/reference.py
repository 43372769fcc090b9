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


def add_relu(y: Array, residual: Array) -> Array:
    """The fused epilogue of a ResNet block: relu(y + residual), in y's dtype."""
    xp = array_module(y, residual)
    return xp.maximum(y + xp.asarray(residual).astype(y.dtype, copy=False), 0)


def relu_backward(dy: Array, y: Array, *, dtype=np.float64) -> Array:
    """The gradient through relu given its output y: dy where y > 0, else 0."""
    xp = array_module(dy, y)
    dy = _as(xp, dy, dtype)
    return xp.where(xp.asarray(y) > 0, dy, xp.zeros_like(dy))


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
                          dloss: float | Array = 1.0, *, grad: bool = True, z_loss: float = 0.0,
                          softcap: float | None = None, return_z_loss: bool = False,
                          dtype=np.float64) -> tuple:
    """(loss, dz) of torch.nn.functional.cross_entropy semantics (dz None when not `grad`);
    (loss, z_term, dz) with return_z_loss.

    Every case is one formula over a target distribution Y per row:
    loss_row = -sum_c w_c Y_c log p_c and d loss_row / dz_j = p_j sum_c w_c Y_c - w_j Y_j,
    with Y = (1 - ls) onehot(t) + ls / C for class indices (Y = 0 on ignored rows) and
    Y = (1 - ls) target + ls / C for probabilities. 'mean' divides by the summed class weight of
    the non-ignored targets (indices) or by the number of rows (probabilities). A class with no
    target mass adds 0 to the loss, even where log p = -inf. Class indices are gathered, not
    expanded to a one-hot Y, so the formula stays cheap on large vocabularies.

    z_loss (PaLM): z_loss * lse^2 per live row (not ignored), lse = logsumexp of the row, added to
    the loss unweighted; 'mean' divides its sum by the number of live rows (Liger-Kernel's
    convention); its gradient is 2 z_loss lse softmax. softcap (Gemma 2): every formula reads
    softcap * tanh(z / softcap) for z, and dz is multiplied by 1 - tanh^2(z / softcap).
    """
    xp = array_module(z, target, weight)
    ls = label_smoothing
    z = _as(xp, z, dtype)
    if softcap is not None:
        th = xp.tanh(z / softcap)
        z = softcap * th
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
        live = valid
    else:
        Y = (1 - ls) * xp.moveaxis(_as(xp, target, dtype), axis, -1) + ls / C
        rows_loss = -masked(w * Y, logp).sum(-1)
        denom = float(logp[..., 0].size)
        wy_sum = (w * Y).sum(-1)
        live = xp.ones(rows_loss.shape, bool)

    zm = xp.moveaxis(z, axis, -1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        lse = zm.max(-1) + xp.log(xp.exp(zm - zm.max(-1, keepdims=True)).sum(-1))
    z_rows = xp.where(live, z_loss * lse * lse, 0.0)
    count = float(live.sum())

    dloss = xp.broadcast_to(_as(xp, dloss, dtype), rows_loss.shape)
    if reduction == "none":
        loss, scale, z_term, z_scale = rows_loss, dloss, z_rows, dloss
    elif reduction == "sum":
        loss, scale, z_term, z_scale = rows_loss.sum(), dloss, z_rows.sum(), dloss
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = rows_loss.sum() / denom                      # a mean over nothing: NaN
            z_term = z_rows.sum() / np.float64(count)
            # as PyTorch: every target ignored gives a gradient of 0; target weights summing to 0
            # give NaN on the rows that are not ignored (dloss / 0) and 0 on those that are
            scale = xp.where(denom != 0, dloss / denom, xp.where(live, np.nan, 0.0))
            z_scale = xp.where(live, dloss / max(count, 1.0), 0.0)
    if z_loss:
        loss = loss + z_term
    if not grad:
        return (loss, z_term, None) if return_z_loss else (loss, None)

    g = xp.exp(logp) * wy_sum[..., None]
    if target.dtype.kind in "iu":
        # w Y is summed before it is subtracted, so that a row with one class gets dz = 0 exactly
        wy = xp.where(valid[..., None], smooth, 0.0) if ls else xp.zeros(logp.shape, dtype)
        wy = xp.ascontiguousarray(wy).reshape(-1, C)
        wy[xp.arange(wy.shape[0]), t.reshape(-1)] += w_hit.reshape(-1)
        g = g - wy.reshape(logp.shape)
    else:
        g = g - w * Y
    g = g * scale[..., None]
    if z_loss:
        with np.errstate(invalid="ignore"):
            g = g + xp.where(live[..., None], 2 * z_loss * (lse * z_scale)[..., None] * xp.exp(logp), 0.0)
    g = xp.moveaxis(g, -1, axis)
    if softcap is not None:
        g = g * (1 - th * th)
    return (loss, z_term, g) if return_z_loss else (loss, g)


def linear_cross_entropy(h: Array, W: Array, target: Array, bias: Array | None = None, reduction: str = "mean",
                         ignore_index: int = -100, label_smoothing: float = 0.0, weight: Array | None = None,
                         dloss: float | Array = 1.0, *, z_loss: float = 0.0, softcap: float | None = None,
                         dtype=np.float64) -> tuple:
    """(loss, z_term, dh, dW, dbias) of softmax_cross_entropy(h @ W.T + bias): the logits
    materialized in `dtype` (dbias None without a bias); h is (..., H), W (V, H)."""
    xp = array_module(h, W, target, bias, weight)
    h, W = _as(xp, h, dtype), _as(xp, W, dtype)
    z = h @ W.T
    if bias is not None:
        z = z + _as(xp, bias, dtype)
    loss, z_term, dz = softmax_cross_entropy(z, target, -1, reduction, ignore_index, label_smoothing, weight,
                                             dloss, z_loss=z_loss, softcap=softcap, return_z_loss=True,
                                             dtype=dtype)
    dz2 = dz.reshape(-1, W.shape[0])
    dbias = None if bias is None else dz2.sum(0)
    return loss, z_term, dz @ W, dz2.T @ h.reshape(-1, W.shape[1]), dbias
