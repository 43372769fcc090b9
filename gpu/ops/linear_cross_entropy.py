"""Fused linear + cross-entropy: the loss of softmax(h W^T + b) against class targets, and its
gradients, without ever holding the (tokens, vocab) logits.

A language model's output layer turns N hidden states h (N, H) into logits z = h W^T + b over a
vocabulary of V classes; at N = 16K tokens and V = 128K the logits alone are 4 GiB in bf16 and
their float32 gradient another 8 GiB. Here they exist one chunk of rows at a time:

    for each chunk of rows c:
        z_c  = h_c W^T (+ b)                       the array library's matmul (BLAS, cuBLAS)
        dz_c = fused cross-entropy forward + gradient over z_c (softmax_cross_entropy's NumPy path
               or kernels: the loss, z-loss, soft-cap and dZ in one pass, written over z_c on the
               kernel path)
        dh_c = dz_c W,   dW += dz_c^T h_c,   db += sum_rows dz_c

so the extra memory is bounded by the chunk. Every chunk sees the same global 'mean' scale: the
denominators (the summed class weight of the non-ignored targets, and their number for the
z-loss) come from the targets alone before the first chunk, as device scalars on the kernel path
(no host synchronization, except one when class weights, z_loss and 'mean' meet: the z-loss's
coefficient is rescaled by sum(w_t) / n on the host).

The result is deterministic: the same chunking gives the same bits (chunks and their partial
sums run in a fixed order). float16 / bfloat16 h and W compute in float32: W is converted once
(V H 4 bytes), each chunk's h and logits are float32, dW and db accumulate in float32; the
returned loss and gradients have the inputs' dtype.
"""
from __future__ import annotations

import math
import operator

import numpy as np

from .. import _backend as B
from .. import _workspace
from .softmax import vocab_parallel as VP
from .softmax import vocab_parallel_kernels as VK
from .softmax.cross_entropy import check_options, check_targets, compute, record_bad_target, rows_args

#: The NumPy path's default bound on the memory a chunk takes (its logits, their gradient, which
#: the NumPy cross-entropy writes to a second array, and the chunk's h and dh rows): 32 MiB. For
#: (4096 tokens, 1024 hidden, 50257 vocab) in float32 that is 82 rows a chunk, and a peak about
#: 6x below the materializing path (tests/test_linear_cross_entropy.py measures it).
NUMPY_CHUNK_BYTES = 32 << 20

#: The kernel path's bound: this fraction of the device's free memory, between these limits.
DEVICE_FREE_FRACTION = 0.25
DEVICE_CHUNK_BYTES = (64 << 20, 2 << 30)


