"""The compiled loops of `jit` (imported only when Numba is: `jit._load`).

Module-level functions calling each other as globals, so that Numba's on-disk cache holds every
one of them (a dispatcher captured in a closure changes the cache key in every process, and the
functions that call it compiled again each time: 3-4 s a process).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

# Serial loops over a range of rows (channels-last, x as (outer, C)) or of planes
# (channels-first, x as (outer * C, inner)); the `par_` drivers below run them block by block
# on Numba's threads; partials per block, merged in block order. Float64 accumulators;
# error_model="numpy" keeps the loops free of Python's division checks.
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


# The affine loops carry batch norm's epilogue, y = act(bn(x) + res): ``add`` (res read; else res
# is any array of x's shape, never read) and ``relu`` (max(v, 0), NaN kept); ``zero`` is 0 in
# x's dtype (a literal 0.0 would widen float32 arithmetic to float64).

@njit(**opts)
def rows_affine(y, x, res, center, scale, shift, r0, r1, add, relu, zero):
    C = x.shape[1]
    for r in range(r0, r1):
        xr = x[r]
        yr = y[r]
        rr = res[r]
        for c in range(C):
            v = (xr[c] - center[c]) * scale[c] + shift[c]
            if add:
                v += rr[c]
            if relu and v < zero:
                v = zero
            yr[c] = v


@njit(**opts)
def planes_affine(y, x, res, center, scale, shift, p0, p1, C, add, relu, zero):
    inner = x.shape[1]
    for p in range(p0, p1):
        c = p % C
        mu, sc, sh = center[c], scale[c], shift[c]
        xr = x[p]
        yr = y[p]
        rr = res[p]
        for j in range(inner):
            v = (xr[j] - mu) * sc + sh
            if add:
                v += rr[j]
            if relu and v < zero:
                v = zero
            yr[j] = v


# The backward loops take relu's mask: with ``relu`` the gradient is dz = dy where y > 0, else 0
# (y: the forward's output; else any array of x's shape, never read); ``zero`` as above.

@njit(**opts)
def rows_grad_sums(dy, x, y, mean, r0, r1, sub, ps, pd, relu, zero):
    """sum(dz), sum(dz * (x - mean)) per channel of each block of `sub` rows, into ps[k], pd[k]:
    within a block in x's dtype (twice the vector width of float64; the NumPy path's sums are
    float32 too), across blocks in float64."""
    C = x.shape[1]
    for b0 in range(r0, r1, sub):
        s = np.zeros(C, x.dtype)
        t = np.zeros(C, x.dtype)
        for r in range(b0, min(r1, b0 + sub)):
            gr = dy[r]
            xr = x[r]
            yr = y[r]
            for c in range(C):
                g = gr[c] if not relu or yr[c] > zero else zero
                s[c] += g
                t[c] += g * (xr[c] - mean[c])
        k = b0 // sub
        for c in range(C):
            ps[k, c] = s[c]
            pd[k, c] = t[c]


@njit(**planes)
def planes_grad_sums(dy, x, y, mean, p0, p1, C, sdy, sdx, relu, zero):
    inner = x.shape[1]
    for p in range(p0, p1):
        mu = mean[p % C]
        gr = dy[p]
        xr = x[p]
        yr = y[p]
        s = 0.0
        t = 0.0
        for j in range(inner):
            g = gr[j] if not relu or yr[j] > zero else zero
            s += g
            t += g * (xr[j] - mu)
        sdy[p] = s
        sdx[p] = t


@njit(**opts)
def rows_grad_apply(dx, dres, dy, x, y, mean, k, a, b, r0, r1, relu, write_res, zero):
    """dx = k dz + a (x - mean) + b; dres = dz when ``write_res`` (else dres is never written)."""
    C = x.shape[1]
    for r in range(r0, r1):
        gr = dy[r]
        xr = x[r]
        yr = y[r]
        out = dx[r]
        out2 = dres[r]
        for c in range(C):
            g = gr[c] if not relu or yr[c] > zero else zero
            out[c] = (xr[c] - mean[c]) * a[c] + b[c] + g * k[c]
            if write_res:
                out2[c] = g


@njit(**opts)
def planes_grad_apply(dx, dres, dy, x, y, mean, k, a, b, p0, p1, C, relu, write_res, zero):
    inner = x.shape[1]
    for p in range(p0, p1):
        c = p % C
        mu, kk, aa, bb = mean[c], k[c], a[c], b[c]
        gr = dy[p]
        xr = x[p]
        yr = y[p]
        out = dx[p]
        out2 = dres[p]
        for j in range(inner):
            g = gr[j] if not relu or yr[j] > zero else zero
            out[j] = (xr[j] - mu) * aa + bb + g * kk
            if write_res:
                out2[j] = g


# The drivers: every block of `sub` rows (planes) of a call, spread over Numba's threads by
# prange (OpenMP or TBB workers that spin between regions: Python pool threads, woken per call,
# started a few hundred microseconds late on a VM and often left one thread doing both shares).
# Each block writes its own partial: the same bits for any number of threads.
par = dict(opts, parallel=True)


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
def par_rows_affine(y, x, res, center, scale, shift, sub, add, relu, zero):
    n = x.shape[0]
    for k in prange(-(-n // sub)):
        rows_affine(y, x, res, center, scale, shift, k * sub, min(n, (k + 1) * sub), add, relu, zero)


@njit(**par)
def par_planes_affine(y, x, res, center, scale, shift, sub, C, add, relu, zero):
    n = x.shape[0]
    for k in prange(-(-n // sub)):
        planes_affine(y, x, res, center, scale, shift, k * sub, min(n, (k + 1) * sub), C, add, relu, zero)


@njit(**par)
def par_rows_grad_sums(dy, x, y, mean, sub, ps, pd, relu, zero):
    n = x.shape[0]
    for k in prange(ps.shape[0]):
        rows_grad_sums(dy, x, y, mean, k * sub, min(n, (k + 1) * sub), sub, ps, pd, relu, zero)


@njit(**par)
def par_planes_grad_sums(dy, x, y, mean, sub, C, sdy, sdx, relu, zero):
    n = x.shape[0]
    for k in prange(-(-n // sub)):
        planes_grad_sums(dy, x, y, mean, k * sub, min(n, (k + 1) * sub), C, sdy, sdx, relu, zero)


@njit(**par)
def par_rows_grad_apply(dx, dres, dy, x, y, mean, kk, a, b, sub, relu, write_res, zero):
    n = x.shape[0]
    for k in prange(-(-n // sub)):
        rows_grad_apply(dx, dres, dy, x, y, mean, kk, a, b, k * sub, min(n, (k + 1) * sub), relu, write_res, zero)


@njit(**par)
def par_planes_grad_apply(dx, dres, dy, x, y, mean, kk, a, b, sub, C, relu, write_res, zero):
    n = x.shape[0]
    for k in prange(-(-n // sub)):
        planes_grad_apply(dx, dres, dy, x, y, mean, kk, a, b, k * sub, min(n, (k + 1) * sub), C, relu, write_res,
                          zero)

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
def small_affine(y3, x3, r3, center, scale, shift, add, relu, zero):
    """y = act((x - center) * scale + shift (+ r)) over a whole (outer, C, inner) x."""
    outer, C, inner = x3.shape
    if inner == 1:
        rows_affine(y3.reshape((outer, C)), x3.reshape((outer, C)), r3.reshape((outer, C)), center, scale, shift,
                    0, outer, add, relu, zero)
    else:
        planes_affine(y3.reshape((outer * C, inner)), x3.reshape((outer * C, inner)), r3.reshape((outer * C, inner)),
                      center, scale, shift, 0, outer * C, C, add, relu, zero)


@njit(**opts)
def small_forward(y3, mean, var, invstd, x3, r3, gamma, beta, eps, rm, rv, keep, momentum, unbias, add, relu):
    """The training forward of a whole x: `small_stats`, invstd = 1 / sqrt(var + eps) (0 where
    var + eps == 0, PyTorch's native op), y = (x - mean) * invstd * gamma + beta; per-channel
    arrays (C,) of x's dtype, eps a scalar of it. Running statistics rm, rv (empty: none)
    updated in place with the NumPy path's roundings in x's dtype: rm * keep + momentum * mean,
    rv * keep + momentum * (var * unbias); the epilogue (``add`` r3, ``relu``) as `small_affine`.
    Returns False (nothing written but the statistics)
    when a statistic is not finite."""
    if not small_stats(x3, mean, var):
        return False
    scale = np.empty_like(mean)
    for c in range(mean.shape[0]):
        v = var[c] + eps
        invstd[c] = 0 if v == 0 else 1 / np.sqrt(v)
        scale[c] = invstd[c] * gamma[c]
    small_affine(y3, x3, r3, mean, scale, beta, add, relu, eps - eps)
    for c in range(rm.shape[0]):
        rm[c] = rm[c] * keep + momentum * mean[c]
        rv[c] = rv[c] * keep + momentum * (var[c] * unbias)
    return True


@njit(**opts)
def small_inference(y3, x3, r3, gamma, beta, running_mean, running_var, eps, add, relu):
    """Inference over a whole x: y = (x - running_mean) * gamma / sqrt(running_var + eps) + beta
    (scale 0 where running_var + eps == 0); per-channel arrays (C,) of x's dtype."""
    scale = np.empty_like(gamma)
    for c in range(gamma.shape[0]):
        v = running_var[c] + eps
        scale[c] = 0 if v == 0 else gamma[c] / np.sqrt(v)
    small_affine(y3, x3, r3, running_mean, scale, beta, add, relu, eps - eps)
