"""The NumPy path of the softmax family and cross-entropy (any array module with NumPy's API):
the reference the kernels are tested against, and the CPU fallback.

Rows are taken with the class axis last, in cache-sized row blocks spread over the thread pool
above DIRECT_BYTES (gpu/_cpu.py), combined in block order so the result does not depend on the
thread count. Arguments arrive checked and normalized (_args); nothing here checks them again.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from ... import _backend as B
from ... import _cpu
from ._args import CEArgs

#: Arrays of up to this many bytes (in the accumulation dtype) run in one call on the calling
#: thread, without row blocks or the pool: below it the pool's hand-off costs more than a second
#: core saves (measured on 2 cores with `python -m gpu.bench`, see _run_rows).
DIRECT_BYTES = 1 << 20

#: The NumPy path takes exp(z) without subtracting the row maximum (which saves a pass for the
#: maximum and one for the subtraction) when every row sum s of exp(z) in a block lies in this
#: range: then no exp overflowed, 1/s is a normal number and the row's largest terms are normal,
#: so p = exp(z) / s rounds like exp(z - max) / sum(exp(z - max)), and log s, taken in float64
#: per row, keeps the digits of small losses. Blocks outside it (logits beyond about +-60, rows of
#: -inf, NaN) are computed again with the maximum subtracted.
UNSHIFTED_SUMS = (2.0 ** -20, 2.0 ** 100)

#: Rows up to this many classes are summed with einsum (2-3x np.sum's speed on short rows, which
#: has a per-row cost); longer rows with np.sum's pairwise summation, for its accuracy.
EINSUM_MAX_COLS = 2048


def _blocked(a, class_last_ndim: int):
    """View of a (rows..., C) or (rows...) array with leading unit axes, so that axis 1 is a row
    axis to cut blocks along: (1, rows..., C), or (1, 1, C) for a single row."""
    return a[(None,) * (2 if class_last_ndim == 1 else 1)]


def _run_rows(xp, block, n_rows: int, row_bytes: int) -> None:
    """block(slice) over rows [0, n_rows) of the _blocked views: one call on this thread for a
    small array (no block machinery), else cache-sized row blocks over the pool."""
    if xp is not np or n_rows * row_bytes <= DIRECT_BYTES:
        block(slice(None))
    else:
        _cpu.map_ordered(block, _cpu.row_blocks(xp, n_rows, row_bytes), xp)


def _quiet(xp):
    """Silence NumPy's warnings for inf - inf and exp overflow: NaN rows are the documented
    result, and an overflowing unshifted exp is detected and redone (UNSHIFTED_SUMS)."""
    if xp is not np:
        return contextlib.nullcontext()
    return np.errstate(invalid="ignore", over="ignore", divide="ignore")


def _row_sum(xp, a):
    return xp.einsum("...c->...", a) if a.shape[-1] <= EINSUM_MAX_COLS else a.sum(axis=-1)


def _row_dot(xp, a, b):
    """sum_c a_c b_c per row; b is (..., C) or (C,)."""
    if a.shape[-1] <= EINSUM_MAX_COLS:
        return xp.einsum("...c,...c->...", a, b)
    return (a * b).sum(axis=-1)


def _unshifted_ok(s) -> bool:
    lo, hi = UNSHIFTED_SUMS
    return s.size == 0 or bool(lo <= s.min() and s.max() <= hi)   # False for NaN


def _exp_rows(xp, za, into):
    """(sh, e, s): exp(sh) written into `into`, s its row sums, sh = za when exp(za) is safe to
    use unshifted (UNSHIFTED_SUMS), else sh = za - row max (a fresh array, not into). One class
    is always shifted: its softmax is then exactly 1, its log-softmax, loss and gradient 0."""
    if za.shape[-1] > 1:
        e = xp.exp(za, out=into)
        s = _row_sum(xp, e)
        if _unshifted_ok(s):
            return za, e, s
    sh = za - za.max(axis=-1, keepdims=True)   # a row of -inf gives NaN, as in PyTorch
    e = xp.exp(sh, out=into)
    return sh, e, _row_sum(xp, e)


# ---------------------------------------------------------------------------------------------
# Softmax, log-softmax, hardmax
# ---------------------------------------------------------------------------------------------

def _softmax_rows(xp, za, ob, log: bool) -> None:
    """Softmax (log-softmax) of the rows of za (..., C), in the accumulation dtype, into ob."""
    acc = za.dtype
    # log-softmax needs za after exp: exp goes to scratch unless ob can hold it
    e = ob if ob.dtype == acc else _cpu.scratch(xp, za.shape, acc)
    with _quiet(xp):
        sh, e, s = _exp_rows(xp, za, e)
        if log:   # one rounding: sh - log s, log s per row
            xp.subtract(sh, xp.log(s)[..., None], out=ob)
            return
        e *= xp.reciprocal(s)[..., None]
    if e is not ob:
        ob[...] = e


def softmax(xp, z, ax: int, log: bool):
    """Softmax (log=True: log-softmax) of z along ax, in z's dtype."""
    acc = B.compute_dtype(z.dtype)
    last = ax == z.ndim - 1
    moved = z if last else xp.moveaxis(z, ax, -1)
    out = xp.empty(moved.shape, z.dtype)
    if out.size == 0:                      # no rows, or no classes: empty, as PyTorch
        pass
    elif xp is not np or out.size * acc.itemsize <= DIRECT_BYTES:
        _softmax_rows(xp, moved.astype(acc, copy=False), out, log)
    else:
        zr, outr = _blocked(moved, z.ndim), _blocked(out, z.ndim)
        _run_rows(xp, lambda sl: _softmax_rows(xp, zr[:, sl].astype(acc, copy=False), outr[:, sl], log),
                  zr.shape[1], zr.shape[-1] * acc.itemsize)
    return out if last else xp.moveaxis(out, -1, ax)


