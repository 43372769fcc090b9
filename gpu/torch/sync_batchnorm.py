"""`SyncBatchNorm`: a drop-in for `torch.nn.SyncBatchNorm` on the package's synchronized batch norm.

The module has torch's constructor (``process_group=`` included), attributes, parameters,
buffers, state_dict keys, `train()/eval()` and `extra_repr`: a checkpoint of either loads into
the other. It subclasses torch's ``_BatchNorm`` (as torch's SyncBatchNorm does), not
``torch.nn.SyncBatchNorm``, which DistributedDataParallel refuses in a CPU module; so
``isinstance(m, torch.nn.SyncBatchNorm)`` is False.

In training with a process group of more than one rank the forward runs
``gpu::sync_batch_norm_fwd``: each rank's (count, mean, M2) per channel, ONE packed allgather through ``gpu.distributed.wrap(process_group)`` and a merge in rank order (the same
statistics, bitwise, on every rank; unequal batch sizes and ranks with no rows are exact, the
running variance unbiased with the global count). The backward, ``gpu::sync_batch_norm_bwd``,
runs ONE packed all-reduce of (sum dy, sum dy * x_hat). Everything else (eval, one rank,
torch.distributed not initialized) is `gpu.torch.batch_norm`.

Gradients follow torch's SyncBatchNorm: the input's gradient uses the sums over every rank; the
weight's and bias's are this rank's own (a data-parallel all-reduce of the parameter gradients,
DDP's, then counts each example once); a rank with no rows gets zeros. When the input needs no
gradient the backward runs no collective (as torch's), so all ranks must agree on that.

Unlike torch's module this one runs on CPU tensors too (gloo), DistributedDataParallel
included, and on CUDA tensors (NCCL).
`torch.compile` sees the two ops as opaque custom ops (fake implementations, autograd) whose
collectives run eagerly inside them; the group travels by name. `sync_batch_norm` compiles with
fullgraph=True (tests/test_distributed.py, on a group of one rank).

    import torch, gpu.torch as gt
    model = gt.SyncBatchNorm.convert_sync_batchnorm(model)   # every BatchNorm*d / SyncBatchNorm
    model = torch.nn.parallel.DistributedDataParallel(model)
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..ops import batch_norm as _bn
from . import _bridge as TB
from . import functional as F
from ._groups import communicator, group_name
from .modules import forward_arguments

__all__ = ["SyncBatchNorm", "sync_batch_norm"]


# ---------------------------------------------------------------------------------------------
# The functional form
# ---------------------------------------------------------------------------------------------

def sync_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    momentum: Optional[float] = 0.1, eps: float = 1e-5, process_group: Any = None, *,
                    num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """Training-mode batch norm over the batch concatenated across `process_group`'s ranks (None:
    the default group), as `torch.nn.SyncBatchNorm` in training. Every rank of the group must call
    it with the same channel count and dtype (a mismatch is a ValueError on every rank); any
    number of rows per rank, zero included. Arguments as `gpu.torch.batch_norm`; running_mean and
    running_var (optional) are updated in place with the global statistics.

    >>> y = gt.sync_batch_norm(x, rm, rv, weight, bias)     # doctest: +SKIP
    """
    group, weight, bias, running_mean, running_var, num_batches_tracked = sync_arguments(
        input, running_mean, running_var, weight, bias, momentum, eps, process_group, num_batches_tracked)
    y, _, _, rm, rv, nbt = torch.ops.gpu.sync_batch_norm_fwd(
        TB.dense(input), weight, bias, running_mean, running_var, num_batches_tracked,
        None if momentum is None else float(momentum), float(eps), group_name(group))
    if running_mean is not None:
        F.store_running_stats((running_mean, running_var, num_batches_tracked), (rm, rv, nbt))
    return y


def sync_arguments(input, running_mean, running_var, weight, bias, momentum, eps, process_group,
                   num_batches_tracked):
    """`sync_batch_norm`'s checks: (group, weight, bias, running_mean, running_var,
    num_batches_tracked) as the op takes them."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group: torch.distributed is not initialized (call "
                           "torch.distributed.init_process_group first)")
    group = process_group if process_group is not None else dist.group.WORLD
    # the shared checks, less the per-rank "more than 1 value per channel": one row per rank is a
    # batch of P rows here
    C = F._check_batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps,
                            num_batches_tracked)
    if not eps > 0 and F._torch_rejects_eps0():
        raise ValueError(f"eps: must be positive during training, got {eps}")
    if C == 0:
        raise ValueError("SyncBatchNorm number of input channels should be non-zero")
    weight, bias, running_mean, running_var = (None if p is None else p.view(C) if p.dim() != 1 else p
                                               for p in (weight, bias, running_mean, running_var))
    if (running_mean is None) != (running_var is None):
        raise RuntimeError("running_mean, running_var: pass both or neither")
    if momentum is None and running_mean is not None and num_batches_tracked is None:
        raise TypeError("momentum: None (the cumulative average) needs num_batches_tracked, the count of "
                        "updates (use gpu.torch.SyncBatchNorm, or pass num_batches_tracked=)")
    if running_mean is None:
        num_batches_tracked = None
    return group, weight, bias, running_mean, running_var, num_batches_tracked


