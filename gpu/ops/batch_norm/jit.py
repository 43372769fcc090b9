"""The NumPy path's compiled batch-norm loops (the optional ``cpu-jit`` extra: Numba).

NumPy cannot fuse: its training forward crosses x four times (sum, centred sums, scale, shift)
and its backward six, each pass a separate loop over memory or cache. These Numba loops take
each phase in one pass over memory, as PyTorch's CPU kernels do:

    forward   statistics: x read once (each block twice, the second time from cache);
              normalize: x read, y written                                  3 E*s
    backward  sums of dy and dy * (x - mean): dy and x read once;
              dx = k * dy + a * (x - mean) + b: dy, x read, dx written      5 E*s

The epilogue rides in the same passes: the normalize pass reads the residual and applies the relu
as it writes y (4 E*s); with relu the backward's two passes read y with dy and mask it (y > 0),
and the second writes dresidual with dx (8 E*s).

Each phase is a prange over row blocks (``gpu._cpu``'s ~1 MiB) on Numba's threads (OpenMP or
TBB: workers that spin between regions, as PyTorch's; the NumPy path's Python pool, whose workers
are woken per call, started a share hundreds of microseconds late on a VM), ``gpu._cpu.threads()``
of them; every block leaves its own partial, combined in block order. Numerics follow the NumPy
path: statistics by a two-pass within each block (its mean, then its centred sum of squares, from
cache) in float64, merged across blocks by Chan's formula; the backward's sums in x's dtype within
a block, float64 across blocks: bitwise the same for any number of threads. A non-finite statistic
returns None and the NumPy path (overflow-safe, PyTorch's special values) computes the call instead.

Small x (the NumPy path's small-x switch, at most 128K elements) takes one serial compiled call per
op (statistics, the training forward with the running statistics, inference): there NumPy's cost
is per call, about 20 ufunc and BLAS calls against one.

Used by the NumPy path (``numpy_path.py``: its "small-jit" and "jit" strategies) for C-contiguous
float32/float64 x, when Numba imports and ``GPU_CPU_JIT`` is not ``0``. The NumPy path stays the
reference: the tests run both (tests/test_batch_norm_jit.py, skipped without Numba). The loops
themselves are in ``jit_loops.py``, module-level functions so that Numba's disk cache keeps every
one of them; they compile on first use.
"""
from __future__ import annotations

import threading

import numpy as np

from gpu import _backend as B, _cpu

_kernels = None
_numba = None


def available() -> bool:
    """Whether the compiled loops can run: Numba imports and ``GPU_CPU_JIT`` is not ``0``."""
    if B.env("GPU_CPU_JIT", "1") == "0":
        return False
    return _load() is not None


def _load():
    global _kernels, _numba
    if _kernels is None:
        try:
            import numba
        except ImportError:
            _kernels = False
            return None
        _numba = numba
        _kernels = _build(numba)
    return _kernels or None


def _build(nb):
    from . import jit_loops
    return {name: f for name, f in vars(jit_loops).items() if isinstance(f, nb.core.dispatcher.Dispatcher)}


