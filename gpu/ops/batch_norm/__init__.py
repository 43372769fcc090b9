"""Batch statistics and batch normalization: forward (training), inference and backward.

`axis` is NumPy's: the axes reduced over. The kept axes are the features (channels); gamma,
beta, running statistics, mean and invstd have the shape of the kept axes (the shape with the
reduced axes kept as 1 is accepted too, e.g. the (n, 1) column for the seed's (n, m) layout).

    layout                  x shape          axis
    dense (batch, features) (N, C)           0
    the seed's Z[l]         (n_units, m)     1
    NCHW activations        (N, C, H, W)     (0, 2, 3)
    NHWC activations        (N, H, W, C)     (0, 1, 2)

NumPy arrays run the NumPy reference path (also the CPU fallback); CuPy arrays run the
CUDA kernels of ``cuda_src/batch_norm.cu``. Accumulation is in float32 for float16, bfloat16 and
float32 storage and in float64 for float64.

Each public function checks its arguments once (``_args``), then makes one call into one path:

    _args.py        layout, argument checks, the validated-call cache
    numpy_path.py   the NumPy reference path: its strategies (small, compiled, direct, row blocks)
    jit.py          the compiled loops of the optional cpu-jit extra (Numba; jit_loops.py)
    kernel_path.py  launches of batch_norm.cu over the plans of gpu/_engines/channels.py
    sync.py         comm=: synchronized batch norm across processes
"""
from __future__ import annotations

from typing import Sequence

from . import _args, kernel_path, numpy_path, sync

__all__ = ["batch_stats", "batch_norm_forward", "batch_norm_backward", "batch_norm_inference", "batch_norm"]


def batch_stats(x, axis: int | Sequence[int] = 0, *, comm=None):
    """Biased per-feature mean and variance of `x` over `axis`.

    Returns (mean, var), both of the kept axes' shape and of x's dtype. With ``comm`` (a
    `gpu.distributed` communicator, or an engine object it wraps) the statistics are those of the
    batch concatenated over the ranks (see `batch_norm_forward`).

    >>> import numpy as np, gpu
    >>> x = np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32)
    >>> mean, var = gpu.batch_stats(x, axis=0)      # shapes (8,), (8,)
    """
    if comm is None:
        a = _args.stats(x, axis)
        return (kernel_path if a.kernels else numpy_path).stats(a)
    return sync.batch_stats(_args.communicator(comm), _args.stats(x, axis, synced=True))


def batch_norm_forward(x, gamma=None, beta=None, *, axis: int | Sequence[int] = 0, eps: float = 1e-5,
                       running_mean=None, running_var=None, momentum: float | None = 0.1,
                       num_batches_tracked=None, comm=None, residual=None, activation: str | None = None):
    """Training-mode batch norm: y = act(gamma * (x - mean) * invstd + beta + residual) over `axis`.

    invstd = 1 / sqrt(var + eps) with the biased variance. gamma=None means 1, beta=None means 0.
    When running_mean and running_var are given they are updated in place, as PyTorch does:
    r_mean = (1 - momentum) * r_mean + momentum * mean,
    r_var = (1 - momentum) * r_var + momentum * var * M / (M - 1), M the elements per feature.
    ``momentum=None`` is PyTorch's cumulative average: it needs ``num_batches_tracked``, an int64
    array of one element (torch's ``BatchNorm.num_batches_tracked`` buffer) that is incremented in
    place first, and momentum = 1 / num_batches_tracked. Given with a float momentum it is just
    incremented, as torch's module does. On CuPy the increment and the division stay on the device
    (no synchronization).

    Special values follow PyTorch: the statistics are finite whenever the true variance fits the
    dtype (overflow-safe accumulation); an inf in a feature gives mean inf and var NaN, a NaN (or
    +inf with -inf) NaN; with eps = 0 a constant feature gets invstd 0 and y = beta.

    The epilogue (fused: the sum is rounded once, to x's dtype, after the activation):
    ``residual`` is an array of x's shape, dtype and library (any strides; it may be x itself) or
    None; ``activation`` is None or "relu" (max(v, 0), NaN kept). The statistics are x's alone.

    Returns (y, mean, invstd): y of x's shape and dtype; mean and invstd of the kept axes' shape
    in the accumulation dtype (float32 for float16/bfloat16 input, like PyTorch's save_mean and
    save_invstd), to be passed to `batch_norm_backward`.

    ``comm``: synchronized batch norm. Every rank passes its own x (the same feature shape and
    dtype; any number of rows, zero included) and gets the statistics of the batch concatenated
    over the ranks, bitwise the same on every rank, from one packed collective (an allgather of
    each rank's count, mean and M2, merged in rank order). M above is then the global count.
    ``comm`` is a `gpu.distributed.Communicator` or what `gpu.distributed.wrap` accepts (an
    mpi4py communicator, a torch.distributed process group, a cupyx.distributed communicator).
    Ranks that disagree on the channel count, the dtype or the communicator's size get a
    ValueError on every rank; an engine failure or timeout a `gpu.distributed.CollectiveError`.

    >>> import numpy as np, gpu
    >>> x = np.random.default_rng(0).standard_normal((32, 16, 8, 8)).astype(np.float32)
    >>> rm, rv = np.zeros(16, np.float32), np.ones(16, np.float32)
    >>> y, mean, invstd = gpu.batch_norm_forward(x, axis=(0, 2, 3), running_mean=rm, running_var=rv)
    """
    if comm is None:
        a = _args.forward(x, gamma, beta, axis, eps, running_mean, running_var, momentum, num_batches_tracked,
                          residual=residual, activation=activation)
        if num_batches_tracked is not None:
            num_batches_tracked += 1            # before the update, as torch's module
        return (kernel_path if a.kernels else numpy_path).forward(a)
    return sync.forward(_args.communicator(comm), _args.forward(
        x, gamma, beta, axis, eps, running_mean, running_var, momentum, num_batches_tracked, synced=True,
        residual=residual, activation=activation))


