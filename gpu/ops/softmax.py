"""Softmax, log-softmax, hardmax and softmax + cross-entropy with its fused gradient.

`axis` is the class axis (rows are all the other axes): -1 for (batch, classes) logits, 0 for
the seed's (classes, m) output layer, 1 for NCHW-style per-pixel classes.

`softmax_cross_entropy` has the semantics of `torch.nn.functional.cross_entropy` with the class
axis at `axis`: integer class targets (z's shape without `axis`) or class probabilities (z's
shape), `weight`, `ignore_index`, `label_smoothing`, reduction 'mean' | 'sum' | 'none'; a mean over
only ignored targets is NaN. Its gradient is dZ = (softmax(Z) - Y) * scale, Y the (smoothed,
weighted) target distribution, computed in the same pass as the loss.

All are stable for logits of any magnitude: the row maximum is subtracted before exp (the NumPy
path skips that pass when exp(z) cannot overflow or lose precision, UNSHIFTED_SUMS). As in
PyTorch, a row whose logits are all -inf (or hold +inf or NaN) gives NaN.

Corner cases follow PyTorch (tests/test_numerics_softmax.py): an empty class axis gives empty
arrays (hardmax too); cross-entropy with no classes gives torch's losses (_ce_no_classes);
label_smoothing < 0 means no smoothing (only > 1 is rejected); with reduction 'mean' and target
weights summing to 0 the loss is NaN and every non-ignored row's gradient is NaN (ignored rows: 0).

NumPy arrays run the NumPy reference path below; CuPy arrays run the CUDA kernels of
``cuda_src/softmax.cu``. float16 and bfloat16 compute in float32.
"""
from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from .. import _backend as B
from .. import _cpu, _kernels, _launch, _workspace

REDUCTIONS = ("mean", "sum", "none")


def _check_z(xp, z, axis, name: str = "z"):
    # An empty class axis is not an error: as in PyTorch, softmax and log-softmax of it are empty
    # arrays (so is hardmax), and cross-entropy's losses are those of torch (see _ce_no_classes).
    z = B.as_float_array(xp, z, name)
    if z.ndim == 0:
        raise ValueError(f"{name}: expected an array with at least one dimension, got a scalar")
    return z, B.normalize_axis(axis, z.ndim)


# ---------------------------------------------------------------------------------------------
# Public API: softmax family
# ---------------------------------------------------------------------------------------------

def softmax(z, axis: int = -1):
    """exp(z - max) / sum(exp(z - max)) along `axis`, in z's dtype.

    >>> import numpy as np, gpu
    >>> p = gpu.softmax(np.array([[1.0, 2.0, 3.0]], np.float32))     # rows sum to 1
    """
    return _softmax(z, axis, log=False)


def log_softmax(z, axis: int = -1):
    """z - max - log(sum(exp(z - max))) along `axis`, in z's dtype.

    >>> import numpy as np, gpu
    >>> logp = gpu.log_softmax(np.array([[1e4, 0.0]], np.float32))   # [[0, -1e4]], no overflow
    """
    return _softmax(z, axis, log=True)


def _softmax(z, axis: int, log: bool):
    xp, kernels = B.dispatch(z=z)
    z, ax = _check_z(xp, z, axis)
    if kernels:
        return _gpu_softmax(xp, z, ax, log)
    return _cpu_softmax(xp, z, ax, log)


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

    def __init__(self, xp, z, target, axis, reduction, ignore_index, label_smoothing, weight,
                 check_targets: bool = True, z_loss: float = 0.0, softcap: float | None = None):
        # check_targets=False: the kernel path checks integer targets itself, on the device (a
        # record gpu.check_errors() reads), instead of an extra pass and a sync here.
        z, ax = _check_z(xp, z, axis)
        self.xp, self.z, self.axis = xp, z, ax
        self.reduction = B.check_choice(reduction, "reduction", REDUCTIONS)
        try:
            self.ignore_index = operator.index(ignore_index)
        except TypeError:
            raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}") from None
        # PyTorch rejects only label_smoothing > 1; a negative value means no smoothing
        self.label_smoothing = max(0.0, B.check_real(label_smoothing, "label_smoothing", None, 1.0))
        self.z_loss, self.softcap = _check_z_loss_softcap(z_loss, softcap)
        self.return_z = False
        self.n_classes = c = z.shape[ax]
        self.row_shape = z.shape[:ax] + z.shape[ax + 1:]

        if target is None:
            raise TypeError("target: expected an array of class indices or probabilities, got None")
        t = target if B.is_cupy_array(target) else xp.asarray(target)
        if t.dtype.kind in "iu":
            if t.shape != self.row_shape:
                raise ValueError(f"target: class indices must have z's shape without axis {ax}, "
                                 f"{self.row_shape}; got {t.shape}")
            # two reductions decide the common case (every index in range); else the full test
            in_range = not check_targets or t.size == 0 or (int(t.min()) >= 0 and int(t.max()) < c)
            bad = None if in_range else ((t < 0) | (t >= c)) & (t != self.ignore_index)
            if bad is not None and bool(bad.any()):
                pos = tuple(int(i) for i in np.unravel_index(int(bad.ravel().argmax()), t.shape))
                raise _bad_target_error(t, pos, c, self.ignore_index)
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

    _FACTS = ("axis", "reduction", "ignore_index", "label_smoothing", "n_classes", "row_shape", "probs", "z_loss",
              "softcap")

    @classmethod
    def checked(cls, z, target, axis, reduction, ignore_index, label_smoothing, weight, z_loss=0.0, softcap=None):
        """(xp, kernels, the checked arguments). On the kernel path a call whose signature (arrays'
        type, shape, strides, dtype and the options) passed the checks before skips them."""
        key, path = None, B.path_key(z)
        if path not in (None, "numpy"):      # the NumPy path checks target values: never skipped
            sig = _launch.signature(z, target, weight)
            if sig is not None:
                key = (path, sig, axis, reduction, ignore_index, label_smoothing, z_loss, softcap)
                try:
                    facts = _VALID.get(key)
                except TypeError:            # an unhashable option: checked every time
                    key = facts = None
                if facts is not None:
                    ce = cls.__new__(cls)
                    ce.xp, ce.z, ce.target, ce.weight = (np if path == "emulate" else B.array_module(z=z)), z, target, weight
                    for name, value in zip(cls._FACTS, facts):
                        setattr(ce, name, value)
                    ce.return_z = False
                    return ce.xp, True, ce
        xp, kernels = B.dispatch(z=z, target=target, weight=weight)
        ce = cls(xp, z, target, axis, reduction, ignore_index, label_smoothing, weight, check_targets=not kernels,
                 z_loss=z_loss, softcap=softcap)
        if kernels:
            _VALID.put(key, tuple(getattr(ce, name) for name in cls._FACTS))
        return xp, kernels, ce