def _sub(item_bytes: int) -> int:
    """Rows (or planes) per block: about _cpu.BLOCK_BYTES, so that a block stays in cache between
    the two reads of the statistics. Blocks, not threads, set the merge order."""
    return max(1, _cpu.BLOCK_BYTES // max(1, item_bytes))


_par_lock = threading.Lock()


def _par(name: str, *args):
    """Run driver `name` on ``gpu._cpu.threads()`` of Numba's threads. One call at a time: Numba's
    workqueue layer (without OpenMP or TBB) must not be entered by two threads at once, and two
    teams on the same cores would only share them."""
    with _par_lock:
        _numba.set_num_threads(max(1, min(_cpu.threads(), _numba.config.NUMBA_NUM_THREADS)))
        return _kernels[name](*args)


def _stats(k, x3):
    """(mean, biased var) per channel, float64."""
    outer, C, inner = x3.shape
    if inner == 1:
        x = x3.reshape(outer, C)
        sub = _sub(C * x.itemsize)
        nb = -(-outer // sub)
        pm, pq = np.empty((nb, C)), np.empty((nb, C))
        _par("par_rows_stats", x, sub, pm, pq)
        counts = np.full(nb, float(sub))
        counts[-1] = outer - (nb - 1) * sub
        mean, m2 = k["chan_merge"](pm, pq, counts)
        return mean, m2 / outer
    x = x3.reshape(outer * C, inner)
    pm, pq = np.empty(outer * C), np.empty(outer * C)
    _par("par_planes_stats", x, _sub(inner * x.itemsize), pm, pq)
    mean, m2 = k["chan_merge"](pm.reshape(outer, C), pq.reshape(outer, C), np.full(outer, float(inner)))
    return mean, m2 / (outer * inner)


def _param(p, C: int, dtype, fill: float):
    """A (C,) per-channel array of dtype for the loops (``fill`` for None): contiguous, writeable
    (Numba compiles read-only arrays as another type)."""
    if p is None:
        return np.full(C, fill, dtype)
    a = p.reshape(-1)
    if a.dtype != dtype or not (a.flags.c_contiguous and a.flags.writeable):
        a = np.array(a, dtype)
    return a


def small_stats(x3):
    """(mean, biased var) per channel of a small C-contiguous (outer, C, inner) float32/float64
    view in one serial call, (C,) arrays of x's dtype; None when one is not finite."""
    mean, var = np.empty(x3.shape[1], x3.dtype), np.empty(x3.shape[1], x3.dtype)
    return (mean, var) if _load()["small_stats"](x3, mean, var) else None


def small_forward(x3, gamma, beta, eps: float, running=None, r3=None, relu: bool = False):
    """`forward` for a small x, one serial call: (y3, mean, var, invstd) or None; the epilogue
    y = act(bn(x) + r3) (r3: x's shape and dtype, C-contiguous, or None). ``running``:
    (running_mean, running_var, momentum, M), the two (C,) C-contiguous arrays of x's dtype, to be
    updated in place as the NumPy path does (with M / (M - 1) for the
    variance); not touched when None is returned."""
    C, dt = x3.shape[1], x3.dtype
    y3 = np.empty_like(x3)
    mean, var, invstd = np.empty(C, dt), np.empty(C, dt), np.empty(C, dt)
    if running is None:
        rm = rv = np.empty(0, dt)
        momentum = m = 2
    else:
        rm, rv, momentum, m = running
    if not _load()["small_forward"](y3, mean, var, invstd, x3, x3 if r3 is None else r3, _param(gamma, C, dt, 1.0),
                                    _param(beta, C, dt, 0.0), dt.type(eps), rm, rv, dt.type(1 - momentum),
                                    dt.type(momentum), dt.type(m / (m - 1)), r3 is not None, relu):
        return None
    return y3, mean, var, invstd


def small_inference(x3, gamma, beta, running_mean, running_var, eps: float, r3=None, relu: bool = False):
    """Inference for a small x, one serial call: y3. Per-channel arrays in any float dtype (or
    None for gamma, beta); the epilogue as `small_forward`'s."""
    C, dt = x3.shape[1], x3.dtype
    y3 = np.empty_like(x3)
    _load()["small_inference"](y3, x3, x3 if r3 is None else r3, _param(gamma, C, dt, 1.0), _param(beta, C, dt, 0.0),
                               _param(running_mean, C, dt, 0.0), _param(running_var, C, dt, 0.0), dt.type(eps),
                               r3 is not None, relu)
    return y3


def forward(x3, gamma, beta, eps: float, r3=None, relu: bool = False):
    """Training forward of a C-contiguous (outer, C, inner) float32/float64 view. Returns
    (y3, mean, var, invstd), per-channel arrays (C,) in x's dtype, or None when a statistic is not
    finite (the NumPy path then computes the call). gamma, beta: (C,) arrays of x's dtype or None;
    the epilogue y = act(bn(x) + r3) in the normalize pass (r3 as x3, or None)."""
    k = _load()
    mean, var = _stats(k, x3)
    if not (np.isfinite(mean).all() and np.isfinite(var).all()):
        return None
    acc = x3.dtype
    mean, var = mean.astype(acc), var.astype(acc)
    with np.errstate(divide="ignore"):
        invstd = np.where(var + acc.type(eps) == 0, acc.type(0), 1 / np.sqrt(var + acc.type(eps))).astype(acc)
    scale = invstd if gamma is None else (invstd * gamma).astype(acc, copy=False)
    shift = np.zeros_like(mean) if beta is None else beta
    y3 = np.empty_like(x3)
    outer, C, inner = x3.shape
    shape = (outer, C) if inner == 1 else (outer * C, inner)
    x, y, r = x3.reshape(shape), y3.reshape(shape), (x3 if r3 is None else r3).reshape(shape)
    ep = (r3 is not None, relu, acc.type(0))
    if inner == 1:
        _par("par_rows_affine", y, x, r, mean, scale, shift, _sub(C * x.itemsize), *ep)
    else:
        _par("par_planes_affine", y, x, r, mean, scale, shift, _sub(inner * x.itemsize), C, *ep)
    return y3, mean, var, invstd


def backward(dy3, x3, mean, invstd, gamma, inv_m, y3=None, residual_grad: bool = False):
    """(dx3, dgamma, dbeta, dres3) of a (outer, C, inner) view, x's dtype; mean, invstd, gamma (or
    None): (C,) arrays of x's dtype. ``y3`` (the forward's output, as x3): relu's mask, dy taken
    where y > 0; ``residual_grad``: dres3 = the masked dy (else None)."""
    _load()                                         # the compiled loops, for _par
    acc = x3.dtype
    outer, C, inner = x3.shape
    relu, zero = y3 is not None, acc.type(0)
    shape = (outer, C) if inner == 1 else (outer * C, inner)
    x, dy, y = x3.reshape(shape), dy3.reshape(shape), (x3 if y3 is None else y3).reshape(shape)
    if inner == 1:
        sub = _sub((3 if relu else 2) * C * x.itemsize)
        nb = -(-outer // sub)
        ps, pd = np.empty((nb, C)), np.empty((nb, C))
        _par("par_rows_grad_sums", dy, x, y, mean, sub, ps, pd, relu, zero)
        sdy, sdx = ps.sum(0), pd.sum(0)             # block order: the same bits for any threads
    else:
        sub = _sub((3 if relu else 2) * inner * x.itemsize)
        ps, pd = np.empty(outer * C), np.empty(outer * C)
        _par("par_planes_grad_sums", dy, x, y, mean, sub, C, ps, pd, relu, zero)
        sdy, sdx = ps.reshape(outer, C).sum(0), pd.reshape(outer, C).sum(0)
    dbeta = sdy.astype(acc)
    dgamma = (sdx * invstd).astype(acc)
    kk = invstd if gamma is None else (invstd * gamma).astype(acc, copy=False)
    a = (-kk * invstd * dgamma * acc.type(inv_m)).astype(acc, copy=False)
    b = (-kk * dbeta * acc.type(inv_m)).astype(acc, copy=False)
    dx3 = np.empty_like(x3)
    dres3 = np.empty_like(x3) if residual_grad else None
    dx = dx3.reshape(x.shape)
    dres = dx if dres3 is None else dres3.reshape(x.shape)
    if inner == 1:
        _par("par_rows_grad_apply", dx, dres, dy, x, y, mean, kk, a, b, sub, relu, residual_grad, zero)
    else:
        _par("par_planes_grad_apply", dx, dres, dy, x, y, mean, kk, a, b, sub, C, relu, residual_grad, zero)
    return dx3, dgamma, dbeta, dres3
