"""Softmax, log-softmax, hardmax and softmax + cross-entropy with its fused gradient.

`axis` is the class axis (rows are all the other axes): -1 for (batch, classes) logits, 0 for
the seed's (classes, m) output layer, 1 for NCHW-style per-pixel classes.

`softmax_cross_entropy` has the semantics of `torch.nn.functional.cross_entropy` with the class
axis at `axis`: integer class targets (z's shape without `axis`) or class probabilities (z's
shape), `weight`, `ignore_index`, `label_smoothing`, reduction 'mean' | 'sum' | 'none'; a mean over
only ignored targets is NaN. Its gradient is dZ = (softmax(Z) - Y) * scale, Y the (smoothed,
weighted) target distribution, computed in the same pass as the loss.

All are stable for logits of any magnitude: the row maximum is subtracted before exp. As in
PyTorch, a row whose logits are all -inf (or hold +inf or NaN) gives NaN.

NumPy arrays run the NumPy reference path below; CuPy arrays run the CUDA kernels of
``cuda_src/softmax.cu``. float16 and bfloat16 compute in float32.
"""
from __future__ import annotations

import contextlib
import operator

import numpy as np

from . import _backend as B

REDUCTIONS = ("mean", "sum", "none")


def _check_z(xp, z, axis, name: str = "z"):
    z = B.as_float_array(xp, z, name)
    if z.ndim == 0:
        raise ValueError(f"{name}: expected an array with at least one dimension, got a scalar")
    ax = B.normalize_axis(axis, z.ndim)
    if z.shape[ax] == 0:
        raise ValueError(f"{name}: empty reduction: axis {ax} of shape {z.shape} has no classes")
    return z, ax


# ---------------------------------------------------------------------------------------------
# Public API: softmax family
# ---------------------------------------------------------------------------------------------

def softmax(z, axis: int = -1):
    """exp(z - max) / sum(exp(z - max)) along `axis`, in z's dtype.

    >>> import numpy as np, gpu
    >>> p = gpu.softmax(np.array([[1.0, 2.0, 3.0]], np.float32))     # rows sum to 1
    """
    xp, kernels = B.dispatch(z=z)
    z, ax = _check_z(xp, z, axis)
    if kernels:
        return _gpu_softmax(xp, z, ax, log=False)
    return _cpu_softmax(xp, z, ax, log=False)


def log_softmax(z, axis: int = -1):
    """z - max - log(sum(exp(z - max))) along `axis`, in z's dtype.

    >>> import numpy as np, gpu
    >>> logp = gpu.log_softmax(np.array([[1e4, 0.0]], np.float32))   # [[0, -1e4]], no overflow
    """
    xp, kernels = B.dispatch(z=z)
    z, ax = _check_z(xp, z, axis)
    if kernels:
        return _gpu_softmax(xp, z, ax, log=True)
    return _cpu_softmax(xp, z, ax, log=True)


def hardmax(z, axis: int = -1):
    """One-hot of the argmax along `axis` (the first index on ties; a NaN counts as the maximum,
    as in NumPy's argmax), in z's dtype.

    >>> import numpy as np, gpu
    >>> gpu.hardmax(np.array([[1.0, 3.0, 3.0]]))
    array([[0., 1., 0.]])
    """
    xp, kernels = B.dispatch(z=z)
    z, ax = _check_z(xp, z, axis)
    if kernels:
        return _gpu_hardmax(xp, z, ax)
    return _cpu_hardmax(xp, z, ax)


# ---------------------------------------------------------------------------------------------
# Public API: cross-entropy
# ---------------------------------------------------------------------------------------------