_VALID = _launch.ValidCalls()


def _check_z_loss_softcap(z_loss, softcap) -> tuple[float, float | None]:
    z_loss = B.check_real(z_loss, "z_loss", 0.0)
    if softcap is not None:
        softcap = B.check_real(softcap, "softcap")
        if not softcap > 0:
            raise ValueError(f"softcap: expected None or a finite number > 0, got {softcap!r}")
    return z_loss, softcap


def softmax_cross_entropy(z, target, *, axis: int = -1, reduction: str = "mean", ignore_index: int = -100,
                          label_smoothing: float = 0.0, weight=None, z_loss: float = 0.0, softcap: float | None = None,
                          return_grad: bool = False, return_z_loss: bool = False, inplace: bool = False):
    """Cross-entropy of softmax(z) against `target`, as `torch.nn.functional.cross_entropy`.

    target: integer class indices of z's shape without `axis` (entries equal to `ignore_index`
    contribute nothing), or class probabilities of z's shape. weight: per-class weights, shape
    (C,). reduction 'mean' (over non-ignored targets, weighted by their class weight; over rows
    for probability targets), 'sum' or 'none' (per-row losses of z's shape without `axis`).

    z_loss (PaLM's auxiliary loss, >= 0): adds z_loss * lse^2 per row, lse = logsumexp of the
    row's logits, on rows that are not ignored. As in Liger-Kernel, the class weight does not
    scale it, and 'mean' averages it over the non-ignored rows (all rows for probability
    targets), not over their summed weight: loss = sum(w_t ce) / sum(w_t) + sum(z_loss lse^2) / n.
    softcap (Gemma 2, None or > 0): the logits are replaced by softcap * tanh(z / softcap) before
    everything else (z-loss included); the gradient is taken through it. Both are fused into the
    same pass over z, with exact gradients.

    Returns the loss in z's dtype; with return_z_loss=True also the z-loss term (included in the
    loss) under the same reduction, and with return_grad=True dz, the gradient of the returned
    loss (of loss.sum() for 'none') in z's dtype, computed in the same pass: loss, (loss, z_term),
    (loss, dz) or (loss, z_term, dz).
    inplace=True (with return_grad=True) writes dz over z and returns z as dz: it DESTROYS z, and
    saves a z-sized allocation for large vocabularies. After a ValueError for a bad target, z's
    contents are unspecified.

    A bad integer target (outside [0, C) and not ignore_index) raises ValueError at once on the
    NumPy path. On the kernel path (CuPy, emulate backend) the check stays on the device, as a
    device-side assert does in PyTorch: the row counts as ignored, and the error is raised by the
    next ``gpu.check_errors()``; with ``gpu.set_eager_checks(True)`` (or ``GPU_EAGER_CHECKS=1``)
    by the call itself, at the cost of one sync per call.

    >>> import numpy as np, gpu
    >>> z = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    >>> loss, dz = gpu.softmax_cross_entropy(z, np.array([1, 2, 3, 4]), return_grad=True)
    """
    xp, kernels, ce = _CE.checked(z, target, axis, reduction, ignore_index, label_smoothing, weight, z_loss,
                                  softcap)
    if inplace and not return_grad:
        raise ValueError("inplace: writing the gradient over z needs return_grad=True")
    if inplace and not getattr(ce.z.flags, "writeable", True):
        raise ValueError("z: inplace=True needs a writeable array")
    ce.return_z = bool(return_z_loss)
    run = _gpu_cross_entropy if kernels else _cpu_cross_entropy
    loss, dz = run(ce, want_loss=True, dloss=1.0 if return_grad else None, inplace=inplace)
    out = (loss,) + ((ce.z_term,) if return_z_loss else ()) + ((dz,) if return_grad else ())
    return out if len(out) > 1 else loss


