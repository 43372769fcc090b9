"""The batch-norm ops' argument checks: one pass per public call, before any path runs.

Each public function calls one function here (`stats`, `forward`, `backward`, `inference`), which
returns the call's arguments checked and normalized (an argument object: x a float array of a
supported dtype; per-feature arrays as views of the kept axes' shape; eps and momentum floats;
the layout, the array module and which path runs it). The paths take them as they are and check
nothing again.

A call whose signature (path, op, axis, and each array's type, shape, strides and dtype) passed
the checks before skips them (the validated-call cache, ``gpu._launch.ValidCalls``); what a
signature does not hold (eps, momentum, writeability of the running statistics) is checked on
every call. ``synced=True``: the same checks for a synchronized call (``comm=``), where a rank may
hold no rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from gpu import _backend as B
from gpu import _launch
from gpu._engines import channels


@dataclass(frozen=True)
class Layout:
    axes: tuple[int, ...]            # reduced axes, sorted
    kept_shape: tuple[int, ...]      # shape of per-feature arrays
    keepdims_shape: tuple[int, ...]  # the same with reduced axes kept as 1 (broadcasts with x)
    m: int                           # elements reduced per feature
    kept_axes: tuple[int, ...]
    # the kernels' (outer, C, inner) view (`gpu._engines.channels.split`): a reshape when the kept
    # axes are adjacent, else a (reduced..., kept...) transposed copy (perm)
    outer: int
    C: int
    inner: int
    perm: tuple[int, ...] | None


_LAYOUTS: dict[tuple, Layout] = {}


def layout(x, axis, name: str = "x", allow_empty: bool = False) -> Layout:
    """The layout of ``x`` reduced over ``axis`` (kept per shape and axis); ValueError for a bad
    axis, or an empty reduction unless ``allow_empty``."""
    key = (x.shape, axis if isinstance(axis, int) else tuple(axis) if isinstance(axis, (tuple, list)) else None)
    lay = _LAYOUTS.get(key) if key[1] is not None else None
    if lay is None:
        lay = _make_layout(x.shape, axis, name, True)
        if key[1] is not None and len(_LAYOUTS) < 4096:
            _LAYOUTS[key] = lay
    if lay.m == 0 and not allow_empty:
        _make_layout(x.shape, axis, name)           # raises, naming the argument
    return lay


def _make_layout(shape: tuple[int, ...], axis, name: str, allow_empty: bool = False) -> Layout:
    if len(shape) == 0:
        raise ValueError(f"{name}: expected an array with at least one dimension, got a scalar")
    axes = B.normalize_axes(axis, len(shape))
    kept = tuple(n for i, n in enumerate(shape) if i not in axes)
    keep = tuple(1 if i in axes else n for i, n in enumerate(shape))
    m = math.prod(shape[i] for i in axes)
    if m == 0 and not allow_empty:
        raise ValueError(f"{name}: empty reduction: axis {axes} of shape {shape} has no elements")
    kept_axes = tuple(i for i in range(len(shape)) if i not in axes)
    outer, C, inner, perm = channels.split(shape, axes)
    return Layout(axes, kept, keep, m, kept_axes, outer, C, inner, perm)


# ---------------------------------------------------------------------------------------------
# The checked arguments of each op (arguments only: the paths return their results)
# ---------------------------------------------------------------------------------------------

class Stats(NamedTuple):
    xp: object                       # numpy or cupy
    kernels: bool                    # the kernel path runs the call (else the NumPy path)
    x: object
    lay: Layout


class Forward(NamedTuple):
    xp: object
    kernels: bool
    x: object
    lay: Layout
    gamma: object                    # per-feature arrays: kept shape, or None
    beta: object
    running_mean: object             # updated in place
    running_var: object
    eps: float
    momentum: float | None           # None: the cumulative average, 1 / batches
    batches: object                  # num_batches_tracked (int64, one element) or None
    residual: object = None          # the epilogue: y = act(bn(x) + residual); x's shape and dtype
    relu: bool = False               # activation="relu"


class Backward(NamedTuple):
    xp: object
    kernels: bool
    dy: object                       # of x's shape
    x: object
    lay: Layout
    gamma: object
    mean: object
    invstd: object
    y: object = None                 # the forward's output (x's shape and dtype): relu's mask y > 0
    relu: bool = False               # activation="relu": dy masked by y > 0 first
    residual_grad: bool = False      # also return dresidual (the masked dy)


class Inference(NamedTuple):
    xp: object
    kernels: bool
    x: object
    lay: Layout
    gamma: object
    beta: object
    running_mean: object
    running_var: object
    eps: float
    residual: object = None
    relu: bool = False


#: An argument object from its fields: ``tuple.__new__`` directly, not the NamedTuple's generated
#: ``__new__`` (a Python call: a sixth of what checking a warm call costs)
_new = tuple.__new__


# ---------------------------------------------------------------------------------------------
# The validated-call cache
# ---------------------------------------------------------------------------------------------

_VALID = _launch.ValidCalls()


def _key(op: str, axis, x, *arrays):
    """The signature of a call (None if an argument is not an array): a call whose signature
    passed the checks before skips them. Its first item is the path ("numpy", "emulate", "cupy")."""
    path = B.path_key(x)
    if path is None:
        return None
    ax = axis if type(axis) is int else tuple(axis) if type(axis) in (tuple, list) else None
    sig = _launch.signature(x, *arrays)
    return None if ax is None or sig is None else (path, op, ax, sig)


def _remember(key, xp, kernels: bool, lay: Layout, arrays: tuple, params: tuple = ()) -> None:
    """Keep a call that passed its checks: its layout, and whether a per-feature array (of
    ``params``) came in the keepdims shape (a hit then reshapes). Calls whose arrays were converted
    (a non-native byte order) are not kept: their next call converts again."""
    if key is None or not all(a is None or a.dtype.isnative for a in arrays + params):
        return
    reshape = any(p is not None and p.shape != lay.kept_shape for p in params)
    _VALID.put(key, (xp, kernels, lay, reshape))


def _kept(lay: Layout, *params):
    """Per-feature arrays as views of the kept axes' shape (they may come in the keepdims shape)."""
    return [None if p is None else p.reshape(lay.kept_shape) for p in params]


