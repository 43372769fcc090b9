"""Batch statistics and batch normalization: forward (training), inference and backward.

`axis` is NumPy's: the axes reduced over. The kept axes are the features (channels); gamma,
beta, running statistics, mean and invstd have the shape of the kept axes (the shape with the
reduced axes kept as 1 is accepted too, e.g. the (n, 1) column for the seed's (n, m) layout).

    layout                  x shape          axis
    dense (batch, features) (N, C)           0
    the seed's Z[l]         (n_units, m)     1
    NCHW activations        (N, C, H, W)     (0, 2, 3)
    NHWC activations        (N, H, W, C)     (0, 1, 2)

NumPy arrays run the NumPy reference path below (also the CPU fallback); CuPy arrays run the
CUDA kernels of ``cuda_src/batch_norm.cu``. Accumulation is in float32 for float16, bfloat16 and
float32 storage and in float64 for float64.

The variance is computed by the corrected two-pass formula var = mean(c^2) - mean(c)^2 with
c = x - mean: the second term cancels the rounding error of the first-pass mean, so data at an
offset of 1e4 with unit variance keeps its variance in float32.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from .. import _backend as B
from .. import _cpu, _jit, _kernels, _launch
from .. import _workspace as _ws

@dataclass(frozen=True)
class _Layout:
    axes: tuple[int, ...]            # reduced axes, sorted
    kept_shape: tuple[int, ...]      # shape of per-feature arrays
    keepdims_shape: tuple[int, ...]  # the same with reduced axes kept as 1 (broadcasts with x)
    m: int                           # elements reduced per feature
    kept_axes: tuple[int, ...]
    # the kernels' (outer, C, inner) view: a reshape when the kept axes are adjacent (axes of length
    # 1 do not count), else a (reduced..., kept...) transposed copy (perm)
    outer: int
    C: int
    inner: int
    perm: tuple[int, ...] | None


_LAYOUTS: dict[tuple, _Layout] = {}


def _layout(x, axis, name: str = "x", allow_empty: bool = False) -> _Layout:
    key = (x.shape, axis if isinstance(axis, int) else tuple(axis) if isinstance(axis, (tuple, list)) else None)
    lay = _LAYOUTS.get(key) if key[1] is not None else None
    if lay is None:
        lay = _make_layout(x.shape, axis, name, True)
        if key[1] is not None and len(_LAYOUTS) < 4096:
            _LAYOUTS[key] = lay
    if lay.m == 0 and not allow_empty:
        _make_layout(x.shape, axis, name)           # raises, naming the argument
    return lay


def _make_layout(shape: tuple[int, ...], axis, name: str, allow_empty: bool = False) -> _Layout:
    if len(shape) == 0:
        raise ValueError(f"{name}: expected an array with at least one dimension, got a scalar")
    axes = B.normalize_axes(axis, len(shape))
    kept = tuple(n for i, n in enumerate(shape) if i not in axes)
    keep = tuple(1 if i in axes else n for i, n in enumerate(shape))
    m = math.prod(shape[i] for i in axes)
    if m == 0 and not allow_empty:
        raise ValueError(f"{name}: empty reduction: axis {axes} of shape {shape} has no elements")
    kept_axes = tuple(i for i in range(len(shape)) if i not in axes)
    nontrivial = [i for i in kept_axes if shape[i] != 1]
    C, perm = math.prod(kept), None
    if not nontrivial:               # one channel: one row of M elements
        outer, inner = 1, m
    elif all(i in nontrivial or shape[i] == 1 for i in range(nontrivial[0], nontrivial[-1] + 1)):
        outer, inner = math.prod(shape[:nontrivial[0]]), math.prod(shape[nontrivial[-1] + 1:])
    else:
        perm = axes + kept_axes
        outer, inner = m, 1
    return _Layout(axes, kept, keep, m, kept_axes, outer, C, inner, perm)


_VALID = _launch.ValidCalls()


def _valid_key(op: str, axis, x, *arrays):
    """The signature of a call (None for arguments that are not arrays): a call whose signature
    passed the checks before skips them. Its first item is the path ("numpy", "emulate", "cupy")."""
    path = B.path_key(x)
    if path is None:
        return None
    ax = axis if type(axis) is int else tuple(axis) if type(axis) in (tuple, list) else None
    sig = _launch.signature(x, *arrays)
    return None if ax is None or sig is None else (path, op, ax, sig)


def _xp_of(x):
    return np if type(x) is np.ndarray else B.array_module(x=x)


def _kept(lay: "_Layout", *params):
    """Per-feature arrays as views of the kept axes' shape (they may come in the keepdims shape)."""
    return [None if p is None else p.reshape(lay.kept_shape) for p in params]


def _params(xp, lay: _Layout, **params):
    return [B.check_param(xp, p, name, lay.kept_shape, lay.keepdims_shape) for name, p in params.items()]


def _writeable(a, b) -> bool:
    """Whether the two arrays updated in place may be written (CuPy arrays always may)."""
    return (type(a) is not np.ndarray or a.flags.writeable) and (type(b) is not np.ndarray or b.flags.writeable)


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
    return B.check_real(momentum, "momentum")


def _check_running(xp, lay: _Layout, running_mean, running_var):
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


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def batch_stats(x, axis: int | Sequence[int] = 0, *, comm=None):
    """Biased per-feature mean and variance of `x` over `axis`.

    Returns (mean, var), both of the kept axes' shape and of x's dtype. With ``comm`` (a
    `gpu.distributed` communicator, or an engine object it wraps) the statistics are those of the
    batch concatenated over the ranks (see `batch_norm_forward`).

    >>> import numpy as np, gpu
    >>> x = np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32)
    >>> mean, var = gpu.batch_stats(x, axis=0)      # shapes (8,), (8,)
    """
    if comm is not None:
        return _sync_batch_stats(x, axis, comm)
    key = _valid_key("stats", axis, x)
    lay = _VALID.get(key)
    if lay is not None:
        if key[0] != "numpy":
            return _gpu_batch_stats(_xp_of(x), x, lay)
        with np.errstate(all="ignore"):
            mean, var = _cpu_stats(np, x, lay)
        return mean.astype(x.dtype, copy=False), var.astype(x.dtype, copy=False)
    xp, kernels = B.dispatch(x=x)
    x = B.as_float_array(xp, x, "x")
    lay = _layout(x, axis)
    if kernels:
        out = _gpu_batch_stats(xp, x, lay)
        _VALID.put(key, lay)
        return out
    with np.errstate(all="ignore"):   # special values are results here (PyTorch's), not warnings
        mean, var = _cpu_stats(xp, x, lay)
    _VALID.put(key, lay)
    return mean.astype(x.dtype), var.astype(x.dtype)