class _CE:
    """Checked arguments of one cross-entropy call; z is viewed with the class axis last."""

    def __init__(self, xp, z, target, axis, reduction, ignore_index, label_smoothing, weight):
        z, ax = _check_z(xp, z, axis)
        self.xp, self.z, self.axis = xp, z, ax
        self.reduction = B.check_choice(reduction, "reduction", REDUCTIONS)
        try:
            self.ignore_index = operator.index(ignore_index)
        except TypeError:
            raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}") from None
        self.label_smoothing = B.check_real(label_smoothing, "label_smoothing", 0.0, 1.0)
        self.n_classes = c = z.shape[ax]
        self.row_shape = z.shape[:ax] + z.shape[ax + 1:]

        if target is None:
            raise TypeError("target: expected an array of class indices or probabilities, got None")
        t = target if B.is_cupy_array(target) else xp.asarray(target)
        if t.dtype.kind in "iu":
            if t.shape != self.row_shape:
                raise ValueError(f"target: class indices must have z's shape without axis {ax}, "
                                 f"{self.row_shape}; got {t.shape}")
            bad = ((t < 0) | (t >= c)) & (t != self.ignore_index)
            if bool(bad.any()):
                pos = tuple(int(i) for i in np.unravel_index(int(bad.ravel().argmax()), t.shape))
                raise ValueError(f"target: class index {int(t[pos])} at position {pos} is out of range "
                                 f"[0, {c}) and is not ignore_index ({self.ignore_index})")
            self.probs = False
        elif t.dtype in B.FLOAT_DTYPES:
            if t.shape != z.shape:
                raise ValueError(f"target: class probabilities must have z's shape {z.shape}; got {t.shape}")
            self.probs = True
        else:
            raise TypeError(f"target: dtype {t.dtype} is neither integer (class indices) nor floating "
                            "(class probabilities)")
        self.target = t

        if weight is not None:
            weight = B.as_float_array(xp, weight, "weight")
            if weight.shape != (c,):
                raise ValueError(f"weight: expected shape ({c},), one weight per class; got {weight.shape}")
        self.weight = weight


def softmax_cross_entropy(z, target, *, axis: int = -1, reduction: str = "mean", ignore_index: int = -100,
                          label_smoothing: float = 0.0, weight=None, return_grad: bool = False):
    """Cross-entropy of softmax(z) against `target`, as `torch.nn.functional.cross_entropy`.

    target: integer class indices of z's shape without `axis` (entries equal to `ignore_index`
    contribute nothing), or class probabilities of z's shape. weight: per-class weights, shape
    (C,). reduction 'mean' (over non-ignored targets, weighted by their class weight; over rows
    for probability targets), 'sum' or 'none' (per-row losses of z's shape without `axis`).

    Returns the loss in z's dtype, or (loss, dz) with return_grad=True, dz the gradient of the
    returned loss (of loss.sum() for 'none') in z's dtype, computed in the same pass.

    >>> import numpy as np, gpu
    >>> z = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    >>> loss, dz = gpu.softmax_cross_entropy(z, np.array([1, 2, 3, 4]), return_grad=True)
    """
    xp, kernels = B.dispatch(z=z, target=target, weight=weight)
    ce = _CE(xp, z, target, axis, reduction, ignore_index, label_smoothing, weight)
    run = _gpu_cross_entropy if kernels else _cpu_cross_entropy
    loss, dz = run(ce, want_loss=True, dloss=1.0 if return_grad else None)
    return (loss, dz) if return_grad else loss


def softmax_cross_entropy_backward(z, target, dloss=1.0, *, axis: int = -1, reduction: str = "mean",
                                   ignore_index: int = -100, label_smoothing: float = 0.0, weight=None):
    """Gradient of `softmax_cross_entropy` with respect to z, times `dloss`.

    dloss: a scalar for 'mean' and 'sum'; for 'none' a scalar or an array of the per-row loss
    shape (the gradient of sum(dloss * loss)). Returns dz in z's dtype.

    >>> import numpy as np, gpu
    >>> z = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    >>> dz = gpu.softmax_cross_entropy_backward(z, np.array([1, 2, 3, 4]))
    """
    xp, kernels = B.dispatch(z=z, target=target, weight=weight, dloss=dloss)
    ce = _CE(xp, z, target, axis, reduction, ignore_index, label_smoothing, weight)
    dloss = dloss if B.is_cupy_array(dloss) else xp.asarray(dloss)
    if dloss.dtype.kind not in "iuf" and dloss.dtype not in B.FLOAT_DTYPES:
        raise TypeError(f"dloss: expected a real scalar or array, got dtype {dloss.dtype}")
    allowed = [()] + ([ce.row_shape] if ce.reduction == "none" else [])
    if dloss.shape not in allowed:
        raise ValueError(f"dloss: shape {dloss.shape} does not match the loss, expected "
                         + " or ".join(map(str, allowed)))
    run = _gpu_cross_entropy if kernels else _cpu_cross_entropy
    return run(ce, want_loss=False, dloss=dloss)[1]