def hardmax(xp, z, ax: int):
    """One-hot of the argmax along ax (the first on ties, NaN counts as the maximum), in z's dtype."""
    if z.shape[ax] == 0:                   # no classes: nothing to mark (argmax would raise)
        return xp.empty(z.shape, z.dtype)
    # argmax on float32 for the narrow types: exact, and NaN-aware like NumPy's float argmax
    idx = z.astype(B.compute_dtype(z.dtype), copy=False).argmax(axis=ax)
    classes = xp.arange(z.shape[ax]).reshape((-1,) + (1,) * (z.ndim - ax - 1))
    return (classes == xp.expand_dims(idx, ax)).astype(z.dtype)


# ---------------------------------------------------------------------------------------------
# Cross-entropy where nothing is summed (both paths)
# ---------------------------------------------------------------------------------------------

def no_classes(args: CEArgs, want_loss: bool, dloss, inplace: bool):
    """(loss, z-loss term, dz) over an empty class axis (both paths; nothing to launch), as
    PyTorch: row losses are 0, or NaN with label smoothing over integer targets (ls / C); 'mean' is
    NaN (its denominator, the summed target weight or torch's rows = numel / C, is 0 / 0). The
    z-loss term adds nothing (no row has a class). Every integer target is ignored (_args raised
    for any other)."""
    xp = args.xp
    loss = None
    if want_loss:
        row = np.nan if (args.label_smoothing and not args.probs) else 0.0
        if args.reduction == "none":
            loss = xp.full(args.row_shape, row, args.z.dtype)
        else:
            total = np.nan if args.reduction == "mean" else row if math.prod(args.row_shape) else 0.0
            loss = xp.asarray(total, dtype=args.z.dtype)
    z_term = empty_z_term(args)
    if dloss is None:
        return loss, z_term, None
    return loss, z_term, args.z if inplace else xp.empty(args.z.shape, args.z.dtype)