def _real(value, name: str, lo: float | None = None) -> float:
    """``B.check_real``, without the call for the common case, a finite Python float in range."""
    if type(value) is float and value - value == 0.0 and (lo is None or value >= lo):
        return value
    return B.check_real(value, name, lo=lo)


def _writeable(a, b) -> bool:
    """Whether the two arrays updated in place may be written (CuPy arrays always may)."""
    return (type(a) is not np.ndarray or a.flags.writeable) and (type(b) is not np.ndarray or b.flags.writeable)


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------

def stats(x, axis, synced: bool = False) -> Stats:
    """`batch_stats`'s arguments."""
    key = _key("stats/comm" if synced else "stats", axis, x)
    hit = _VALID.get(key)
    if hit is not None:
        return _new(Stats, (hit[0], hit[1], x, hit[2]))
    xp, kernels = B.dispatch(x=x)
    a = B.as_float_array(xp, x, "x")
    lay = layout(a, axis, allow_empty=synced)
    _remember(key, xp, kernels, lay, (x,))
    return _new(Stats, (xp, kernels, a, lay))


def forward(x, gamma, beta, axis, eps, running_mean, running_var, momentum, num_batches_tracked,
            synced: bool = False, residual=None, activation=None) -> Forward:
    """`batch_norm_forward`'s arguments (num_batches_tracked is not incremented here)."""
    relu = _activation(activation)
    op = ("forward/comm" if synced else "forward") + ("/relu" if relu else "")
    key = _key(op, axis, x, gamma, beta, running_mean, running_var, residual)
    hit = _VALID.get(key)
    if (hit is not None and num_batches_tracked is None and momentum is not None
            and (running_mean is None or _writeable(running_mean, running_var))):
        xp, kernels, lay, reshape = hit
        eps, momentum = _real(eps, "eps", 0.0), _real(momentum, "momentum")
        if reshape:
            gamma, beta, running_mean, running_var = _kept(lay, gamma, beta, running_mean, running_var)
        return _new(Forward, (xp, kernels, x, lay, gamma, beta, running_mean, running_var, eps, momentum, None,
                              residual, relu))
    xp, kernels = B.dispatch(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var,
                             residual=residual)
    a = B.as_float_array(xp, x, "x")
    lay = layout(a, axis, allow_empty=synced)       # synchronized: a rank may have no rows
    r = like_x(xp, a, residual, "residual")
    g, b = _params(xp, lay, gamma=gamma, beta=beta)
    rm, rv = _check_running(xp, lay, running_mean, running_var)
    eps = _real(eps, "eps", 0.0)
    momentum = _check_batches(xp, num_batches_tracked, momentum, rm)
    if not synced and rm is not None and lay.m == 1:
        raise ValueError("x: expected more than 1 value per feature when training with running stats "
                         f"(axis {lay.axes} of shape {a.shape} reduces 1 element)")
    if num_batches_tracked is None and momentum is not None:
        _remember(key, xp, kernels, lay, (x, residual), (gamma, beta, running_mean, running_var))
    return _new(Forward, (xp, kernels, a, lay, g, b, rm, rv, eps, momentum, num_batches_tracked, r, relu))


