"""Synchronized batch norm across processes (``comm=``): the wire protocol and the merge.

Forward: each rank computes its (count, mean, M2) per channel with its local path, packs
[header | count | mean | M2] into one float64 buffer, and ONE allgather gives every rank every
rank's buffer; `_merge_stats` combines them in rank order. Backward: ONE all-reduce (sum) of
[checks | count | sum dy | sum dy * xhat]. Buffers are float64 whatever x's dtype: counts are
exact to 2^53, the merge cancels nothing, and a rank with another dtype sends a buffer of the
same length (so its header reports it, instead of the engine failing on a length mismatch).

Lengths must agree for a collective to be well formed (MPI truncates, gloo aborts the process),
and they depend on C: the first call with a given C on a communicator exchanges the header
alone (fixed length) so that a rank with another C gets a ValueError on every rank; after that
one collective per call. On a device-resident result (NCCL, CUDA-aware MPI) the header is
checked on the device without a host sync: the statistics become NaN and the ValueError is
raised by the next synchronized call on that communicator, once the flag is on the host.

The arguments come checked (``_args``, ``synced=True``: a rank may hold no rows); the local work
is the paths' (``kernel_path``, ``numpy_path``).
"""
from __future__ import annotations

import numpy as np

from gpu import _backend as B

from . import kernel_path, numpy_path
from ._args import Backward, Forward, Inference, Layout, Stats

_SYNC_MAGIC = 1.0 + 2.0 ** -20 + 4093.0      # not a plausible count, mean or small integer
_SYNC_VERSION = 1.0
_SYNC_HEADER = 7                              # magic, version, op, C, dtype code, comm size, rank
_SYNC_OPS = {"forward": 1.0, "handshake": 2.0}
_SYNC_CHECKS = 6                              # backward: 1, C, C^2, code, code^2, count
_SYNC_DTYPES = ("float16", "bfloat16", "float32", "float64")
_SYNC_PREFIX: dict[tuple, object] = {}        # device copies of header + count, by key


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

def batch_stats(comm, a: Stats):
    """`batch_stats` with ``comm``: the statistics of the batch concatenated over the ranks."""
    _, mean, var = _sync_stats(a.xp, a.kernels, a.x, a.lay, comm, "batch_stats")
    kept = a.lay.kept_shape
    return mean.reshape(kept).astype(a.x.dtype), var.reshape(kept).astype(a.x.dtype)


def forward(comm, a: Forward):
    """`batch_norm_forward` with ``comm``: y normalized by the global statistics; the running
    statistics updated with the global count (num_batches_tracked incremented here)."""
    xp, kernels, x, lay = a.xp, a.kernels, a.x, a.lay
    running_mean, running_var = a.running_mean, a.running_var
    acc = B.compute_dtype(x.dtype)
    N, mean64, var64 = _sync_stats(xp, kernels, x, lay, comm, "batch_norm_forward")
    if running_mean is not None and xp is np and N == 1:
        raise ValueError("x: expected more than 1 value per feature over all ranks when training with "
                         "running stats (1 in all)")
    mean, var = mean64.astype(acc), var64.astype(acc)
    invstd = numpy_path.invstd(xp, var, a.eps, acc)
    kept = lay.kept_shape
    if lay.m == 0:
        y = xp.empty(x.shape, x.dtype)
    elif kernels:
        # the epilogue (residual, relu) rides on inference's: y is one pass with the global statistics
        y = kernel_path.inference(Inference(xp, kernels, x, lay, a.gamma, a.beta, mean, var, a.eps,
                                            a.residual, a.relu))
    else:
        y = numpy_path.inference(Inference(xp, kernels, x, lay, a.gamma, a.beta, mean.reshape(kept),
                                           var.reshape(kept), a.eps, a.residual, a.relu))
    if a.batches is not None:
        batches = a.batches
        batches += 1                        # before the update, as torch's module
    if running_mean is not None:
        # the unbiased variance with the GLOBAL count (torch's SyncBatchNorm once used the local one)
        if a.momentum is None:
            mom = 1.0 / a.batches.reshape(()).astype(np.float64)
        else:
            mom = a.momentum
        with np.errstate(all="ignore"):
            unbiased = var64 * (N / (N - 1))
            running_mean[...] = ((1 - mom) * running_mean.reshape(-1) + mom * mean64).reshape(running_mean.shape)
            running_var[...] = ((1 - mom) * running_var.reshape(-1) + mom * unbiased).reshape(running_var.shape)
    return y, mean.reshape(kept), invstd.reshape(kept)


