"""The NumPy reference path of batch norm (also the CPU fallback): any array module with NumPy's
API, NumPy in practice.

Each op tries its strategies in order; the first that takes the call runs it, unless a statistic
comes out not finite (an inf or NaN in x, or a sum of squares past the dtype), where it passes the
call on, so that the row blocks' overflow-safe statistics (PyTorch's special values) answer:

    strategy   takes                                             how                     ops
    small-jit  `small`'s x, when Numba imports (the cpu-jit       one serial compiled     stats, forward,
               extra) and GPU_CPU_JIT is not 0                    call (`jit.small_*`)    inference
    small      C-contiguous float32/float64 x of at most          one thread, BLAS sums   stats, forward,
               SMALL_ELEMENTS whose view is a reshape                                     inference
    jit        the same x past SMALL_ELEMENTS (and dy like x),    `jit.forward`/          forward,
               with Numba                                         `jit.backward`          backward
    direct     x of one row block (gpu._cpu.BLOCK_BYTES)          whole-array NumPy       all
    blocks     any x                                              row blocks on the       all
                                                                  NumPy path's threads

`strategy` names the one a call takes. Accumulation is in float32 for float16, bfloat16 and
float32 storage and in float64 for float64. The variance is the corrected two-pass
var = mean(c^2) - mean(c)^2 with c = x - mean0: the second term cancels the rounding error of the
first-pass mean, so data at an offset of 1e4 with unit variance keeps its variance in float32.
"""
from __future__ import annotations

import math

import numpy as np

from gpu import _backend as B
from gpu import _cpu

from . import _args, jit
from . import numpy_blocks as blocks
from .numpy_blocks import (coefficients, epilogue, grad_coefficients, grad_output, invstd, out_dtype, per_feature,
                           reduce, with_residual_grad)
from ._args import Backward, Forward, Inference, Layout, Stats

#: x of at most this many elements takes the small strategies (the switch: docs/BENCHMARKS.md, "NumPy path").
SMALL_ELEMENTS = 1 << 17

_ALL = slice(None)


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

def stats(a: Stats):
    """`batch_stats` on this path: (mean, var) of the kept axes' shape in x's dtype."""
    mean, var = statistics(a.xp, a.x, a.lay)
    return mean.astype(a.x.dtype, copy=False), var.astype(a.x.dtype, copy=False)


def statistics(xp, x, lay: Layout):
    """(mean, biased var) per feature, kept shape, in the accumulation dtype."""
    with np.errstate(all="ignore"):   # special values are results here (PyTorch's), not warnings
        mean, var = _run(_STATS, xp, x, lay, ())
    return mean.reshape(lay.kept_shape), var.reshape(lay.kept_shape)


def forward(a: Forward):
    """`batch_norm_forward` on this path: (y, mean, invstd); running statistics updated in place
    (num_batches_tracked, if given, already counts this call)."""
    momentum = a.momentum
    if momentum is None:
        momentum = 1.0 / float(a.batches.reshape(-1)[0]) if a.running_mean is not None else 0.0
    with np.errstate(all="ignore"):
        y, mean, var, invstd, updated = _run(_FORWARD, a.xp, a.x, a.lay, (), a, momentum)
        kept = a.lay.kept_shape
        mean, var, invstd = mean.reshape(kept), var.reshape(kept), invstd.reshape(kept)
        if not updated:
            _update_running(a.lay, mean, var, a.running_mean, a.running_var, momentum)
    return y, mean, invstd


def backward(a: Backward, sync=None):
    """`batch_norm_backward` on this path: (dx, dgamma, dbeta[, dresidual]). With relu, dy is
    masked by y > 0 first (`grad_output`), and the masked dy is dresidual.

    With x_hat = (x - mean) * invstd, dbeta = sum(dy), dgamma = sum(dy * x_hat) and
    k = gamma * invstd: dx = k * dy + a * (x - mean) + b, a = -k * invstd * dgamma / M and
    b = -k * dbeta / M. ``sync(dbeta, dgamma, k, invstd) -> (a, b)``, given (synchronized batch
    norm), makes a and b from the sums over every rank instead; then the whole array is one block
    (`direct`), since the sums of every block must be in before any dx."""
    with np.errstate(all="ignore"):
        if sync is not None:
            return _unfused(_backward_direct)(None, a, sync)
        return _run(_BACKWARD, a.xp, a.x, a.lay, (a.dy, a.y) if a.relu else (a.dy,), a, None)