def backward(dy, x, gamma, mean, invstd, axis, synced: bool = False, activation=None, y=None,
             residual_grad: bool = False) -> Backward:
    """`batch_norm_backward`'s arguments."""
    relu = _activation(activation)
    if type(residual_grad) is not bool:
        raise TypeError(f"residual_grad: expected a bool, got {type(residual_grad).__name__}")
    if relu and y is None:
        raise ValueError("y: required with activation='relu' (the forward's output: the gradient passes where "
                         "y > 0)")
    op = ("backward/comm" if synced else "backward") + ("/relu" if relu else "")
    key = _key(op, axis, x, dy, gamma, mean, invstd, y)
    hit = _VALID.get(key)
    if hit is not None:
        xp, kernels, lay, reshape = hit
        if reshape:
            gamma, mean, invstd = _kept(lay, gamma, mean, invstd)
        return _new(Backward, (xp, kernels, dy, x, lay, gamma, mean, invstd, y, relu, residual_grad))
    xp, kernels = B.dispatch(dy=dy, x=x, gamma=gamma, mean=mean, invstd=invstd, y=y)
    a = B.as_float_array(xp, x, "x")
    d = B.as_float_array(xp, dy, "dy")
    if d.shape != a.shape:
        raise ValueError(f"dy: shape {d.shape} does not match x's shape {a.shape}")
    lay = layout(a, axis, allow_empty=synced)
    yy = like_x(xp, a, y, "y")
    g, mu, istd = _params(xp, lay, gamma=gamma, mean=mean, invstd=invstd)
    if mu is None or istd is None:
        raise TypeError("mean, invstd: required (pass those returned by batch_norm_forward)")
    _remember(key, xp, kernels, lay, (x, dy, y), (gamma, mean, invstd))
    return _new(Backward, (xp, kernels, d, a, lay, g, mu, istd, yy, relu, residual_grad))