def batch_norm_backward(dy, x, gamma, mean, invstd, *, axis: int | Sequence[int] = 0, activation: str | None = None,
                        y=None, residual_grad: bool = False, comm=None):
    """Gradients of `batch_norm_forward`'s y with respect to x, gamma and beta (and the residual).

    With x_hat = (x - mean) * invstd:
    dbeta = sum(dy), dgamma = sum(dy * x_hat) over `axis`,
    dx = gamma * invstd * (dy - dbeta / M - x_hat * dgamma / M).

    `mean` and `invstd` are those returned by the forward. gamma=None means 1. Returns
    (dx, dgamma, dbeta): dx of x's dtype, dgamma and dbeta of the kept axes' shape in gamma's dtype
    (x's dtype when gamma is None).

    The epilogue's backward: with ``activation="relu"``, ``y`` (the forward's output, x's shape and
    dtype) is required and dy is first masked by y > 0 (the gradient of relu, as torch's
    threshold_backward); ``residual_grad=True`` also returns dresidual, the (masked) dy in x's
    dtype: (dx, dgamma, dbeta, dresidual).

    ``comm`` (the forward's): dbeta and dgamma in dx are the sums over every rank's batch, from
    one packed all-reduce; M is the global count. The returned dgamma and dbeta are this rank's
    share (their sum over the ranks is the full gradient), as torch's SyncBatchNorm returns, so a
    data-parallel all-reduce of the parameter gradients counts each example once.

    >>> import numpy as np, gpu
    >>> x = np.random.default_rng(0).standard_normal((64, 10))
    >>> y, mean, invstd = gpu.batch_norm_forward(x)
    >>> dx, dgamma, dbeta = gpu.batch_norm_backward(np.ones_like(y), x, None, mean, invstd)
    """
    if comm is None:
        a = _args.backward(dy, x, gamma, mean, invstd, axis, activation=activation, y=y, residual_grad=residual_grad)
        return (kernel_path if a.kernels else numpy_path).backward(a)
    return sync.backward(_args.communicator(comm), _args.backward(
        dy, x, gamma, mean, invstd, axis, synced=True, activation=activation, y=y, residual_grad=residual_grad))


def batch_norm_inference(x, gamma, beta, running_mean, running_var, *, axis: int | Sequence[int] = 0,
                         eps: float = 1e-5, residual=None, activation: str | None = None):
    """Inference-mode batch norm with given statistics:
    y = act(gamma * (x - running_mean) / sqrt(running_var + eps) + beta + residual), one pass.
    gamma/beta may be None; ``residual`` and ``activation`` as in `batch_norm_forward`.

    >>> import numpy as np, gpu
    >>> x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    >>> y = gpu.batch_norm_inference(x, None, None, np.zeros(4, np.float32), np.ones(4, np.float32))
    """
    a = _args.inference(x, gamma, beta, running_mean, running_var, axis, eps, residual, activation)
    if a.x.size == 0:
        return a.xp.empty(a.x.shape, a.x.dtype)     # an empty batch gives an empty y, as torch
    return (kernel_path if a.kernels else numpy_path).inference(a)


def batch_norm(x, gamma=None, beta=None, *, axis: int | Sequence[int] = 0, eps: float = 1e-5,
               running_mean=None, running_var=None, momentum: float | None = 0.1, training: bool = True,
               num_batches_tracked=None, comm=None, residual=None, activation: str | None = None):
    """Batch norm, the convenience form: `batch_norm_forward`'s y when training (updating running
    stats if given), else `batch_norm_inference` with the running stats (then required); the
    epilogue keywords ``residual`` and ``activation`` go to either.

    >>> import numpy as np, gpu
    >>> y = gpu.batch_norm(np.random.default_rng(0).standard_normal((16, 3)))
    """
    if training:
        return batch_norm_forward(x, gamma, beta, axis=axis, eps=eps, running_mean=running_mean,
                                  running_var=running_var, momentum=momentum,
                                  num_batches_tracked=num_batches_tracked, comm=comm, residual=residual,
                                  activation=activation)[0]
    return batch_norm_inference(x, gamma, beta, running_mean, running_var, axis=axis, eps=eps, residual=residual,
                                activation=activation)