def inference(a: Inference):
    """`batch_norm_inference` on this path: y = act((x - running_mean) * gamma / sqrt(running_var + eps)
    + beta + residual)."""
    with np.errstate(all="ignore"):
        return _run(_INFERENCE, a.xp, a.x, a.lay, (), a)


def strategy(op: str, x, axis, *others) -> str:
    """The strategy that takes ``op`` ("stats", "forward", "backward", "inference") for x reduced over
    ``axis`` (``others``: the backward's dy), before any fallback for non-finite statistics."""
    lay = _args.layout(x, axis)
    xp = np if type(x) is np.ndarray else B.array_module(x=x)
    return next(name for name, takes, _ in _TABLES[op] if takes(xp, x, lay, others) is not None)


def _run(table, xp, x, lay: Layout, others: tuple, *args):
    """The result of the first strategy of ``table`` that takes the call and answers it."""
    for _, takes, run in table:
        view = takes(xp, x, lay, others)
        if view is not None:
            out = run(view, *args) if args else run(view, xp, x, lay)
            if out is not None:
                return out
    raise AssertionError("the blocks strategy takes every call")


# ---------------------------------------------------------------------------------------------
# Which strategies take a call: each returns what its strategy runs on, or None
# ---------------------------------------------------------------------------------------------

_SMALL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _small_view(x, lay: Layout):
    """x as the (outer, C * inner) matrix of its (outer, C, inner) view (no copy), if the small
    strategy takes it. Every operation then runs over rows of C * inner elements, and a
    per-channel operand is one such row (`_pc`)."""
    if (type(x) is not np.ndarray or x.size > SMALL_ELEMENTS or lay.perm is not None or x.size == 0
            or x.dtype not in _SMALL_DTYPES or not x.flags.c_contiguous):
        return None
    return x.reshape(lay.outer, lay.C * lay.inner)


def _takes_small(xp, x, lay: Layout, others):
    return _small_view(x, lay)


def _takes_small_jit(xp, x, lay: Layout, others):
    """x as the C-contiguous (outer, C, inner) view of `jit.small_*`'s one serial call."""
    if _small_view(x, lay) is None or not jit.available():
        return None
    return x.reshape(lay.outer, lay.C, lay.inner)


def _takes_jit(xp, x, lay: Layout, others):
    """x (and ``others``, arrays of x's shape) as C-contiguous (outer, C, inner) views for the
    compiled loops: NumPy float32/float64 past SMALL_ELEMENTS, no transposed copy needed."""
    if (type(x) is not np.ndarray or x.size <= SMALL_ELEMENTS or lay.perm is not None
            or x.dtype not in _SMALL_DTYPES or not x.flags.c_contiguous
            or any(type(o) is not np.ndarray or o.dtype != x.dtype or not o.flags.c_contiguous for o in others)
            or not jit.available()):
        return None
    shape = (lay.outer, lay.C, lay.inner)
    return [a.reshape(shape) for a in (x,) + others]


def _takes_direct(xp, x, lay: Layout, others):
    """x of one row block: then the block engine (threads, closures, scratch) costs more than it
    saves, and whole-array NumPy runs instead."""
    return True if xp is np and x.size * B.compute_dtype(x.dtype).itemsize <= _cpu.BLOCK_BYTES else None


def _takes_blocks(xp, x, lay: Layout, others):
    return True


# ---------------------------------------------------------------------------------------------
# The running statistics' update (every forward strategy but a fused small-jit call)
# ---------------------------------------------------------------------------------------------

def _update_running(lay: Layout, mean, var, running_mean, running_var, momentum):
    if running_mean is None:
        return
    unbiased = var * (lay.m / (lay.m - 1))
    if running_mean.dtype == mean.dtype and running_var.dtype == var.dtype:
        # in place, the same roundings: (1 - momentum) * r, momentum * stat, their sum
        running_mean *= 1 - momentum
        running_mean += momentum * mean
        running_var *= 1 - momentum
        running_var += momentum * unbiased
        return
    running_mean[...] = ((1 - momentum) * running_mean + momentum * mean).astype(running_mean.dtype)
    running_var[...] = ((1 - momentum) * running_var + momentum * unbiased).astype(running_var.dtype)


def _flat(p, acc):
    """A per-channel array (kept or keepdims shape, or None) as a contiguous (C,) array of acc."""
    return None if p is None else np.ascontiguousarray(p.reshape(-1), dtype=acc)


# ---------------------------------------------------------------------------------------------
# small-jit and jit: the compiled loops (jit.py)
# ---------------------------------------------------------------------------------------------

