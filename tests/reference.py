"""Independent float64 formulas the tests hold every backend against.

Written directly from the definitions (not from the package's code): batch norm from Ioffe &
Szegedy (2015), cross-entropy from PyTorch's documented semantics.
"""
from __future__ import annotations

import numpy as np


def batch_norm_stats(x, axes):
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return mean, var


def bn_forward(x, gamma, beta, axes, eps):
    """(y, mean, invstd, var) with mean/invstd/var in keepdims shape; gamma/beta keepdims or None."""
    x = np.asarray(x, np.float64)
    mean, var = batch_norm_stats(x, axes)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - mean) * invstd
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y, mean, invstd, var


def bn_backward(dy, x, gamma, mean, invstd, axes):
    """(dx, dgamma, dbeta), dgamma/dbeta keepdims; by the chain rule through x_hat, mean and var."""
    dy = np.asarray(dy, np.float64)
    x = np.asarray(x, np.float64)
    m = x.size // mean.size
    xhat = (x - mean) * invstd
    g = 1.0 if gamma is None else gamma
    dxhat = dy * g
    dvar = (dxhat * (x - mean)).sum(axis=axes, keepdims=True) * -0.5 * invstd ** 3
    dmean = -(dxhat * invstd).sum(axis=axes, keepdims=True) - 2.0 * dvar * (x - mean).mean(axis=axes, keepdims=True)
    dx = dxhat * invstd + dvar * 2.0 * (x - mean) / m + dmean / m
    return dx, (dy * xhat).sum(axis=axes, keepdims=True), dy.sum(axis=axes, keepdims=True)


def softmax(z, axis):
    z = np.asarray(z, np.float64)
    with np.errstate(invalid="ignore"):
        e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(z, axis):
    z = np.asarray(z, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = z - z.max(axis=axis, keepdims=True)
        return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


def hardmax(z, axis):
    z = np.asarray(z, np.float64)
    idx = np.argmax(z, axis=axis)
    out = np.zeros_like(z)
    np.put_along_axis(out, np.expand_dims(idx, axis), 1.0, axis=axis)
    return out


def cross_entropy(z, target, axis=-1, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                  weight=None, dloss=1.0):
    """(loss, dz) of torch.nn.functional.cross_entropy semantics, in float64.

    Every case is the same formula over a target distribution Y per row:
    loss_row = -sum_c w_c Y_c log p_c and d loss_row / dz_j = p_j sum_c w_c Y_c - w_j Y_j,
    with Y = (1 - ls) * onehot(t) + ls / C for class indices (Y = 0 on ignored rows) and
    Y = (1 - ls) * target + ls / C for probabilities. 'mean' divides by the summed class weight of
    the non-ignored targets (indices) or by the number of rows (probabilities).
    """
    z = np.moveaxis(np.asarray(z, np.float64), axis, -1)
    C = z.shape[-1]
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    target = np.asarray(target)
    if target.dtype.kind in "iu":
        valid = target != ignore_index
        onehot = (np.arange(C) == target[..., None]).astype(np.float64)
        Y = ((1 - label_smoothing) * onehot + label_smoothing / C) * valid[..., None]
        denom = (w[np.where(valid, target, 0)] * valid).sum()
    else:
        Y = (1 - label_smoothing) * np.moveaxis(np.asarray(target, np.float64), axis, -1) + label_smoothing / C
        denom = float(z[..., 0].size)
    logp = log_softmax(z, -1)
    p = np.exp(logp)
    wY = w * Y
    with np.errstate(invalid="ignore"):   # a class with no target mass adds 0, even where log p = -inf
        rows_loss = -np.where(wY != 0, wY * logp, 0.0).sum(-1)
    grad_rows = p * wY.sum(-1, keepdims=True) - wY
    dloss = np.broadcast_to(np.asarray(dloss, np.float64), rows_loss.shape)
    if reduction == "none":
        loss, scale = rows_loss, dloss
    elif reduction == "sum":
        loss, scale = rows_loss.sum(), dloss
    else:
        loss = rows_loss.sum() / denom if denom else np.nan
        scale = dloss / denom if denom else np.zeros_like(dloss)
    return loss, np.moveaxis(grad_rows * scale[..., None], -1, axis)
