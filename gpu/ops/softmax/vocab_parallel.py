"""Vocabulary-parallel cross-entropy (``comm=``): the classes split over the ranks, the loss over all.

Rank r holds a contiguous slice of the C classes, in rank order (rank 0 the first ones; slices may
be unequal, or empty); the integer targets hold global class indices and are the same on every
rank. A row's loss needs its log-sum-exp and its target logit over every slice, so each rank
computes per row, from its slice (after the soft-cap, z' = cap tanh(z / cap)):

    m_r   max_c z'_c (-inf for an empty slice)       s_r   sum_c exp(z'_c - m_r)
    zt_r  z'_t where the target t is in the slice, else 0
    wt_r  w_t (1 without weights) where t is in the slice, else 0
    q_r   sum_c w_c (z'_c - m_r)                      (label smoothing only)

(probability targets, this rank's slice of them: m_r, s_r, sum_c wy_c and sum_c wy_c (z'_c - m_r)),
packs [header | statistics] into ONE float64 buffer and ONE allgather gives every rank every rank's
buffer. The merge reduces the rank axis in rank order, so every rank gets the same bits:

    M = max_r m_r,  lse = M + log sum_r s_r exp(m_r - M),  z'_t = sum_r zt_r,  w_t = sum_r wt_r
    sum_c w_c z'_c - W lse = sum_r [q_r + W_r (m_r - lse)]     (W_r the slice's summed weight)

and the loss, the z-loss term and this rank's slice of dz follow locally, as on one process. Bytes
per row on the wire: 8 k P for k statistics (4, 5 with smoothing) gathered from P ranks, against
Megatron's three all-reduces (max, sum of exp, target logit) of 8 bytes each.

The header: the first call of a configuration (the function, rows, slice size, dtype, options,
the chunk rows of fused linear CE) on a communicator exchanges a fixed-length header alone, so a
disagreement is a ValueError naming the argument on every rank instead of a collective of
mismatched lengths (which hangs, truncates or aborts). Every later call still carries a short
header in its buffer (rows, dtype, slice size, the caller's rank), checked after the collective.
On the device path (CuPy) the check stays on the device (no host sync): the results become NaN
and the ValueError is raised by the next call on that communicator once the flag is on the host.

The module is one of the cross-entropy paths: ``softmax_cross_entropy(comm, ...)`` from the public
functions (cross_entropy.py); ``chunk_pass`` per chunk of rows for fused linear CE
(gpu/ops/linear_cross_entropy.py). The statistics and the gradient are computed with the array
module's operations on the NumPy path and by the kernels of softmax.cu on the kernel path
(vocab_parallel_kernels.py); the merge is array operations on either (no host sync).
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import numpy as np

from ... import _backend as B
from ..._workspace import eager_checks
from . import vocab_parallel_kernels as VK
from ._args import REDUCTIONS

_MAGIC = 1.0 + 2.0 ** -20 + 4099.0          # not a plausible row count, logit or small integer
_VERSION = 1.0
OPS = {"softmax_cross_entropy": 1.0, "softmax_cross_entropy_backward": 2.0, "fused_linear_cross_entropy": 3.0}
_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: handshake slots: magic, version, op, rows, slice size, dtype, reduction, ignore_index,
#: label_smoothing, z_loss, softcap (-1: None), flags, hidden size, chunk rows, comm size, rank
_HANDSHAKE = 16
#: flags in the handshake (F_REJECTED: the rank's arguments failed its own checks)
F_WEIGHT, F_PROBS, F_GRAD, F_ZRET, F_BIAS, F_REJECTED = 1, 2, 4, 8, 16, 32


class AgreedError(ValueError):
    """A ValueError every rank raises from the same gathered data (a header mismatch, a bad
    target): no further collective is needed to tell the others."""
#: the header of every call's buffer: magic, op, rows, dtype, slice size, comm size, rank, the
#: slice's summed class weight, its share of the 'mean' denominator, the first bad target
#: (position, value; -1 for none)
HEAD = 11

#: communicator -> {configuration: Config}, the configurations whose handshake passed
_VERIFIED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Config(NamedTuple):
    """What the handshake of a configuration established, the same on every rank."""

    sizes: tuple           # every rank's slice size, in rank order
    offset: int            # this rank's first class
    classes: int           # the global class count
    chunk: int             # fused linear CE: the rows of a chunk (the smallest any rank proposed)


def dtype_code(dtype) -> float:
    return float(_DTYPES.index(np.dtype(dtype).name) + 1)


def _dtype_name(code) -> str:
    return _DTYPES[int(code) - 1] if 1 <= code <= len(_DTYPES) else f"code {code:g}"


# ---------------------------------------------------------------------------------------------
# The handshake
# ---------------------------------------------------------------------------------------------

def handshake(xp, comm, op: str, rows: int, n_local: int, dtype, options: tuple, flags: int,
              hidden: int = 0, chunk: int = 0, chunk_key: int = 0) -> Config:
    """The configuration's Config; its first call on `comm` exchanges the header alone (a buffer of
    the same length on every rank) and raises the same ValueError on every rank on a mismatch.
    options: (reduction, ignore_index, label_smoothing, z_loss, softcap), normalized; chunk: the
    chunk rows this rank proposes (the smallest proposal is taken), chunk_key: the caller's
    chunk_size (0 for None), which the configuration is known by."""
    comm.raise_pending(AgreedError)
    reduction, ignore_index, label_smoothing, z_loss, softcap = options
    key = (op, rows, n_local, np.dtype(dtype).name, options, flags, hidden, chunk_key, comm.size, comm.rank)
    known = _VERIFIED.setdefault(comm, {})
    cfg = known.get(key)
    if cfg is not None:
        return cfg
    hdr = np.array([_MAGIC, _VERSION, OPS[op], rows, n_local, dtype_code(dtype), REDUCTIONS.index(reduction),
                    ignore_index, label_smoothing, z_loss, -1.0 if softcap is None else softcap, flags, hidden,
                    chunk, comm.size, comm.rank], np.float64)
    got = comm.allgather(hdr if xp is np else xp.asarray(hdr), f"{op} (header exchange)")
    got = got if type(got) is np.ndarray else got.get()
    problem = _handshake_problem(got, op)
    if problem:
        raise AgreedError(problem)
    sizes = tuple(int(c) for c in got[:, 4])
    cfg = Config(sizes, sum(sizes[:comm.rank]), sum(sizes), int(got[:, 13].min()))
    if len(known) > 256:
        known.clear()
    known[key] = cfg
    return cfg


def reject(comm, op: str) -> None:
    """This rank's arguments failed their checks: send a rejecting header in the header exchange
    the other ranks make, so that they raise too instead of waiting (the caller then raises its
    own error). A rank whose configuration was exchanged before makes no header exchange: it
    meets the rejection in its next collective, whose lengths differ (the engine's error)."""
    from gpu.distributed import wrap
    try:
        comm = wrap(comm)
    except TypeError:
        return
    hdr = np.zeros(_HANDSHAKE, np.float64)
    hdr[[0, 1, 2, 11, 14, 15]] = _MAGIC, _VERSION, OPS[op], F_REJECTED, comm.size, comm.rank
    if comm.engine == "nccl":      # device buffers only
        import cupy
        hdr = cupy.asarray(hdr)
    comm.allgather(hdr, f"{op} (header exchange)")


def _handshake_problem(head: np.ndarray, op: str) -> str | None:
    """Why the gathered handshake headers (size, _HANDSHAKE) disagree, or None: the same message
    on every rank, naming the argument and the first rank that differs from rank 0."""
    first = "h" if op == "fused_linear_cross_entropy" else "z"
    for r, h in enumerate(head):
        if h[0] != _MAGIC or h[1] != _VERSION:
            return (f"{op}: rank {r} sent something else than this collective's header (ranks call "
                    "different collectives on this communicator, or another version)")
        if h[14] != len(head) or h[15] != r:
            return f"comm: rank {r} calls with a communicator of size {h[14]:g} as rank {h[15]:g} ({op})"
    for r, h in enumerate(head):
        if int(h[11]) & F_REJECTED:
            return (f"{op}: rank {r} rejected its arguments (its own ValueError or TypeError names them); "
                    "every rank raises")
    h0 = head[0]
    for r, h in enumerate(head):
        if h[2] != h0[2]:
            names = {v: k for k, v in OPS.items()}
            return (f"{op}: ranks call different functions on this communicator: rank 0 "
                    f"{names.get(h0[2], '?')}, rank {r} {names.get(h[2], '?')}")
    for slot, name, show in ((3, f"{first}: the number of rows", lambda v: f"{v:g}"),
                             (5, f"{first}: the dtype", _dtype_name),
                             (12, "h: the hidden size", lambda v: f"{v:g}"),
                             (6, "reduction", lambda v: repr(REDUCTIONS[int(v)])),
                             (7, "ignore_index", lambda v: f"{v:g}"),
                             (8, "label_smoothing", lambda v: f"{v:g}"),
                             (9, "z_loss", lambda v: f"{v:g}"),
                             (10, "softcap", lambda v: "None" if v < 0 else f"{v:g}")):
        for r, h in enumerate(head):
            if h[slot] != h0[slot]:
                return (f"{name} differs across ranks: rank 0 has {show(h0[slot])}, rank {r} has "
                        f"{show(h[slot])} ({op})")
    for bit, name in ((F_WEIGHT, "weight: given on some ranks only"),
                      (F_PROBS, "target: class indices on some ranks, probabilities on others"),
                      (F_GRAD, "return_grad differs across ranks"),
                      (F_ZRET, "return_z_loss differs across ranks"),
                      (F_BIAS, "bias: given on some ranks only")):
        got = [int(h[11]) & bit for h in head]
        if len(set(got)) > 1:
            return f"{name} ({op}: rank 0 {'has' if got[0] else 'has not'}, rank {got.index(got[0] ^ bit)} "\
                   f"{'has not' if got[0] else 'has'})"
    return None


def head_problem(got: np.ndarray, op: str, rows: int, dtype, cfg: Config) -> str | None:
    """Why the gathered call headers (size, HEAD) disagree with the handshake's, or None."""
    first = "h" if op == "fused_linear_cross_entropy" else "z"
    for r, h in enumerate(got):
        if h[0] != _MAGIC or h[1] != OPS[op] or h[6] != r or h[5] != len(got):
            return (f"{op}: rank {r} sent something else than this collective's statistics (ranks call "
                    "different collectives on this communicator)")
        if h[2] != rows:
            return f"{first}: the number of rows differs across ranks: this rank has {rows}, rank {r} has {h[2]:g} ({op})"
        if h[3] != dtype_code(dtype):
            return (f"{first}: the dtype differs across ranks: this rank has {np.dtype(dtype).name}, rank {r} has "
                    f"{_dtype_name(h[3])} ({op})")
        if h[4] != cfg.sizes[r]:
            return f"{first}: rank {r}'s slice has {h[4]:g} classes, {cfg.sizes[r]} at the header exchange ({op})"
    return None


_HEADS: dict = {}     # device copies of the constant head slots, by configuration


def call_head(xp, op: str, rows: int, dtype, cfg: Config, comm, w_local, denom_local, bad=(-1.0, -1.0)):
    """This call's HEAD slots (float64, of xp); the constant ones are kept on the device per
    configuration (a copy from pageable host memory would synchronize the stream every call)."""
    n = cfg.sizes[comm.rank]
    const = np.array([_MAGIC, OPS[op], rows, dtype_code(dtype), n, comm.size, comm.rank], np.float64)
    if xp is not np:
        key = (op, rows, np.dtype(dtype).name, n, comm.size, comm.rank, id(xp.cuda.Device()))
        if key not in _HEADS:
            if len(_HEADS) > 1024:
                _HEADS.clear()
            _HEADS[key] = xp.asarray(const)
        const = _HEADS[key]
    head = xp.empty(HEAD, np.float64)
    head[:7] = const
    head[7:8] = w_local
    head[8:9] = denom_local
    head[9:10] = bad[0]
    head[10:11] = bad[1]
    return head


def exchange(xp, comm, head, stats, op: str, rows: int, dtype, cfg: Config, target=None, ignore_index=0):
    """ONE allgather of [head | stats (k, chunk rows)]: the gathered (size, HEAD), (size, k, chunk
    rows) float64 arrays (rows: the call's, which the header carries), the header checked (on the host for NumPy arrays; on the device for CuPy
    arrays: a deferred check, the statistics NaN on a mismatch)."""
    k, nr = stats.shape
    buf = xp.empty(HEAD + k * nr, np.float64)
    buf[:HEAD] = head
    buf[HEAD:] = stats.reshape(-1)
    got = comm.allgather(buf, op)
    heads, st = got[:, :HEAD], got[:, HEAD:].reshape(comm.size, k, nr)
    if type(got) is np.ndarray:
        problem = head_problem(heads, op, rows, dtype, cfg)
        if problem:
            raise AgreedError(problem)
        for r, h in enumerate(heads):
            if h[9] >= 0:    # the first rank that found one (the targets should be the same everywhere)
                raise AgreedError(f"target: class index {int(h[10])} at row {int(h[9])} (flat; found on rank {r}) "
                                 f"is out of range [0, {cfg.classes}) of the classes over all ranks and is not "
                                 f"ignore_index ({ignore_index}) ({op})")
        return heads, st
    expect = xp.asarray(np.array([[_MAGIC, OPS[op], rows, dtype_code(dtype), cfg.sizes[r], comm.size, r]
                                  for r in range(comm.size)]))
    ok = (heads[:, :7] == expect).all()
    st = st + xp.where(ok, 0.0, np.nan)
    comm.defer_check(xp, ok, f"{op}: ranks disagree on the rows, dtype, slice sizes or communicator (the "
                 "results of that call were NaN)")
    return heads, st


# ---------------------------------------------------------------------------------------------
# The statistics of a slice, the merge, the loss and the gradient (array operations)
# ---------------------------------------------------------------------------------------------

class Targets(NamedTuple):
    """Integer targets of (N,) rows against this rank's slice [offset, offset + n)."""

    valid: object          # not ignored and in [0, classes): rows that count
    local: object          # valid and in this slice
    tl: object             # the target's column in the slice where local, else 0
    w_t: object            # w_t (1 without weights) where local, else 0, float64


def targets(xp, t, offset: int, n: int, classes: int, ignore_index: int, w) -> Targets:
    valid = (t != ignore_index) & (t >= 0) & (t < classes)
    local = valid & (t >= offset) & (t < offset + n)
    tl = xp.where(local, t - offset, 0).astype(xp.intp)
    if w is None:
        w_t = local.astype(np.float64)
    else:
        w_t = xp.where(local, w[tl] if n else 0.0, 0.0).astype(np.float64)
    return Targets(valid, local, tl, w_t)


def softcapped(xp, za, softcap):
    """(z', tanh(z / cap) or None): za (acc dtype) replaced in place by cap tanh(za / cap)."""
    if softcap is None:
        return za, None
    th = xp.tanh(za / za.dtype.type(softcap))
    xp.multiply(th, za.dtype.type(softcap), out=za)
    return za, th


def local_stats(xp, za, tg: Targets | None, w, label_smoothing: float, y=None, keep=1.0, ls_c=0.0):
    """The (k, N) float64 statistics of the slice za (N, n), z' already soft-capped: m, s, zt, wt
    (+ q with smoothing) for integer targets tg; m, s, sum wy, sum wy (z' - m) for probabilities y.
    za is left holding exp(z' - shift) (shift = m, 0 for a row of -inf), which `gradient` rescales:
    one exp per element for the loss and dz together."""
    N, n = za.shape
    acc = za.dtype
    k = 4 + (1 if (tg is not None and label_smoothing) else 0)
    st = xp.empty((k, N), np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if tg is not None:
            zt = za[xp.arange(N), tg.tl] if n else xp.zeros(N, acc)
            st[2] = xp.where(tg.local, zt, 0.0)
            st[3] = tg.w_t
        if not n:
            st[0], st[1] = -np.inf, 0.0
            st[2 if tg is None else 4:] = 0.0      # the weighted sums of no class
            return st
        m = za.max(axis=1)
        st[0] = m
        za -= xp.where(m == -np.inf, acc.type(0), m)[:, None]      # z' - shift
        if tg is not None:
            if label_smoothing:
                st[4] = za.sum(axis=1, dtype=acc) if w is None else za @ w
        else:
            wy = y.astype(acc) * acc.type(keep) + acc.type(ls_c)
            if w is not None:
                wy = wy * w
            st[2] = wy.sum(axis=1, dtype=acc)
            st[3] = (za * wy).sum(axis=1, dtype=acc)
        xp.exp(za, out=za)
        st[1] = za.sum(axis=1, dtype=acc)
    return st


class Merged(NamedTuple):
    """Per-row results of the merge, float64, the same bits on every rank."""

    lse: object            # log-sum-exp of the row's logits (after the soft-cap) over all classes
    rows: object           # the cross-entropy per row (0 for ignored rows), before any reduction
    wsum: object           # probability targets: sum_c wy_c over all classes (else None)
    wt: object             # integer targets: the target's class weight w_t (0 for ignored rows)
    w_all: float | object  # the summed class weight over all classes


def merge(xp, heads, st, probs: bool, ls: float, classes: int, valid) -> Merged:
    """The merge in rank order of the gathered statistics st (P, k, N) and headers (P, HEAD)."""
    keep = 1.0 - ls
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m, s = st[:, 0], st[:, 1]
        M = m.max(axis=0)
        S = (s * xp.exp(m - M)).sum(axis=0)
        lse = M + xp.log(S)
        shift = xp.where(m == -np.inf, 0.0, m)
        w_r = heads[:, 7]
        w_all = w_r.sum()
        if probs:
            wys = st[:, 2]
            rows = (xp.where(wys == 0, 0.0, wys * (lse - shift)) - st[:, 3]).sum(axis=0)
            return Merged(lse, rows, wys.sum(axis=0), None, w_all)
        zt, wt = st[:, 2].sum(axis=0), st[:, 3].sum(axis=0)
        rows = wt * (lse - zt)
        if ls:
            part = xp.where(w_r[:, None] == 0, 0.0, st[:, 4] + w_r[:, None] * (shift - lse))
            rows = rows * keep - part.sum(axis=0) * (ls / classes)
        return Merged(lse, xp.where(valid, rows, 0.0), None, wt, w_all)


def reduce_rows(xp, rows, zrows, reduction: str, denom, count, z_loss: float, dtype, return_z: bool):
    """(loss, z-loss term or None) in dtype under the reduction, as the single-process paths."""
    zterm = None
    if zrows is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            zterm = zrows.sum() if reduction == "sum" else zrows.sum() / count if reduction == "mean" else zrows
    loss = rows
    with np.errstate(invalid="ignore", divide="ignore"):
        if reduction == "sum":
            loss = rows.sum()
        elif reduction == "mean":
            loss = xp.where(denom != 0, rows.sum() / denom, np.nan)
    if z_loss:
        loss = loss + zterm
    return xp.asarray(loss).astype(dtype), (xp.asarray(zterm).astype(dtype) if return_z else None)


def coefficients(xp, mg: Merged, tg: Targets | None, g, gz, z_loss: float, ls: float, classes: int):
    """The (5, N) float64 per-row coefficients of this slice's dz: lse, scale, sub_t, sub_w and the
    target's column in the slice (-1: elsewhere, -2: an ignored row), from the merged rows; g, gz
    the per-row upstream scales of the loss and the z-loss (0 on ignored rows). Then
        dz_j = [exp(z'_j - lse) scale - [j == t] sub_t - sub_w w_j] (1 - tanh^2)      integer targets
        dz_j = [exp(z'_j - lse) scale - sub_w wy_j] (1 - tanh^2)                      probabilities."""
    keep, ls_c = 1.0 - ls, ls / classes
    N = mg.lse.shape[0]
    coef = xp.empty((5, N), np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        zc = 2 * z_loss * mg.lse * gz if z_loss else 0.0
        coef[0] = mg.lse
        if tg is None:
            coef[1] = g * mg.wsum + zc
            coef[2] = 0.0
            coef[3] = g
            coef[4] = -1.0
        else:
            hit = g * keep * mg.wt   # every class of the row has p_j (keep w_t + ...); the target also -keep w_t
            coef[1] = hit + (g * (ls_c * mg.w_all) if ls else 0.0) + zc
            coef[2] = hit
            coef[3] = g * ls_c
            coef[4] = xp.where(tg.local, tg.tl, xp.where(tg.valid, -1, -2))
    return coef


def gradient(xp, e, th, coef, m, w, ls: float, classes: int, y=None):
    """This slice's dz (N, n), written over e = exp(z' - shift) (local_stats' leftover, in the
    accumulation dtype; m the rows' local maxima, shift = m or 0) from `coefficients`: the NumPy
    path's counterpart of softmax_cross_entropy_vp_grad, with p = e exp(shift - lse)."""
    acc = e.dtype
    keep, ls_c = 1.0 - ls, ls / classes
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        shift = xp.where(m == -np.inf, 0.0, m)
        p = e
        p *= (xp.exp(shift - coef[0]) * coef[1]).astype(acc)[:, None]
        if y is not None:
            wy = y.astype(acc) * acc.type(keep) + acc.type(ls_c)
            if w is not None:
                wy = wy * w
            p -= coef[3].astype(acc)[:, None] * wy
        else:
            tl = coef[4]
            rows = xp.nonzero(tl >= 0)[0]
            if rows.size:
                p[rows, tl[rows].astype(xp.intp)] -= coef[2][rows].astype(acc)
            if ls:
                p -= coef[3].astype(acc)[:, None] * (acc.type(1) if w is None else w[None, :])
        if th is not None:
            p *= 1 - th * th
        if y is None:
            p[coef[4] == -2] = 0
    return p


# ---------------------------------------------------------------------------------------------
# softmax_cross_entropy(..., comm=)
# ---------------------------------------------------------------------------------------------

def first_bad(t, classes: int, ignore_index: int) -> tuple[float, float]:
    """(row, value) of t's first index outside [0, classes) that is not ignore_index, or (-1, -1)."""
    if t.size == 0:
        return -1.0, -1.0
    bad = ((t < 0) | (t >= classes)) & (t != ignore_index)
    if not bool(bad.any()):
        return -1.0, -1.0
    i = int(bad.argmax())
    return float(i), float(t[i])


def upstream(xp, dloss, n_rows: int, reduction: str, denom, count, valid):
    """(g, gz): the per-row upstream scales of the loss and the z-loss, float64 (0 on rows that
    are not valid; valid None: every row counts)."""
    if isinstance(dloss, (int, float)):     # a fill on the device, not an upload
        g = xp.full((), float(dloss), np.float64)
    else:
        g = xp.asarray(dloss, dtype=np.float64)
        g = g.reshape(n_rows) if g.ndim else g
    gz = g
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            g, gz = g / denom, g / count
    g, gz = xp.broadcast_to(g, (n_rows,)), xp.broadcast_to(gz, (n_rows,))
    if valid is not None:
        g, gz = xp.where(valid, g, 0.0), xp.where(valid, gz, 0.0)
    return g, gz


def cross_entropy(comm, op: str, args, kernels: bool, want_loss: bool, dloss, inplace: bool = False):
    """(loss or None, z-loss term or None, dz or None) of softmax_cross_entropy[_backward] with
    ``comm``: args (CEArgs) hold this rank's slice of the classes and the global targets."""
    from gpu.distributed import wrap
    from .numpy_path import no_classes
    comm = wrap(comm)
    xp, z = args.xp, args.z
    acc = B.compute_dtype(z.dtype)
    n = args.n_classes
    N = int(np.prod(args.row_shape))
    grad = dloss is not None
    flags = ((F_WEIGHT if args.weight is not None else 0) | (F_PROBS if args.probs else 0)
             | (F_GRAD if grad else 0) | (F_ZRET if args.return_z else 0))
    options = (args.reduction, args.ignore_index, args.label_smoothing, args.z_loss, args.softcap)
    cfg = handshake(xp, comm, op, N, n, z.dtype, options, flags)
    V, ii, ls = cfg.classes, args.ignore_index, args.label_smoothing
    t = None if args.probs else args.target.reshape(N)
    if V == 0:              # no classes on any rank: nothing to exchange (every rank returns here)
        if t is not None:
            from ._args import check_targets
            check_targets(t, 0, ii)
        return no_classes(args, want_loss, dloss, inplace)
    moved = xp.moveaxis(z, args.axis, -1)
    y = None
    if args.probs:
        y = xp.moveaxis(args.target, args.axis, -1).reshape(N, n)
    w = None if args.weight is None else args.weight.astype(acc, copy=False)
    bad = (-1.0, -1.0)
    if t is not None:
        if kernels and not eager_checks():   # on the device, as the single-process kernels: no sync
            from .kernel_path import record_bad_target
            record_bad_target(xp, t, V, ii)
        else:
            bad = first_bad(t, V, ii)
    tg = None if t is None else targets(xp, t, cfg.offset, n, V, ii, w)
    za = th = z2 = None
    if kernels and n:       # the statistics from the kernel, into the collective's buffer
        z2 = xp.ascontiguousarray(moved).reshape(N, n)
        t64 = None if t is None else xp.ascontiguousarray(t.astype(np.int64, copy=False))
        st = VK.stats(xp, z2, t64, y, w, cfg.offset, V, ii, ls, args.softcap, 4 + int(bool(ls) and t is not None))
    else:
        za = xp.array(moved.reshape(N, n), dtype=acc)          # a copy: the soft-cap and dz go over it
        za, th = softcapped(xp, za, args.softcap)
        st = local_stats(xp, za, tg, w, ls, y, 1.0 - ls, ls / V)
    w_r = float(n) if w is None else w.sum(dtype=np.float64)
    head = call_head(xp, op, N, z.dtype, cfg, comm, w_r, 0.0 if tg is None else tg.w_t.sum(), bad)
    heads, gst = exchange(xp, comm, head, st, op, N, z.dtype, cfg, t, ii)
    valid = None if tg is None else tg.valid
    mg = merge(xp, heads, gst, args.probs, ls, V, valid)
    if args.probs:
        denom = count = float(N)
    else:
        denom, count = mg.wt.sum(), valid.sum(dtype=np.float64)
    loss = z_term = None
    if want_loss or args.return_z:
        zrows = None
        if args.z_loss or args.return_z:
            zrows = args.z_loss * mg.lse * mg.lse
            if valid is not None:
                zrows = xp.where(valid, zrows, 0.0)
        rows, zr = mg.rows.reshape(args.row_shape), None if zrows is None else zrows.reshape(args.row_shape)
        loss, z_term = reduce_rows(xp, rows, zr, args.reduction, denom, count, args.z_loss, z.dtype, args.return_z)
        loss = loss if want_loss else None
    if not grad:
        return loss, z_term, None
    g, gz = upstream(xp, dloss, N, args.reduction, denom, count, valid)
    coef = coefficients(xp, mg, tg, g, gz, args.z_loss, ls, V)
    if z2 is not None:
        d = VK.gradient(xp, z2, coef, y, w, ls, V, args.softcap, B.empty(xp, (N, n), z.dtype))
    else:
        d = gradient(xp, za, th, coef, st[0], w, ls, V, y).astype(z.dtype, copy=False)
    dz = xp.moveaxis(d.reshape(moved.shape), -1, args.axis)
    if inplace:
        z[...] = dz
        dz = z
    return loss, z_term, dz