def _stats_small_jit(x3, xp, x, lay):
    return jit.small_stats(x3)


def _residual3(a, x3):
    """The epilogue's residual as x3's C-contiguous (outer, C, inner) view, or None."""
    return None if a.residual is None else np.ascontiguousarray(a.residual).reshape(x3.shape)


def _forward_small_jit(x3, a: Forward, momentum):
    """Running statistics of x's dtype are updated inside the compiled call, others after it."""
    rm, rv, x = a.running_mean, a.running_var, a.x
    fused = rm is not None and all(r.dtype == x.dtype and r.flags.c_contiguous for r in (rm, rv))
    out = jit.small_forward(x3, a.gamma, a.beta, a.eps,
                            (rm.reshape(-1), rv.reshape(-1), momentum, a.lay.m) if fused else None,
                            _residual3(a, x3), a.relu)
    if out is None:
        return None
    y3, mean, var, inv = out
    return y3.reshape(x.shape), mean, var, inv, fused


def _inference_small_jit(x3, a: Inference):
    return jit.small_inference(x3, a.gamma, a.beta, a.running_mean, a.running_var, a.eps, _residual3(a, x3),
                               a.relu).reshape(a.x.shape)


def _forward_jit(views, a: Forward, momentum):
    x = a.x
    out = jit.forward(views[0], _flat(a.gamma, x.dtype), _flat(a.beta, x.dtype), a.eps, _residual3(a, views[0]),
                      a.relu)
    if out is None:
        return None
    y3, mean, var, inv = out
    return y3.reshape(x.shape), mean, var, inv, False


def _backward_jit(views, a: Backward, sync):
    """The compiled backward, relu's mask and dresidual inside its two passes (views: x, dy[, y])."""
    x, lay, acc = a.x, a.lay, a.x.dtype
    dx3, dgamma, dbeta, dres3 = jit.backward(views[1], views[0], _flat(a.mean, acc), _flat(a.invstd, acc),
                                             _flat(a.gamma, acc), 1.0 / lay.m, views[2] if a.relu else None,
                                             a.residual_grad)
    dt = out_dtype(a)
    out = (dx3.reshape(x.shape), dgamma.reshape(lay.kept_shape).astype(dt, copy=False),
           dbeta.reshape(lay.kept_shape).astype(dt, copy=False))
    return out + (dres3.reshape(x.shape),) if a.residual_grad else out


def _unfused(run):
    """A backward strategy that takes dy as it is: with the epilogue it is given the masked dy
    (`grad_output`, one more pass) and dresidual is appended."""
    def masked(view, a: Backward, sync):
        if not a.relu and not a.residual_grad:
            return run(view, a, sync)
        dz = grad_output(a.xp, a)
        return with_residual_grad(a, run(view, a if dz is a.dy else a._replace(dy=dz), sync), dz)
    return masked


# ---------------------------------------------------------------------------------------------
# small: one thread, BLAS sums
# ---------------------------------------------------------------------------------------------
#
# For a small x NumPy's call overhead is the cost: a reduction along a strided axis runs a short
# inner loop per row (8.8 us for 256x64 float32, against 1.5 us for the same sums as a BLAS
# matrix-vector product). These functions take the fewest NumPy calls, sum through ``ones @ v``
# and work on the flat (C,) statistics; the sums are the same sequential per-channel
# accumulations as NumPy's along axis 0.

_ONES: dict[tuple, np.ndarray] = {}


def _ones(n: int, dtype, value: float = 1.0) -> np.ndarray:
    """A read-only vector of n ``value``s (kept): ``_ones(n, dt, 1 / m) @ v`` is a mean."""
    key = (n, dtype, value)
    o = _ONES.get(key)
    if o is None:
        if len(_ONES) >= 256:
            _ONES.clear()
        o = _ONES[key] = np.full(n, value, dtype)
        o.flags.writeable = False
    return o


def _small_mean(v, inv_m, C: int):
    """Per-channel means of a small view, (C,), or of a stack of them, (k, C): sums weighted by 1/M
    (each product rounds once), over the rows, then over each channel's inner run."""
    s = _ones(v.shape[-2], v.dtype, inv_m) @ v
    inner = v.shape[-1] // C
    return s if inner == 1 else s.reshape(s.shape[:-1] + (C, inner)) @ _ones(inner, v.dtype)


def _pc(v, a):
    """A (C,) per-channel array as a row of the small view v (each value repeated inner times)."""
    inner = v.shape[-1] // a.shape[0]
    return a if inner == 1 else a.repeat(inner)