def fused_linear_cross_entropy(h, W, target, bias=None, *, chunk_size: int | None = None, reduction: str = "mean",
                               ignore_index: int = -100, label_smoothing: float = 0.0, weight=None,
                               z_loss: float = 0.0, softcap: float | None = None, return_grad: bool = False,
                               return_z_loss: bool = False, dloss=1.0, comm=None):
    """Cross-entropy of softmax(h @ W.T + bias) against class indices `target`, chunk by chunk.

    h: (..., H) hidden states; W: (V, H) the output projection (a Linear's weight); target:
    integer class indices of h's shape without the last axis; bias: (V,) or None. The options are
    softmax_cross_entropy's (reduction, ignore_index, label_smoothing, weight, z_loss, softcap),
    with the same semantics as on the materialized logits (class-index targets only).
    chunk_size: rows of logits held at once; None picks it from the memory (NumPy:
    NUMPY_CHUNK_BYTES; the kernel path: a quarter of the device's free memory, 64 MiB to 2 GiB).
    dloss: the upstream gradient of the loss (a scalar; for reduction 'none' also an array of the
    loss's shape), which the gradients are multiplied by.

    comm (vocabulary parallelism): anything ``gpu.distributed.wrap`` takes. W (V_local, H), bias
    (V_local,) and weight (V_local,) are then this rank's contiguous rows of the vocabulary, in rank
    order (slices may be unequal, or empty); h, target (global class indices) and dloss are the
    same on every rank. The loss is the same, bitwise, on every rank and equals the
    single-process result; dh is the FULL gradient, already summed over the ranks (one all-reduce
    per call: it needs no further all-reduce); dW and dbias are this rank's rows. The logits of
    one chunk of rows of this rank's slice exist at a time; each chunk makes ONE allgather of its
    per-row statistics (gpu/ops/softmax/vocab_parallel.py), after a header exchange on the first
    call of a configuration (a disagreement is a ValueError on every rank).

    Returns the loss (in h's dtype); with return_z_loss also the z-loss term (included in the
    loss) under the same reduction; with return_grad also dh (h's shape and dtype), dW (W's) and
    dbias (bias's, or None): loss, (loss, z_term), (loss, dh, dW, dbias) or
    (loss, z_term, dh, dW, dbias).

    >>> import numpy as np, gpu
    >>> rng = np.random.default_rng(0)
    >>> h = rng.standard_normal((8, 16)).astype(np.float32)
    >>> W = rng.standard_normal((50, 16)).astype(np.float32)
    >>> loss, dh, dW, db = gpu.fused_linear_cross_entropy(h, W, rng.integers(0, 50, 8), return_grad=True)
    """
    try:
        return _fused_linear_cross_entropy(h, W, target, bias, chunk_size, reduction, ignore_index, label_smoothing,
                                           weight, z_loss, softcap, return_grad, return_z_loss, dloss, comm)
    except (ValueError, TypeError) as e:
        if comm is not None and not isinstance(e, VP.AgreedError):
            VP.reject(comm, "fused_linear_cross_entropy")   # the other ranks raise too, instead of waiting
        raise


def chunk_logits(xp, h2, Wc, bc, buf, r0: int, r1: int, acc):
    """Rows r0:r1 of h in the accumulation dtype and their logits h W^T (+ bias) in `buf`."""
    hc = h2[r0:r1].astype(acc, copy=False)
    z = buf[:r1 - r0]
    xp.matmul(hc, Wc.T, out=z)
    if bc is not None:
        z += bc
    return hc, z


