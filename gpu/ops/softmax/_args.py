"""The one checking pass of each public call of the softmax family and cross-entropy, before any
path runs: checked, normalized arguments (CEArgs for cross-entropy), the bad-target errors, and the
cache of validated kernel-path calls, written once here and used by every cross-entropy call.

A kernel-path call whose signature (the arrays' type, shape, strides and dtype, and the options)
passed the checks before skips them: the cache keeps what they produced. Values the signature does
not hold are still checked every call (dloss, writeability); integer targets are checked on the
NumPy path here, and on the kernel path by the kernel itself (a sticky device record that
``gpu.check_errors()`` reads), so a bad target needs no extra pass and no sync.
"""
from __future__ import annotations

import operator
from typing import NamedTuple

import numpy as np

from ... import _backend as B
from ... import _launch, _workspace

REDUCTIONS = ("mean", "sum", "none")


def check_z(xp, z, axis, name: str = "z"):
    """(z as a float array of xp, its class axis normalized). An empty class axis is not an error:
    as in PyTorch, softmax and log-softmax of it are empty arrays (so is hardmax), and
    cross-entropy's losses are those of torch (numpy_path.no_classes)."""
    z = B.as_float_array(xp, z, name)
    if z.ndim == 0:
        raise ValueError(f"{name}: expected an array with at least one dimension, got a scalar")
    return z, B.normalize_axis(axis, z.ndim)


def softmax_args(z, axis):
    """softmax / log_softmax / hardmax: (xp, whether the kernels run, z, its class axis)."""
    xp, kernels = B.dispatch(z=z)
    z, ax = check_z(xp, z, axis)
    return xp, kernels, z, ax


# ---------------------------------------------------------------------------------------------
# Cross-entropy
# ---------------------------------------------------------------------------------------------

class CEArgs(NamedTuple):
    """The checked arguments of one cross-entropy call (arguments only: the paths return results)."""

    xp: object               # the array module of the arrays
    z: object               # the logits, a float array
    target: object          # class indices (z's shape without axis) or probabilities (z's shape)
    weight: object          # per-class weights (C,), or None
    return_z: bool          # the call returns the z-loss term too
    axis: int               # the class axis, normalized
    reduction: str          # 'mean', 'sum' or 'none'
    ignore_index: int
    label_smoothing: float  # in [0, 1]
    z_loss: float           # >= 0
    softcap: float | None   # None or > 0
    n_classes: int
    row_shape: tuple        # z's shape without axis: the shape of the per-row losses
    probs: bool             # target holds class probabilities


_ARRAYS = 5   # CEArgs' fields before the facts a signature decides (kept by the cache)


def check_reduction(reduction) -> str:
    return B.check_choice(reduction, "reduction", REDUCTIONS)


def check_ignore_index(ignore_index) -> int:
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}") from None


def check_label_smoothing(label_smoothing) -> float:
    """PyTorch rejects only label_smoothing > 1; a negative value means no smoothing (0)."""
    return max(0.0, B.check_real(label_smoothing, "label_smoothing", None, 1.0))


def check_z_loss_softcap(z_loss, softcap) -> tuple[float, float | None]:
    """(z_loss, softcap) as floats: z_loss finite and >= 0, softcap None or finite and > 0."""
    z_loss = B.check_real(z_loss, "z_loss", 0.0)
    if softcap is not None:
        softcap = B.check_real(softcap, "softcap")
        if not softcap > 0:
            raise ValueError(f"softcap: expected None or a finite number > 0, got {softcap!r}")
    return z_loss, softcap


def check_options(reduction, ignore_index, label_smoothing, z_loss, softcap) -> tuple:
    """(reduction, ignore_index, label_smoothing, z_loss, softcap) checked and normalized, in the
    order fused_linear_cross_entropy has always checked them (reduction, ignore_index, z_loss and
    softcap, label_smoothing)."""
    reduction = check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    z_loss, softcap = check_z_loss_softcap(z_loss, softcap)
    return reduction, ignore_index, check_label_smoothing(label_smoothing), z_loss, softcap