def _small_stats(v, m: int, C: int):
    """(mean, var, c, c_mean) of a small view, flat (C,), the corrected two-pass of `numpy_blocks._group_stats`
    (c = x - mean0 is kept for the forward); None if a statistic is not finite."""
    inv_m = float(v.dtype.type(1 / m))
    mean0 = _small_mean(v, inv_m, C)
    cc = np.empty((2,) + v.shape, v.dtype)          # c and c^2: their means in one product
    c = np.subtract(v, _pc(v, mean0), out=cc[0])
    np.square(c, out=cc[1])
    c_mean, var = _small_mean(cc, inv_m, C)
    var -= c_mean * c_mean
    np.maximum(var, 0, out=var)
    mean0 += c_mean
    # one O(C) check: an inf or NaN in either makes the product sum non-finite (so may an
    # overflowing product of finite values: the blocked path then computes the same statistics)
    if not math.isfinite(mean0 @ var):
        return None
    return mean0, var, c, c_mean


def _small_coefficients(scale, gamma, beta, center, acc):
    """(scale, shift') of y = x_or_c * scale + shift', flat (C,), from the batch-norm affine with
    the center folded into the shift."""
    scale = scale if gamma is None else scale * gamma.reshape(-1).astype(acc, copy=False)
    if beta is None:
        return scale, np.negative(center * scale)
    return scale, np.subtract(beta.reshape(-1).astype(acc, copy=False), center * scale)


def _stats_small(v, xp, x, lay):
    out = _small_stats(v, lay.m, lay.C)
    return None if out is None else out[:2]


def _forward_small(v, a: Forward, momentum):
    x = a.x
    out = _small_stats(v, a.lay.m, a.lay.C)
    if out is None:
        return None
    mean, var, c, c_mean = out
    inv = invstd(np, var, a.eps, x.dtype)
    scale, shift = _small_coefficients(inv, a.gamma, a.beta, c_mean, x.dtype)
    c *= _pc(v, scale)                          # y = (c - c_mean) * scale + beta, in c
    c += _pc(v, shift)
    epilogue(np, c, _small_residual(v, a.residual), a.relu)
    return c.reshape(x.shape), mean, var, inv, False


def _inference_small(v, a: Inference):
    acc, gamma = a.x.dtype, a.gamma
    with np.errstate(all="ignore"):
        rv = a.running_var.reshape(-1).astype(acc, copy=False)
        if a.eps > 0 and gamma is not None:         # scale = gamma / sqrt(rv + eps): one divide
            scale = np.divide(gamma.reshape(-1).astype(acc, copy=False), np.sqrt(rv + acc.type(a.eps)))
            gamma = None
        else:
            scale = invstd(np, rv, a.eps, acc)
        scale, shift = _small_coefficients(scale, gamma, a.beta, a.running_mean.reshape(-1), acc)
        y = np.multiply(v, _pc(v, scale))           # two passes, the first one allocating y
        y += _pc(v, shift)
        epilogue(np, y, _small_residual(v, a.residual), a.relu)
    return y.reshape(a.x.shape)


def _small_residual(v, residual):
    """The residual as the small view's (outer, C * inner) matrix (a copy if it has other strides)."""
    return None if residual is None else residual.reshape(v.shape)


# ---------------------------------------------------------------------------------------------
# direct: x of one block, whole-array NumPy
# ---------------------------------------------------------------------------------------------

def _direct_stats(xp, x, lay: Layout, acc):
    """(mean, var, c, c_mean): the corrected two-pass of `numpy_blocks._group_stats`, keeping c = x - mean0
    (accumulation dtype) for the caller to normalize in place; None if a statistic is not finite."""
    inv_m = acc.type(1 / lay.m)
    mean0 = x.sum(axis=lay.axes, keepdims=True, dtype=acc)
    mean0 *= inv_m
    c = xp.subtract(x, mean0, dtype=acc)
    c_mean = c.sum(axis=lay.axes, keepdims=True)
    c_mean *= inv_m
    var = reduce(xp, lay, c, c)
    var *= inv_m
    var -= c_mean * c_mean
    xp.maximum(var, 0, out=var)
    mean = mean0 + c_mean
    if not xp.isfinite(mean.sum() + var.sum()):     # one O(C) check: an inf or NaN anywhere shows
        return None
    return mean, var, c, c_mean


def _stats_direct(_, xp, x, lay):
    out = _direct_stats(xp, x, lay, B.compute_dtype(x.dtype))
    return None if out is None else out[:2]