def empty_z_term(args: CEArgs):
    """The z-loss term when no row has a class to sum: 0 per row, 0 summed, NaN averaged (None
    unless the call returns it)."""
    if not args.return_z:
        return None
    xp, dt = args.xp, args.z.dtype
    if args.reduction == "none":
        return xp.zeros(args.row_shape, dt)
    return xp.asarray(np.nan if args.reduction == "mean" else 0.0, dtype=dt)


# ---------------------------------------------------------------------------------------------
# Cross-entropy
# ---------------------------------------------------------------------------------------------

def cross_entropy(args: CEArgs, want_loss: bool, dloss, inplace: bool = False):
    """(loss or None, z-loss term or None, dz or None) for at least one class. dloss=None: no
    gradient; else the upstream gradient (a scalar, or one per row for 'none'). inplace: dz is
    written over args.z, which is returned as dz.

    Per row block (the class axis last): e = exp(z) (unshifted when safe, UNSHIFTED_SUMS), its row
    sums s, the row losses from log s and the target terms in float64 (R values: cheap, and
    log s - z_t keeps its digits for small losses), and the gradient written over e, which is dz
    itself when the dtypes allow. A soft-cap replaces the block's logits by cap tanh(z / cap)
    (tanh kept for the gradient's 1 - tanh^2); the z-loss adds its per-row terms from lse.
    """
    xp = args.xp
    last = args.axis == args.z.ndim - 1
    moved = args.z if last else xp.moveaxis(args.z, args.axis, -1)
    ce = _Rows(args, moved, last, want_loss, dloss)
    _run_rows(xp, ce.block, ce.z.shape[1], args.n_classes * ce.acc.itemsize)
    loss, z_term = ce.reduced()
    if ce.g is None:
        return loss, z_term, None
    dz = ce.dz.reshape(moved.shape) if last else xp.moveaxis(ce.dz.reshape(moved.shape), -1, args.axis)
    if inplace:
        args.z[...] = dz
        dz = args.z
    return loss, z_term, dz