def softmax_cross_entropy_backward(z, target, dloss=1.0, *, axis: int = -1, reduction: str = "mean",
                                   ignore_index: int = -100, label_smoothing: float = 0.0, weight=None,
                                   z_loss: float = 0.0, softcap: float | None = None):
    """Gradient of `softmax_cross_entropy` with respect to z, times `dloss`.

    dloss: a scalar for 'mean' and 'sum'; for 'none' a scalar or an array of the per-row loss
    shape (the gradient of sum(dloss * loss)). Returns dz in z's dtype.

    >>> import numpy as np, gpu
    >>> z = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    >>> dz = gpu.softmax_cross_entropy_backward(z, np.array([1, 2, 3, 4]))
    """
    xp, kernels = B.dispatch(z=z, target=target, weight=weight, dloss=dloss)
    ce = _CE(xp, z, target, axis, reduction, ignore_index, label_smoothing, weight, check_targets=not kernels,
             z_loss=z_loss, softcap=softcap)
    # a host scalar stays on the host (the kernel path keeps it as a device constant, uploaded
    # once); only an array is the caller's device (or, on the NumPy path, host) memory
    host_scalar = not B.is_cupy_array(dloss) and np.ndim(dloss) == 0
    if host_scalar:
        dl = np.asarray(dloss)
        if dl.dtype.kind not in "iuf":
            raise TypeError(f"dloss: expected a real scalar or array, got dtype {dl.dtype}")
        dloss = float(dl) if kernels else dl
    else:
        dloss = dloss if B.is_cupy_array(dloss) else xp.asarray(dloss)
    if not host_scalar and dloss.dtype.kind not in "iuf" and dloss.dtype not in B.FLOAT_DTYPES:
        raise TypeError(f"dloss: expected a real scalar or array, got dtype {dloss.dtype}")
    allowed = [()] + ([ce.row_shape] if ce.reduction == "none" else [])
    if np.shape(dloss) not in allowed:
        raise ValueError(f"dloss: shape {np.shape(dloss)} does not match the loss, expected "
                         + " or ".join(map(str, allowed)))
    run = _gpu_cross_entropy if kernels else _cpu_cross_entropy
    return run(ce, want_loss=False, dloss=dloss)[1]


# ---------------------------------------------------------------------------------------------
# NumPy reference path (any array module with NumPy's API)
# ---------------------------------------------------------------------------------------------

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


def _cpu_softmax(xp, z, ax, log):
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


def _cpu_hardmax(xp, z, ax):
    if z.shape[ax] == 0:                   # no classes: nothing to mark (argmax would raise)
        return xp.empty(z.shape, z.dtype)
    # argmax on float32 for the narrow types: exact, and NaN-aware like NumPy's float argmax
    idx = z.astype(B.compute_dtype(z.dtype), copy=False).argmax(axis=ax)
    classes = xp.arange(z.shape[ax]).reshape((-1,) + (1,) * (z.ndim - ax - 1))
    return (classes == xp.expand_dims(idx, ax)).astype(z.dtype)


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


def _ce_no_classes(ce: _CE, want_loss: bool, dloss, inplace: bool):
    """Cross-entropy over an empty class axis (both paths; nothing to launch), as PyTorch: every
    class index is out of range unless ignored; row losses are 0, or NaN with label smoothing
    over integer targets (ls / C); 'mean' is NaN (its denominator, the summed target weight or
    torch's rows = numel / C, is 0 / 0). The z-loss term adds nothing (no row has a class)."""
    xp = ce.xp
    if not ce.probs:
        bad = ce.target != ce.ignore_index
        if bool(bad.any()):
            pos = tuple(int(i) for i in np.unravel_index(int(bad.ravel().argmax()), bad.shape))
            raise _bad_target_error(ce.target, pos, 0, ce.ignore_index)
    loss = None
    if want_loss:
        row = np.nan if (ce.label_smoothing and not ce.probs) else 0.0
        if ce.reduction == "none":
            loss = xp.full(ce.row_shape, row, ce.z.dtype)
        else:
            total = np.nan if ce.reduction == "mean" else row if math.prod(ce.row_shape) else 0.0
            loss = xp.asarray(total, dtype=ce.z.dtype)
    ce.z_term = _z_term_empty(ce)
    if dloss is None:
        return loss, None
    return loss, ce.z if inplace else xp.empty(ce.z.shape, ce.z.dtype)


def _z_term_empty(ce: _CE):
    """The z-loss term when no row has a class to sum: 0 per row, 0 summed, NaN averaged."""
    if not ce.return_z:
        return None
    xp, dt = ce.xp, ce.z.dtype
    if ce.reduction == "none":
        return xp.zeros(ce.row_shape, dt)
    return xp.asarray(np.nan if ce.reduction == "mean" else 0.0, dtype=dt)