def backward(comm, a: Backward):
    """`batch_norm_backward` with ``comm``: dx from the sums over every rank (ONE all-reduce
    between the sums and dx); dgamma, dbeta this rank's share; the relu mask and dresidual are
    local (the paths')."""
    xp, x, lay = a.xp, a.x, a.lay
    what = "batch_norm_backward"
    _handshake(xp, comm, lay.C, x.dtype, what)

    def coefficients(dbeta, dgamma, k, istd):
        # a, b of dx = k dy + a (x - mean) + b, from the global sums and count
        N, dbeta_g, dgamma_g = _sync_sums(xp, comm, dbeta.reshape(-1), dgamma.reshape(-1), x, lay, what)
        return -k * istd * (dgamma_g.reshape(k.shape) / N), -k * (dbeta_g.reshape(k.shape) / N)

    if a.kernels and lay.m > 0:
        return kernel_path.backward(a, sync=coefficients)
    return numpy_path.backward(a, sync=coefficients)    # also a rank with no rows on the kernel path


# ---------------------------------------------------------------------------------------------
# The header and the handshake
# ---------------------------------------------------------------------------------------------

def _dtype_code(dtype) -> float:
    return float(_SYNC_DTYPES.index(np.dtype(dtype).name) + 1)


def _sync_header(op: str, C: int, dtype, comm) -> np.ndarray:
    return np.array([_SYNC_MAGIC, _SYNC_VERSION, _SYNC_OPS[op], C, _dtype_code(dtype), comm.size,
                     comm.rank], np.float64)


def _device_const(xp, key, make):
    """A small float64 array made on the host once per key and kept on xp's device (a copy from
    pageable host memory would synchronize the stream every call)."""
    if xp is np:
        return make()
    a = _SYNC_PREFIX.get(key)
    if a is None:
        if len(_SYNC_PREFIX) > 1024:
            _SYNC_PREFIX.clear()
        a = _SYNC_PREFIX[key] = xp.asarray(make())
    return a


def _header_problem(head: np.ndarray, C: int, dtype, comm, what: str) -> str | None:
    """Why the gathered headers (size, _SYNC_HEADER) disagree with this rank's, or None. The
    message names the first rank that differs and is the same on every rank."""
    names = {1: "float16", 2: "bfloat16", 3: "float32", 4: "float64"}
    for r, h in enumerate(head):
        if h[0] != _SYNC_MAGIC or h[1] != _SYNC_VERSION or h[2] != head[0][2]:
            return (f"{what}: rank {r} sent something else than this collective's statistics (ranks "
                    "call different collectives on this communicator, or another version)")
        if h[5] != comm.size or h[6] != r:
            return (f"comm: rank {r} calls with a communicator of size {h[5]:g} as rank {h[6]:g}, "
                    f"this one has size {comm.size} ({what})")
    for r, h in enumerate(head):
        if h[3] != head[0][3]:
            return (f"x: the channel count differs across ranks: rank 0 has {head[0][3]:g}, rank {r} "
                    f"has {h[3]:g} ({what})")
        if h[4] != head[0][4]:
            return (f"x: the dtype differs across ranks: rank 0 has {names.get(int(head[0][4]))}, rank {r} "
                    f"has {names.get(int(h[4]))} ({what})")
    return None


def _handshake(xp, comm, C: int, dtype, what: str) -> None:
    """The first call with channel count C on `comm`: exchange the header alone, a buffer of the
    same length on every rank whatever its C, so that a mismatch is a ValueError everywhere."""
    comm.raise_pending()
    if C in comm.verified:
        return
    hdr = _sync_header("handshake", C, dtype, comm)
    got = comm.allgather(hdr if xp is np else xp.asarray(hdr), f"{what} (header exchange)")
    got = got if type(got) is np.ndarray else got.get()
    problem = _header_problem(got, C, dtype, comm, what)
    if problem:
        raise ValueError(problem)
    comm.verified.add(C)


# ---------------------------------------------------------------------------------------------
# Forward: the statistics, gathered and merged
# ---------------------------------------------------------------------------------------------

def _local_stats(xp, kernels: bool, x, lay: Layout):
    """This rank's (mean, var) per channel, flat in the accumulation dtype; zeros for no rows."""
    acc = B.compute_dtype(x.dtype)
    if lay.m == 0:
        return xp.zeros(lay.C, acc), xp.zeros(lay.C, acc)
    if kernels:
        return kernel_path.statistics(xp, x, lay)
    mean, var = numpy_path.statistics(xp, x, lay)
    return mean.reshape(-1), var.reshape(-1)


def _merge_stats(xp, gathered, C: int):
    """Chan's merge of the ranks' (count, mean, M2) rows of `gathered` (size, header + 1 + 2C),
    float64: (N, mean, var) with var the biased variance of the concatenated batch.

    Written as the merge's closed form, mean = sum_r n_r mean_r / N and
    M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2, reduced over the rank axis in rank order: the
    same array on every rank gives bitwise the same result on every rank, whichever rank was
    fastest, with two reductions instead of size sequential merges (a kernel launch each on a GPU).
    Ranks with no rows (n_r = 0, mean_r = M2_r = 0) add nothing. N = 0 gives NaN.
    """
    H = _SYNC_HEADER
    n = gathered[:, H:H + 1]
    means, m2 = gathered[:, H + 1:H + 1 + C], gathered[:, H + 1 + C:H + 1 + 2 * C]
    N = n.sum()
    with np.errstate(all="ignore"):
        mean = (n * means).sum(axis=0) / N
        d = means - mean
        var = (m2.sum(axis=0) + (n * d * d).sum(axis=0)) / N
    return N, mean, var