def _fused_linear_cross_entropy(h, W, target, bias, chunk_size, reduction, ignore_index, label_smoothing, weight,
                                z_loss, softcap, return_grad, return_z_loss, dloss, comm):
    xp, kernels = B.dispatch(h=h, W=W, target=target, bias=bias, weight=weight)
    h = B.as_float_array(xp, h, "h")
    W = B.as_float_array(xp, W, "W")
    if h.ndim < 1:
        raise ValueError("h: expected an array of shape (..., H), got a scalar")
    if W.ndim != 2:
        raise ValueError(f"W: expected a 2-D (vocab, hidden) array, got shape {W.shape}")
    V, H = W.shape
    if h.shape[-1] != H:
        raise ValueError(f"h: its last axis ({h.shape[-1]}) must match W's hidden size, W.shape[1] = {H}")
    if W.dtype != h.dtype:
        raise TypeError(f"W: dtype {W.dtype} differs from h's {h.dtype}; pass both in one dtype")
    if bias is not None:
        bias = B.as_float_array(xp, bias, "bias")
        if bias.shape != (V,):
            raise ValueError(f"bias: expected shape ({V},), one per class; got {bias.shape}")
        if bias.dtype != h.dtype:
            raise TypeError(f"bias: dtype {bias.dtype} differs from h's {h.dtype}")
    if target is None:
        raise TypeError("target: expected an array of class indices, got None")
    t = target if B.is_cupy_array(target) else xp.asarray(target)
    if t.dtype.kind not in "iu":
        raise TypeError(f"target: expected integer class indices, got dtype {t.dtype}")
    row_shape = h.shape[:-1]
    if t.shape != row_shape:
        raise ValueError(f"target: expected h's shape without its last axis, {row_shape}; got {t.shape}")
    reduction, ignore_index, label_smoothing, z_loss, softcap = check_options(reduction, ignore_index,
                                                                               label_smoothing, z_loss, softcap)
    acc = B.compute_dtype(h.dtype)
    if weight is not None:
        weight = B.as_float_array(xp, weight, "weight")
        if weight.shape != (V,):
            raise ValueError(f"weight: expected shape ({V},), one weight per class; got {weight.shape}")
        weight = weight.astype(acc, copy=False)
    if chunk_size is not None:
        try:
            chunk_size = operator.index(chunk_size)
        except TypeError:
            raise TypeError(f"chunk_size: expected an int or None, got {chunk_size!r}") from None
        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected at least 1 row, got {chunk_size}")
    dl = dloss if B.is_cupy_array(dloss) else xp.asarray(dloss)
    if dl.dtype.kind not in "iuf" and dl.dtype not in B.FLOAT_DTYPES:
        raise TypeError(f"dloss: expected a real scalar or array, got dtype {dl.dtype}")
    allowed = [()] + ([row_shape] if reduction == "none" else [])
    if dl.shape not in allowed:
        raise ValueError(f"dloss: shape {dl.shape} does not match the loss, expected " + " or ".join(map(str, allowed)))

    N = math.prod(row_shape)
    h2 = h.reshape(N, H)
    t = t.reshape(N)
    if comm is not None:
        return _vocab_parallel(comm, xp, kernels, h, h2, W, bias, t, weight, chunk_size, dl, return_grad,
                               bool(return_z_loss), (reduction, ignore_index, label_smoothing, z_loss, softcap))
    # no vocabulary: every target not ignored is out of range, raised at once on either path
    if not kernels or _workspace.eager_checks() or V == 0:
        check_targets(t, V, ignore_index)
    else:
        record_bad_target(xp, t, V, ignore_index)

    # The global 'mean' denominators, from the targets alone (device scalars on the kernel path).
    valid = (t != ignore_index) & (t >= 0) & (t < V)
    f64 = np.dtype(np.float64)
    count = valid.sum(dtype=f64)
    denom = count if weight is None else xp.where(valid, weight[xp.where(valid, t, 0)], 0).sum(dtype=f64)
    red_c = "none" if reduction == "none" else "sum"   # each chunk sums; the call scales
    r = 1.0   # z_loss's factor: makes the chunk's one upstream scale 1/denom right for the z-loss (1/count)
    if reduction == "mean" and weight is not None and z_loss:
        with np.errstate(invalid="ignore", divide="ignore"):
            r = float(denom / count)             # the one host synchronization (see the module doc)
        if not (math.isfinite(r) and r > 0):     # no valid row, or zero weights: the loss is NaN
            r = 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        g = dl.astype(f64) / denom if reduction == "mean" else dl.astype(f64)
    g_rows = g.reshape(N) if g.ndim else None

    Wc = W.astype(acc, copy=False)               # once: float32 for the narrow dtypes
    bc = None if bias is None else bias.astype(acc, copy=False)
    rows = chunk_size or chunk_rows(xp, N, V, H, acc, return_grad)
    rows = max(1, min(rows, N))

    want_z = bool(return_z_loss)
    loss_rows = xp.empty(N, acc) if reduction == "none" else None
    z_rows = xp.empty(N, acc) if reduction == "none" and want_z else None
    total = xp.zeros((), f64)
    z_total = xp.zeros((), f64)
    if return_grad:
        dh = xp.empty((N, H), h.dtype)
        dW = xp.zeros((V, H), acc)
        db = xp.zeros(V, acc) if bias is not None else None
    buf = xp.empty((rows, V), acc) if N else None
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        hc, z = chunk_logits(xp, h2, Wc, bc, buf, r0, r1, acc)
        args = rows_args(xp, z, t[r0:r1], weight, red_c, ignore_index, label_smoothing, z_loss * r, softcap, want_z)
        try:   # the kernels write dz over the chunk's logits; NumPy into a second array
            loss_c, z_c, dz = compute(args, kernels, want_loss=True, inplace=kernels,
                                      dloss=(g if g_rows is None else g_rows[r0:r1]) if return_grad else None)
        except ValueError:
            check_targets(t, V, ignore_index)   # a kernel-flagged bad target (eager): its position in t
            raise
        if reduction == "none":
            loss_rows[r0:r1] = loss_c
            if want_z:
                z_rows[r0:r1] = z_c
        else:
            total = total + loss_c.astype(f64)
            if want_z:
                z_total = z_total + z_c.astype(f64)
        if return_grad:
            # dz W as (W^T dz^T)^T: the same GEMM, but OpenBLAS takes 20-50x longer on dz @ W's
            # layout (few rows, a 50K-long inner axis); cuBLAS is indifferent
            dh[r0:r1] = (Wc.T @ dz.T).T
            _add_outer(dW, dz, hc, z.nbytes)
            if db is not None:
                db += dz.sum(axis=0)
        del dz   # NumPy: released before the next chunk's is allocated

    if reduction == "none":
        loss = loss_rows.reshape(row_shape).astype(h.dtype)
        z_term = z_rows.reshape(row_shape).astype(h.dtype) if want_z else None
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            if reduction == "mean":
                loss = xp.where(denom != 0, total / denom, np.nan)
                z_term = z_total / (r * count)   # 0 / 0: NaN when every target is ignored
            else:
                loss, z_term = total, z_total
        loss = xp.asarray(loss).astype(h.dtype)
        z_term = xp.asarray(z_term).astype(h.dtype) if want_z else None
    out = (loss,) + ((z_term,) if want_z else ())
    if return_grad:
        out += (dh.reshape(h.shape), dW.astype(W.dtype, copy=False),
                None if db is None else db.astype(bias.dtype, copy=False))
    return out if len(out) > 1 else loss


