"""Softmax + cross-entropy with its fused gradient, and the seam other cross-entropy callers use.

`softmax_cross_entropy` has the semantics of `torch.nn.functional.cross_entropy` with the class
axis at `axis`: integer class targets (z's shape without `axis`) or class probabilities (z's
shape), `weight`, `ignore_index`, `label_smoothing`, reduction 'mean' | 'sum' | 'none'; a mean over
only ignored targets is NaN. Its gradient is dZ = (softmax(Z) - Y) * scale, Y the (smoothed,
weighted) target distribution, computed in the same pass as the loss.

Corner cases follow PyTorch (tests/test_numerics_softmax.py): cross-entropy with no classes gives
torch's losses (numpy_path.no_classes); label_smoothing < 0 means no smoothing (only > 1 is
rejected); with reduction 'mean' and target weights summing to 0 the loss is NaN and every
non-ignored row's gradient is NaN (ignored rows: 0).

Each public call makes one checking pass (_args) before a path runs: numpy_path.py for NumPy
arrays, kernel_path.py for CuPy arrays and the emulate backend (cuda_src/softmax.cu).

The seam
--------
What other cross-entropy callers (fused linear CE, gpu/ops/linear_cross_entropy.py; a
vocabulary-parallel CE later; gpu.torch) call by name, instead of this package's private names:

    REDUCTIONS                  the reduction names: ('mean', 'sum', 'none')
    check_options(...)          reduction, ignore_index, label_smoothing, z_loss, softcap: checked, normalized
    check_z_loss_softcap(z, c)  (z_loss, softcap) checked: z_loss finite >= 0, softcap None or finite > 0
    check_targets(t, C, ii)     raise the public ValueError at t's first index outside [0, C) not ii
    record_bad_target(xp, t, C, ii)  kernel path: that index into the sticky record, no sync
    rows_args(...)              CEArgs of checked rows z (N, C), class axis last, built without checks
    compute(args, kernels, ...)  (loss, z-loss term, dz) of checked arguments, kernels or NumPy
"""
from __future__ import annotations

from . import _args, kernel_path, numpy_path, vocab_parallel
from ._args import (REDUCTIONS, CEArgs, check_options, check_targets, check_z_loss_softcap,  # noqa: F401 (the seam)
                    rows_args)
from .kernel_path import record_bad_target  # noqa: F401 (the seam)

__all__ = ["softmax_cross_entropy", "softmax_cross_entropy_backward",
           "REDUCTIONS", "check_options", "check_z_loss_softcap", "check_targets", "record_bad_target", "rows_args",
           "compute"]


def softmax_cross_entropy(z, target, *, axis: int = -1, reduction: str = "mean", ignore_index: int = -100,
                          label_smoothing: float = 0.0, weight=None, z_loss: float = 0.0, softcap: float | None = None,
                          return_grad: bool = False, return_z_loss: bool = False, inplace: bool = False,
                          comm=None):
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

    comm (vocabulary parallelism): anything ``gpu.distributed.wrap`` takes. z's class axis then
    holds this rank's contiguous slice of the classes, in rank order (rank 0 the first classes;
    slices may be unequal, or empty); integer targets hold global class indices and are the same
    on every rank (probability targets: this rank's slice, like z); weight is this rank's slice.
    Every option works; the loss (and the z-loss term) is the same, bitwise, on every rank and
    equals the single-process result on the concatenated logits; dz is this rank's slice of the
    single-process gradient. The first call of a configuration (rows, slice size, dtype,
    options) on a communicator exchanges a header (a disagreement is a ValueError on every rank);
    each call then makes ONE allgather of the per-row statistics (gpu/ops/softmax/vocab_parallel.py).
    A bad target raises on every rank (NumPy) or is recorded on the device (kernel path).

    >>> import numpy as np, gpu
    >>> z = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    >>> loss, dz = gpu.softmax_cross_entropy(z, np.array([1, 2, 3, 4]), return_grad=True)
    """
    try:
        kernels, args = _args.forward_args(z, target, axis, reduction, ignore_index, label_smoothing, weight, z_loss,
                                           softcap, return_grad, return_z_loss, inplace, sliced=comm is not None)
    except (ValueError, TypeError):
        if comm is not None:     # the other ranks raise too, instead of waiting for this one
            vocab_parallel.reject(comm, "softmax_cross_entropy")
        raise
    if comm is not None:
        loss, z_term, dz = vocab_parallel.cross_entropy(comm, "softmax_cross_entropy", args, kernels, True,
                                                        1.0 if return_grad else None, inplace)
    else:
        loss, z_term, dz = compute(args, kernels, want_loss=True, dloss=1.0 if return_grad else None,
                                   inplace=inplace)
    if return_grad:
        return (loss, z_term, dz) if return_z_loss else (loss, dz)
    return (loss, z_term) if return_z_loss else loss


def softmax_cross_entropy_backward(z, target, dloss=1.0, *, axis: int = -1, reduction: str = "mean",
                                   ignore_index: int = -100, label_smoothing: float = 0.0, weight=None,
                                   z_loss: float = 0.0, softcap: float | None = None, comm=None):
    """Gradient of `softmax_cross_entropy` with respect to z, times `dloss`.

    dloss: a scalar for 'mean' and 'sum'; for 'none' a scalar or an array of the per-row loss
    shape (the gradient of sum(dloss * loss)). Returns dz in z's dtype. comm: as in
    `softmax_cross_entropy` (this rank's slice of the classes; dz is this rank's slice, from ONE
    allgather of the per-row statistics).

    >>> import numpy as np, gpu
    >>> z = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    >>> dz = gpu.softmax_cross_entropy_backward(z, np.array([1, 2, 3, 4]))
    """
    try:
        kernels, args, dloss = _args.backward_args(z, target, dloss, axis, reduction, ignore_index, label_smoothing,
                                                   weight, z_loss, softcap, sliced=comm is not None)
    except (ValueError, TypeError):
        if comm is not None:
            vocab_parallel.reject(comm, "softmax_cross_entropy_backward")
        raise
    if comm is not None:
        return vocab_parallel.cross_entropy(comm, "softmax_cross_entropy_backward", args, kernels, False, dloss)[2]
    return compute(args, kernels, want_loss=False, dloss=dloss)[2]


def compute(args: CEArgs, kernels: bool, *, want_loss: bool = True, dloss=None, inplace: bool = False):
    """(loss or None, z-loss term or None, dz or None) of checked arguments, on the kernels or the
    NumPy path. dloss: None (no gradient) or the upstream gradient (a scalar, or one per row for
    'none'); inplace: dz is written over args.z, which is returned as dz."""
    if args.n_classes == 0:   # nothing to sum on either path
        return numpy_path.no_classes(args, want_loss, dloss, inplace)
    if kernels:
        return kernel_path.cross_entropy(args, want_loss, dloss, inplace)
    return numpy_path.cross_entropy(args, want_loss, dloss, inplace)
