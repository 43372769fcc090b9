"""The kernel path of vocabulary-parallel cross-entropy (vocab_parallel.py): the launches of
softmax.cu's softmax_cross_entropy_vp_stats (the row engine, statistics only: no second pass) and
softmax_cross_entropy_vp_grad (elementwise dz from the merged per-row coefficients), on rows
C-contiguous (rows, C) of this rank's slice. Nothing is read back: the statistics go to the
collective's float64 buffer on the device, the coefficients come from array operations on the
gathered buffer (vocab_parallel.coefficients).
"""
from __future__ import annotations

import numpy as np

from ... import _backend as B
from ... import _kernels, _launch
from ..._engines import rows

FAMILY = "softmax"


def flags(weight, probs: bool, smooth: bool, softcap) -> int:
    K = _kernels.family(FAMILY).constants
    return ((K["VP_WEIGHT"] if weight is not None else 0) | (K["VP_PROBS"] if probs else 0)
            | (K["VP_SMOOTH"] if smooth else 0) | (K["VP_SOFTCAP"] if softcap is not None else 0))


def stats(xp, z2, t, y, w, offset: int, classes: int, ignore_index: int, label_smoothing: float, softcap, k: int):
    """The (k, N) float64 statistics of the slice z2 (N, n) (C-contiguous; n > 0), from one launch.
    t: int64 global targets (N,) or None (probability targets y, (N, n) like z2); w: the slice's
    weights in the accumulation dtype, or None."""
    N, n = z2.shape
    dtype = z2.dtype
    acc = B.compute_dtype(dtype)
    out = B.empty(xp, (k, N), np.float64)
    if N == 0:
        return out
    lay = rows.layout(xp, z2, 1)
    probs = t is None
    if probs:
        y = xp.ascontiguousarray(y.astype(dtype, copy=False))
    plan = rows.plan(xp, FAMILY, lay, dtype.itemsize, *(rows.alignment(lay.z, y) if probs else rows.alignment(lay.z)),
                     regions=2 if probs else 1, cache=False, max_n=8 if dtype == np.float64 else 32)
    kern = plan.kernel(xp, "softmax_cross_entropy_vp_stats", dtype)
    named = plan.sizes(lay, rows=None, cached=True) | {
        "stats": out, "z": lay.z,
        "target": _launch.dummy(xp, np.int64) if probs else t,
        "y": y if probs else _launch.dummy(xp, dtype),
        "weight": _launch.dummy(xp, acc) if w is None else xp.ascontiguousarray(w.astype(acc, copy=False)),
        "offset": np.int64(offset), "classes": np.int64(classes), "ignore_index": np.int64(ignore_index),
        "keep": acc.type(1.0 - label_smoothing), "ls_c": acc.type(label_smoothing / classes),
        "softcap": acc.type(softcap or 0.0), "flags": np.int32(flags(w, probs, bool(label_smoothing), softcap)),
        "n_rows": np.int64(N)}
    _kernels.launch(kern, plan.grid, plan.block, kern.args_from(named), shared_mem=plan.smem)
    return out


def gradient(xp, z2, coef, y, w, label_smoothing: float, classes: int, softcap, out):
    """dz (N, n) of the slice into `out` (z2's dtype; may be z2 itself) from the per-row
    coefficients coef (5, N) float64, one launch."""
    N, n = z2.shape
    if N == 0 or n == 0:
        return out
    dtype = z2.dtype
    acc = B.compute_dtype(dtype)
    K = _kernels.family(FAMILY).constants
    probs = y is not None
    kern = _kernels.get_kernel(FAMILY, "softmax_cross_entropy_vp_grad", xp, dtype)
    block = K["VP_GRAD_THREADS"]
    grid = max(1, min(_launch.ceil_div(N * n, block), 4 * kern.device["sm_count"]))
    named = {"dz": out, "z": z2, "coef": xp.ascontiguousarray(coef),
             "y": xp.ascontiguousarray(y.astype(dtype, copy=False)) if probs else _launch.dummy(xp, dtype),
             "weight": _launch.dummy(xp, acc) if w is None else xp.ascontiguousarray(w.astype(acc, copy=False)),
             "keep": acc.type(1.0 - label_smoothing), "ls_c": acc.type(label_smoothing / classes),
             "softcap": acc.type(softcap or 0.0), "flags": np.int32(flags(w, probs, bool(label_smoothing), softcap)),
             "n_rows": np.int64(N), "C": np.int32(n)}
    _kernels.launch(kern, grid, block, kern.args_from(named))
    return out