# ---------------------------------------------------------------------------------------------
# NumPy reference path (any array module with NumPy's API)
# ---------------------------------------------------------------------------------------------

#: Row blocks of about this many bytes (in the accumulation dtype) keep a block and its temporaries
#: in the CPU caches (1 MiB: L2 or L3): z crosses memory once, dz once, however many NumPy operations a row takes.
_BLOCK_BYTES = 1 << 20


def _row_blocks(xp, rows: int, row_len: int, acc) -> list[slice]:
    """Slices of about _BLOCK_BYTES along the first axis; one slice (everything) on CuPy."""
    step = rows if xp is not np else _BLOCK_BYTES // max(1, row_len * np.dtype(acc).itemsize)
    step = max(1, step)
    return [slice(i, i + step) for i in range(0, rows, step)] or [slice(0, 0)]


def _blocked(a, class_last_ndim: int):
    """View of a (rows..., C) or (rows...) array with leading unit axes, so that axis 1 is a row
    axis to cut blocks along: (1, rows..., C), or (1, 1, C) for a single row."""
    return a[(None,) * (2 if class_last_ndim == 1 else 1)]


def _quiet(xp):
    """Silence NumPy's invalid-value warning for inf - inf: NaN rows are the documented result."""
    return np.errstate(invalid="ignore") if xp is np else contextlib.nullcontext()


def _cpu_softmax(xp, z, ax, log):
    acc = B.compute_dtype(z.dtype)
    moved = xp.moveaxis(z, ax, -1)
    zr = _blocked(moved, z.ndim)
    out = xp.empty(zr.shape, z.dtype)
    for sl in _row_blocks(xp, zr.shape[1], zr.shape[-1], acc):
        zb = zr[:, sl].astype(acc, copy=False)
        with _quiet(xp):  # a row of -inf gives NaN, as in PyTorch, without a warning
            sh = zb - zb.max(axis=-1, keepdims=True)
        if log:
            sh -= xp.log(xp.exp(sh).sum(axis=-1, keepdims=True))
        else:
            xp.exp(sh, out=sh)
            sh *= 1 / sh.sum(axis=-1, keepdims=True)
        out[:, sl] = sh
    return xp.moveaxis(out.reshape(moved.shape), -1, ax)


def _cpu_hardmax(xp, z, ax):
    # argmax on float32 for the narrow types: exact, and NaN-aware like NumPy's float argmax
    idx = z.astype(B.compute_dtype(z.dtype), copy=False).argmax(axis=ax)
    classes = xp.arange(z.shape[ax]).reshape((-1,) + (1,) * (z.ndim - ax - 1))
    return (classes == xp.expand_dims(idx, ax)).astype(z.dtype)


def _row_index(xp, shape):
    """Open-mesh index arrays over `shape`, to pair every row with one class index."""
    n = len(shape)
    return tuple(xp.arange(s).reshape((-1,) + (1,) * (n - i - 1)) for i, s in enumerate(shape))