def _cpu_cross_entropy(ce: _CE, want_loss: bool, dloss, inplace: bool = False):
    """(loss or None, dz or None). dloss=None: no gradient; else the upstream gradient.
    inplace: dz is written over ce.z, which is returned as dz.

    Per row block (the class axis last): e = exp(z) (unshifted when safe, UNSHIFTED_SUMS), its row
    sums s, the row losses from log s and the target terms in float64 (R values: cheap, and
    log s - z_t keeps its digits for small losses), and the gradient written over e, which is dz
    itself when the dtypes allow. A soft-cap replaces the block's logits by cap tanh(z / cap)
    (tanh kept for the gradient's 1 - tanh^2); the z-loss adds its per-row terms from lse.
    Sets ce.z_term (the z-loss term under the reduction) when ce.return_z.
    """
    xp, ls, C = ce.xp, ce.label_smoothing, ce.n_classes
    if C == 0:
        return _ce_no_classes(ce, want_loss, dloss, inplace)
    acc, f64 = B.compute_dtype(ce.z.dtype), np.dtype(np.float64)
    last = ce.axis == ce.z.ndim - 1
    moved = ce.z if last else xp.moveaxis(ce.z, ce.axis, -1)
    z = _blocked(moved, moved.ndim)                   # blocks of rows along axis 1
    row_shape = z.shape[:-1]
    w = None if ce.weight is None else ce.weight.astype(acc)
    keep, ls_c = 1.0 - ls, ls / C
    zl, cap = ce.z_loss, ce.softcap

    # Per-row target terms, and the 'mean' denominator: known before any logit is read.
    if ce.probs:
        y = _blocked(ce.target if last else xp.moveaxis(ce.target, ce.axis, -1), moved.ndim)
        denom = count = np.float64(z.size // C)
    else:
        t = _blocked(ce.target, moved.ndim)
        valid = t != ce.ignore_index
        tt = xp.where(valid, t, 0).astype(xp.intp)
        w_t = valid.astype(f64) if w is None else xp.where(valid, w[tt], 0).astype(f64)
        denom = w_t.sum()
        count = valid.sum(dtype=f64)   # the z-loss's 'mean' denominator
        w_all = float(C) if w is None else float(w.sum(dtype=f64))

    g = gz = None
    if dloss is not None:   # per-row upstream scale: dloss, over the mean's denominator
        g = gz = xp.asarray(dloss, dtype=f64)
        if ce.reduction == "mean":
            with _quiet(xp):
                g = g / denom   # inf when the target weights sum to 0: a NaN gradient, as PyTorch
                gz = gz / count
        g, gz = xp.broadcast_to(g, row_shape), xp.broadcast_to(gz, row_shape)
        if not ce.probs:    # an ignored row's gradient is 0, whatever dloss and the denominator
            g, gz = xp.where(valid, g, 0.0), xp.where(valid, gz, 0.0)
            # the per-row gradient coefficients, once for all rows rather than per block (fewer
            # Python steps between a block's passes, where the threads take turns at the GIL)
            with _quiet(xp):    # inf * 0 (all target weights 0): NaN, as PyTorch
                hit = g * w_t * keep
                coef_t = hit + g * (ls_c * w_all) if ls else hit
        dz = xp.empty(z.shape, ce.z.dtype)
    if not ce.probs:
        # flat index of each row's target class in a C-contiguous (rows..., C) array; a block
        # subtracts its first row's offset (one fancy index instead of an open mesh per access)
        t_flat = xp.arange(0, math.prod(row_shape) * C, C, dtype=xp.intp).reshape(row_shape) + tt
        block_stride = math.prod(row_shape[2:]) * C   # elements per index along the block axis
    rows = xp.empty(row_shape, f64) if want_loss else None
    zrows = xp.zeros(row_shape, f64) if (zl and want_loss) or ce.return_z else None

    def block(sl):
        with _quiet(xp):   # NaN rows, overflowing unshifted exp, inf * 0 for a zero denominator
            _ce_block(sl)

    def _ce_block(sl):
        za = z[:, sl].astype(acc, copy=False)
        if cap is not None:
            th = xp.tanh(za / acc.type(cap))
            za = th * acc.type(cap)
        into = dz[:, sl] if g is not None and dz.dtype == acc else _cpu.scratch(xp, za.shape, acc)
        sh, e, s = _exp_rows(xp, za, into)       # log p = sh - log s
        lse = xp.log(s.astype(f64))
        zc = None
        if zl:   # lse of the logits themselves: log s plus the shift _exp_rows took
            lse_z = lse if sh is za else lse + za.max(axis=-1).astype(f64)
            live = True if ce.probs else valid[:, sl]
            if zrows is not None:   # a conditional: ignored NaN rows add 0
                zrows[:, sl] = xp.where(live, zl * lse_z * lse_z, 0.0)
            if gz is not None:
                zc = xp.where(live, 2 * zl * lse_z * gz[:, sl], 0.0)   # dz += zc p
        if ce.probs:
            yb = y[:, sl].astype(acc)
            if ls:
                yb = yb * acc.type(keep) + acc.type(ls_c)
            wy = yb if w is None else yb * w          # weighted target distribution
            wy_sum = _row_sum(xp, wy).astype(f64)
            if want_loss:
                rows[:, sl] = lse * wy_sum - _row_dot(xp, sh, wy)
        else:
            w_tb = w_t[:, sl]
            t_loc = t_flat[:, sl] - (sl.start or 0) * block_stride if xp is np else None
            if want_loss:
                picked = _take_rows(xp, sh, t_loc, tt[:, sl])   # sh_t
                r = xp.where(valid[:, sl], w_tb * (lse - picked), 0.0)   # ignored: 0 whatever the logits
                if ls:
                    smooth_sh = _row_sum(xp, sh) if w is None else _row_dot(xp, sh, w)   # sum_c w_c sh_c
                    r = r * keep + xp.where(valid[:, sl], w_all * lse - smooth_sh, 0) * ls_c
                rows[:, sl] = r
        if g is None:
            return
        gb = g[:, sl]
        if ce.probs:
            # d/dz_j = p_j * sum_c(w_c y_c) - w_j y_j
            coef = gb * wy_sum if zc is None else gb * wy_sum + zc
            e *= (coef / s).astype(acc)[..., None]
            e -= gb.astype(acc)[..., None] * wy
        else:
            # d/dz_j = p_j ((1-ls) w_t + ls W / C) - (1-ls) w_t [j == t] - (ls / C) w_j; 0 if ignored
            hit_b, coef = hit[:, sl], coef_t[:, sl]
            if zc is not None:
                coef = coef + zc
            e *= (coef / s).astype(acc)[..., None]
            if t_loc is not None and e.flags.c_contiguous:
                e.reshape(-1)[t_loc] -= hit_b.astype(acc)
            else:
                e[_row_index(xp, e.shape[:-1]) + (tt[:, sl],)] -= hit_b.astype(acc)
            if ls:
                e -= (gb * ls_c).astype(acc)[..., None] * (1 if w is None else w)
        if cap is not None:   # through the soft-cap: d tanh = 1 - tanh^2
            e *= 1 - th * th
        if not ce.probs:      # ignored rows: 0 even where their logits are +inf or NaN (0 * NaN)
            e[~valid[:, sl]] = 0
        if dz.dtype != acc:   # else e already is this block of dz
            dz[:, sl] = e

    _run_rows(xp, block, z.shape[1], C * acc.itemsize)

    zterm = None
    if zrows is not None:
        zterm = zrows.reshape(ce.row_shape)
        with _quiet(xp):   # a 'mean' over no rows: 0 / 0
            zterm = zterm.sum() if ce.reduction == "sum" else zterm.sum() / count if ce.reduction == "mean" else zterm
    loss = None
    if want_loss:
        rows = rows.reshape(ce.row_shape)
        if ce.reduction == "sum":
            rows = rows.sum()
        elif ce.reduction == "mean":
            with _quiet(xp):
                rows = rows.sum() / denom if denom != 0 else xp.asarray(np.nan, f64)
        if zl:
            rows = rows + zterm
        loss = xp.asarray(rows).astype(ce.z.dtype)
    ce.z_term = xp.asarray(zterm).astype(ce.z.dtype) if ce.return_z else None
    if g is None:
        return loss, None
    dz = dz.reshape(moved.shape) if last else xp.moveaxis(dz.reshape(moved.shape), -1, ce.axis)
    if inplace:
        ce.z[...] = dz
        dz = ce.z
    return loss, dz


# ---------------------------------------------------------------------------------------------
# Kernel launch path (CuPy arrays; NumPy arrays under the emulator backend): cuda_src/softmax.cu
# ---------------------------------------------------------------------------------------------
#
# z is viewed as a C-contiguous (outer, C, inner) array (a Fortran-ordered z as its transpose, no
# copy); rows are (outer, inner) pairs. Path per call (the .cu header has the kernels' design):
#   inner == 1, C <= warp_max_cols      *_warp_n{N}: a lane group per row, the row in registers
#   inner == 1, row fits shared memory   *_block, cached=C: a block per row, read once
#   inner == 1, larger rows              *_block, 0 < cached < C: the leading columns in shared
#                                        memory, the rest read twice (the second read from L2)
#   inner > 1                            *_strided: (32, TY) blocks over tiles of 32 inner positions
# Grids are min(work, one wave of resident blocks); kernels grid-stride over the rest.


@dataclass(frozen=True)
class _Tuning:
    """Path thresholds. Tests force each path at small sizes with `_tuning(...)` (no rebuild:
    every kernel is in the one module per dtype)."""

    warp_max_cols: int | None = None        # None: 1024 (256 for float64 cross-entropy)
    smem_bytes: int | None = None           # cached-row budget; None: the device's opt-in limit
    strided_cache_bytes: int = 48 * 1024    # (C, 32) tile cache of the strided path, at most
    block_threads: int | None = None        # None: by row length


_TUNING = _DEFAULT_TUNING = _Tuning()
_WARP_NS = (1, 2, 4, 8, 16, 32)             # the warp kernels' values per lane: *_warp_n{N}


def _k(name: str) -> int:
    """A constant of cuda_src/softmax.cu or rows.cuh (its ``#define``)."""
    return _kernels.family("softmax").constants[name]


@contextlib.contextmanager
def _tuning(**changes):
    """Override path thresholds inside the block (kernel tests)."""
    global _TUNING
    saved = _TUNING
    _TUNING = replace(_TUNING, **changes)
    try:
        yield
    finally:
        _TUNING = saved


class _Layout(NamedTuple):
    """z as the kernels see it (a tuple: built on every call, cheaper than a dataclass)."""

    z: object      # C-contiguous: z itself, z.T (flip) or a contiguous copy
    axis: int      # the class axis of `z`
    outer: int
    C: int
    inner: int
    flip: bool     # z is the caller's array transposed: transpose outputs back
    copied: bool   # z is a copy of the caller's array

    @property
    def rows(self) -> int:
        return self.outer * self.inner

    def orient(self, a):
        """A caller-oriented array (z's shape, or z's shape without axis) in this layout."""
        return a.T if self.flip else a


def _layout(xp, z, ax) -> _Layout:
    flip = copied = False
    if not z.flags.c_contiguous:
        if z.ndim > 1 and z.flags.f_contiguous:
            z, ax, flip = z.T, z.ndim - 1 - ax, True
        else:
            z, copied = xp.ascontiguousarray(z), True
    return _Layout(z, ax, math.prod(z.shape[:ax]), z.shape[ax], math.prod(z.shape[ax + 1:]), flip, copied)


@dataclass(frozen=True)
class _Plan:
    path: str        # "warp", "block" or "strided"
    grid: int
    block: tuple
    smem: int = 0
    n: int = 0       # warp: values per lane
    lanes: int = 32  # warp: lanes per row
    vec: int = 0     # 16-byte vector loads
    cached: int = 0  # strided: the tile kept in shared memory (0/1); block: its leading columns kept
    kernels: dict = field(default_factory=dict, compare=False, repr=False)   # fetched once

    def kernel(self, xp, op: str, dtype, exact: bool = False):
        """The kernel of this path for ``op`` (softmax, hardmax or softmax_cross_entropy), or the
        kernel named ``op`` with ``exact``; fetched once per plan."""
        k = self.kernels.get((op, dtype))
        if k is None:
            suffix = "" if exact else f"_warp_n{self.n}" if self.path == "warp" else f"_{self.path}"
            k = self.kernels[(op, dtype)] = _kernels.get_kernel("softmax", op + suffix, xp, dtype)
        return k

    def sizes(self, lay: _Layout, rows: str | None = "rows", cached: bool = True) -> dict:
        """The size arguments of this path's kernels, by name (``rows=None``: the kernel takes the
        row count under another name). Kept per plan, whose key holds the sizes; a fresh dict."""
        key = ("sizes", rows, cached)
        out = self.kernels.get(key)
        if out is None:
            out = self.kernels[key] = self._sizes(lay, rows, cached)
        return dict(out)

    def _sizes(self, lay: _Layout, rows: str | None, cached: bool) -> dict:
        C = np.int32(lay.C)
        if self.path == "strided":
            out = dict(outer=np.int64(lay.outer), C=C, inner=np.int64(lay.inner))
        else:
            out = dict(C=C, vec=np.int32(self.vec))
            if self.path == "warp":
                out["lanes"] = np.int32(self.lanes)
            if rows:
                out[rows] = np.int64(lay.rows)
        if cached and self.path != "warp":
            out["cached"] = np.int32(self.cached)
        return out


_PLANS = _launch.PlanCache()


def _plan(xp, lay: _Layout, itemsize: int, aligned: bool, vec_first: bool, *, dense_target=False, cache=True,
          max_n=32) -> _Plan:
    """Which kernel path runs (lay.outer, lay.C, lay.inner) rows, and its launch shape; kept per
    shape, dtype size, alignment, options, device and knobs. ``aligned``: every operand has the same
    address modulo 16; ``vec_first``: z itself is 16-byte aligned."""
    dev = _launch.device(xp)
    tune = None if _TUNING is _DEFAULT_TUNING else _TUNING   # hashing the dataclass costs more than the key
    key = (lay.outer, lay.C, lay.inner, itemsize, aligned, vec_first, dense_target, cache, max_n, id(dev), tune)
    return _PLANS.get(key, lambda: _make_plan(dev, lay, itemsize, aligned, vec_first, dense_target, cache, max_n))


def _make_plan(dev, lay: _Layout, itemsize: int, aligned: bool, vec_first: bool, dense_target: bool, cache: bool,
               max_n: int) -> _Plan:
    C, regions = lay.C, 2 if dense_target else 1
    pack = 16 // itemsize
    limit = dev["max_shared_memory_per_block_optin"] - 4096   # leave room for static scratch
    budget = min(limit, _TUNING.smem_bytes if _TUNING.smem_bytes is not None else limit)
    if lay.inner > 1:
        ty = min(_k("SM_STRIDED_MAX_TY"), _launch.pow2_ceil(C))
        smem = C * 32 * itemsize * regions
        cached = int(cache and smem <= min(budget, _TUNING.strided_cache_bytes))
        smem = smem if cached else 0
        tiles = lay.outer * _launch.ceil_div(lay.inner, 32)
        if tiles >= 2**31:   # the kernel counts tiles in 32 bits
            raise ValueError(f"z: {tiles} tiles of 32 positions along the axes after axis {lay.axis} "
                             "exceed the strided kernel's 2^31")
        return _Plan("strided", min(tiles, _launch.resident_blocks(dev, 32 * ty, smem)), (32, ty), smem,
                     cached=cached)

    warp_max = _TUNING.warp_max_cols if _TUNING.warp_max_cols is not None else 32 * max_n
    if C <= min(warp_max, 32 * max_n):
        n = next(n for n in _WARP_NS if 32 * n >= C)
        lanes = 32 if C > 32 else _launch.pow2_ceil(C)
        vec = int(aligned and vec_first and C % pack == 0)
        block = _k("SM_WARP_THREADS")
        groups = _launch.ceil_div(lay.rows, block // lanes)
        return _Plan("warp", min(groups, _launch.resident_blocks(dev, block)), (block,),
                     n=n, lanes=lanes, vec=vec)

    # About four 16-byte vectors per thread per pass; 512 at most for float64 (its registers).
    most = _k("SM_BLOCK_MAX_THREADS" if itemsize < 8 else "SM_BLOCK_MAX_THREADS_F64")
    threads = _TUNING.block_threads or max(128, min(most,
                                                     _launch.pow2_ceil(_launch.ceil_div(C, 4 * pack))))
    # The leading `cached` columns stay in shared memory: the whole row where it fits, else as many
    # as the budget holds (the rest is read again, from L2: see rows_block). Its region per operand:
    # SM_BLOCK_REGION(cached) elements, (ceil(cached / pack) + 2) 16-byte vectors.
    cached = 0
    if cache:
        cached = min(C, (budget // (16 * regions) - 2) * pack)
        cached = cached if cached > 0 else 0
    smem = (_launch.ceil_div(cached, pack) + 2) * 16 * regions if cached else 0
    return _Plan("block", min(lay.rows, _launch.resident_blocks(dev, threads, smem)), (threads,), smem,
                 vec=int(aligned), cached=cached)


def _alignment(*arrays) -> tuple[bool, bool]:
    """(every array at the same address modulo 16, the first 16-byte aligned)."""
    if _launch.aligned(*arrays):     # the common case, without reading every address
        return True, True
    ptrs = [_launch.data_ptr(a) for a in arrays]
    return len({p % 16 for p in ptrs}) == 1, ptrs[0] % 16 == 0


def _gpu_softmax(xp, z, ax, log):
    lay = _layout(xp, z, ax)
    out = B.empty(xp, lay.z.shape, z.dtype)
    if lay.z.size:
        plan = _plan(xp, lay, z.dtype.itemsize, *_alignment(lay.z, out))
        k = plan.kernel(xp, "softmax", z.dtype)
        _kernels.launch(k, plan.grid, plan.block, k.args(out=out, z=lay.z, log=np.int32(log), **plan.sizes(lay)),
                        shared_mem=plan.smem)
    return lay.orient(out)


def _gpu_hardmax(xp, z, ax):
    lay = _layout(xp, z, ax)
    out = B.empty(xp, lay.z.shape, z.dtype)
    if lay.z.size:
        plan = _plan(xp, lay, z.dtype.itemsize, *_alignment(lay.z, out), cache=False)
        k = plan.kernel(xp, "hardmax", z.dtype)
        _kernels.launch(k, plan.grid, plan.block, k.args(out=out, z=lay.z, **plan.sizes(lay, cached=False)),
                        shared_mem=plan.smem)
    return lay.orient(out)


_CE_RED = {"none": "CE_RED_NONE", "sum": "CE_RED_SUM", "mean": "CE_RED_MEAN"}


def _bad_target_error(target, pos: tuple, n_classes: int, ignore_index: int) -> ValueError:
    return ValueError(f"target: class index {int(target[pos])} at position {pos} is out of range "
                      f"[0, {n_classes}) and is not ignore_index ({ignore_index})")


#: The workspace's record of the first out-of-range target: {row, target, C, ignore_index}.
_BAD_TARGET = "softmax_cross_entropy.target"


def _recorded_bad_target(values: list) -> ValueError:
    row, t, n_classes, ignore_index = values
    return ValueError(f"target: class index {t} at row {row} (flat, over the axes other than the class axis, "
                      f"in memory order) of a cross-entropy call (softmax_cross_entropy, or fused_linear_cross_entropy's "
                      f"rows) since the last gpu.check_errors() is "
                      f"out of range [0, {n_classes}) and is not ignore_index ({ignore_index}); that row was "
                      "treated as ignored (set gpu.set_eager_checks(True) or GPU_EAGER_CHECKS=1 to raise in "
                      "the call itself)")


_workspace.register_error(_BAD_TARGET, _recorded_bad_target)


class _CERecipe(NamedTuple):
    """Everything about a cross-entropy launch that the arrays' values do not change: kept per
    (shape, dtype, options, alignment, device, knobs), so a repeated call only allocates and launches."""

    plan: _Plan
    k: object                # the fused kernel of the plan's path
    scalars: dict            # its size and option arguments
    kw: object               # softmax_cross_entropy_weight_sum, or None when no denominator is needed
    grid_w: int
    block_w: int
    weight_sum: dict         # its scalar arguments


_CE_RECIPES = _launch.PlanCache()


def _ce_recipe(xp, lay: _Layout, dtype, acc, ce: _CE, want_loss: bool, grad: bool, dl_stride: int,
               alignment: tuple[bool, bool]) -> _CERecipe:
    dev = _launch.device(xp)
    key = (lay.outer, lay.C, lay.inner, dtype, ce.probs, ce.weight is not None, ce.reduction, ce.ignore_index,
           ce.label_smoothing, ce.z_loss, ce.softcap, ce.return_z, want_loss, grad, dl_stride, alignment, id(dev),
           None if _TUNING is _DEFAULT_TUNING else _TUNING)
    return _CE_RECIPES.get(key, lambda: _make_ce_recipe(xp, lay, dtype, acc, ce, want_loss, grad, dl_stride,
                                                        alignment))


def _make_ce_recipe(xp, lay, dtype, acc, ce, want_loss, grad, dl_stride, alignment) -> _CERecipe:
    K = _kernels.family("softmax").constants
    red, R = ce.reduction, lay.rows
    flags = ((K["CE_PROBS"] if ce.probs else 0) | (K["CE_WEIGHT"] if ce.weight is not None else 0)
             | (K["CE_GRAD"] if grad else 0) | (K["CE_ROWS"] if (want_loss or ce.return_z) and red == "none" else 0)
             | (K["CE_SOFTCAP"] if ce.softcap is not None else 0) | (K["CE_ZRET"] if ce.return_z else 0))
    denom = grad and red == "mean" and not ce.probs
    if denom:
        flags |= K["CE_DENOM"]
    code = K["CE_RED_MEAN_ROWS"] if red == "mean" and ce.probs else K[_CE_RED[red]]
    # loss only: no second pass, so nothing to keep in shared memory (it would only cut occupancy)
    plan = _plan(xp, lay, dtype.itemsize, *alignment, dense_target=ce.probs, cache=grad,
                 max_n=8 if dtype == np.float64 else 32)
    k = plan.kernel(xp, "softmax_cross_entropy", dtype)
    scalars = plan.sizes(lay, rows=None) | {
        "dloss_stride": np.int64(dl_stride), "ignore_index": np.int64(ce.ignore_index),
        "label_smoothing": acc.type(ce.label_smoothing), "z_loss": acc.type(ce.z_loss),
        "softcap": acc.type(ce.softcap or 0.0), "flags": np.int32(flags), "reduction": np.int32(code),
        "n_rows": np.int64(R)}
    kw, grid_w, block_w, weight_sum = None, 0, 0, {}
    if denom:
        kw = plan.kernel(xp, "softmax_cross_entropy_weight_sum", dtype, exact=True)
        block_w = K["SM_WEIGHT_SUM_THREADS"]
        grid_w = min(_launch.ceil_div(R, block_w), 4 * kw.device["sm_count"])
        weight_sum = {"has_weight": np.int32(ce.weight is not None), "rows": np.int64(R), "C": np.int32(lay.C),
                      "ignore_index": np.int64(ce.ignore_index)}
    return _CERecipe(plan, k, scalars, kw, grid_w, block_w, weight_sum)


def _gpu_cross_entropy(ce: _CE, want_loss: bool, dloss, inplace: bool = False):
    """(loss or None, dz or None) from the fused kernels; same contract as _cpu_cross_entropy.

    Integer targets are checked by the kernel (no extra pass over them, no sync): a bad one is
    treated as ignored and recorded in the stream's workspace; ``gpu.check_errors()`` raises it
    (ValueError), or the call itself with eager checks (``gpu.set_eager_checks``)."""
    xp, z = ce.xp, ce.z
    if ce.n_classes == 0:
        return _ce_no_classes(ce, want_loss, dloss, inplace)
    acc = B.compute_dtype(z.dtype)
    lay = _layout(xp, z, ce.axis)
    R, C = lay.rows, lay.C
    grad = dloss is not None
    red = ce.reduction

    if R == 0:   # nothing to launch: the reference's values for empty sums
        ce.z_term = _z_term_empty(ce)
        loss = None
        if want_loss:
            loss = (xp.empty(ce.row_shape, z.dtype) if red == "none"
                    else xp.asarray(0 if red == "sum" else np.nan, dtype=z.dtype))
        return loss, (xp.empty(z.shape, z.dtype) if grad else None)

    one = lambda dt: _launch.dummy(xp, dt)   # stands in for a pointer argument the flags leave unused
    if ce.probs:
        y = xp.ascontiguousarray(lay.orient(ce.target).astype(z.dtype, copy=False))
        target = one(np.int64)
    else:
        y = one(z.dtype)
        target = xp.ascontiguousarray(lay.orient(ce.target).astype(np.int64, copy=False))
    weight = one(acc) if ce.weight is None else xp.ascontiguousarray(ce.weight.astype(acc, copy=False))
    dz = one(z.dtype)
    dl, dl_stride = one(acc), 0
    if grad:
        dz = lay.z if inplace else B.empty(xp, lay.z.shape, z.dtype)
        scale = acc.type(1 / R) if red == "mean" and ce.probs else None   # 'mean' over rows: known here
        if B.is_cupy_array(dloss) or getattr(dloss, "ndim", 0):
            dl = xp.asarray(dloss, dtype=acc)
            if dl.ndim:   # 'none' with one upstream gradient per row
                dl, dl_stride = xp.ascontiguousarray(lay.orient(dl)).reshape(-1), 1
            else:
                dl = dl.reshape(1)
            if scale is not None:
                dl = dl * scale
        else:         # a host scalar: a kept device constant, not an upload per call
            dl = _launch.constant(xp, acc, float(dloss) * (1.0 if scale is None else float(scale)))

    r = _ce_recipe(xp, lay, z.dtype, acc, ce, want_loss, grad, dl_stride,
                   _alignment(lay.z, dz, *((y,) if ce.probs else ())))
    G = r.plan.grid
    # scratch from the stream's persistent workspace (no allocation, no memset): acc partials of
    # both kernels (4 and 2 per block) and the inverse denominators, the per-block first bad rows,
    # both kernels' tickets (the last block leaves them at zero), the sticky bad-target record
    ws = _workspace.get(xp)
    fbuf = ws.buffer("softmax_cross_entropy.acc", acc, 4 * G + (2 * r.grid_w + 2 if r.kw is not None else 0))
    part_bad = ws.buffer("softmax_cross_entropy.bad", np.int64, G)
    tickets = ws.counters("softmax_cross_entropy", 2)
    bad = ws.error_record(_BAD_TARGET)
    inv_denom = one(acc)
    if r.kw is not None:
        # 1 / (sum of the target weights), which every gradient element needs before it is written
        inv_denom = fbuf[4 * G:4 * G + 2]
        _kernels.launch(r.kw, r.grid_w, r.block_w, r.kw.args_from(r.weight_sum | {
            "inv_denom": inv_denom, "part": fbuf[4 * G + 2:], "ticket": tickets[1:], "target": target,
            "weight": weight}))
    nz = 2 if ce.return_z else 1   # the z-loss term follows the loss (rows or scalar)
    want_out = want_loss or ce.return_z
    loss_rows = B.empty(xp, nz * R, z.dtype) if want_out and red == "none" else one(z.dtype)
    # the reduced loss: an output, or (gradient only) scratch the kernel writes anyway
    loss_out = (B.empty(xp, nz, z.dtype) if want_out and red != "none"
                else ws.buffer("softmax_cross_entropy.loss", z.dtype, nz))
    named = r.scalars | {"dz": dz, "loss_rows": loss_rows, "loss_out": loss_out, "bad_out": bad,
                         "part_loss": fbuf[:G], "part_w": fbuf[G:4 * G], "part_bad": part_bad, "ticket": tickets[:1],
                         "z": lay.z, "target": target, "y": y, "weight": weight, "dloss": dl, "inv_denom": inv_denom}
    _kernels.launch(r.k, G, r.plan.block, r.k.args_from(named), shared_mem=r.plan.smem)

    # A bad target stays on the device (no sync here): recorded for gpu.check_errors(), unless
    # eager checks read the record now and raise with the exact position.
    if _workspace.eager_checks() and not ce.probs and _kernels.launches_run():
        found = ws.read_error(_BAD_TARGET)
        if found is not None:
            pos = tuple(int(i) for i in np.unravel_index(found[0], _row_shape_of(lay)))
            raise _bad_target_error(ce.target, pos[::-1] if lay.flip else pos, C, ce.ignore_index)

    loss = None
    if want_loss:
        if red == "none":
            loss = lay.orient(loss_rows[:R].reshape(_row_shape_of(lay)))
        else:
            loss = loss_out[:1].reshape(())
    ce.z_term = None
    if ce.return_z:
        ce.z_term = lay.orient(loss_rows[R:].reshape(_row_shape_of(lay))) if red == "none" else loss_out[1:2].reshape(())
    out = None
    if grad:
        out = lay.orient(dz)
        if inplace and lay.copied:
            z[...] = out
            out = z
    return loss, out


def _row_shape_of(lay: _Layout) -> tuple:
    return lay.z.shape[:lay.axis] + lay.z.shape[lay.axis + 1:]