def _check(xp, z, target, weight, axis, reduction, ignore_index, label_smoothing, z_loss, softcap,
           return_z: bool, target_values: bool, sliced: bool = False) -> CEArgs:
    """Every check of a cross-entropy call's arrays and options. target_values=False: the kernel
    checks the integer targets' values itself, on the device. sliced: z holds one rank's slice of
    the classes (``comm=``), the targets are global: their values are checked by the caller."""
    z, ax = check_z(xp, z, axis)
    reduction = check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    label_smoothing = check_label_smoothing(label_smoothing)
    z_loss, softcap = check_z_loss_softcap(z_loss, softcap)
    c = z.shape[ax]
    row_shape = z.shape[:ax] + z.shape[ax + 1:]

    if target is None:
        raise TypeError("target: expected an array of class indices or probabilities, got None")
    t = target if B.is_cupy_array(target) else xp.asarray(target)
    if t.dtype.kind in "iu":
        if t.shape != row_shape:
            raise ValueError(f"target: class indices must have z's shape without axis {ax}, "
                             f"{row_shape}; got {t.shape}")
        if not sliced and (target_values or c == 0):   # no classes: every index is out of range unless ignored
            check_targets(t, c, ignore_index)
        probs = False
    elif t.dtype in B.FLOAT_DTYPES:
        if t.shape != z.shape:
            raise ValueError(f"target: class probabilities must have z's shape {z.shape}; got {t.shape}")
        probs = True
    else:
        raise TypeError(f"target: dtype {t.dtype} is neither integer (class indices) nor floating "
                        "(class probabilities)")

    if weight is not None:
        weight = B.as_float_array(xp, weight, "weight")
        if weight.shape != (c,):
            raise ValueError(f"weight: expected shape ({c},), one weight per class; got {weight.shape}")
    return CEArgs(xp, z, t, weight, return_z, ax, reduction, ignore_index, label_smoothing, z_loss, softcap, c,
                  row_shape, probs)


#: Signatures of kernel-path calls that passed _check -> the facts it produced (CEArgs[_ARRAYS:]).
_VALID = _launch.ValidCalls()


def _checked(z, target, weight, options: tuple, return_z: bool, dloss=None,
             sliced: bool = False) -> tuple[bool, CEArgs]:
    """(whether the kernels run, the checked arguments), from the cache of validated calls when a
    kernel-path call like this one passed the checks before. options: (axis, reduction,
    ignore_index, label_smoothing, z_loss, softcap); dloss: the backward's, for dispatch's
    array-module check (its value is checked by the caller)."""
    key, path = None, B.path_key(z)
    if path not in (None, "numpy") and not sliced:   # the NumPy path checks target values: never skipped
        sig = _launch.signature(z, target, weight)
        if sig is not None:
            key = (path, sig, options)
            try:
                facts = _VALID.get(key)
            except TypeError:            # an unhashable option: checked every time
                key = facts = None
            # dloss (the backward's) passes dispatch's module check as a scalar or an array of z's
            # module; anything else takes the full checks, whose dispatch accepts or names it
            if facts is not None and (dloss is None or type(dloss) is float or np.isscalar(dloss)
                                      or (isinstance(dloss, np.ndarray) if path == "emulate"
                                          else B.is_cupy_array(dloss))):
                xp = np if path == "emulate" else B.array_module(z=z)
                return True, tuple.__new__(CEArgs, (xp, z, target, weight, return_z) + facts)
    xp, kernels = B.dispatch(z=z, target=target, weight=weight, dloss=dloss)
    args = _check(xp, z, target, weight, *options, return_z, target_values=not kernels, sliced=sliced)
    # kept unless a check converted z or weight (a big-endian copy: the next call must convert too)
    # or read the targets' values (no classes: every index not ignored is out of range)
    if kernels and args.n_classes and args.z is z and args.weight is weight:
        _VALID.put(key, args[_ARRAYS:])
    return kernels, args


def forward_args(z, target, axis, reduction, ignore_index, label_smoothing, weight, z_loss, softcap,
                 return_grad, return_z_loss, inplace, sliced: bool = False) -> tuple[bool, CEArgs]:
    """softmax_cross_entropy's checks: (whether the kernels run, the checked arguments). sliced:
    z is this rank's slice of the classes (``comm=``)."""
    kernels, args = _checked(z, target, weight, (axis, reduction, ignore_index, label_smoothing, z_loss, softcap),
                             bool(return_z_loss), sliced=sliced)
    if inplace and not return_grad:
        raise ValueError("inplace: writing the gradient over z needs return_grad=True")
    if inplace and not getattr(args.z.flags, "writeable", True):
        raise ValueError("z: inplace=True needs a writeable array")
    return kernels, args


