"""Softmax, log-softmax, hardmax and softmax + cross-entropy with its fused gradient.

`axis` is the class axis (rows are all the other axes): -1 for (batch, classes) logits, 0 for
the seed's (classes, m) output layer, 1 for NCHW-style per-pixel classes.

All are stable for logits of any magnitude: the row maximum is subtracted before exp (the NumPy
path skips that pass when exp(z) cannot overflow or lose precision, numpy_path.UNSHIFTED_SUMS). As
in PyTorch, a row whose logits are all -inf (or hold +inf or NaN) gives NaN; an empty class axis
gives empty arrays (hardmax too).

NumPy arrays run the NumPy reference path (numpy_path.py); CuPy arrays, and NumPy arrays under
the emulate backend, run the CUDA kernels of ``cuda_src/softmax.cu`` (kernel_path.py) on the row
engine (gpu/_engines/rows.py). float16 and bfloat16 compute in float32. Each call checks its
arguments once (_args.py) before either path runs. Cross-entropy is in cross_entropy.py, with the
seam that fused linear cross-entropy and gpu.torch call.
"""
from __future__ import annotations

from . import kernel_path, numpy_path
from ._args import softmax_args
from .cross_entropy import softmax_cross_entropy, softmax_cross_entropy_backward

__all__ = ["softmax", "log_softmax", "hardmax", "softmax_cross_entropy", "softmax_cross_entropy_backward"]


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
    xp, kernels, z, ax = softmax_args(z, axis)
    return (kernel_path if kernels else numpy_path).softmax(xp, z, ax, log)


def hardmax(z, axis: int = -1):
    """One-hot of the argmax along `axis` (the first index on ties; a NaN counts as the maximum,
    as in NumPy's argmax), in z's dtype.

    >>> import numpy as np, gpu
    >>> gpu.hardmax(np.array([[1.0, 3.0, 3.0]]))
    array([[0., 1., 0.]])
    """
    xp, kernels, z, ax = softmax_args(z, axis)
    return (kernel_path if kernels else numpy_path).hardmax(xp, z, ax)