def batch_norm_forward(x, gamma=None, beta=None, *, axis: int | Sequence[int] = 0, eps: float = 1e-5,
                       running_mean=None, running_var=None, momentum: float | None = 0.1,
                       num_batches_tracked=None, comm=None):
    """Training-mode batch norm: y = gamma * (x - mean) * invstd + beta over `axis`.

    invstd = 1 / sqrt(var + eps) with the biased variance. gamma=None means 1, beta=None means 0.
    When running_mean and running_var are given they are updated in place, as PyTorch does:
    r_mean = (1 - momentum) * r_mean + momentum * mean,
    r_var = (1 - momentum) * r_var + momentum * var * M / (M - 1), M the elements per feature.
    ``momentum=None`` is PyTorch's cumulative average: it needs ``num_batches_tracked``, an int64
    array of one element (torch's ``BatchNorm.num_batches_tracked`` buffer) that is incremented in
    place first, and momentum = 1 / num_batches_tracked. Given with a float momentum it is just
    incremented, as torch's module does. On CuPy the increment and the division stay on the device
    (no synchronization).

    Special values follow PyTorch: the statistics are finite whenever the true variance fits the
    dtype (overflow-safe accumulation); an inf in a feature gives mean inf and var NaN, a NaN (or
    +inf with -inf) NaN; with eps = 0 a constant feature gets invstd 0 and y = beta.

    Returns (y, mean, invstd): y of x's shape and dtype; mean and invstd of the kept axes' shape
    in the accumulation dtype (float32 for float16/bfloat16 input, like PyTorch's save_mean and
    save_invstd), to be passed to `batch_norm_backward`.

    ``comm``: synchronized batch norm. Every rank passes its own x (the same feature shape and
    dtype; any number of rows, zero included) and gets the statistics of the batch concatenated
    over the ranks, bitwise the same on every rank, from one packed collective (an allgather of
    each rank's count, mean and M2, merged in rank order). M above is then the global count.
    ``comm`` is a `gpu.distributed.Communicator` or what `gpu.distributed.wrap` accepts (an
    mpi4py communicator, a torch.distributed process group, a cupyx.distributed communicator).
    Ranks that disagree on the channel count, the dtype or the communicator's size get a
    ValueError on every rank; an engine failure or timeout a `gpu.distributed.CollectiveError`.

    >>> import numpy as np, gpu
    >>> x = np.random.default_rng(0).standard_normal((32, 16, 8, 8)).astype(np.float32)
    >>> rm, rv = np.zeros(16, np.float32), np.ones(16, np.float32)
    >>> y, mean, invstd = gpu.batch_norm_forward(x, axis=(0, 2, 3), running_mean=rm, running_var=rv)
    """
    if comm is not None:
        return _sync_forward(x, gamma, beta, axis, eps, running_mean, running_var, momentum,
                             num_batches_tracked, comm)
    key = _valid_key("forward", axis, x, gamma, beta, running_mean, running_var)
    lay = _VALID.get(key)
    if lay is not None and num_batches_tracked is None and momentum is not None and (
            running_mean is None or _writeable(running_mean, running_var)):
        eps, momentum = B.check_real(eps, "eps", lo=0.0), B.check_real(momentum, "momentum")
        if key[0] != "numpy":
            return _gpu_forward(_xp_of(x), x, gamma, beta, running_mean, running_var, lay, eps, momentum, None)
        with np.errstate(all="ignore"):
            # gamma, beta in either accepted shape (reshaped there); running stats updated as kept
            return _cpu_forward(np, x, gamma, beta, *_kept(lay, running_mean, running_var), lay, eps, momentum)
    xp, kernels = B.dispatch(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    x = B.as_float_array(xp, x, "x")
    lay = _layout(x, axis)
    gamma, beta = _params(xp, lay, gamma=gamma, beta=beta)
    running_mean, running_var = _check_running(xp, lay, running_mean, running_var)
    eps = B.check_real(eps, "eps", lo=0.0)
    momentum = _check_batches(xp, num_batches_tracked, momentum, running_mean)
    if running_mean is not None and lay.m == 1:
        raise ValueError("x: expected more than 1 value per feature when training with running stats "
                         f"(axis {lay.axes} of shape {x.shape} reduces 1 element)")
    if num_batches_tracked is not None:
        num_batches_tracked += 1            # before the update, as torch's module
    if kernels:
        out = _gpu_forward(xp, x, gamma, beta, running_mean, running_var, lay, eps, momentum,
                           num_batches_tracked)
        if num_batches_tracked is None and momentum is not None:
            _VALID.put(key, lay)
        return out
    if num_batches_tracked is None and momentum is not None:
        _VALID.put(key, lay)
    if momentum is None and running_mean is not None:
        momentum = 1.0 / float(num_batches_tracked.reshape(-1)[0])
    with np.errstate(all="ignore"):
        return _cpu_forward(xp, x, gamma, beta, running_mean, running_var, lay, eps, momentum or 0.0)


def batch_norm_backward(dy, x, gamma, mean, invstd, *, axis: int | Sequence[int] = 0, comm=None):
    """Gradients of `batch_norm_forward`'s y with respect to x, gamma and beta.

    With x_hat = (x - mean) * invstd:
    dbeta = sum(dy), dgamma = sum(dy * x_hat) over `axis`,
    dx = gamma * invstd * (dy - dbeta / M - x_hat * dgamma / M).

    `mean` and `invstd` are those returned by the forward. gamma=None means 1. Returns
    (dx, dgamma, dbeta): dx of x's dtype, dgamma and dbeta of the kept axes' shape in gamma's dtype
    (x's dtype when gamma is None).

    ``comm`` (the forward's): dbeta and dgamma in dx are the sums over every rank's batch, from
    one packed all-reduce; M is the global count. The returned dgamma and dbeta are this rank's
    share (their sum over the ranks is the full gradient), as torch's SyncBatchNorm returns, so a
    data-parallel all-reduce of the parameter gradients counts each example once.

    >>> import numpy as np, gpu
    >>> x = np.random.default_rng(0).standard_normal((64, 10))
    >>> y, mean, invstd = gpu.batch_norm_forward(x)
    >>> dx, dgamma, dbeta = gpu.batch_norm_backward(np.ones_like(y), x, None, mean, invstd)
    """
    if comm is not None:
        return _sync_backward(dy, x, gamma, mean, invstd, axis, comm)
    key = _valid_key("backward", axis, x, dy, gamma, mean, invstd)
    lay = _VALID.get(key)
    if lay is not None:
        if key[0] != "numpy":
            return _gpu_backward(_xp_of(x), dy, x, gamma, mean, invstd, lay)
        with np.errstate(all="ignore"):
            return _cpu_backward(np, dy, x, *_kept(lay, gamma, mean, invstd), lay)
    xp, kernels = B.dispatch(dy=dy, x=x, gamma=gamma, mean=mean, invstd=invstd)
    x = B.as_float_array(xp, x, "x")
    dy = B.as_float_array(xp, dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"dy: shape {dy.shape} does not match x's shape {x.shape}")
    lay = _layout(x, axis)
    gamma, mean, invstd = _params(xp, lay, gamma=gamma, mean=mean, invstd=invstd)
    if mean is None or invstd is None:
        raise TypeError("mean, invstd: required (pass those returned by batch_norm_forward)")
    if kernels:
        out = _gpu_backward(xp, dy, x, gamma, mean, invstd, lay)
        _VALID.put(key, lay)
        return out
    _VALID.put(key, lay)
    with np.errstate(all="ignore"):
        return _cpu_backward(xp, dy, x, gamma, mean, invstd, lay)


def batch_norm_inference(x, gamma, beta, running_mean, running_var, *, axis: int | Sequence[int] = 0,
                         eps: float = 1e-5):
    """Inference-mode batch norm with given statistics:
    y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta. gamma/beta may be None.

    >>> import numpy as np, gpu
    >>> x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    >>> y = gpu.batch_norm_inference(x, None, None, np.zeros(4, np.float32), np.ones(4, np.float32))
    """
    key = _valid_key("inference", axis, x, gamma, beta, running_mean, running_var)
    lay = _VALID.get(key)
    if lay is not None:
        eps = B.check_real(eps, "eps", lo=0.0)
        if key[0] != "numpy":
            return _gpu_inference(_xp_of(x), x, gamma, beta, running_mean, running_var, lay, eps)
        # per-feature arrays in either accepted shape: reshaped there
        return _cpu_inference(np, x, gamma, beta, running_mean, running_var, lay, eps)
    xp, kernels = B.dispatch(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    x = B.as_float_array(xp, x, "x")
    lay = _layout(x, axis, allow_empty=True)     # an empty batch gives an empty y, as torch
    gamma, beta, running_mean, running_var = _params(
        xp, lay, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    if running_mean is None or running_var is None:
        raise TypeError("running_mean, running_var: required for inference")
    eps = B.check_real(eps, "eps", lo=0.0)
    if x.size == 0:
        return xp.empty(x.shape, x.dtype)
    if kernels:
        out = _gpu_inference(xp, x, gamma, beta, running_mean, running_var, lay, eps)
        _VALID.put(key, lay)
        return out
    _VALID.put(key, lay)
    return _cpu_inference(xp, x, gamma, beta, running_mean, running_var, lay, eps)


def batch_norm(x, gamma=None, beta=None, *, axis: int | Sequence[int] = 0, eps: float = 1e-5,
               running_mean=None, running_var=None, momentum: float | None = 0.1, training: bool = True,
               num_batches_tracked=None, comm=None):
    """Batch norm, the convenience form: `batch_norm_forward`'s y when training (updating running
    stats if given), else `batch_norm_inference` with the running stats (then required).

    >>> import numpy as np, gpu
    >>> y = gpu.batch_norm(np.random.default_rng(0).standard_normal((16, 3)))
    """
    if training:
        return batch_norm_forward(x, gamma, beta, axis=axis, eps=eps, running_mean=running_mean,
                                  running_var=running_var, momentum=momentum,
                                  num_batches_tracked=num_batches_tracked, comm=comm)[0]
    return batch_norm_inference(x, gamma, beta, running_mean, running_var, axis=axis, eps=eps)


# ---------------------------------------------------------------------------------------------
# NumPy reference path (any array module with NumPy's API: NumPy, or CuPy until kernels land)
# ---------------------------------------------------------------------------------------------

class _Blocks:
    """x cut into row blocks along axis 0 (``gpu._cpu``'s engine), with per-thread scratch
    buffers of one block. The arrays cross memory the fewest times: statistics 2 reads, forward
    3 reads + 1 write, backward 4 reads + 1 write, inference 1 read + 1 write; when axis 0 is kept,
    every block holds whole features and each array is read once."""

    def __init__(self, xp, x, lay: _Layout):
        self.xp, self.x, self.lay = xp, x, lay
        self.acc = B.compute_dtype(x.dtype)
        n = x.shape[0]
        self.step = _cpu.block_rows(xp, n, (x.size // max(n, 1)) * self.acc.itemsize)

    def map(self, fn, slices) -> list:
        """[fn(sl) for sl in slices], on the NumPy path's threads; results in block order."""
        return _cpu.map_ordered(fn, slices, self.xp)

    def each_group(self, fn) -> None:
        """fn(p, slices) for every group: groups in parallel when there are several (each then runs
        its blocks inline), else the one group's blocks in parallel through `map`."""
        groups = list(self.groups())
        self.map(lambda g: fn(*g), groups) if len(groups) > 1 else fn(*groups[0])

    def groups(self):
        """Yields (p, slices), the blocks grouped by the features they share.

        If axis 0 is reduced, every block holds part of every feature: one group of all blocks,
        and p = slice(None). If axis 0 is kept, each block holds whole features: one group per
        block, and p = that block's slice, which also indexes the per-feature (keepdims) arrays.
        On CuPy: one block, the whole array.
        """
        blocks = [slice(i, i + self.step) for i in range(0, self.x.shape[0], self.step)]
        if 0 in self.lay.axes:
            yield slice(None), blocks
        else:
            yield from ((sl, [sl]) for sl in blocks)

    def scratch(self, i: int, sl):
        """Scratch buffer `i` of the calling thread in the accumulation dtype, shaped like block
        `sl` of x."""
        return _cpu.scratch(self.xp, (len(range(*sl.indices(self.x.shape[0]))),) + self.x.shape[1:], self.acc, i)

    def affine(self, y, slices, center, scale, shift) -> None:
        """y = (x - center) * scale (+ shift) over the blocks `slices`, per-feature operands."""
        def block(sl):
            blk = self.xp.subtract(self.x[sl], center, out=self.out(y, sl))
            blk *= scale
            if shift is not None:
                blk += shift
            _store(y[sl], blk)

        self.map(block, slices)

    def out(self, y, sl):
        """Where to compute block `sl` of output y: in y itself when y has the accumulation dtype."""
        return y[sl] if y.dtype == self.acc else self.scratch(1, sl)


def _reduce(xp, lay: _Layout, a, b=None):
    """sum(a) or sum(a * b) over the reduced axes with kept dims, without materializing a * b."""
    if b is None:
        return a.sum(axis=lay.axes, keepdims=True, dtype=B.compute_dtype(a.dtype))
    if xp is np:
        idx = list(range(a.ndim))
        return np.expand_dims(np.einsum(a, idx, b, idx, list(lay.kept_axes)), lay.axes)
    return (a * b).sum(axis=lay.axes, keepdims=True)


def _group_stats(blocks: _Blocks, slices):
    """(mean, var) of the features in one group, keepdims shape, accumulation dtype.

    Corrected two-pass: mean0 first, then c = x - mean0, var = mean(c^2) - mean(c)^2, whose
    second term cancels the rounding error of mean0 (mean = mean0 + mean(c)).
    """
    xp, x, lay = blocks.xp, blocks.x, blocks.lay
    m = blocks.acc.type(lay.m)
    mean0 = sum(blocks.map(lambda sl: _reduce(xp, lay, x[sl]), slices)) / m

    def centered(sl):
        c = xp.subtract(x[sl], mean0, out=blocks.scratch(0, sl))
        return _reduce(xp, lay, c), _reduce(xp, lay, c, c)

    parts = blocks.map(centered, slices)
    c_sum, c_sq = sum(p[0] for p in parts), sum(p[1] for p in parts)
    c_mean = c_sum / m
    mean, var = mean0 + c_mean, xp.maximum(c_sq / m - c_mean * c_mean, 0)
    if not (xp.isfinite(mean).all() and xp.isfinite(var).all()):    # O(C): the rare path below
        mean, var = _scaled_stats(blocks, slices, mean, var)
    return mean, var


def _scaled_stats(blocks: _Blocks, slices, mean, var):
    """The statistics again for features whose fast result is not finite, overflow-safe, with
    PyTorch's special values (its mean is a sum):

    - finite data: the same two-pass on x * 2^-e, e the exponent of the feature's max |x| (exact,
      |x * 2^-e| < 1, so no sum or square overflows), then mean * 2^e and var * 2^2e: var is finite
      whenever the true variance fits the dtype (the kernels: a scaled Welford, channels.cuh);
    - an inf: mean inf (or NaN for +inf with -inf), var NaN; a NaN: both NaN.
    """
    xp, x, lay, acc = blocks.xp, blocks.x, blocks.lay, blocks.acc
    m = acc.type(lay.m)
    sl = slice(None) if 0 in lay.axes else slice(slices[0].start, slices[-1].stop)
    xs = x[sl].astype(acc)                           # a copy: this path is for broken data only
    with np.errstate(over="ignore", invalid="ignore"):
        amax = xp.abs(xs).max(axis=lay.axes, keepdims=True)
        finite = xp.isfinite(amax)
        e = xp.frexp(xp.where(finite & (amax > 0), amax, acc.type(1)))[1]
        z = xp.ldexp(xs, -e)
        mean_s = z.sum(axis=lay.axes, keepdims=True) / m
        z -= mean_s
        c_mean = z.sum(axis=lay.axes, keepdims=True) / m
        var_s = xp.maximum((z * z).sum(axis=lay.axes, keepdims=True) / m - c_mean * c_mean, 0)
        s_mean = xp.ldexp(mean_s + c_mean, e)
        s_var = xp.ldexp(var_s, 2 * e)               # inf exactly when it does not fit
        s_mean = xp.where(finite, s_mean, xs.sum(axis=lay.axes, keepdims=True) / m)
        s_var = xp.where(finite, s_var, acc.type(np.nan))
    bad = ~(xp.isfinite(mean) & xp.isfinite(var))
    return xp.where(bad, s_mean, mean), xp.where(bad, s_var, var)


def _store(out, block):
    """Write a computed block into its output slice (a cast for narrow output dtypes)."""
    if block is not out:
        out[...] = block


def _per_feature(p, lay: _Layout, acc, sl):
    """A per-feature array (kept shape, or None) as a keepdims block for slice p of axis 0."""
    return None if p is None else p.reshape(lay.keepdims_shape).astype(acc, copy=False)[sl]


def _invstd(xp, var, eps: float, acc):
    """1 / sqrt(var + eps); 0 where var + eps == 0 (eps = 0 and a constant feature), as PyTorch's
    native op (the kernels' bn_invstd): y = beta there."""
    v = var + acc.type(eps)
    if acc.type(eps) > 0:
        return 1 / xp.sqrt(v)
    with np.errstate(divide="ignore"):
        return xp.where(v == 0, acc.type(0), 1 / xp.sqrt(v))


def _coefficients(invstd, gamma, beta, lay: _Layout, acc, p):
    """(scale, shift) of y = (x - center) * scale + shift: the batch-norm affine, written once for
    the training forward (center = mean) and inference (center = running_mean)."""
    scale = invstd if gamma is None else invstd * _per_feature(gamma, lay, acc, p)
    return scale, _per_feature(beta, lay, acc, p)


def _one_block(xp, x, lay: _Layout) -> bool:
    """Whether x is one row block of the NumPy path: then the block engine (threads, closures,
    scratch) costs more than it saves, and the direct functions below run instead."""
    return xp is np and x.size * B.compute_dtype(x.dtype).itemsize <= _cpu.BLOCK_BYTES


def _direct_stats(xp, x, lay: _Layout, acc):
    """(mean, var, c, c_mean) for an x of one block: the corrected two-pass of `_group_stats`,
    keeping c = x - mean0 (accumulation dtype) for the caller to normalize in place; None if a
    statistic is not finite (the blocked path's overflow-safe recomputation takes over)."""
    inv_m = acc.type(1 / lay.m)
    mean0 = x.sum(axis=lay.axes, keepdims=True, dtype=acc)
    mean0 *= inv_m
    c = xp.subtract(x, mean0, dtype=acc)
    c_mean = c.sum(axis=lay.axes, keepdims=True)
    c_mean *= inv_m
    var = _reduce(xp, lay, c, c)
    var *= inv_m
    var -= c_mean * c_mean
    xp.maximum(var, 0, out=var)
    mean = mean0 + c_mean
    if not xp.isfinite(mean.sum() + var.sum()):     # one O(C) check: an inf or NaN anywhere shows
        return None
    return mean, var, c, c_mean


def _direct_forward(xp, x, gamma, beta, lay: _Layout, eps: float):
    acc = B.compute_dtype(x.dtype)
    stats = _direct_stats(xp, x, lay, acc)
    if stats is None:
        return None
    mean, var, c, c_mean = stats
    invstd = _invstd(xp, var, eps, acc)
    scale, shift = _coefficients(invstd, gamma, beta, lay, acc, slice(None))
    # y = (c - c_mean) * scale + shift = c * scale + (shift - c_mean * scale): two passes over c
    c *= scale
    c += -c_mean * scale if shift is None else shift - c_mean * scale
    y = c if x.dtype == acc else c.astype(x.dtype)
    return y, mean.reshape(lay.kept_shape), var.reshape(lay.kept_shape), invstd.reshape(lay.kept_shape)



# Small x: one thread, BLAS sums. For an x of at most _SMALL_ELEMENTS elements (float32 or
# float64 storage, a C-contiguous array whose (outer, C, inner) view is a reshape) NumPy's call
# overhead is the cost: a reduction along a strided axis runs a short inner loop per row (8.8 us
# for 256x64 float32, against 1.5 us for the same sums as a BLAS matrix-vector product). These
# functions take the fewest NumPy calls, sum through ``ones @ v`` and work on the flat (C,)
# statistics; the sums are the same sequential per-channel accumulations as NumPy's along axis 0.

#: x of at most this many elements takes the small path (the switch: docs/BENCHMARKS.md, "NumPy path").
_SMALL_ELEMENTS = 1 << 17

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


_SMALL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _small_view(x, lay: _Layout):
    """x as the (outer, C * inner) matrix of its (outer, C, inner) view (no copy), if the small path
    takes it; else None. Every operation then runs over rows of C * inner elements, and a
    per-channel operand is one such row (`_pc`)."""
    if (type(x) is not np.ndarray or x.size > _SMALL_ELEMENTS or lay.perm is not None or x.size == 0
            or x.dtype not in _SMALL_DTYPES or not x.flags.c_contiguous):
        return None
    return x.reshape(lay.outer, lay.C * lay.inner)


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
    """(mean, var, c, c_mean) of a small view, flat (C,), the corrected two-pass of `_group_stats`
    (c = x - mean0 is kept for the forward); None if a statistic is not finite (the blocked path's
    overflow-safe recomputation takes over)."""
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


def _small_coefficients(invstd, gamma, beta, center, acc):
    """(scale, shift') of y = x_or_c * scale + shift', flat (C,), from the batch-norm affine with
    the center folded into the shift."""
    scale = invstd if gamma is None else invstd * gamma.reshape(-1).astype(acc, copy=False)
    if beta is None:
        return scale, np.negative(center * scale)
    return scale, np.subtract(beta.reshape(-1).astype(acc, copy=False), center * scale)


def _small_affine(v, scale, shift, shape):
    """v * scale + shift per channel (two passes, the first one allocating y), in x's shape."""
    y = np.multiply(v, _pc(v, scale))
    y += _pc(v, shift)
    return y.reshape(shape)


def _small_jit(x, lay: _Layout):
    """x as the C-contiguous (outer, C, inner) view that `gpu._jit`'s small-x loops take (one
    serial call for the whole op), when the small path takes x and Numba is there; else None."""
    if _small_view(x, lay) is None or not _jit.available():
        return None
    return x.reshape(lay.outer, lay.C, lay.inner)


def _jit_view(x, lay: _Layout, *others):
    """x (and `others`, arrays of x's shape) as C-contiguous (outer, C, inner) views for the
    compiled loops (`gpu._jit`), if they take this call: NumPy float32/float64 past the small path,
    no transposed copy needed, Numba installed; else None."""
    if (type(x) is not np.ndarray or x.size <= _SMALL_ELEMENTS or lay.perm is not None
            or x.dtype not in _SMALL_DTYPES or not x.flags.c_contiguous
            or any(type(o) is not np.ndarray or o.dtype != x.dtype or not o.flags.c_contiguous for o in others)
            or not _jit.available()):
        return None
    shape = (lay.outer, lay.C, lay.inner)
    return [a.reshape(shape) for a in (x,) + others]


def _flat(p, acc):
    """A per-channel array (kept or keepdims shape, or None) as a contiguous (C,) array of acc."""
    return None if p is None else np.ascontiguousarray(p.reshape(-1), dtype=acc)


def _cpu_stats(xp, x, lay: _Layout):
    x3 = _small_jit(x, lay)
    stats = None if x3 is None else _jit.small_stats(x3)
    if stats is not None:
        return stats[0].reshape(lay.kept_shape), stats[1].reshape(lay.kept_shape)
    v = _small_view(x, lay)
    if v is not None:
        stats = _small_stats(v, lay.m, lay.C)
        if stats is not None:
            return stats[0].reshape(lay.kept_shape), stats[1].reshape(lay.kept_shape)
    if _one_block(xp, x, lay):
        stats = _direct_stats(xp, x, lay, B.compute_dtype(x.dtype))
        if stats is not None:
            return stats[0].reshape(lay.kept_shape), stats[1].reshape(lay.kept_shape)
    blocks = _Blocks(xp, x, lay)
    mean, var = xp.empty(lay.keepdims_shape, blocks.acc), xp.empty(lay.keepdims_shape, blocks.acc)

    def group(p, slices):
        mean[p], var[p] = _group_stats(blocks, slices)

    blocks.each_group(group)
    return mean.reshape(lay.kept_shape), var.reshape(lay.kept_shape)


def _update_running(lay, mean, var, running_mean, running_var, momentum):
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


def _cpu_forward(xp, x, gamma, beta, running_mean, running_var, lay, eps, momentum):
    x3 = _small_jit(x, lay)
    if x3 is not None:
        # running statistics of x's dtype are updated inside the compiled call, others after it
        fused = running_mean is not None and all(
            r.dtype == x.dtype and r.flags.c_contiguous for r in (running_mean, running_var))
        out = _jit.small_forward(x3, gamma, beta, eps, (running_mean.reshape(-1), running_var.reshape(-1),
                                                        momentum, lay.m) if fused else None)
        if out is not None:
            y3, mean, var, invstd = out
            mean, var, invstd = mean.reshape(lay.kept_shape), var.reshape(lay.kept_shape), invstd.reshape(lay.kept_shape)
            if not fused:
                _update_running(lay, mean, var, running_mean, running_var, momentum)
            return y3.reshape(x.shape), mean, invstd
    v = _small_view(x, lay)
    stats = None if v is None else _small_stats(v, lay.m, lay.C)
    if stats is not None:
        mean, var, c, c_mean = stats
        invstd = _invstd(np, var, eps, x.dtype)
        scale, shift = _small_coefficients(invstd, gamma, beta, c_mean, x.dtype)
        c *= _pc(v, scale)                          # y = (c - c_mean) * scale + beta, in c
        c += _pc(v, shift)
        mean, var, invstd = mean.reshape(lay.kept_shape), var.reshape(lay.kept_shape), invstd.reshape(lay.kept_shape)
        _update_running(lay, mean, var, running_mean, running_var, momentum)
        return c.reshape(x.shape), mean, invstd
    views = _jit_view(x, lay)
    out = None if views is None else _jit.forward(views[0], _flat(gamma, x.dtype), _flat(beta, x.dtype), eps)
    if out is not None:
        y3, mean, var, invstd = out
        mean, var, invstd = mean.reshape(lay.kept_shape), var.reshape(lay.kept_shape), invstd.reshape(lay.kept_shape)
        _update_running(lay, mean, var, running_mean, running_var, momentum)
        return y3.reshape(x.shape), mean, invstd
    direct = _direct_forward(xp, x, gamma, beta, lay, eps) if _one_block(xp, x, lay) else None
    if direct is not None:
        y, mean, var, invstd = direct
        _update_running(lay, mean, var, running_mean, running_var, momentum)
        return y, mean, invstd
    blocks = _Blocks(xp, x, lay)
    acc = blocks.acc
    y = xp.empty(x.shape, x.dtype)
    mean, var, invstd = (xp.empty(lay.keepdims_shape, acc) for _ in range(3))

    def group(p, slices):
        mean[p], var[p] = _group_stats(blocks, slices)
        invstd[p] = _invstd(xp, var[p], eps, acc)
        blocks.affine(y, slices, mean[p], *_coefficients(invstd[p], gamma, beta, lay, acc, p))

    blocks.each_group(group)
    mean, var, invstd = (a.reshape(lay.kept_shape) for a in (mean, var, invstd))
    _update_running(lay, mean, var, running_mean, running_var, momentum)
    return y, mean, invstd


def _cpu_backward(xp, dy, x, gamma, mean, invstd, lay):
    # dx = k * (dy - dbeta/M - x_hat * dgamma/M) with k = gamma * invstd, x_hat = (x - mean) * invstd,
    # dbeta = sum(dy), dgamma = sum(dy * x_hat): dx = k * dy + a * (x - mean) + b, where
    # a = -k * invstd * dgamma / M and b = -k * dbeta / M.
    views = _jit_view(x, lay, dy)
    if views is not None:
        acc = x.dtype
        dx3, dgamma, dbeta = _jit.backward(views[1], views[0], _flat(mean, acc), _flat(invstd, acc),
                                           _flat(gamma, acc), 1.0 / lay.m)
        out_dtype = gamma.dtype if gamma is not None else x.dtype
        return (dx3.reshape(x.shape), dgamma.reshape(lay.kept_shape).astype(out_dtype, copy=False),
                dbeta.reshape(lay.kept_shape).astype(out_dtype, copy=False))
    if _one_block(xp, x, lay):
        return _direct_backward(xp, dy, x, gamma, mean, invstd, lay)
    blocks = _Blocks(xp, x, lay)
    acc = blocks.acc
    out_dtype = gamma.dtype if gamma is not None else x.dtype
    inv_m = acc.type(1.0 / lay.m)
    dx = xp.empty(x.shape, x.dtype)
    dgamma, dbeta = xp.empty(lay.keepdims_shape, acc), xp.empty(lay.keepdims_shape, acc)

    def group(p, slices):
        mu, istd = _per_feature(mean, lay, acc, p), _per_feature(invstd, lay, acc, p)

        def sums(sl):
            xmu = xp.subtract(x[sl], mu, out=blocks.scratch(0, sl))
            return _reduce(xp, lay, dy[sl]), _reduce(xp, lay, dy[sl], xmu)

        parts = blocks.map(sums, slices)
        dbeta[p] = sum(q[0] for q in parts)
        dgamma[p] = sum(q[1] for q in parts) * istd
        k = istd if gamma is None else istd * _per_feature(gamma, lay, acc, p)
        a, b = -k * istd * dgamma[p] * inv_m, -k * dbeta[p] * inv_m

        def apply(sl):
            blk = xp.subtract(x[sl], mu, out=blocks.out(dx, sl))
            blk *= a
            blk += b
            blk += xp.multiply(dy[sl], k, out=blocks.scratch(0, sl))
            _store(dx[sl], blk)

        blocks.map(apply, slices)

    blocks.each_group(group)
    return (dx, dgamma.reshape(lay.kept_shape).astype(out_dtype),
            dbeta.reshape(lay.kept_shape).astype(out_dtype))


def _direct_backward(xp, dy, x, gamma, mean, invstd, lay: _Layout):
    """`_cpu_backward` for an x of one block, the same formulas without the block engine."""
    acc = B.compute_dtype(x.dtype)
    out_dtype = gamma.dtype if gamma is not None else x.dtype
    inv_m = acc.type(1.0 / lay.m)
    mu, istd = _per_feature(mean, lay, acc, slice(None)), _per_feature(invstd, lay, acc, slice(None))
    xmu = xp.subtract(x, mu, dtype=acc)
    dbeta = dy.sum(axis=lay.axes, keepdims=True, dtype=acc)
    dgamma = _reduce(xp, lay, dy, xmu) * istd
    k = istd if gamma is None else istd * _per_feature(gamma, lay, acc, slice(None))
    xmu *= -k * istd * dgamma * inv_m                        # dx = a (x - mean) + b + k dy
    xmu += -k * dbeta * inv_m
    xmu += xp.multiply(dy, k, dtype=acc)
    dx = xmu if x.dtype == acc else xmu.astype(x.dtype)
    return (dx, dgamma.reshape(lay.kept_shape).astype(out_dtype),
            dbeta.reshape(lay.kept_shape).astype(out_dtype))


def _cpu_inference(xp, x, gamma, beta, running_mean, running_var, lay, eps):
    x3 = _small_jit(x, lay)
    if x3 is not None:
        return _jit.small_inference(x3, gamma, beta, running_mean, running_var, eps).reshape(x.shape)
    with np.errstate(all="ignore"):
        return _numpy_inference(xp, x, gamma, beta, running_mean, running_var, lay, eps)


def _numpy_inference(xp, x, gamma, beta, running_mean, running_var, lay, eps):
    v = _small_view(x, lay)
    if v is not None:
        acc = x.dtype
        rv = running_var.reshape(-1).astype(acc, copy=False)
        if eps > 0 and gamma is not None:           # scale = gamma / sqrt(rv + eps): one divide
            scale = np.divide(gamma.reshape(-1).astype(acc, copy=False), np.sqrt(rv + acc.type(eps)))
            gamma = None
        else:
            scale = _invstd(np, rv, eps, acc)
        return _small_affine(v, *_small_coefficients(scale, gamma, beta, running_mean.reshape(-1), acc), x.shape)
    if _one_block(xp, x, lay):
        acc = B.compute_dtype(x.dtype)
        rm, rv = _per_feature(running_mean, lay, acc, slice(None)), _per_feature(running_var, lay, acc, slice(None))
        scale, shift = _coefficients(_invstd(xp, rv, eps, acc), gamma, beta, lay, acc, slice(None))
        # y = (x - rm) * scale + shift = x * scale + (shift - rm * scale): two passes over x
        y = xp.multiply(x, scale, dtype=acc)
        y += -rm * scale if shift is None else shift - rm * scale
        return y if x.dtype == acc else y.astype(x.dtype)
    blocks = _Blocks(xp, x, lay)
    acc = blocks.acc
    y = xp.empty(x.shape, x.dtype)

    def group(p, slices):
        rm, rv = _per_feature(running_mean, lay, acc, p), _per_feature(running_var, lay, acc, p)
        blocks.affine(y, slices, rm, *_coefficients(_invstd(xp, rv, eps, acc), gamma, beta, lay, acc, p))

    blocks.each_group(group)
    return y


# ---------------------------------------------------------------------------------------------
# Kernel launch path (CuPy arrays; NumPy arrays under the emulator backend)
# ---------------------------------------------------------------------------------------------
#
# cuda_src/batch_norm.cu reduces a C-contiguous (outer, C, inner) view over (outer, inner); its
# header comment has the kernels, their launch shapes and the bytes each op moves. Here: the view
# (no copy for the four layouts of the module docstring and any axis whose kept axes are
# adjacent; a non-contiguous x, or kept axes separated by a reduced one, is first made into a
# contiguous (reduced..., kept...) copy), the launch plan, and the per-channel arrays, which the
# kernels take in the accumulation dtype (mixed parameter dtypes are converted here).

def _k(name: str) -> int:
    """A constant of cuda_src/batch_norm.cu (its ``#define``): the one source of block sizes,
    row counts and flags that the launch arithmetic must agree with."""
    return _kernels.family("batch_norm").constants[name]


@dataclass(frozen=True)
class _Tuning:
    """Launch knobs; tests override them (``_tuned``) to force every path at small sizes."""

    threads: int = 256             # block size of the streaming kernels (a power of two >= 32)
    max_cols: int = 32             # channels-last: most threads along C in a tile (power of two)
    blocks_per_sm: int | None = None  # resident blocks aimed for per SM (None: full occupancy)
    grid_rows: int | None = None   # force grid.y, the blocks sharing a tile's rows
    path: str = "auto"             # training forward: "auto", "onchip" (one block per tile),
                                   # "persistent" (x on chip across a cooperative grid) or "twopass"
    backward_path: str | None = None  # backward: the same choices (dy and x on chip; "twopass":
                                   # batch_norm_backward_reduce + _apply); None follows ``path``
    vector: bool | None = None     # False forces the scalar module; None: vectors where aligned


_TUNING = _DEFAULT_TUNING = _Tuning()


@contextlib.contextmanager
def _tuned(**knobs):
    """Override launch knobs inside the block (tests), e.g. ``_tuned(threads=64, path="twopass")``."""
    global _TUNING
    saved = _TUNING
    _TUNING = dataclasses.replace(saved, **knobs)
    try:
        yield
    finally:
        _TUNING = saved


class _View(NamedTuple):
    """x as the kernels see it (a tuple: built on every call, and cheaper than a dataclass)."""

    x: object                        # C-contiguous (outer, C, inner) array
    outer: int
    C: int
    inner: int
    shape: tuple[int, ...]           # shape of the array x3 was reshaped from
    perm: tuple[int, ...] | None     # transpose applied before the copy, if any
    aligned: bool                    # x starts on a 16-byte boundary

    def restore(self, y3):
        """An output of the view's shape back in the caller's layout."""
        y = y3.reshape(self.shape)
        return y if self.perm is None else y.transpose(tuple(int(i) for i in np.argsort(self.perm)))


def _view(xp, x, lay: _Layout) -> _View:
    """x as the C-contiguous (outer, C, inner) array of its layout."""
    if lay.perm is not None:
        x = x.transpose(lay.perm)
    shape = x.shape
    xc = xp.ascontiguousarray(x)
    return _View(xc.reshape(lay.outer, lay.C, lay.inner), lay.outer, lay.C, lay.inner, shape, lay.perm,
                 _launch.aligned(xc))


@dataclass(frozen=True)
class _Plan:
    vector: bool      # BN_VECTOR module: 16-byte vectors
    vec: int          # elements per vector
    bx: int           # threads along the contiguous axis
    threads: int      # block size
    tiles: int        # channels-last: C / (bx * vec) tiles; channels-first: C
    chunks: int       # channels-first: pieces of the inner axis per channel
    grid_rows: int    # grid.y
    smem: int         # dynamic shared memory of the reductions (and the on-chip kernels' row cache)
    cache_rows: int = 0   # on-chip kernels: rows per thread in the row cache, after the register rows

    @property
    def grid(self) -> tuple[int, int]:
        return (self.tiles * self.chunks, self.grid_rows)

    @property
    def parts(self) -> int:
        return self.chunks * self.grid_rows

    @property
    def defines(self) -> dict[str, int]:
        return {"BN_VECTOR": int(self.vector)}


def _smem(threads: int, vec: int, acc) -> int:
    """Dynamic shared memory of the reductions: a BnWelford<VEC> per thread, 1 + 3 VEC words
    (the backward's sums take 2 VEC)."""
    return threads * (1 + 3 * vec) * acc.itemsize


#: The kernels whose partials the streaming grid sizes: one wave of the more constrained of the two.
_REDUCTIONS = ("batch_norm_stats", "batch_norm_backward_reduce")


def _plan(dev, outer: int, C: int, inner: int, itemsize: int, acc, vector: bool, tune: _Tuning,
          resident=None) -> _Plan:
    """Block shape and grid of the streaming kernels for an (outer, C, inner) view; ``vector``:
    every element-wise operand is 16-byte aligned.

    grid.y is one wave of resident blocks over the tiles, so each tile's partials are as few as
    keep every SM busy: ``resident(vector, threads, smem)`` gives the blocks per SM of the
    reduction kernels (`_resident`: the occupancy calculator, registers included on a GPU); without
    it, threads alone decide (an upper bound: the partials buffer then holds more than one wave)."""
    vmax = 16 // itemsize
    n = C if inner == 1 else inner                 # contiguous run: a row of channels, or a plane
    vector = vector and n % vmax == 0
    if tune.vector is not None:
        vector = vector and tune.vector
    vec = vmax if vector else 1
    w = _launch.ceil_div(n, vec)                   # vectors per run
    T = tune.threads
    if inner == 1:
        # channels-last: a warp reads bx vectors of a row, 32/bx rows at once (bx < 32 for few
        # channels keeps every lane busy: C = 3 reads 8 rows per warp instruction)
        bx = min(_launch.pow2_ceil(w), tune.max_cols, T)
        tiles, chunks = _launch.ceil_div(w, bx), 1
    else:
        # channels-first: pick the chunk width wasting the fewest lanes on the plane's tail
        # (inner = 3136 floats = 784 vectors: 32 lanes x 25 chunks use 98%, 256 x 4 only 77%)
        hi = min(_launch.pow2_ceil(w), T)
        cands = [b for b in (1 << k for k in range(11)) if min(32, hi) <= b <= hi]
        bx = max(cands, key=lambda b: (w / (b * _launch.ceil_div(w, b)) + 0.02 * math.log2(b)))
        tiles, chunks = C, _launch.ceil_div(w, bx)
    by = max(32 // bx, min(T // bx, _launch.pow2_ceil(outer)))
    T = bx * by
    grid_rows = tune.grid_rows
    if grid_rows is None:
        per_sm = tune.blocks_per_sm
        if per_sm is None:
            per_sm = (resident(vector, T, _smem(T, vec, acc)) if resident is not None
                      else dev["max_threads_per_sm"] // T)
        grid_rows = (dev["sm_count"] * max(1, per_sm)) // (tiles * chunks)
    grid_rows = max(1, min(grid_rows, _launch.ceil_div(outer, by), dev["max_grid_dims"][1]))
    return _Plan(vector, vec, bx, T, tiles, chunks, grid_rows, _smem(T, vec, acc))


class _OnChip(NamedTuple):
    """An on-chip kernel: its name, the constant of its register rows, and the tensors it keeps on
    chip (x; or dy and x)."""

    kernel: str
    rows: str
    rows_16bit: str
    tensors: int

    def register_rows(self, dtype) -> int:
        return _k(self.rows if dtype.itemsize >= 4 else self.rows_16bit)

    def smem(self, threads: int, vec: int, itemsize: int, acc, cache_rows: int) -> int:
        """Dynamic shared memory: the reduction's area (a BnWelford<VEC> or BnGradSums<VEC> per
        thread), then the row cache (cache_rows vectors per thread and tensor)."""
        words = 1 + 3 * vec if self.tensors == 1 else 2 * vec
        return threads * (words * acc.itemsize + cache_rows * vec * itemsize * self.tensors)


_FORWARD_ONCHIP = _OnChip("batch_norm_forward_onchip", "BN_ONCHIP_ROWS", "BN_ONCHIP_ROWS", 1)
_BACKWARD_ONCHIP = _OnChip("batch_norm_backward_onchip", "BN_BACKWARD_ROWS", "BN_BACKWARD_ROWS_16BIT", 2)


def _onchip_geometry(xp, dtype, spec: _OnChip, p: _Plan, outer: int, gy: int, by_max: int, cooperative: bool):
    """The on-chip plan of gy blocks per tile (by threads along the rows, at most ``by_max``): each
    thread's rows in registers, then the row cache; None if its shared memory exceeds the block's
    limit (the opt-in limit for a cooperative grid, else the default 48 KiB: many waves of blocks
    keep their occupancy) or a cooperative grid does not fit the device at once."""
    rows = spec.register_rows(dtype)
    by = max(32 // p.bx, min(by_max, _launch.pow2_ceil(_launch.ceil_div(outer, gy * rows))))
    T = p.bx * by
    gy = max(1, min(gy, _launch.ceil_div(outer, by)))   # no block without rows
    cache = max(0, _launch.ceil_div(outer, gy * by) - rows)
    acc = B.compute_dtype(dtype)
    smem = spec.smem(T, p.vec, dtype.itemsize, acc, cache)
    plan = _Plan(p.vector, p.vec, p.bx, T, p.tiles, p.chunks if cooperative else 1, gy, smem, cache)
    k = _kernels.get_kernel("batch_norm", spec.kernel, xp, dtype, plan.defines)
    dev = _launch.device(xp)
    limit = dev["max_shared_memory_per_block_optin" if cooperative else "max_shared_memory_per_block"]
    if k.static_smem + smem > limit:
        return None
    if cooperative and plan.tiles * plan.parts > _kernels.max_cooperative_grid(k, T, smem):
        return None
    return plan


def _onchip_plan(xp, dtype, spec: _OnChip, p: _Plan, outer: int, inner: int) -> _Plan | None:
    """One block per tile holding all its rows (an ordinary launch), or None if they do not fit a
    block of at most BN_ONCHIP_THREADS threads: its register rows and a row cache within the
    default 48 KiB of shared memory."""
    if p.chunks != 1 or (inner == 1 and p.bx > _k("BN_MAX_COLS")):
        return None
    return _onchip_geometry(xp, dtype, spec, p, outer, 1, max(1, _k("BN_ONCHIP_THREADS") // p.bx), False)


def _persistent_plan(xp, dtype, spec: _OnChip, p: _Plan, outer: int, inner: int, tune: _Tuning) -> _Plan | None:
    """The cooperative on-chip plan: a tile's rows (and, channels-first, its chunks) spread over gy
    blocks of at most BN_ONCHIP_THREADS threads (capped by the ``threads`` knob), every block
    resident at once (``max_cooperative_grid``). First the register rows alone (the most blocks);
    where those cannot hold x, one wave of 2, then 1 block per SM with the rest of each thread's
    rows in the row cache (up to the opt-in shared memory: 227 KiB a block on an H100/H200). None
    if the tile's rows fit in neither. ``grid_rows`` forces gy."""
    if inner == 1 and p.bx > _k("BN_MAX_COLS"):
        return None
    by_max = max(1, min(tune.threads, _k("BN_ONCHIP_THREADS")) // p.bx)
    if tune.grid_rows:
        return _onchip_geometry(xp, dtype, spec, p, outer, tune.grid_rows, by_max, True)
    plan = _onchip_geometry(xp, dtype, spec, p, outer, _launch.ceil_div(outer, by_max * spec.register_rows(dtype)),
                            by_max, True)
    if plan is not None:
        return plan
    sm_count = _launch.device(xp)["sm_count"]
    for per_sm in (2, 1):
        gy = sm_count * per_sm // (p.tiles * p.chunks)
        plan = _onchip_geometry(xp, dtype, spec, p, outer, gy, by_max, True) if gy >= 1 else None
        if plan is not None:
            return plan
    return None


def _onchip_choice(xp, dev, p: _Plan, outer: int, inner: int, dtype, tune: _Tuning, spec: _OnChip,
                   path: str) -> _Plan | None:
    """The on-chip plan of the training forward (x read once) or of the backward (dy and x read
    once), or None for the two-kernel path.

    ``auto``: one block per tile when that costs no parallelism (the streaming grid has one block
    per tile anyway, or there are tiles enough to fill every SM); else the persistent grid if the
    rows fit on chip across the blocks the device holds at once; else two kernels. ``onchip`` /
    ``persistent`` force one of the two (ValueError if it does not fit), ``twopass`` two kernels.
    """
    if path == "twopass":
        return None
    if path in ("auto", "onchip"):
        plan = _onchip_plan(xp, dtype, spec, p, outer, inner)
        if path == "onchip" and plan is None:
            raise ValueError(f"path='onchip': a tile of {outer} rows does not fit one block")
        if plan is not None and (path == "onchip" or p.grid_rows == 1 or p.tiles >= dev["sm_count"]):
            return plan
    plan = _persistent_plan(xp, dtype, spec, p, outer, inner, tune)
    if path == "persistent" and plan is None:
        raise ValueError(f"path='persistent': {outer} rows x {p.tiles} tiles do not fit on chip across "
                         "the blocks the device holds at once")
    return plan


class _Plans:
    """The launch plans of one (view, dtype, alignment, device, knobs): the streaming plan, the
    training forward's on-chip plan (or None), and the kernels they launch, fetched once."""

    __slots__ = ("p", "onchip", "_xp", "_dtype", "_kernels", "_geometry")

    def __init__(self, xp, dtype, p: _Plan, onchip: _Plan | None):
        self.p, self.onchip, self._xp, self._dtype, self._kernels, self._geometry = p, onchip, xp, dtype, {}, {}

    def geometry(self, v: "_View", plan: _Plan) -> dict:
        """The size arguments of the streaming kernels (the view's shape is part of the key)."""
        g = self._geometry.get(id(plan))
        if g is None:
            g = self._geometry[id(plan)] = dict(outer=np.int64(v.outer), C=np.int32(v.C), inner=np.int64(v.inner),
                                                bx=np.int32(plan.bx), chunks=np.int32(plan.chunks))
        return g

    def scalars(self, v: "_View", acc) -> dict:
        """1/M and the unbiasing factor M/(M-1) of the statistics kernels (M = outer * inner)."""
        sc = self._geometry.get("scalars")
        if sc is None:
            m = v.outer * v.inner
            sc = self._geometry["scalars"] = dict(inv_m=acc.type(1.0 / m), unbias=acc.type(m / (m - 1) if m > 1 else 0.0))
        return sc

    def fixed(self, v: "_View", plan: _Plan, acc) -> dict:
        """The statistics kernels' arguments that the plan and the view fix: geometry and scalars."""
        f = self._geometry.get(("fixed", id(plan)))
        if f is None:
            f = self._geometry[("fixed", id(plan))] = self.geometry(v, plan) | self.scalars(v, acc)
        return f

    def kernel(self, name: str, plan: _Plan):
        k = self._kernels.get(name)
        if k is None:
            k = self._kernels[name] = _kernels.get_kernel("batch_norm", name, self._xp, self._dtype, plan.defines)
        return k


_PLANS = _launch.PlanCache()


def _resident(xp, dtype, vector: bool, threads: int, smem: int) -> int:
    """Blocks per SM that the reduction kernels (`_REDUCTIONS`) can each keep resident with
    ``threads`` threads and ``smem`` bytes of dynamic shared memory: the occupancy calculator
    (`max_cooperative_grid`; registers count on a GPU: 64 registers a thread at 256 threads allow 4
    blocks of float32, not the 8 that threads alone would), the lesser of the two."""
    dev = _launch.device(xp)
    most = min(_kernels.max_cooperative_grid(
        _kernels.get_kernel("batch_norm", name, xp, dtype, {"BN_VECTOR": int(vector)}), threads, smem)
        for name in _REDUCTIONS)
    return max(1, most // dev["sm_count"])


def _plans(xp, v: _View, dtype, vector: bool, op: str | None) -> _Plans:
    """The plans for this view, kept per shape, dtype, alignment, device and knobs; with the on-chip
    plan of ``op`` ("forward" or "backward"; None: the streaming plan alone)."""
    dev = _launch.device(xp)
    tune = _TUNING
    # the default knobs by identity (hashing the dataclass costs more than the rest of the key)
    key = (v.outer, v.C, v.inner, dtype, vector, op, id(dev), None if tune is _DEFAULT_TUNING else tune)

    def make():
        acc = B.compute_dtype(dtype)
        p = _plan(dev, v.outer, v.C, v.inner, dtype.itemsize, acc, vector, tune,
                  resident=lambda vec, T, smem: _resident(xp, dtype, vec, T, smem))
        onchip = None
        if op == "forward":
            onchip = _onchip_choice(xp, dev, p, v.outer, v.inner, dtype, tune, _FORWARD_ONCHIP, tune.path)
        elif op == "backward":
            onchip = _onchip_choice(xp, dev, p, v.outer, v.inner, dtype, tune, _BACKWARD_ONCHIP,
                                    tune.path if tune.backward_path is None else tune.backward_path)
        return _Plans(xp, dtype, p, onchip)

    return _PLANS.get(key, make)


def _as_acc(xp, p, acc):
    """A per-channel array (or None) as a contiguous array of the accumulation dtype."""
    if p is None or (p.ndim == 1 and p.dtype == acc and p.flags.c_contiguous):
        return p
    return xp.ascontiguousarray(p.reshape(-1), dtype=acc)


def _workspace(xp, p: _Plan, words: int, C: int, acc):
    """Partials and arrival counters of the grid merge (a 1-element stand-in when one block per
    tile needs none), from the stream's persistent workspace: nothing allocated or zeroed per
    call (the last block of each tile leaves its counter at zero)."""
    if p.parts == 1:               # never touched: the kernels skip the merge
        return _launch.dummy(xp, acc), _launch.dummy(xp, np.uint32)
    ws = _ws.get(xp)
    return ws.buffer("batch_norm.partials", acc, words * p.parts * C), ws.counters("batch_norm", p.tiles)


_FLAGS: dict[tuple[bool, bool, bool, bool], np.int32] = {}


def _flags(gamma=None, beta=None, running=None, cumulative: bool = False) -> np.int32:
    """The kernels' BN_HAS_GAMMA | BN_HAS_BETA | BN_RUNNING | BN_CUMULATIVE flags."""
    key = (gamma is not None, beta is not None, running is not None, cumulative)
    f = _FLAGS.get(key)
    if f is None:
        f = _FLAGS[key] = np.int32((_k("BN_HAS_GAMMA") if key[0] else 0) | (_k("BN_HAS_BETA") if key[1] else 0)
                                   | (_k("BN_RUNNING") if key[2] else 0) | (_k("BN_CUMULATIVE") if key[3] else 0))
    return f




def _stats_launch(xp, x, gamma, beta, running_mean, running_var, lay, eps, momentum, normalize, batches=None):
    """Statistics, optionally the normalized output: (y or None, mean, var, invstd), per-channel
    arrays flat in the accumulation dtype; running stats updated in place."""
    acc = B.compute_dtype(x.dtype)
    v = _view(xp, x, lay)
    C = v.C
    mean, var, invstd, scale, shift = B.empty(xp, (5, C), acc)    # one allocation, five rows
    if C == 0:                                  # nothing to launch over
        y = xp.empty(x.shape, x.dtype) if normalize else None
        return y, mean, var, invstd
    g, b = _as_acc(xp, gamma, acc), _as_acc(xp, beta, acc)
    rm, rv = _as_acc(xp, running_mean, acc), _as_acc(xp, running_var, acc)
    y3 = B.empty(xp, v.x.shape, x.dtype) if normalize else None
    # outputs come from the array library's allocator, 16-byte aligned: only x decides
    plans = _plans(xp, v, x.dtype, v.aligned, "forward" if normalize else None)
    p, onchip = plans.p, plans.onchip
    # absent arrays: a valid pointer the kernel never reads (the flags say so)
    named = {"mean": mean, "var": var, "invstd": invstd, "scale": scale, "shift": shift,
             "running_mean": rm if rm is not None else mean, "running_var": rv if rv is not None else mean,
             "x": v.x, "gamma": g if g is not None else mean, "beta": b if b is not None else mean,
             "eps": acc.type(eps), "momentum": acc.type(momentum or 0.0),
             "flags": _flags(g, b, rm, momentum is None and rm is not None),
             "batches": batches if batches is not None else _launch.dummy(xp, np.int64)}
    if onchip is not None:
        ws, _ = _workspace(xp, onchip, 4, C, acc)
        k = plans.kernel("batch_norm_forward_onchip", onchip)
        named.update(plans.fixed(v, onchip, acc), y=y3, ws=ws, cache_rows=np.int32(onchip.cache_rows))
        _kernels.launch(k, onchip.grid, onchip.threads, k.args_from(named), shared_mem=onchip.smem,
                        cooperative=onchip.parts > 1)
    else:
        ws, counters = _workspace(xp, p, 4, C, acc)
        k = plans.kernel("batch_norm_stats", p)
        named.update(plans.fixed(v, p, acc), ws=ws, counters=counters)
        _kernels.launch(k, p.grid, p.threads, k.args_from(named), shared_mem=p.smem)
        if normalize:
            _apply(plans, y3, v, mean, scale, shift)
    for r, r_k in ((running_mean, rm), (running_var, rv)):
        if r_k is not None and not (r.dtype == acc and r.flags.c_contiguous):   # else r_k is r's memory
            r[...] = r_k.reshape(r.shape)   # written back in the caller's dtype
    return (v.restore(y3) if normalize else None), mean, var, invstd


def _apply(plans: _Plans, y3, v: _View, center, scale, shift):
    """y = (x - center) * scale + shift per channel (forward second pass, inference)."""
    p = plans.p
    k = plans.kernel("batch_norm_apply", p)
    _kernels.launch(k, p.grid, p.threads, k.args(y=y3, x=v.x, center=center, scale=scale, shift=shift,
                                                 **plans.geometry(v, p)))


def _gpu_batch_stats(xp, x, lay):
    _, mean, var, _ = _stats_launch(xp, x, None, None, None, None, lay, 0.0, 0.0, normalize=False)
    return (mean.reshape(lay.kept_shape).astype(x.dtype, copy=False),
            var.reshape(lay.kept_shape).astype(x.dtype, copy=False))


def _gpu_forward(xp, x, gamma, beta, running_mean, running_var, lay, eps, momentum, batches):
    # momentum None: the kernel reads the (already incremented) count itself, so CuPy never syncs
    y, mean, _, invstd = _stats_launch(xp, x, gamma, beta, running_mean, running_var, lay, eps, momentum,
                                       normalize=True, batches=None if batches is None else batches.reshape(-1))
    return y, mean.reshape(lay.kept_shape), invstd.reshape(lay.kept_shape)


def _gpu_inference(xp, x, gamma, beta, running_mean, running_var, lay, eps):
    acc = B.compute_dtype(x.dtype)
    v = _view(xp, x, lay)
    y3 = B.empty(xp, v.x.shape, x.dtype)
    if v.C == 0:
        return v.restore(y3)
    scale, shift = _ws.get(xp).buffer("batch_norm.params", acc, 2 * v.C).reshape(2, v.C)   # scratch
    g, b = _as_acc(xp, gamma, acc), _as_acc(xp, beta, acc)
    rm, rv = _as_acc(xp, running_mean, acc), _as_acc(xp, running_var, acc)
    plans = _plans(xp, v, x.dtype, v.aligned, None)
    T = _k("BN_PARAMS_THREADS")
    k = plans.kernel("batch_norm_inference_params", plans.p)
    _kernels.launch(k, _launch.ceil_div(v.C, T), T,
                    k.args(scale=scale, shift=shift, gamma=g if g is not None else rv,
                           beta=b if b is not None else rv, running_var=rv, C=np.int32(v.C), eps=acc.type(eps),
                           flags=_flags(g, b)))
    _apply(plans, y3, v, rm, scale, shift)
    return v.restore(y3)


def _gpu_backward(xp, dy, x, gamma, mean, invstd, lay, sync=None):
    """``sync(dgamma, dbeta, k, a, b)``, given, runs between the two kernels (synchronized batch
    norm): it may rewrite a and b in place from the sums over every rank."""
    acc = B.compute_dtype(x.dtype)
    out_dtype = gamma.dtype if gamma is not None else x.dtype
    v = _view(xp, x, lay)
    vg = _view(xp, dy.astype(x.dtype, copy=False), lay)
    C = v.C
    dx3 = B.empty(xp, v.x.shape, x.dtype)
    dgamma, dbeta, k, a, b = B.empty(xp, (5, C), acc)              # one allocation, five rows
    if C > 0:
        mu, istd, g = _as_acc(xp, mean, acc), _as_acc(xp, invstd, acc), _as_acc(xp, gamma, acc)
        # synchronized batch norm rewrites the coefficients between two kernels: no on-chip path
        plans = _plans(xp, v, x.dtype, v.aligned and vg.aligned, "backward" if sync is None else None)
        p, onchip = plans.p, plans.onchip
        if onchip is not None:
            ws, _ = _workspace(xp, onchip, 2, C, acc)
            ko = plans.kernel("batch_norm_backward_onchip", onchip)
            _kernels.launch(ko, onchip.grid, onchip.threads, ko.args_from(plans.geometry(v, onchip) | {
                "dx": dx3, "dgamma": dgamma, "dbeta": dbeta, "ws": ws, "dy": vg.x, "x": v.x, "mean": mu,
                "invstd": istd, "gamma": g if g is not None else istd, "inv_m": plans.scalars(v, acc)["inv_m"],
                "flags": _flags(g), "cache_rows": np.int32(onchip.cache_rows)}),
                shared_mem=onchip.smem, cooperative=onchip.parts > 1)
        else:
            ws, counters = _workspace(xp, p, 2, C, acc)
            geo = plans.geometry(v, p)
            kr = plans.kernel("batch_norm_backward_reduce", p)
            _kernels.launch(kr, p.grid, p.threads, kr.args_from(geo | {
                "dgamma": dgamma, "dbeta": dbeta, "k": k, "a": a, "b": b, "ws": ws, "counters": counters,
                "dy": vg.x, "x": v.x, "mean": mu, "invstd": istd, "gamma": g if g is not None else istd,
                "inv_m": plans.scalars(v, acc)["inv_m"], "flags": _flags(g)}), shared_mem=p.smem)
            if sync is not None:
                sync(dgamma, dbeta, k, a, b)
            ka = plans.kernel("batch_norm_backward_apply", p)
            _kernels.launch(ka, p.grid, p.threads, ka.args_from(geo | {
                "dx": dx3, "dy": vg.x, "x": v.x, "mean": mu, "k": k, "a": a, "b": b}))
    return (v.restore(dx3), dgamma.reshape(lay.kept_shape).astype(out_dtype, copy=False),
            dbeta.reshape(lay.kept_shape).astype(out_dtype, copy=False))


# ---------------------------------------------------------------------------------------------
# Synchronized batch norm across processes (comm=)
# ---------------------------------------------------------------------------------------------
#
# Forward: each rank computes its (count, mean, M2) per channel with the paths above, packs
# [header | count | mean | M2] into one float64 buffer, and ONE allgather gives every rank every
# rank's buffer; `_merge_stats` combines them in rank order. Backward: ONE all-reduce (sum) of
# [checks | count | sum dy | sum dy * xhat]. Buffers are float64 whatever x's dtype: counts are
# exact to 2^53, the merge cancels nothing, and a rank with another dtype sends a buffer of the
# same length (so its header reports it, instead of the engine failing on a length mismatch).
#
# Lengths must agree for a collective to be well formed (MPI truncates, gloo aborts the process),
# and they depend on C: the first call with a given C on a communicator exchanges the header
# alone (fixed length) so that a rank with another C gets a ValueError on every rank; after that
# one collective per call. On a device-resident result (NCCL, CUDA-aware MPI) the header is
# checked on the device without a host sync: the statistics become NaN and the ValueError is
# raised by the next synchronized call on that communicator, once the flag is on the host.

_SYNC_MAGIC = 1.0 + 2.0 ** -20 + 4093.0      # not a plausible count, mean or small integer
_SYNC_VERSION = 1.0
_SYNC_HEADER = 7                              # magic, version, op, C, dtype code, comm size, rank
_SYNC_OPS = {"forward": 1.0, "handshake": 2.0}
_SYNC_CHECKS = 6                              # backward: 1, C, C^2, code, code^2, count
_SYNC_DTYPES = ("float16", "bfloat16", "float32", "float64")
_SYNC_PREFIX: dict[tuple, object] = {}        # device copies of header + count, by key


def _communicator(comm):
    from .. import distributed
    return distributed.wrap(comm)


def _dtype_code(dtype) -> float:
    return float(_SYNC_DTYPES.index(np.dtype(dtype).name) + 1)


def _sync_header(op: str, C: int, dtype, comm) -> np.ndarray:
    return np.array([_SYNC_MAGIC, _SYNC_VERSION, _SYNC_OPS[op], C, _dtype_code(dtype), comm.size,
                     comm.rank], np.float64)


def _device_const(xp, key, make):
    """A small float64 array made on the host once per key and kept on xp's device (a copy from
    pageable host memory would synchronize the stream every call)."""
    if xp is np:
        return make()
    a = _SYNC_PREFIX.get(key)
    if a is None:
        if len(_SYNC_PREFIX) > 1024:
            _SYNC_PREFIX.clear()
        a = _SYNC_PREFIX[key] = xp.asarray(make())
    return a


def _header_problem(head: np.ndarray, C: int, dtype, comm, what: str) -> str | None:
    """Why the gathered headers (size, _SYNC_HEADER) disagree with this rank's, or None. The
    message names the first rank that differs and is the same on every rank."""
    names = {1: "float16", 2: "bfloat16", 3: "float32", 4: "float64"}
    for r, h in enumerate(head):
        if h[0] != _SYNC_MAGIC or h[1] != _SYNC_VERSION or h[2] != head[0][2]:
            return (f"{what}: rank {r} sent something else than this collective's statistics (ranks "
                    "call different collectives on this communicator, or another version)")
        if h[5] != comm.size or h[6] != r:
            return (f"comm: rank {r} calls with a communicator of size {h[5]:g} as rank {h[6]:g}, "
                    f"this one has size {comm.size} ({what})")
    for r, h in enumerate(head):
        if h[3] != head[0][3]:
            return (f"x: the channel count differs across ranks: rank 0 has {head[0][3]:g}, rank {r} "
                    f"has {h[3]:g} ({what})")
        if h[4] != head[0][4]:
            return (f"x: the dtype differs across ranks: rank 0 has {names.get(int(head[0][4]))}, rank {r} "
                    f"has {names.get(int(h[4]))} ({what})")
    return None


def _raise_pending(comm) -> None:
    """Raise the ValueError of an earlier device-side check whose flag has reached the host."""
    keep = []
    for flag, event, message in comm.pending:
        if not event.done:
            keep.append((flag, event, message))
        elif not bool(flag[0]):
            comm.pending = []
            raise ValueError(message)
    comm.pending = keep


def _defer_check(xp, comm, ok, message: str) -> None:
    """Copy the device flag `ok` to pinned host memory without waiting; checked by a later call."""
    import cupyx
    host = cupyx.empty_pinned((1,), np.bool_)
    ok.reshape(1).get(out=host, blocking=False)
    event = xp.cuda.Event()
    event.record()
    comm.pending.append((host, event, message))


def _handshake(xp, comm, C: int, dtype, what: str) -> None:
    """The first call with channel count C on `comm`: exchange the header alone, a buffer of the
    same length on every rank whatever its C, so that a mismatch is a ValueError everywhere."""
    _raise_pending(comm)
    if C in comm.verified:
        return
    hdr = _sync_header("handshake", C, dtype, comm)
    got = comm.allgather(hdr if xp is np else xp.asarray(hdr), f"{what} (header exchange)")
    got = got if type(got) is np.ndarray else got.get()
    problem = _header_problem(got, C, dtype, comm, what)
    if problem:
        raise ValueError(problem)
    comm.verified.add(C)


def _local_stats(xp, kernels: bool, x, lay: _Layout):
    """This rank's (mean, var) per channel, flat in the accumulation dtype; zeros for no rows."""
    acc = B.compute_dtype(x.dtype)
    if lay.m == 0:
        return xp.zeros(lay.C, acc), xp.zeros(lay.C, acc)
    if kernels:
        _, mean, var, _ = _stats_launch(xp, x, None, None, None, None, lay, 0.0, 0.0, normalize=False)
        return mean, var
    with np.errstate(all="ignore"):
        mean, var = _cpu_stats(xp, x, lay)
    return mean.reshape(-1), var.reshape(-1)


def _merge_stats(xp, gathered, C: int):
    """Chan's merge of the ranks' (count, mean, M2) rows of `gathered` (size, header + 1 + 2C),
    float64: (N, mean, var) with var the biased variance of the concatenated batch.

    Written as the merge's closed form, mean = sum_r n_r mean_r / N and
    M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2, reduced over the rank axis in rank order: the
    same array on every rank gives bitwise the same result on every rank, whichever rank was
    fastest, with two reductions instead of size sequential merges (a kernel launch each on a GPU).
    Ranks with no rows (n_r = 0, mean_r = M2_r = 0) add nothing. N = 0 gives NaN.
    """
    H = _SYNC_HEADER
    n = gathered[:, H:H + 1]
    means, m2 = gathered[:, H + 1:H + 1 + C], gathered[:, H + 1 + C:H + 1 + 2 * C]
    N = n.sum()
    with np.errstate(all="ignore"):
        mean = (n * means).sum(axis=0) / N
        d = means - mean
        var = (m2.sum(axis=0) + (n * d * d).sum(axis=0)) / N
    return N, mean, var


def _sync_stats(xp, kernels: bool, x, lay: _Layout, comm, what: str):
    """(N, mean, var) of the batch concatenated over the ranks, float64: N a host float on the
    NumPy path, a device scalar on the device path (no synchronization)."""
    C = lay.C
    _handshake(xp, comm, C, x.dtype, what)
    mean, var = _local_stats(xp, kernels, x, lay)
    H = _SYNC_HEADER
    buf = xp.empty(H + 1 + 2 * C, np.float64)
    buf[:H + 1] = _device_const(xp, ("fwd", C, x.dtype.name, comm.size, comm.rank, lay.m), lambda: np.append(
        _sync_header("forward", C, x.dtype, comm), float(lay.m)))
    buf[H + 1:H + 1 + C] = mean
    xp.multiply(var, float(lay.m), out=buf[H + 1 + C:])        # M2 = var * count
    got = comm.allgather(buf, what)
    N, gmean, gvar = _merge_stats(xp, got, C)
    if type(got) is np.ndarray:
        problem = _header_problem(got[:, :H], C, x.dtype, comm, what)
        if problem:
            raise ValueError(problem)
        N = float(N)
        if N == 0:
            raise ValueError(f"x: empty reduction on every rank: no rows to take statistics of ({what})")
    else:
        expect = _device_const(xp, ("head", C, x.dtype.name, comm.size), lambda: _sync_heads(C, x.dtype, comm))
        ok = (got[:, :H] == expect).all()
        gmean, gvar = xp.where(ok, gmean, np.nan), xp.where(ok, gvar, np.nan)
        _defer_check(xp, comm, ok, f"{what}: ranks disagree on the dtype or the communicator (the "
                     "statistics of that call were NaN)")
    return N, gmean, gvar


def _sync_heads(C, dtype, comm):
    """The expected gathered headers (size, _SYNC_HEADER): this rank's with each rank's number."""
    head = np.stack([_sync_header("forward", C, dtype, comm)] * comm.size)
    head[:, 6] = np.arange(comm.size)
    return head


def _sync_batch_stats(x, axis, comm):
    comm = _communicator(comm)
    xp, kernels = B.dispatch(x=x)
    x = B.as_float_array(xp, x, "x")
    lay = _layout(x, axis, allow_empty=True)
    _, mean, var = _sync_stats(xp, kernels, x, lay, comm, "batch_stats")
    return mean.reshape(lay.kept_shape).astype(x.dtype), var.reshape(lay.kept_shape).astype(x.dtype)


def _sync_forward(x, gamma, beta, axis, eps, running_mean, running_var, momentum, num_batches_tracked, comm):
    comm = _communicator(comm)
    xp, kernels = B.dispatch(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    x = B.as_float_array(xp, x, "x")
    lay = _layout(x, axis, allow_empty=True)       # a rank may have no rows
    gamma, beta = _params(xp, lay, gamma=gamma, beta=beta)
    running_mean, running_var = _check_running(xp, lay, running_mean, running_var)
    eps = B.check_real(eps, "eps", lo=0.0)
    momentum = _check_batches(xp, num_batches_tracked, momentum, running_mean)
    acc = B.compute_dtype(x.dtype)
    N, mean64, var64 = _sync_stats(xp, kernels, x, lay, comm, "batch_norm_forward")
    if running_mean is not None and xp is np and N == 1:
        raise ValueError("x: expected more than 1 value per feature over all ranks when training with "
                         "running stats (1 in all)")
    mean, var = mean64.astype(acc), var64.astype(acc)
    invstd = _invstd(xp, var, eps, acc)
    kept = lay.kept_shape
    if lay.m == 0:
        y = xp.empty(x.shape, x.dtype)
    elif kernels:
        y = _gpu_inference(xp, x, gamma, beta, mean, var, lay, eps)
    else:
        with np.errstate(all="ignore"):
            y = _cpu_inference(xp, x, *_kept(lay, gamma, beta), mean.reshape(kept), var.reshape(kept), lay, eps)
    if num_batches_tracked is not None:
        num_batches_tracked += 1            # before the update, as torch's module
    if running_mean is not None:
        # the unbiased variance with the GLOBAL count (torch's SyncBatchNorm once used the local one)
        if momentum is None:
            mom = 1.0 / num_batches_tracked.reshape(()).astype(np.float64)
        else:
            mom = momentum
        with np.errstate(all="ignore"):
            unbiased = var64 * (N / (N - 1))
            running_mean[...] = ((1 - mom) * running_mean.reshape(-1) + mom * mean64).reshape(running_mean.shape)
            running_var[...] = ((1 - mom) * running_var.reshape(-1) + mom * unbiased).reshape(running_var.shape)
    return y, mean.reshape(kept), invstd.reshape(kept)


def _backward_checks(C: int, dtype, m: int) -> np.ndarray:
    """The backward's check and count slots, summed over the ranks by the all-reduce: with P ranks
    the sums are (P, sum C, sum C^2, sum code, sum code^2, N). The C_r all equal C exactly when
    sum C = P C and P sum C^2 = (sum C)^2 (and the same for the dtype code); the sums are the same
    on every rank, so each rank finds the mismatch. An allgather of a header would say which rank
    differs, at P times the bytes of this 6-slot prefix: the forward's header says that already."""
    code = _dtype_code(dtype)
    return np.array([1.0, C, C * C, code, code * code, m], np.float64)


def _checks_problem(s: np.ndarray, C: int, dtype, comm, what: str) -> str | None:
    P = s[0]
    if P != comm.size:
        return f"comm: {P:g} ranks took part, this rank's communicator has size {comm.size} ({what})"
    if s[1] != P * C or s[2] * P != s[1] * s[1]:
        return f"x: the channel count differs across ranks (this rank has {C}; {what})"
    code = _dtype_code(dtype)
    if s[3] != P * code or s[4] * P != s[3] * s[3]:
        return f"x: the dtype differs across ranks (this rank has {np.dtype(dtype).name}; {what})"
    return None


def _sync_sums(xp, comm, dbeta, dgamma, x, lay: _Layout, what: str):
    """ONE all-reduce of [checks | count | dbeta | dgamma]: (N, dbeta, dgamma) summed over ranks."""
    C, S = lay.C, _SYNC_CHECKS
    buf = xp.empty(S + 2 * C, np.float64)
    buf[:S] = _device_const(xp, ("bwd", C, x.dtype.name, lay.m), lambda: _backward_checks(C, x.dtype, lay.m))
    buf[S:S + C] = dbeta
    buf[S + C:] = dgamma
    got = comm.allreduce(buf, what)
    if type(got) is np.ndarray:
        problem = _checks_problem(got[:S], C, x.dtype, comm, what)
        if problem:
            raise ValueError(problem)
        return float(got[S - 1]), got[S:S + C], got[S + C:]
    expect = _device_const(xp, ("bwdsum", C, x.dtype.name, comm.size), lambda: (
        lambda c: np.array([comm.size, comm.size * C, comm.size * C * C, comm.size * c, comm.size * c * c]))(
            _dtype_code(x.dtype)))
    ok = (got[:S - 1] == expect).all()
    _defer_check(xp, comm, ok, f"{what}: ranks disagree on the channel count, dtype or communicator")
    nan = xp.where(ok, 0.0, np.nan)
    return got[S - 1], got[S:S + C] + nan, got[S + C:] + nan


def _sync_backward(dy, x, gamma, mean, invstd, axis, comm):
    comm = _communicator(comm)
    xp, kernels = B.dispatch(dy=dy, x=x, gamma=gamma, mean=mean, invstd=invstd)
    x = B.as_float_array(xp, x, "x")
    dy = B.as_float_array(xp, dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"dy: shape {dy.shape} does not match x's shape {x.shape}")
    lay = _layout(x, axis, allow_empty=True)
    gamma, mean, invstd = _params(xp, lay, gamma=gamma, mean=mean, invstd=invstd)
    if mean is None or invstd is None:
        raise TypeError("mean, invstd: required (pass those returned by batch_norm_forward)")
    what = "batch_norm_backward"
    _handshake(xp, comm, lay.C, x.dtype, what)
    acc = B.compute_dtype(x.dtype)
    out_dtype = gamma.dtype if gamma is not None else x.dtype
    if kernels and lay.m > 0:
        def sync(dgamma, dbeta, k, a, b):
            # a, b of the kernel's dx = k dy + a (x - mean) + b, from the global sums and count
            N, dbeta_g, dgamma_g = _sync_sums(xp, comm, dbeta, dgamma, x, lay, what)
            istd = _as_acc(xp, invstd, acc)
            a[...] = -k * istd * (dgamma_g / N)
            b[...] = -k * (dbeta_g / N)
        return _gpu_backward(xp, dy, x, gamma, mean, invstd, lay, sync=sync)
    kept = lay.kept_shape
    g, mu, istd = (_per_feature(p, lay, acc, slice(None)) for p in (gamma, mean, invstd))
    if lay.m > 0:
        with np.errstate(all="ignore"):
            xmu = xp.subtract(x, mu, dtype=acc)
            dbeta = dy.sum(axis=lay.axes, keepdims=True, dtype=acc)
            dgamma = _reduce(xp, lay, dy, xmu) * istd
    else:
        xmu = None
        dbeta = dgamma = xp.zeros(lay.keepdims_shape, acc)
    N, dbeta_g, dgamma_g = _sync_sums(xp, comm, dbeta.reshape(-1), dgamma.reshape(-1), x, lay, what)
    if lay.m == 0:
        dx = xp.empty(x.shape, x.dtype)
    else:
        with np.errstate(all="ignore"):
            k = istd if g is None else istd * g
            a = (-k * istd * (dgamma_g.reshape(lay.keepdims_shape) / N)).astype(acc)
            b = (-k * (dbeta_g.reshape(lay.keepdims_shape) / N)).astype(acc)
            xmu *= a                                     # dx = a (x - mean) + b + k dy
            xmu += b
            xmu += xp.multiply(dy, k, dtype=acc)
        dx = xmu if x.dtype == acc else xmu.astype(x.dtype)
    return dx, dgamma.reshape(kept).astype(out_dtype), dbeta.reshape(kept).astype(out_dtype)