def backward_args(z, target, dloss, axis, reduction, ignore_index, label_smoothing, weight, z_loss,
                  softcap, sliced: bool = False) -> tuple[bool, CEArgs, object]:
    """softmax_cross_entropy_backward's checks: (whether the kernels run, the checked arguments,
    dloss as the paths take it: a Python float on the kernel path when it is a host scalar (kept
    as a device constant), else an array of the call's array module)."""
    kernels, args = _checked(z, target, weight, (axis, reduction, ignore_index, label_smoothing, z_loss, softcap),
                             False, dloss, sliced=sliced)
    if type(dloss) is float:      # the common case, without a NumPy round trip
        return kernels, args, dloss if kernels else np.asarray(dloss)
    host_scalar = not B.is_cupy_array(dloss) and np.ndim(dloss) == 0
    if host_scalar:
        dl = np.asarray(dloss)
        if dl.dtype.kind not in "iuf":
            raise TypeError(f"dloss: expected a real scalar or array, got dtype {dl.dtype}")
        dloss = float(dl) if kernels else dl
    else:
        dloss = dloss if B.is_cupy_array(dloss) else args.xp.asarray(dloss)
    if not host_scalar and dloss.dtype.kind not in "iuf" and dloss.dtype not in B.FLOAT_DTYPES:
        raise TypeError(f"dloss: expected a real scalar or array, got dtype {dloss.dtype}")
    allowed = [()] + ([args.row_shape] if args.reduction == "none" else [])
    if np.shape(dloss) not in allowed:
        raise ValueError(f"dloss: shape {np.shape(dloss)} does not match the loss, expected "
                         + " or ".join(map(str, allowed)))
    return kernels, args, dloss


def rows_args(xp, z, target, weight, reduction: str, ignore_index: int, label_smoothing: float, z_loss: float,
              softcap: float | None, return_z: bool) -> CEArgs:
    """The arguments of rows z (N, C), the class axis last, whose caller has checked and
    normalized every one (the check_* functions): built without checks."""
    return CEArgs(xp, z, target, weight, return_z, z.ndim - 1, reduction, ignore_index, label_smoothing, z_loss,
                  softcap, z.shape[-1], z.shape[:-1], False)


# ---------------------------------------------------------------------------------------------
# Bad targets
# ---------------------------------------------------------------------------------------------

def bad_target_error(target, pos: tuple, n_classes: int, ignore_index: int) -> ValueError:
    return ValueError(f"target: class index {int(target[pos])} at position {pos} is out of range "
                      f"[0, {n_classes}) and is not ignore_index ({ignore_index})")


def check_targets(t, n_classes: int, ignore_index: int) -> None:
    """Raise bad_target_error for the first class index of t outside [0, n_classes) that is not
    ignore_index (two reductions decide the common case, every index in range)."""
    if t.size == 0 or (int(t.min()) >= 0 and int(t.max()) < n_classes):
        return
    bad = ((t < 0) | (t >= n_classes)) & (t != ignore_index)
    if bool(bad.any()):
        pos = tuple(int(i) for i in np.unravel_index(int(bad.ravel().argmax()), t.shape))
        raise bad_target_error(t, pos, n_classes, ignore_index)


#: The workspace's record of the first out-of-range target: {row, target, C, ignore_index}.
BAD_TARGET = "softmax_cross_entropy.target"


def _recorded_bad_target(values: list) -> ValueError:
    row, t, n_classes, ignore_index = values
    return ValueError(f"target: class index {t} at row {row} (flat, over the axes other than the class axis, "
                      f"in memory order) of a cross-entropy call (softmax_cross_entropy, or fused_linear_cross_entropy's "
                      f"rows) since the last gpu.check_errors() is "
                      f"out of range [0, {n_classes}) and is not ignore_index ({ignore_index}); that row was "
                      "treated as ignored (set gpu.set_eager_checks(True) or GPU_EAGER_CHECKS=1 to raise in "
                      "the call itself)")


_workspace.register_error(BAD_TARGET, _recorded_bad_target)