def _sync_stats(xp, kernels: bool, x, lay: Layout, comm, what: str):
    """(N, mean, var) of the batch concatenated over the ranks, float64: N a host float on the
    NumPy path, a device scalar on the device path (no synchronization)."""
    C = lay.C
    _handshake(xp, comm, C, x.dtype, what)
    mean, var = _local_stats(xp, kernels, x, lay)
    H = _SYNC_HEADER
    buf = xp.empty(H + 1 + 2 * C, np.float64)
    buf[:H + 1] = _device_const(xp, ("fwd", C, x.dtype.name, comm.size, comm.rank, lay.m), lambda: np.append(
        _sync_header("forward", C, x.dtype, comm), float(lay.m)))
    buf[H + 1:H + 1 + C] = mean
    xp.multiply(var, float(lay.m), out=buf[H + 1 + C:])        # M2 = var * count
    got = comm.allgather(buf, what)
    N, gmean, gvar = _merge_stats(xp, got, C)
    if type(got) is np.ndarray:
        problem = _header_problem(got[:, :H], C, x.dtype, comm, what)
        if problem:
            raise ValueError(problem)
        N = float(N)
        if N == 0:
            raise ValueError(f"x: empty reduction on every rank: no rows to take statistics of ({what})")
    else:
        expect = _device_const(xp, ("head", C, x.dtype.name, comm.size), lambda: _sync_heads(C, x.dtype, comm))
        ok = (got[:, :H] == expect).all()
        gmean, gvar = xp.where(ok, gmean, np.nan), xp.where(ok, gvar, np.nan)
        comm.defer_check(xp, ok, f"{what}: ranks disagree on the dtype or the communicator (the "
                     "statistics of that call were NaN)")
    return N, gmean, gvar


def _sync_heads(C, dtype, comm):
    """The expected gathered headers (size, _SYNC_HEADER): this rank's with each rank's number."""
    head = np.stack([_sync_header("forward", C, dtype, comm)] * comm.size)
    head[:, 6] = np.arange(comm.size)
    return head


# ---------------------------------------------------------------------------------------------
# Backward: the sums, all-reduced
# ---------------------------------------------------------------------------------------------

def _backward_checks(C: int, dtype, m: int) -> np.ndarray:
    """The backward's check and count slots, summed over the ranks by the all-reduce: with P ranks
    the sums are (P, sum C, sum C^2, sum code, sum code^2, N). The C_r all equal C exactly when
    sum C = P C and P sum C^2 = (sum C)^2 (and the same for the dtype code); the sums are the same
    on every rank, so each rank finds the mismatch. An allgather of a header would say which rank
    differs, at P times the bytes of this 6-slot prefix: the forward's header says that already."""
    code = _dtype_code(dtype)
    return np.array([1.0, C, C * C, code, code * code, m], np.float64)


def _checks_problem(s: np.ndarray, C: int, dtype, comm, what: str) -> str | None:
    P = s[0]
    if P != comm.size:
        return f"comm: {P:g} ranks took part, this rank's communicator has size {comm.size} ({what})"
    if s[1] != P * C or s[2] * P != s[1] * s[1]:
        return f"x: the channel count differs across ranks (this rank has {C}; {what})"
    code = _dtype_code(dtype)
    if s[3] != P * code or s[4] * P != s[3] * s[3]:
        return f"x: the dtype differs across ranks (this rank has {np.dtype(dtype).name}; {what})"
    return None


def _sync_sums(xp, comm, dbeta, dgamma, x, lay: Layout, what: str):
    """ONE all-reduce of [checks | count | dbeta | dgamma]: (N, dbeta, dgamma) summed over ranks."""
    C, S = lay.C, _SYNC_CHECKS
    buf = xp.empty(S + 2 * C, np.float64)
    buf[:S] = _device_const(xp, ("bwd", C, x.dtype.name, lay.m), lambda: _backward_checks(C, x.dtype, lay.m))
    buf[S:S + C] = dbeta
    buf[S + C:] = dgamma
    got = comm.allreduce(buf, what)
    if type(got) is np.ndarray:
        problem = _checks_problem(got[:S], C, x.dtype, comm, what)
        if problem:
            raise ValueError(problem)
        return float(got[S - 1]), got[S:S + C], got[S + C:]
    expect = _device_const(xp, ("bwdsum", C, x.dtype.name, comm.size), lambda: (
        lambda c: np.array([comm.size, comm.size * C, comm.size * C * C, comm.size * c, comm.size * c * c]))(
            _dtype_code(x.dtype)))
    ok = (got[:S - 1] == expect).all()
    comm.defer_check(xp, ok, f"{what}: ranks disagree on the channel count, dtype or communicator")
    nan = xp.where(ok, 0.0, np.nan)
    return got[S - 1], got[S:S + C] + nan, got[S + C:] + nan
