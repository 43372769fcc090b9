"""The NumPy path's per-block formulas and its row-block strategy ("blocks" in numpy_path.py).

The formulas take a block of features: ``p``, a slice of axis 0 that indexes the per-feature
(keepdims) arrays when axis 0 is kept, or ``slice(None)`` (every feature; the "direct" strategy's
whole array is one such block). The row-block strategy cuts x into blocks of about
``gpu._cpu.BLOCK_BYTES`` along axis 0, runs them on the NumPy path's threads and combines them in
block order (the same bits for any number of threads); its statistics are overflow-safe, with
PyTorch's special values, so it answers every call the other strategies pass on.
"""
from __future__ import annotations

import numpy as np

from gpu import _backend as B
from gpu import _cpu

from ._args import Backward, Forward, Inference, Layout


# ---------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------

def reduce(xp, lay: Layout, a, b=None):
    """sum(a) or sum(a * b) over the reduced axes with kept dims, without materializing a * b."""
    if b is None:
        return a.sum(axis=lay.axes, keepdims=True, dtype=B.compute_dtype(a.dtype))
    if xp is np:
        idx = list(range(a.ndim))
        return np.expand_dims(np.einsum(a, idx, b, idx, list(lay.kept_axes)), lay.axes)
    return (a * b).sum(axis=lay.axes, keepdims=True)


def store(out, block):
    """Write a computed block into its output slice (a cast for narrow output dtypes)."""
    if block is not out:
        out[...] = block


def per_feature(p, lay: Layout, acc, sl):
    """A per-feature array (kept shape, or None) as a keepdims block for slice sl of axis 0."""
    return None if p is None else p.reshape(lay.keepdims_shape).astype(acc, copy=False)[sl]


def coefficients(inv, gamma, beta, lay: Layout, acc, p):
    """(scale, shift) of y = (x - center) * scale + shift: the batch-norm affine, written once for
    the training forward (center = mean) and inference (center = running_mean)."""
    scale = inv if gamma is None else inv * per_feature(gamma, lay, acc, p)
    return scale, per_feature(beta, lay, acc, p)


def grad_coefficients(k, istd, dgamma, dbeta, inv_m):
    """(a, b) of dx = k * dy + a * (x - mean) + b from this call's sums."""
    return -k * istd * dgamma * inv_m, -k * dbeta * inv_m


def invstd(xp, var, eps: float, acc):
    """1 / sqrt(var + eps); 0 where var + eps == 0 (eps = 0 and a constant feature), as PyTorch's
    native op (the kernels' bn_invstd): y = beta there."""
    v = var + acc.type(eps)
    if acc.type(eps) > 0:
        return 1 / xp.sqrt(v)
    with np.errstate(divide="ignore"):
        return xp.where(v == 0, acc.type(0), 1 / xp.sqrt(v))


def epilogue(xp, y, residual, relu: bool):
    """y = act(y + residual) in place (y in the accumulation dtype, before its one rounding to x's
    dtype); residual (or None) broadcasts with y. relu is max(v, 0) with NaN kept, as torch's."""
    if residual is not None:
        xp.add(y, residual.astype(y.dtype, copy=False), out=y)
    if relu:
        xp.maximum(y, y.dtype.type(0), out=y)


def grad_output(xp, a: Backward):
    """The gradient that reaches the batch norm: dy, or where(y > 0, dy, 0) with relu (torch's
    threshold_backward: a NaN y passes nothing)."""
    if not a.relu:
        return a.dy
    return xp.where(a.y > 0, a.dy, xp.zeros((), a.dy.dtype))


def with_residual_grad(a: Backward, out: tuple, dz) -> tuple:
    """(dx, dgamma, dbeta), plus dresidual (dz in x's dtype, never dy itself) when asked for."""
    if not a.residual_grad:
        return out
    dres = dz.astype(a.x.dtype, copy=dz is a.dy)
    return out + (dres,)


def out_dtype(a: Backward):
    """dgamma and dbeta come in gamma's dtype (x's when gamma is None)."""
    return a.gamma.dtype if a.gamma is not None else a.x.dtype


# ---------------------------------------------------------------------------------------------
# The row-block strategy
# ---------------------------------------------------------------------------------------------

class _Blocks:
    """x cut into row blocks along axis 0 (``gpu._cpu``'s engine), with per-thread scratch
    buffers of one block. The arrays cross memory the fewest times: statistics 2 reads, forward
    3 reads + 1 write, backward 4 reads + 1 write, inference 1 read + 1 write; when axis 0 is kept,
    every block holds whole features and each array is read once."""

    def __init__(self, xp, x, lay: Layout):
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

    def affine(self, y, slices, center, scale, shift, residual=None, relu: bool = False) -> None:
        """y = act((x - center) * scale (+ shift) (+ residual)) over the blocks `slices`,
        per-feature operands."""
        def block(sl):
            blk = self.xp.subtract(self.x[sl], center, out=self.out(y, sl))
            blk *= scale
            if shift is not None:
                blk += shift
            epilogue(self.xp, blk, None if residual is None else residual[sl], relu)
            store(y[sl], blk)

        self.map(block, slices)

    def out(self, y, sl):
        """Where to compute block `sl` of output y: in y itself when y has the accumulation dtype."""
        return y[sl] if y.dtype == self.acc else self.scratch(1, sl)