def _forward_direct(_, a: Forward, momentum):
    xp, x, lay = a.xp, a.x, a.lay
    acc = B.compute_dtype(x.dtype)
    out = _direct_stats(xp, x, lay, acc)
    if out is None:
        return None
    mean, var, c, c_mean = out
    inv = invstd(xp, var, a.eps, acc)
    scale, shift = coefficients(inv, a.gamma, a.beta, lay, acc, _ALL)
    # y = (c - c_mean) * scale + shift = c * scale + (shift - c_mean * scale): two passes over c
    c *= scale
    c += -c_mean * scale if shift is None else shift - c_mean * scale
    epilogue(xp, c, a.residual, a.relu)
    y = c if x.dtype == acc else c.astype(x.dtype)
    return y, mean, var, inv, False


def _backward_direct(_, a: Backward, sync):
    """The backward of `backward`'s docstring on the whole array: the sums (x - mean kept), the
    coefficients (``sync``'s when given), dx. A rank with no rows (synchronized) has zero sums."""
    xp, dy, x, lay = a.xp, a.dy, a.x, a.lay
    acc = B.compute_dtype(x.dtype)
    mu, istd = per_feature(a.mean, lay, acc, _ALL), per_feature(a.invstd, lay, acc, _ALL)
    if lay.m > 0:
        xmu = xp.subtract(x, mu, dtype=acc)
        dbeta = dy.sum(axis=lay.axes, keepdims=True, dtype=acc)
        dgamma = reduce(xp, lay, dy, xmu) * istd
    else:
        xmu = None
        dbeta = dgamma = xp.zeros(lay.keepdims_shape, acc)
    k = istd if a.gamma is None else istd * per_feature(a.gamma, lay, acc, _ALL)
    if sync is None:
        ca, cb = grad_coefficients(k, istd, dgamma, dbeta, acc.type(1.0 / lay.m))
    else:
        ca, cb = (c.astype(acc, copy=False) for c in sync(dbeta, dgamma, k, istd))
    if xmu is None:
        dx = xp.empty(x.shape, x.dtype)
    else:
        xmu *= ca                                           # dx = a (x - mean) + b + k dy
        xmu += cb
        xmu += xp.multiply(dy, k, dtype=acc)
        dx = xmu if x.dtype == acc else xmu.astype(x.dtype)
    dt = out_dtype(a)
    return dx, dgamma.reshape(lay.kept_shape).astype(dt), dbeta.reshape(lay.kept_shape).astype(dt)


def _inference_direct(_, a: Inference):
    xp, x, lay = a.xp, a.x, a.lay
    acc = B.compute_dtype(x.dtype)
    with np.errstate(all="ignore"):
        rm, rv = per_feature(a.running_mean, lay, acc, _ALL), per_feature(a.running_var, lay, acc, _ALL)
        scale, shift = coefficients(invstd(xp, rv, a.eps, acc), a.gamma, a.beta, lay, acc, _ALL)
        # y = (x - rm) * scale + shift = x * scale + (shift - rm * scale): two passes over x
        y = xp.multiply(x, scale, dtype=acc)
        y += -rm * scale if shift is None else shift - rm * scale
        epilogue(xp, y, a.residual, a.relu)
    return y if x.dtype == acc else y.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# The strategy tables: (name, takes, run), in the order they are tried
# ---------------------------------------------------------------------------------------------

_STATS = (("small-jit", _takes_small_jit, _stats_small_jit), ("small", _takes_small, _stats_small),
          ("direct", _takes_direct, _stats_direct), ("blocks", _takes_blocks, blocks.stats))
_FORWARD = (("small-jit", _takes_small_jit, _forward_small_jit), ("small", _takes_small, _forward_small),
            ("jit", _takes_jit, _forward_jit), ("direct", _takes_direct, _forward_direct),
            ("blocks", _takes_blocks, blocks.forward))
_BACKWARD = (("jit", _takes_jit, _backward_jit), ("direct", _takes_direct, _unfused(_backward_direct)),
             ("blocks", _takes_blocks, _unfused(blocks.backward)))
_INFERENCE = (("small-jit", _takes_small_jit, _inference_small_jit), ("small", _takes_small, _inference_small),
              ("direct", _takes_direct, _inference_direct), ("blocks", _takes_blocks, blocks.inference))
_TABLES = {"stats": _STATS, "forward": _FORWARD, "backward": _BACKWARD, "inference": _INFERENCE}
