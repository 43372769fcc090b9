"""The NumPy path's compiled batch-norm loops (the optional ``cpu-jit`` extra: Numba).

NumPy cannot fuse: its training forward crosses x four times (sum, centred sums, scale, shift)
and its backward six, each pass a separate loop over memory or cache. These Numba loops take
each phase in one pass over memory, as PyTorch's CPU kernels do:

    forward   statistics: x read once (each block twice, the second time from cache);
              normalize: x read, y written                                  3 E*s
    backward  sums of dy and dy * (x - mean): dy and x read once;
              dx = k * dy + a * (x - mean) + b: dy, x read, dx written      5 E*s

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

Used by ``gpu.ops.batch_norm`` for C-contiguous float32/float64 x on the NumPy path, when Numba
imports and ``GPU_CPU_JIT`` is not ``0``. The NumPy path stays the reference: the tests run
both (tests/test_batch_norm_jit.py, skipped without Numba). Loops compile on first use (cached on
disk by Numba).
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
    # Serial loops over a range of rows (channels-last, x as (outer, C)) or of planes
    # (channels-first, x as (outer * C, inner)); the `par_` drivers below run them block by block
    # on Numba's threads; partials per block, merged in block order. Float64 accumulators;
    # error_model="numpy" keeps the loops free of Python's division checks.
    njit = nb.njit
    opts = dict(cache=True, nogil=True, error_model="numpy")
    # the sums along a plane may be reassociated (several accumulators, SIMD lanes): 3-4x faster
    # than one serial chain of float64 adds, still a fixed order (the same bits on any thread
    # count); NaN and inf keep their IEEE meaning (no other fast-math flag)
    planes = dict(opts, fastmath={"reassoc"})

    @njit(**opts)
    def rows_stats(x, r0, r1, sub, pm, pq):
        """(mean, M2) per channel of each block of `sub` rows in [r0, r1) (r0 a multiple of sub),
        into pm[k], pq[k] for block k: its sum, then its centred squares (from cache)."""
        C = x.shape[1]
        for b0 in range(r0, r1, sub):
            b1 = min(r1, b0 + sub)
            s = np.zeros(C)
            for r in range(b0, b1):
                row = x[r]
                for c in range(C):
                    s[c] += row[c]
            s /= b1 - b0
            q = np.zeros(C)
            for r in range(b0, b1):
                row = x[r]
                for c in range(C):
                    d = row[c] - s[c]
                    q[c] += d * d
            k = b0 // sub
            for c in range(C):
                pm[k, c] = s[c]
                pq[k, c] = q[c]

    @njit(**planes)
    def planes_stats(x, p0, p1, mean, m2):
        """(mean, M2) of each plane p in [p0, p1) of x (planes, inner), into mean[p], m2[p]."""
        inner = x.shape[1]
        for p in range(p0, p1):
            row = x[p]
            s = 0.0
            for j in range(inner):
                s += row[j]
            s /= inner
            q = 0.0
            for j in range(inner):
                d = row[j] - s
                q += d * d
            mean[p] = s
            m2[p] = q

    @njit(**opts)
    def chan_merge(pm, pq, counts):
        """Chan's merge of partials (k, C) with `counts` values each, in order: (mean, M2)."""
        mean = pm[0].copy()
        m2 = pq[0].copy()
        na = counts[0]
        for k in range(1, pm.shape[0]):
            nb_ = counts[k]
            nab = na + nb_
            w = nb_ / nab
            f = na * w
            for c in range(pm.shape[1]):
                d = pm[k, c] - mean[c]
                mean[c] += d * w
                m2[c] += pq[k, c] + d * d * f
            na = nab
        return mean, m2

    @njit(**opts)
    def rows_affine(y, x, center, scale, shift, r0, r1):
        C = x.shape[1]
        for r in range(r0, r1):
            xr = x[r]
            yr = y[r]
            for c in range(C):
                yr[c] = (xr[c] - center[c]) * scale[c] + shift[c]

    @njit(**opts)
    def planes_affine(y, x, center, scale, shift, p0, p1, C):
        inner = x.shape[1]
        for p in range(p0, p1):
            c = p % C
            mu, sc, sh = center[c], scale[c], shift[c]
            xr = x[p]
            yr = y[p]
            for j in range(inner):
                yr[j] = (xr[j] - mu) * sc + sh

    @njit(**opts)
    def rows_grad_sums(dy, x, mean, r0, r1, sub, ps, pd):
        """sum(dy), sum(dy * (x - mean)) per channel of each block of `sub` rows, into ps[k], pd[k]:
        within a block in x's dtype (twice the vector width of float64; the NumPy path's sums are
        float32 too), across blocks in float64."""
        C = x.shape[1]
        for b0 in range(r0, r1, sub):
            s = np.zeros(C, x.dtype)
            t = np.zeros(C, x.dtype)
            for r in range(b0, min(r1, b0 + sub)):
                g = dy[r]
                xr = x[r]
                for c in range(C):
                    s[c] += g[c]
                    t[c] += g[c] * (xr[c] - mean[c])
            k = b0 // sub
            for c in range(C):
                ps[k, c] = s[c]
                pd[k, c] = t[c]

    @njit(**planes)
    def planes_grad_sums(dy, x, mean, p0, p1, C, sdy, sdx):
        inner = x.shape[1]
        for p in range(p0, p1):
            mu = mean[p % C]
            g = dy[p]
            xr = x[p]
            s = 0.0
            t = 0.0
            for j in range(inner):
                s += g[j]
                t += g[j] * (xr[j] - mu)
            sdy[p] = s
            sdx[p] = t

    @njit(**opts)
    def rows_grad_apply(dx, dy, x, mean, k, a, b, r0, r1):
        C = x.shape[1]
        for r in range(r0, r1):
            g = dy[r]
            xr = x[r]
            out = dx[r]
            for c in range(C):
                out[c] = (xr[c] - mean[c]) * a[c] + b[c] + g[c] * k[c]

    @njit(**opts)
    def planes_grad_apply(dx, dy, x, mean, k, a, b, p0, p1, C):
        inner = x.shape[1]
        for p in range(p0, p1):
            c = p % C
            mu, kk, aa, bb = mean[c], k[c], a[c], b[c]
            g = dy[p]
            xr = x[p]
            out = dx[p]
            for j in range(inner):
                out[j] = (xr[j] - mu) * aa + bb + g[j] * kk

    # The drivers: every block of `sub` rows (planes) of a call, spread over Numba's threads by
    # prange (OpenMP or TBB workers that spin between regions: Python pool threads, woken per call,
    # started a few hundred microseconds late on a VM and often left one thread doing both shares).
    # Each block writes its own partial: the same bits for any number of threads.
    par = dict(opts, parallel=True)
    prange = nb.prange

    @njit(**par)
    def par_rows_stats(x, sub, pm, pq):
        n = x.shape[0]
        for k in prange(pm.shape[0]):
            rows_stats(x, k * sub, min(n, (k + 1) * sub), sub, pm, pq)

    @njit(**par)
    def par_planes_stats(x, sub, mean, m2):
        n = x.shape[0]
        for k in prange(-(-n // sub)):
            planes_stats(x, k * sub, min(n, (k + 1) * sub), mean, m2)

    @njit(**par)
    def par_rows_affine(y, x, center, scale, shift, sub):
        n = x.shape[0]
        for k in prange(-(-n // sub)):
            rows_affine(y, x, center, scale, shift, k * sub, min(n, (k + 1) * sub))

    @njit(**par)
    def par_planes_affine(y, x, center, scale, shift, sub, C):
        n = x.shape[0]
        for k in prange(-(-n // sub)):
            planes_affine(y, x, center, scale, shift, k * sub, min(n, (k + 1) * sub), C)

    @njit(**par)
    def par_rows_grad_sums(dy, x, mean, sub, ps, pd):
        n = x.shape[0]
        for k in prange(ps.shape[0]):
            rows_grad_sums(dy, x, mean, k * sub, min(n, (k + 1) * sub), sub, ps, pd)

    @njit(**par)
    def par_planes_grad_sums(dy, x, mean, sub, C, sdy, sdx):
        n = x.shape[0]
        for k in prange(-(-n // sub)):
            planes_grad_sums(dy, x, mean, k * sub, min(n, (k + 1) * sub), C, sdy, sdx)

    @njit(**par)
    def par_rows_grad_apply(dx, dy, x, mean, kk, a, b, sub):
        n = x.shape[0]
        for k in prange(-(-n // sub)):
            rows_grad_apply(dx, dy, x, mean, kk, a, b, k * sub, min(n, (k + 1) * sub))

    @njit(**par)
    def par_planes_grad_apply(dx, dy, x, mean, kk, a, b, sub, C):
        n = x.shape[0]
        for k in prange(-(-n // sub)):
            planes_grad_apply(dx, dy, x, mean, kk, a, b, k * sub, min(n, (k + 1) * sub), C)

    # Small x (the NumPy path's small-x switch): the whole call in one serial compiled call, where
    # NumPy's per-call cost (a microsecond or more per ufunc, 3-4 per BLAS product) outweighs the
    # arithmetic. The statistics are `rows_stats` or `planes_stats` + `chan_merge` over one block:
    # the bits of the blocked loops above for an x of one block.

    @njit(**opts)
    def small_stats(x3, mean, var):
        """(mean, biased var) per channel of a whole (outer, C, inner) x, stored into mean, var (C,)
        of x's dtype. Returns whether both are finite there."""
        outer, C, inner = x3.shape
        if inner == 1:
            pm, pq = np.empty((1, C)), np.empty((1, C))
            rows_stats(x3.reshape((outer, C)), 0, outer, outer, pm, pq)
            mu, m2 = pm[0], pq[0]
        else:
            pm, pq = np.empty(outer * C), np.empty(outer * C)
            planes_stats(x3.reshape((outer * C, inner)), 0, outer * C, pm, pq)
            mu, m2 = chan_merge(pm.reshape((outer, C)), pq.reshape((outer, C)), np.full(outer, float(inner)))
        n = outer * inner
        ok = True
        for c in range(C):
            mean[c] = mu[c]
            var[c] = m2[c] / n
            ok = ok and np.isfinite(mean[c]) and np.isfinite(var[c])
        return ok

    @njit(**opts)
    def small_affine(y3, x3, center, scale, shift):
        """y = (x - center) * scale + shift over a whole (outer, C, inner) x."""
        outer, C, inner = x3.shape
        if inner == 1:
            rows_affine(y3.reshape((outer, C)), x3.reshape((outer, C)), center, scale, shift, 0, outer)
        else:
            planes_affine(y3.reshape((outer * C, inner)), x3.reshape((outer * C, inner)), center, scale, shift,
                          0, outer * C, C)

    @njit(**opts)
    def small_forward(y3, mean, var, invstd, x3, gamma, beta, eps, rm, rv, keep, momentum, unbias):
        """The training forward of a whole x: `small_stats`, invstd = 1 / sqrt(var + eps) (0 where
        var + eps == 0, PyTorch's native op), y = (x - mean) * invstd * gamma + beta; per-channel
        arrays (C,) of x's dtype, eps a scalar of it. Running statistics rm, rv (empty: none)
        updated in place with the NumPy path's roundings in x's dtype: rm * keep + momentum * mean,
        rv * keep + momentum * (var * unbias). Returns False (nothing written but the statistics)
        when a statistic is not finite."""
        if not small_stats(x3, mean, var):
            return False
        scale = np.empty_like(mean)
        for c in range(mean.shape[0]):
            v = var[c] + eps
            invstd[c] = 0 if v == 0 else 1 / np.sqrt(v)
            scale[c] = invstd[c] * gamma[c]
        small_affine(y3, x3, mean, scale, beta)
        for c in range(rm.shape[0]):
            rm[c] = rm[c] * keep + momentum * mean[c]
            rv[c] = rv[c] * keep + momentum * (var[c] * unbias)
        return True

    @njit(**opts)
    def small_inference(y3, x3, gamma, beta, running_mean, running_var, eps):
        """Inference over a whole x: y = (x - running_mean) * gamma / sqrt(running_var + eps) + beta
        (scale 0 where running_var + eps == 0); per-channel arrays (C,) of x's dtype."""
        scale = np.empty_like(gamma)
        for c in range(gamma.shape[0]):
            v = running_var[c] + eps
            scale[c] = 0 if v == 0 else gamma[c] / np.sqrt(v)
        small_affine(y3, x3, running_mean, scale, beta)

    return {name: f for name, f in locals().items() if callable(f) and name not in ("njit", "prange")}


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


def small_forward(x3, gamma, beta, eps: float, running=None):
    """`forward` for a small x, one serial call: (y3, mean, var, invstd) or None. ``running``:
    (running_mean, running_var, momentum, M), the two (C,) C-contiguous arrays of x's dtype, to be
    updated in place as ``gpu.ops.batch_norm``'s NumPy path does (with M / (M - 1) for the
    variance); not touched when None is returned."""
    C, dt = x3.shape[1], x3.dtype
    y3 = np.empty_like(x3)
    mean, var, invstd = np.empty(C, dt), np.empty(C, dt), np.empty(C, dt)
    if running is None:
        rm = rv = np.empty(0, dt)
        momentum = m = 2
    else:
        rm, rv, momentum, m = running
    if not _load()["small_forward"](y3, mean, var, invstd, x3, _param(gamma, C, dt, 1.0), _param(beta, C, dt, 0.0),
                                    dt.type(eps), rm, rv, dt.type(1 - momentum), dt.type(momentum),
                                    dt.type(m / (m - 1))):
        return None
    return y3, mean, var, invstd


def small_inference(x3, gamma, beta, running_mean, running_var, eps: float):
    """Inference for a small x, one serial call: y3. Per-channel arrays in any float dtype (or
    None for gamma, beta)."""
    C, dt = x3.shape[1], x3.dtype
    y3 = np.empty_like(x3)
    _load()["small_inference"](y3, x3, _param(gamma, C, dt, 1.0), _param(beta, C, dt, 0.0),
                               _param(running_mean, C, dt, 0.0), _param(running_var, C, dt, 0.0), dt.type(eps))
    return y3


def forward(x3, gamma, beta, eps: float):
    """Training forward of a C-contiguous (outer, C, inner) float32/float64 view. Returns
    (y3, mean, var, invstd), per-channel arrays (C,) in x's dtype, or None when a statistic is not
    finite (the NumPy path then computes the call). gamma, beta: (C,) arrays of x's dtype or None."""
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
    if inner == 1:
        x, y = x3.reshape(outer, C), y3.reshape(outer, C)
        _par("par_rows_affine", y, x, mean, scale, shift, _sub(C * x.itemsize))
    else:
        x, y = x3.reshape(outer * C, inner), y3.reshape(outer * C, inner)
        _par("par_planes_affine", y, x, mean, scale, shift, _sub(inner * x.itemsize), C)
    return y3, mean, var, invstd


def backward(dy3, x3, mean, invstd, gamma, inv_m):
    """dx3 and the per-channel (dgamma, dbeta) of a (outer, C, inner) view, x's dtype; mean,
    invstd, gamma (or None): (C,) arrays of x's dtype."""
    _load()                                         # the compiled loops, for _par
    acc = x3.dtype
    outer, C, inner = x3.shape
    if inner == 1:
        x, dy = x3.reshape(outer, C), dy3.reshape(outer, C)
        sub = _sub(2 * C * x.itemsize)
        nb = -(-outer // sub)
        ps, pd = np.empty((nb, C)), np.empty((nb, C))
        _par("par_rows_grad_sums", dy, x, mean, sub, ps, pd)
        sdy, sdx = ps.sum(0), pd.sum(0)             # block order: the same bits for any threads
    else:
        x, dy = x3.reshape(outer * C, inner), dy3.reshape(outer * C, inner)
        sub = _sub(2 * inner * x.itemsize)
        ps, pd = np.empty(outer * C), np.empty(outer * C)
        _par("par_planes_grad_sums", dy, x, mean, sub, C, ps, pd)
        sdy, sdx = ps.reshape(outer, C).sum(0), pd.reshape(outer, C).sum(0)
    dbeta = sdy.astype(acc)
    dgamma = (sdx * invstd).astype(acc)
    kk = invstd if gamma is None else (invstd * gamma).astype(acc, copy=False)
    a = (-kk * invstd * dgamma * acc.type(inv_m)).astype(acc, copy=False)
    b = (-kk * dbeta * acc.type(inv_m)).astype(acc, copy=False)
    dx3 = np.empty_like(x3)
    dx = dx3.reshape(x.shape)
    if inner == 1:
        _par("par_rows_grad_apply", dx, dy, x, mean, kk, a, b, sub)
    else:
        _par("par_planes_grad_apply", dx, dy, x, mean, kk, a, b, sub, C)
    return dx3, dgamma, dbeta