@torch.library.custom_op("gpu::sync_batch_norm_fwd", mutates_args=())
def _sync_fwd(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
              running_mean: Optional[Tensor], running_var: Optional[Tensor],
              num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float,
              group: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, running_mean', running_var', num_batches_tracked') as
    gpu::batch_norm_fwd in training, the statistics those of every rank's batch: ONE allgather."""
    acc = TB.compute_dtype(input.dtype)
    none = input.new_empty((0,), dtype=acc)
    rm, rv, nbt = (none.clone() if r is None else r.clone() for r in (running_mean, running_var, num_batches_tracked))
    stats = running_mean is not None
    y, mean, invstd = F._train_forward(input, weight, bias, rm if stats else None, rv if stats else None,
                                       nbt if num_batches_tracked is not None else None, momentum, eps,
                                       comm=communicator(group))
    return y, mean, invstd, rm, rv, nbt


@_sync_fwd.register_fake
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group):
    acc = TB.compute_dtype(input.dtype)
    C = input.shape[1]
    rm, rv, nbt = (input.new_empty((0,), dtype=acc) if r is None else torch.empty_like(r)
                   for r in (running_mean, running_var, num_batches_tracked))
    return (torch.empty_like(input), input.new_empty((C,), dtype=acc), input.new_empty((C,), dtype=acc),
            rm, rv, nbt)