class _Rows:
    """One cross-entropy call on the NumPy path: what every row block needs, computed once per call
    (the target terms, the 'mean' denominators, the upstream scale per row), the row blocks
    (``block``, on the pool's threads), and the reductions of their row results (``reduced``)."""

    def __init__(self, args: CEArgs, moved, last: bool, want_loss: bool, dloss):
        xp, C, ls = args.xp, args.n_classes, args.label_smoothing
        self.args, self.xp = args, xp
        self.z = z = _blocked(moved, moved.ndim)          # blocks of rows along axis 1
        self.acc = acc = B.compute_dtype(args.z.dtype)
        f64 = np.dtype(np.float64)
        row_shape = z.shape[:-1]
        self.w = w = None if args.weight is None else args.weight.astype(acc)
        self.keep, self.ls_c = 1.0 - ls, ls / C

        # Per-row target terms, and the 'mean' denominator: known before any logit is read.
        if args.probs:
            self.y = _blocked(args.target if last else xp.moveaxis(args.target, args.axis, -1), moved.ndim)
            self.denom = self.count = np.float64(z.size // C)
        else:
            t = _blocked(args.target, moved.ndim)
            self.valid = valid = t != args.ignore_index
            self.tt = tt = xp.where(valid, t, 0).astype(xp.intp)
            self.w_t = w_t = valid.astype(f64) if w is None else xp.where(valid, w[tt], 0).astype(f64)
            self.denom = w_t.sum()
            self.count = valid.sum(dtype=f64)   # the z-loss's 'mean' denominator
            self.w_all = float(C) if w is None else float(w.sum(dtype=f64))
            # flat index of each row's target class in a C-contiguous (rows..., C) array; a block
            # subtracts its first row's offset (one fancy index instead of an open mesh per access)
            self.t_flat = xp.arange(0, math.prod(row_shape) * C, C, dtype=xp.intp).reshape(row_shape) + tt
            self.block_stride = math.prod(row_shape[2:]) * C   # elements per index along the block axis

        self.g = self.gz = None
        if dloss is not None:
            self._upstream(dloss, row_shape)
        self.rows = xp.empty(row_shape, f64) if want_loss else None
        self.zrows = xp.zeros(row_shape, f64) if (args.z_loss and want_loss) or args.return_z else None

    def _upstream(self, dloss, row_shape) -> None:
        """The per-row upstream scale: dloss over the mean's denominator (g for the loss, gz for
        the z-loss), the integer targets' gradient coefficients, and dz."""
        args, xp = self.args, self.xp
        g = gz = xp.asarray(dloss, dtype=np.float64)
        if args.reduction == "mean":
            with _quiet(xp):
                g = g / self.denom   # inf when the target weights sum to 0: a NaN gradient, as PyTorch
                gz = gz / self.count
        g, gz = xp.broadcast_to(g, row_shape), xp.broadcast_to(gz, row_shape)
        if not args.probs:    # an ignored row's gradient is 0, whatever dloss and the denominator
            g, gz = xp.where(self.valid, g, 0.0), xp.where(self.valid, gz, 0.0)
            # the per-row gradient coefficients, once for all rows rather than per block (fewer
            # Python steps between a block's passes, where the threads take turns at the GIL)
            with _quiet(xp):    # inf * 0 (all target weights 0): NaN, as PyTorch
                self.hit = hit = g * self.w_t * self.keep
                self.coef_t = hit + g * (self.ls_c * self.w_all) if args.label_smoothing else hit
        self.g, self.gz = g, gz
        self.dz = xp.empty(self.z.shape, args.z.dtype)

    def block(self, sl) -> None:
        """The rows ``sl`` (along axis 1 of the blocked views): their losses, z-loss terms and dz."""
        with _quiet(self.xp):   # NaN rows, overflowing unshifted exp, inf * 0 for a zero denominator
            self._block(sl)

    def _block(self, sl) -> None:
        args, xp, acc, w, g = self.args, self.xp, self.acc, self.w, self.g
        f64 = np.dtype(np.float64)
        ls, zl, cap = args.label_smoothing, args.z_loss, args.softcap
        za = self.z[:, sl].astype(acc, copy=False)
        th = None
        if cap is not None:
            th = xp.tanh(za / acc.type(cap))
            za = th * acc.type(cap)
        into = self.dz[:, sl] if g is not None and self.dz.dtype == acc else _cpu.scratch(xp, za.shape, acc)
        sh, e, s = _exp_rows(xp, za, into)       # log p = sh - log s
        lse = xp.log(s.astype(f64))
        zc = None
        if zl:   # lse of the logits themselves: log s plus the shift _exp_rows took
            lse_z = lse if sh is za else lse + za.max(axis=-1).astype(f64)
            live = True if args.probs else self.valid[:, sl]
            if self.zrows is not None:   # a conditional: ignored NaN rows add 0
                self.zrows[:, sl] = xp.where(live, zl * lse_z * lse_z, 0.0)
            if self.gz is not None:
                zc = xp.where(live, 2 * zl * lse_z * self.gz[:, sl], 0.0)   # dz += zc p
        wy = wy_sum = t_loc = None
        if args.probs:
            yb = self.y[:, sl].astype(acc)
            if ls:
                yb = yb * acc.type(self.keep) + acc.type(self.ls_c)
            wy = yb if w is None else yb * w          # weighted target distribution
            wy_sum = _row_sum(xp, wy).astype(f64)
            if self.rows is not None:
                self.rows[:, sl] = lse * wy_sum - _row_dot(xp, sh, wy)
        else:
            t_loc = self.t_flat[:, sl] - (sl.start or 0) * self.block_stride if xp is np else None
            if self.rows is not None:
                picked = _take_rows(xp, sh, t_loc, self.tt[:, sl])   # sh_t
                # an ignored row adds 0, whatever its logits
                r = xp.where(self.valid[:, sl], self.w_t[:, sl] * (lse - picked), 0.0)
                if ls:
                    smooth_sh = _row_sum(xp, sh) if w is None else _row_dot(xp, sh, w)   # sum_c w_c sh_c
                    r = r * self.keep + xp.where(self.valid[:, sl], self.w_all * lse - smooth_sh, 0) * self.ls_c
                self.rows[:, sl] = r
        if g is not None:
            self._gradient(sl, e, s, zc, th, wy, wy_sum, t_loc)

    def _gradient(self, sl, e, s, zc, th, wy, wy_sum, t_loc) -> None:
        """dz of the rows ``sl``, written over e = exp(sh) (which is dz's block when the dtypes allow)."""
        args, xp, acc, w = self.args, self.xp, self.acc, self.w
        gb = self.g[:, sl]
        if args.probs:
            # d/dz_j = p_j * sum_c(w_c y_c) - w_j y_j
            coef = gb * wy_sum if zc is None else gb * wy_sum + zc
            e *= (coef / s).astype(acc)[..., None]
            e -= gb.astype(acc)[..., None] * wy
        else:
            # d/dz_j = p_j ((1-ls) w_t + ls W / C) - (1-ls) w_t [j == t] - (ls / C) w_j; 0 if ignored
            hit_b, coef = self.hit[:, sl], self.coef_t[:, sl]
            if zc is not None:
                coef = coef + zc
            e *= (coef / s).astype(acc)[..., None]
            if t_loc is not None and e.flags.c_contiguous:
                e.reshape(-1)[t_loc] -= hit_b.astype(acc)
            else:
                e[_row_index(xp, e.shape[:-1]) + (self.tt[:, sl],)] -= hit_b.astype(acc)
            if args.label_smoothing:
                e -= (gb * self.ls_c).astype(acc)[..., None] * (1 if w is None else w)
        if th is not None:   # through the soft-cap: d tanh = 1 - tanh^2
            e *= 1 - th * th
        if not args.probs:   # ignored rows: 0 even where their logits are +inf or NaN (0 * NaN)
            e[~self.valid[:, sl]] = 0
        if self.dz.dtype != acc:   # else e already is this block of dz
            self.dz[:, sl] = e

    def reduced(self):
        """(loss or None, z-loss term or None) under the call's reduction, in z's dtype."""
        args, xp = self.args, self.xp
        zterm = None
        if self.zrows is not None:
            zterm = self.zrows.reshape(args.row_shape)
            with _quiet(xp):   # a 'mean' over no rows: 0 / 0
                zterm = (zterm.sum() if args.reduction == "sum" else zterm.sum() / self.count
                         if args.reduction == "mean" else zterm)
        loss = None
        if self.rows is not None:
            rows = self.rows.reshape(args.row_shape)
            if args.reduction == "sum":
                rows = rows.sum()
            elif args.reduction == "mean":
                with _quiet(xp):
                    rows = rows.sum() / self.denom if self.denom != 0 else xp.asarray(np.nan, np.float64)
            if args.z_loss:
                rows = rows + zterm
            loss = xp.asarray(rows).astype(args.z.dtype)
        return loss, xp.asarray(zterm).astype(args.z.dtype) if args.return_z else None


def _row_index(xp, shape):
    """Open-mesh index arrays over `shape`, to pair every row with one class index."""
    n = len(shape)
    return tuple(xp.arange(s).reshape((-1,) + (1,) * (n - i - 1)) for i, s in enumerate(shape))


def _take_rows(xp, a, loc, idx):
    """a[..., idx] per row of a (..., C): through a's flat view at ``loc`` (row * C + idx) when a is
    C-contiguous NumPy, else an open-mesh fancy index."""
    if loc is not None and a.flags.c_contiguous:
        return a.reshape(-1)[loc]
    return a[_row_index(xp, a.shape[:-1]) + (idx,)]