def _group_stats(blocks: _Blocks, slices):
    """(mean, var) of the features in one group, keepdims shape, accumulation dtype.

    Corrected two-pass: mean0 first, then c = x - mean0, var = mean(c^2) - mean(c)^2, whose
    second term cancels the rounding error of mean0 (mean = mean0 + mean(c)).
    """
    xp, x, lay = blocks.xp, blocks.x, blocks.lay
    m = blocks.acc.type(lay.m)
    mean0 = sum(blocks.map(lambda sl: reduce(xp, lay, x[sl]), slices)) / m

    def centered(sl):
        c = xp.subtract(x[sl], mean0, out=blocks.scratch(0, sl))
        return reduce(xp, lay, c), reduce(xp, lay, c, c)

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


def stats(_, xp, x, lay: Layout):
    """(mean, var) per feature, keepdims shape, accumulation dtype."""
    blocks = _Blocks(xp, x, lay)
    mean, var = xp.empty(lay.keepdims_shape, blocks.acc), xp.empty(lay.keepdims_shape, blocks.acc)

    def group(p, slices):
        mean[p], var[p] = _group_stats(blocks, slices)

    blocks.each_group(group)
    return mean, var


def forward(_, a: Forward, momentum):
    """(y, mean, var, invstd, False): the running statistics are numpy_path's to update."""
    xp, x, lay = a.xp, a.x, a.lay
    blocks = _Blocks(xp, x, lay)
    acc = blocks.acc
    y = xp.empty(x.shape, x.dtype)
    mean, var, inv = (xp.empty(lay.keepdims_shape, acc) for _ in range(3))

    def group(p, slices):
        mean[p], var[p] = _group_stats(blocks, slices)
        inv[p] = invstd(xp, var[p], a.eps, acc)
        blocks.affine(y, slices, mean[p], *coefficients(inv[p], a.gamma, a.beta, lay, acc, p), a.residual, a.relu)

    blocks.each_group(group)
    return y, mean, var, inv, False


def backward(_, a: Backward, sync):
    """`numpy_path.backward`'s formulas, group by group: a group's sums, then its dx (from cache)."""
    xp, dy, x, lay = a.xp, a.dy, a.x, a.lay
    blocks = _Blocks(xp, x, lay)
    acc = blocks.acc
    inv_m = acc.type(1.0 / lay.m)
    dx = xp.empty(x.shape, x.dtype)
    dgamma, dbeta = xp.empty(lay.keepdims_shape, acc), xp.empty(lay.keepdims_shape, acc)

    def group(p, slices):
        mu, istd = per_feature(a.mean, lay, acc, p), per_feature(a.invstd, lay, acc, p)

        def sums(sl):
            xmu = xp.subtract(x[sl], mu, out=blocks.scratch(0, sl))
            return reduce(xp, lay, dy[sl]), reduce(xp, lay, dy[sl], xmu)

        parts = blocks.map(sums, slices)
        dbeta[p] = sum(q[0] for q in parts)
        dgamma[p] = sum(q[1] for q in parts) * istd
        k = istd if a.gamma is None else istd * per_feature(a.gamma, lay, acc, p)
        ca, cb = grad_coefficients(k, istd, dgamma[p], dbeta[p], inv_m)

        def apply(sl):
            blk = xp.subtract(x[sl], mu, out=blocks.out(dx, sl))
            blk *= ca
            blk += cb
            blk += xp.multiply(dy[sl], k, out=blocks.scratch(0, sl))
            store(dx[sl], blk)

        blocks.map(apply, slices)

    blocks.each_group(group)
    dt = out_dtype(a)
    return dx, dgamma.reshape(lay.kept_shape).astype(dt), dbeta.reshape(lay.kept_shape).astype(dt)


def inference(_, a: Inference):
    """y = (x - running_mean) * scale + shift, block by block."""
    xp, x, lay = a.xp, a.x, a.lay
    blocks = _Blocks(xp, x, lay)
    acc = blocks.acc
    y = xp.empty(x.shape, x.dtype)

    def group(p, slices):
        rm, rv = per_feature(a.running_mean, lay, acc, p), per_feature(a.running_var, lay, acc, p)
        blocks.affine(y, slices, rm, *coefficients(invstd(xp, rv, a.eps, acc), a.gamma, a.beta, lay, acc, p),
                      a.residual, a.relu)

    with np.errstate(all="ignore"):
        blocks.each_group(group)
    return y