@torch.library.custom_op("gpu::sync_batch_norm_bwd", mutates_args=())
def _sync_bwd(grad_out: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor,
              group: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias): dx from the sums over every rank (ONE all-reduce), dweight and dbias
    this rank's own, as torch's SyncBatchNorm."""
    last = TB.channels_last(input)
    grad_out = grad_out.contiguous(memory_format=TB.memory_format(input))
    with TB.running_on(input.device):
        dx, dw, db = _bn.batch_norm_backward(
            TB.to_array(TB.features_last(grad_out, last)), TB.to_array(TB.features_last(input, last)),
            TB.to_array(weight), TB.to_array(mean), TB.to_array(invstd), axis=TB.bn_axis(input.dim(), last),
            comm=communicator(group))
        dx = TB.features_first(TB.from_array(dx), last)
        dw, db = TB.from_array(dw), TB.from_array(db)
    return TB.like(dx, input), dw, db


@_sync_bwd.register_fake
def _(grad_out, input, weight, mean, invstd, group):
    pdt = weight.dtype if weight is not None else input.dtype
    C = input.shape[1]
    return torch.empty_like(input), input.new_empty((C,), dtype=pdt), input.new_empty((C,), dtype=pdt)


def _setup_context(ctx, inputs, output):
    input, weight, bias, *_, group = inputs
    _, mean, invstd, rm, rv, nbt = output
    ctx.mark_non_differentiable(mean, invstd, rm, rv, nbt)
    ctx.set_materialize_grads(False)
    ctx.group = group
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(input, weight, mean, invstd)


def _backward(ctx, grad_y, *_grad_stats):
    input, weight, mean, invstd = ctx.saved_tensors
    if grad_y is None:              # the peers still run the all-reduce: take part with zeros
        grad_y = torch.zeros_like(input)
    if ctx.needs_input_grad[0]:
        dx, dw, db = torch.ops.gpu.sync_batch_norm_bwd(grad_y, input, weight, mean, invstd, ctx.group)
    else:                           # no input gradient: no collective, as torch's SyncBatchNorm
        dx = None
        _, dw, db = torch.ops.gpu.batch_norm_bwd(grad_y, input, weight, mean, invstd)
    return (dx, dw if ctx.has_weight else None, db if ctx.has_bias else None,
            None, None, None, None, None, None)


_sync_fwd.register_autograd(_backward, setup_context=_setup_context)
_sync_bwd.register_autograd(F._no_double_backward("batch_norm"), setup_context=lambda ctx, inputs, output: None)


def forward_group(bn: nn.Module, bn_training: bool) -> Any:
    """The process group a synchronized batch norm module's forward runs over, as torch's
    SyncBatchNorm decides it: in training under an initialized torch.distributed with more than
    one rank in the module's group (None: the world); else None, plain batch norm."""
    if not (bn_training and bn.training and dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) >= 2 else None


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------

class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """`torch.nn.SyncBatchNorm` (same arguments: num_features, eps, momentum, affine,
    track_running_stats, process_group, device, dtype, and torch's other keywords) on the
    package's synchronized batch norm: one collective forward, one backward; exact for unequal
    per-rank batch sizes. Inputs (N, C, ...) on the CPU (gloo) or CUDA (NCCL).

    A subclass of torch's ``_BatchNorm``, the base of ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``,
    not of ``torch.nn.SyncBatchNorm``: ``DistributedDataParallel`` refuses every instance of
    that class in a CPU module ("SyncBatchNorm layers only work with GPU modules"), while this
    one runs on the CPU too. So ``isinstance(m, torch.nn.SyncBatchNorm)`` is False and
    ``isinstance(m, torch.nn.modules.batchnorm._BatchNorm)`` (what torch's own conversions and
    FSDP look for) is True; parameters, buffers, state_dict keys, repr and the input checks are
    torch's SyncBatchNorm's, so checkpoints load both ways.

    >>> import torch, gpu.torch as gt
    >>> bn = gt.SyncBatchNorm(16)          # in training under torch.distributed: synchronized
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group: Any = None,
                 device=None, dtype=None, **kwargs) -> None:
        # **kwargs: the keywords a torch release adds (2.13's bias=), passed on as torch's module does
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        running_mean, running_var, bn_training, momentum, nbt = forward_arguments(self)
        group = forward_group(self, bn_training)
        if group is None:                       # eval, one rank, no torch.distributed: plain batch norm
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training,
                                momentum, self.eps, num_batches_tracked=nbt)
        return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, momentum, self.eps,
                               group, num_batches_tracked=nbt)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Every batch norm in `module` (itself included): torch's ``BatchNorm1d/2d/3d`` and
        ``SyncBatchNorm``, gpu.torch's ``BatchNorm*d`` and ``SyncBatchNorm``, becomes this class,
        keeping its parameters and buffers (the same tensors), arguments and training mode, as
        `torch.nn.SyncBatchNorm.convert_sync_batchnorm`. ``process_group`` scopes the
        synchronization (None: the whole world, or the group a SyncBatchNorm already had).
        Returns the converted module (a new one only when `module` itself is a batch norm).

        >>> import torch, gpu.torch as gt
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> model = gt.SyncBatchNorm.convert_sync_batchnorm(model)
        """
        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            group = process_group if process_group is not None else getattr(module, "process_group", None)
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, group)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