def chunk_rows(xp, N: int, V: int, H: int, acc, grad: bool) -> int:
    """The rows a chunk holds when chunk_size is None: the byte bound (NUMPY_CHUNK_BYTES, or the
    device's share) over a row's bytes (its logits; the NumPy path's gradient is a second such
    row; its h and dh rows)."""
    item = acc.itemsize
    if xp is np:
        budget, per_row = NUMPY_CHUNK_BYTES, (2 * V + 2 * H) * item
    else:
        free = xp.cuda.Device().mem_info[0]
        lo, hi = DEVICE_CHUNK_BYTES
        budget, per_row = min(hi, max(lo, int(free * DEVICE_FREE_FRACTION))), (V + 2 * H) * item
    return max(1, budget // per_row)


def _add_outer(dW, dz, hc, nbytes: int) -> None:
    """dW += dz^T hc in vocabulary slabs whose product takes at most `nbytes` (the chunk's
    logits): the temporary stays bounded by the chunk (a matmul cannot add into its output)."""
    V, H = dW.shape
    step = max(1, nbytes // max(1, H * dW.dtype.itemsize))
    for v0 in range(0, V, step):
        v1 = min(V, v0 + step)
        dW[v0:v1] += dz[:, v0:v1].T @ hc


def _vocab_parallel(comm, xp, kernels, h, h2, W, bias, t, weight, chunk_size, dl, return_grad: bool, want_z: bool,
                    options: tuple):
    """fused_linear_cross_entropy with ``comm``: W, bias and weight this rank's rows of the
    vocabulary. Per chunk: the logits of this slice, their statistics, ONE allgather, the merged
    loss and this slice's dz (vocab_parallel); dh summed over the ranks by ONE all-reduce."""
    from gpu.distributed import wrap
    comm = wrap(comm)
    op = "fused_linear_cross_entropy"
    reduction, ignore_index, label_smoothing, z_loss, softcap = options
    (N, H), n = h2.shape, W.shape[0]
    acc = B.compute_dtype(h.dtype)
    flags = ((VP.F_WEIGHT if weight is not None else 0) | (VP.F_GRAD if return_grad else 0)
             | (VP.F_ZRET if want_z else 0) | (VP.F_BIAS if bias is not None else 0))
    proposal = chunk_size or chunk_rows(xp, N, n, H, acc, return_grad)
    cfg = VP.handshake(xp, comm, op, N, n, h.dtype, options, flags, H, max(1, min(proposal, N)), chunk_size or 0)
    V = cfg.classes
    bad = (-1.0, -1.0)
    if kernels and not _workspace.eager_checks():   # on the device, as the single-process kernel path: no sync
        record_bad_target(xp, t, V, ignore_index)
    else:
        bad = VP.first_bad(t, V, ignore_index)
    tg = VP.targets(xp, t, cfg.offset, n, V, ignore_index, weight)
    t64 = xp.ascontiguousarray(t.astype(np.int64, copy=False))
    count = tg.valid.sum(dtype=np.float64)
    w_r = float(n) if weight is None else weight.sum(dtype=np.float64)
    denom_r = tg.w_t.sum()
    Wc = W.astype(acc, copy=False)
    bc = None if bias is None else bias.astype(acc, copy=False)
    rows = cfg.chunk
    f64 = np.dtype(np.float64)
    loss_rows = xp.empty(N, f64) if reduction == "none" else None
    z_rows = xp.empty(N, f64) if z_loss or want_z else None
    total = xp.zeros((), f64)
    denom = None
    if return_grad:
        dh = xp.empty((N, H), acc)
        dW = xp.zeros((n, H), acc)
        db = xp.zeros(n, acc) if bias is not None else None
    buf = xp.empty((rows, n), acc) if N else None
    g_all = dl.astype(f64)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        hc, z = chunk_logits(xp, h2, Wc, bc, buf, r0, r1, acc)
        tc = VP.Targets(*(a[r0:r1] for a in tg))
        if kernels and n:   # the statistics from the kernel; z (the raw logits) stays for dz
            za = th = None
            st = VK.stats(xp, z, t64[r0:r1], None, weight, cfg.offset, V, ignore_index, label_smoothing, softcap,
                          4 + int(bool(label_smoothing)))
        else:
            za, th = VP.softcapped(xp, z, softcap)
            st = VP.local_stats(xp, za, tc, weight, label_smoothing)
        head = VP.call_head(xp, op, N, h.dtype, cfg, comm, w_r, denom_r, bad)
        heads, gst = VP.exchange(xp, comm, head, st, op, N, h.dtype, cfg, t, ignore_index)
        if denom is None:   # the first chunk's headers: every rank's share, summed in rank order
            denom = heads[:, 8].sum()
        mg = VP.merge(xp, heads, gst, False, label_smoothing, V, tc.valid)
        if loss_rows is not None:
            loss_rows[r0:r1] = mg.rows
        else:
            total = total + mg.rows.sum()
        if z_rows is not None:
            z_rows[r0:r1] = xp.where(tc.valid, z_loss * mg.lse * mg.lse, 0.0)
        if return_grad:
            g, gz = VP.upstream(xp, g_all if g_all.ndim == 0 else g_all.reshape(N)[r0:r1], r1 - r0, reduction,
                                denom, count, tc.valid)
            coef = VP.coefficients(xp, mg, tc, g, gz, z_loss, label_smoothing, V)
            if za is None:     # in place over the chunk's logits
                dz = VK.gradient(xp, z, coef, None, weight, label_smoothing, V, softcap, z)
            else:
                dz = VP.gradient(xp, za, th, coef, st[0], weight, label_smoothing, V)
            dh[r0:r1] = (Wc.T @ dz.T).T
            _add_outer(dW, dz, hc, z.nbytes)
            if db is not None:
                db += dz.sum(axis=0)
    if denom is None:
        denom = xp.zeros((), f64)
    row_shape = h.shape[:-1]
    if reduction == "none":
        loss, z_term = VP.reduce_rows(xp, loss_rows.reshape(row_shape),
                                      None if z_rows is None else z_rows.reshape(row_shape), reduction, denom,
                                      count, z_loss, h.dtype, want_z)
    else:
        zsum = None if z_rows is None else z_rows
        loss, z_term = VP.reduce_rows(xp, total.reshape(1), zsum, reduction, denom, count, z_loss, h.dtype, want_z)
    out = (loss,) + ((z_term,) if want_z else ())
    if return_grad:
        dh = comm.allreduce(dh.reshape(-1), f"{op} (dh)").reshape(h.shape)
        out += (dh.astype(h.dtype, copy=False), dW.astype(W.dtype, copy=False),
                None if db is None else db.astype(bias.dtype, copy=False))
    return out if len(out) > 1 else loss