def inference(x, gamma, beta, running_mean, running_var, axis, eps, residual=None, activation=None) -> Inference:
    """`batch_norm_inference`'s arguments (an empty x passes: an empty batch gives an empty y)."""
    relu = _activation(activation)
    key = _key("inference/relu" if relu else "inference", axis, x, gamma, beta, running_mean, running_var, residual)
    hit = _VALID.get(key)
    if hit is not None:
        xp, kernels, lay, reshape = hit
        eps = _real(eps, "eps", 0.0)
        if reshape:
            gamma, beta, running_mean, running_var = _kept(lay, gamma, beta, running_mean, running_var)
        return _new(Inference, (xp, kernels, x, lay, gamma, beta, running_mean, running_var, eps, residual, relu))
    xp, kernels = B.dispatch(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var,
                             residual=residual)
    a = B.as_float_array(xp, x, "x")
    lay = layout(a, axis, allow_empty=True)
    r = like_x(xp, a, residual, "residual")
    g, b, rm, rv = _params(xp, lay, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    if rm is None or rv is None:
        raise TypeError("running_mean, running_var: required for inference")
    eps = _real(eps, "eps", 0.0)
    if a.size:
        _remember(key, xp, kernels, lay, (x, residual), (gamma, beta, running_mean, running_var))
    return _new(Inference, (xp, kernels, a, lay, g, b, rm, rv, eps, r, relu))


ACTIVATIONS = (None, "relu")


def _activation(activation) -> bool:
    """Whether ``activation`` is "relu" (None: no activation); ValueError naming it otherwise."""
    if activation is None:
        return False
    if isinstance(activation, str) and activation == "relu":
        return True
    raise ValueError(f"activation: expected None or 'relu', got {activation!r}")


def like_x(xp, x, a, name: str):
    """An array that must have x's shape, dtype, array library and device (the residual, the
    forward's y), or None. Read only: it may be x itself (``relu(bn(x) + x)``)."""
    if a is None:
        return None
    if not isinstance(a, xp.ndarray):
        raise TypeError(f"{name}: expected an array of x's library ({xp.__name__}), got {type(a).__name__}")
    if a.shape != x.shape:
        raise ValueError(f"{name}: shape {a.shape} does not match x's shape {x.shape}")
    if a.dtype != x.dtype:
        if not a.dtype.isnative and a.dtype.newbyteorder("=") == x.dtype:
            a = a.astype(x.dtype)                   # big-endian data: a native copy, as x's
        else:
            raise TypeError(f"{name}: dtype {a.dtype} does not match x's dtype {x.dtype}")
    if xp is not np and getattr(a, "device", None) != getattr(x, "device", None):
        raise ValueError(f"{name}: on device {a.device}, x on device {x.device}")
    return a


def communicator(comm):
    """``comm=`` as a `gpu.distributed.Communicator` (what `gpu.distributed.wrap` accepts)."""
    from ... import distributed
    return distributed.wrap(comm)


def _params(xp, lay: Layout, **params):
    return [B.check_param(xp, p, name, lay.kept_shape, lay.keepdims_shape) for name, p in params.items()]


def _check_batches(xp, num_batches_tracked, momentum, running_mean):
    """num_batches_tracked (an int64 array of one element, or None) and momentum (a real, or None
    for the cumulative average) checked together."""
    if num_batches_tracked is not None:
        n = num_batches_tracked
        if not isinstance(n, xp.ndarray) or n.dtype != np.int64 or n.size != 1:
            raise TypeError("num_batches_tracked: expected an int64 array of one element (it is updated in place, "
                            f"as torch's BatchNorm buffer), got {type(n).__name__}"
                            + (f" of dtype {n.dtype} and size {n.size}" if hasattr(n, "dtype") else ""))
        if running_mean is None:
            raise ValueError("num_batches_tracked: counts running-statistics updates: pass running_mean and "
                             "running_var too")
        if xp is np and not n.flags.writeable:
            raise ValueError("num_batches_tracked: must be writeable (it is updated in place)")
    if momentum is None:
        if running_mean is not None and num_batches_tracked is None:
            raise TypeError("momentum=None (the cumulative average, as torch) needs num_batches_tracked: an int64 "
                            "array of one element, incremented in place at every update")
        return None
    return _real(momentum, "momentum")


def _check_running(xp, lay: Layout, running_mean, running_var):
    for name, r in (("running_mean", running_mean), ("running_var", running_var)):
        if r is not None and not isinstance(r, xp.ndarray):
            raise TypeError(f"{name}: expected an array (it is updated in place), got {type(r).__name__}")
    rm, rv = _params(xp, lay, running_mean=running_mean, running_var=running_var)
    if (rm is None) != (rv is None):
        raise ValueError("running_mean, running_var: pass both or neither")
    if rm is not None:
        for name, r in (("running_mean", rm), ("running_var", rv)):
            if xp is np and not r.flags.writeable:
                raise ValueError(f"{name}: must be writeable (it is updated in place)")
    return rm, rv