def _cpu_cross_entropy(ce: _CE, want_loss: bool, dloss):
    """(loss or None, dz or None). dloss=None: no gradient; else the upstream gradient.

    Works on row blocks (the class axis last): per block, shifted logits sh = z - max, one exp,
    log-sum-exp, the row losses, and the gradient written over the exp buffer.
    """
    xp, ls, C = ce.xp, ce.label_smoothing, ce.n_classes
    acc = B.compute_dtype(ce.z.dtype)
    moved = xp.moveaxis(ce.z, ce.axis, -1)
    z = _blocked(moved, moved.ndim)                   # blocks of rows along axis 1
    row_shape = z.shape[:-1]
    w = None if ce.weight is None else ce.weight.astype(acc)
    one_minus_ls, ls_over_c = acc.type(1 - ls), acc.type(ls / C)

    # Per-row target terms, and the 'mean' denominator: known before any logit is read.
    if ce.probs:
        y = _blocked(xp.moveaxis(ce.target, ce.axis, -1), moved.ndim)
        denom = acc.type(z.size // C)
    else:
        t = _blocked(ce.target, moved.ndim)
        valid = t != ce.ignore_index
        tt = xp.where(valid, t, 0).astype(xp.intp)
        w_t = valid.astype(acc) if w is None else xp.where(valid, w[tt], 0).astype(acc)
        denom = w_t.sum()
        w_all = acc.type(C) if w is None else w.sum()

    g = None
    if dloss is not None:   # per-row upstream scale: dloss, over the mean's denominator
        g = xp.asarray(dloss, dtype=acc)
        if ce.reduction == "mean":
            # nothing to differentiate when every target is ignored (PyTorch's gradient is 0 too)
            g = g / denom if denom != 0 else xp.zeros_like(g)
        g = xp.broadcast_to(g, row_shape)
        dz = xp.empty(z.shape, ce.z.dtype)
    rows = xp.empty(row_shape, acc) if want_loss else None

    for sl in _row_blocks(xp, z.shape[1], C, acc):
        zb = z[:, sl].astype(acc, copy=False)
        # sh is C-contiguous whatever z's layout (so the loss rounds the same with or without the
        # gradient); the gradient is computed over it in place: right in dz when dtypes allow
        into = dz[:, sl] if g is not None and dz.dtype == acc else xp.empty(zb.shape, acc)
        with _quiet(xp):
            sh = xp.subtract(zb, zb.max(axis=-1, keepdims=True), out=into)  # log p = sh - lse
        if ce.probs:
            yb = y[:, sl].astype(acc)
            if ls:
                yb = yb * one_minus_ls + ls_over_c
            wy = yb if w is None else yb * w          # weighted target distribution
            wy_sum, wy_sh = wy.sum(axis=-1), (wy * sh).sum(axis=-1)
        else:
            picked = xp.take_along_axis(sh, tt[:, sl, ..., None], axis=-1)[..., 0]
            if ls:
                smooth_sh = sh.sum(axis=-1) if w is None else sh @ w   # sum_c w_c * sh_c
        e = xp.exp(sh, out=sh)
        s = e.sum(axis=-1)
        lse = xp.log(s)
        if want_loss:
            if ce.probs:
                rows[:, sl] = lse * wy_sum - wy_sh
            else:
                r = w_t[:, sl] * (lse - picked)
                if ls:
                    r = r * one_minus_ls + xp.where(valid[:, sl], w_all * lse - smooth_sh, 0) * ls_over_c
                rows[:, sl] = r
        if g is None:
            continue
        gb = g[:, sl]
        if ce.probs:
            # d/dz_j = p_j * sum_c(w_c y_c) - w_j y_j
            e *= (gb * wy_sum / s)[..., None]
            e -= gb[..., None] * wy
        else:
            # d/dz_j = p_j ((1-ls) w_t + ls W / C) - (1-ls) w_t [j == t] - (ls / C) w_j; 0 if ignored
            gv = gb * w_t[:, sl]
            coef = gv * one_minus_ls
            if ls:
                gs = xp.where(valid[:, sl], gb, 0) * ls_over_c
                coef = coef + gs * w_all
            e *= (coef / s)[..., None]
            e[_row_index(xp, e.shape[:-1]) + (tt[:, sl],)] -= gv * one_minus_ls
            if ls:
                e -= gs[..., None] * (1 if w is None else w)
        if dz.dtype != acc:   # else e already is this block of dz
            dz[:, sl] = e

    loss = None
    if want_loss:
        rows = rows.reshape(ce.row_shape)
        if ce.reduction == "sum":
            rows = rows.sum()
        elif ce.reduction == "mean":
            rows = rows.sum() / denom if denom != 0 else xp.asarray(np.nan, acc)
        loss = xp.asarray(rows).astype(ce.z.dtype)
    return loss, (None if g is None else xp.moveaxis(dz.reshape(moved.shape), -1, ce.axis))


# ---------------------------------------------------------------------------------------------
# Kernel launch path (CuPy arrays; NumPy arrays under the emulator backend)
# ---------------------------------------------------------------------------------------------

def _no_kernels(xp, op: str):
    if xp is np:
        raise NotImplementedError(f"{op}: the softmax kernels are not built yet; "
                                  "the emulator backend has nothing to run")


def _gpu_softmax(xp, z, ax, log):
    _no_kernels(xp, "log_softmax" if log else "softmax")
    return _cpu_softmax(xp, z, ax, log)


def _gpu_hardmax(xp, z, ax):
    _no_kernels(xp, "hardmax")
    return _cpu_hardmax(xp, z, ax)


def _gpu_cross_entropy(ce: _CE, want_loss: bool, dloss):
    _no_kernels(ce.xp, "softmax_cross_entropy")
    return _cpu_cross_entropy(ce, want_loss, dloss)
