"""`BatchNormAct1d/2d/3d` and `SyncBatchNormAct`: batch norm with the residual add and the
activation fused in, ``forward(input, residual=None) = act(bn(input) + residual)``.

They subclass the batch-norm modules (torch's `BatchNorm*d`, gpu.torch's `SyncBatchNorm`), so
parameters, buffers and state_dict keys are theirs: a `torch.nn.BatchNorm2d` checkpoint loads
into a `BatchNormAct2d` and back (timm's `BatchNormAct2d` is the naming precedent). The one
addition is the keyword-only ``activation`` ("relu" by default, or None).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from . import batch_norm_act as A
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, forward_arguments
from .sync_batchnorm import SyncBatchNorm, forward_group

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "SyncBatchNormAct"]


def _unfused(bn: nn.Module, input: Tensor, residual: Any) -> Tensor:
    """act(bn(input) + residual) as three ops: for a residual the fused pass does not take (a
    scalar, a broadcast operand, another dtype), exactly what the unfused model computes."""
    y = _call(bn, input, None, None) + residual
    return torch.relu(y) if bn.activation == "relu" else y


def _fusable(input: Tensor, residual: Any) -> bool:
    return residual is None or (isinstance(residual, Tensor) and residual.shape == input.shape
                                and residual.dtype == input.dtype and residual.device == input.device)


def _call(bn: nn.Module, input: Tensor, residual: Optional[Tensor], activation: Optional[str]) -> Tensor:
    running_mean, running_var, bn_training, momentum, nbt = forward_arguments(bn)
    group = forward_group(bn, bn_training) if isinstance(bn, SyncBatchNorm) else None
    if group is not None:
        return A.sync_batch_norm(input, running_mean, running_var, bn.weight, bn.bias, momentum, bn.eps, group,
                                 residual=residual, activation=activation, num_batches_tracked=nbt)
    return A.batch_norm(input, running_mean, running_var, bn.weight, bn.bias, bn_training, momentum, bn.eps,
                        residual=residual, activation=activation, num_batches_tracked=nbt)


class _ActForward:
    """The forward and the ``activation`` attribute the fused modules share. ``broadcast_residual``
    (an attribute, False): a residual the fused pass does not take is added unfused instead of
    refused, as `gpu.torch.fuse` sets it where the model's own add would broadcast."""

    activation: Optional[str]
    broadcast_residual = False

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        if self.broadcast_residual and not _fusable(input, residual):
            return _unfused(self, input, residual)
        return _call(self, input, residual, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


def _init(module: nn.Module, activation: Optional[str]) -> None:
    A.check_activation(activation)
    module.activation = activation


class _BatchNormAct(_ActForward):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, activation: Optional[str] = "relu", **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)
        _init(self, activation)


class BatchNormAct1d(_BatchNormAct, nn.BatchNorm1d):
    """`torch.nn.BatchNorm1d` (input (N, C) or (N, C, L)) then ``+ residual`` and the activation,
    one fused op (`gpu.torch.batch_norm`'s ``residual`` and ``activation``).

    >>> import torch, gpu.torch as gt
    >>> y = gt.BatchNormAct1d(4)(torch.randn(8, 4), torch.randn(8, 4))
    """


class BatchNormAct2d(_BatchNormAct, nn.BatchNorm2d):
    """`torch.nn.BatchNorm2d` (input (N, C, H, W), contiguous or channels_last) then ``+ residual``
    and the activation, one fused op; torch's BatchNorm2d state_dict keys.

    >>> import torch, gpu.torch as gt
    >>> bn = gt.BatchNormAct2d(4)
    >>> _ = bn.load_state_dict(torch.nn.BatchNorm2d(4).state_dict())
    >>> y = bn(torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5))   # relu(bn(x) + r)
    """


class BatchNormAct3d(_BatchNormAct, nn.BatchNorm3d):
    """`torch.nn.BatchNorm3d` (input (N, C, D, H, W)) then ``+ residual`` and the activation, one
    fused op."""


class SyncBatchNormAct(_ActForward, SyncBatchNorm):
    """`gpu.torch.SyncBatchNorm` then ``+ residual`` and the activation: the synchronized fused op
    in training under torch.distributed with more than one rank, else the plain fused op (where
    torch's SyncBatchNorm runs as plain batch norm)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, *,
                 activation: Optional[str] = "relu", **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, **kwargs)
        _init(self, activation)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_non_zero_input_channels(input)
        return super().forward(input, residual)


_ACT = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d, nn.BatchNorm3d: BatchNormAct3d,
        BatchNorm1d: BatchNormAct1d, BatchNorm2d: BatchNormAct2d, BatchNorm3d: BatchNormAct3d,
        nn.SyncBatchNorm: SyncBatchNormAct, SyncBatchNorm: SyncBatchNormAct}


def fusable(bn: nn.Module) -> bool:
    """Whether `fused_module` takes `bn`."""
    return type(bn) in _ACT


def fused_module(bn: nn.Module, activation: Optional[str]) -> nn.Module | None:
    """A fused module sharing `bn`'s parameters, buffers and attributes (the same tensors), with
    `activation` and ``broadcast_residual``; None unless `bn` is exactly one of the batch norms
    whose forward this knows (torch's or gpu.torch's BatchNorm*d, either SyncBatchNorm; not a
    subclass, whose forward may differ)."""
    cls = _ACT.get(type(bn))
    if cls is None:
        return None
    out = cls.__new__(cls)
    nn.Module.__init__(out)
    out.__dict__.update({k: v for k, v in bn.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")})
    out._parameters, out._buffers, out._modules = dict(bn._parameters), dict(bn._buffers), dict(bn._modules)
    out.activation = activation
    out.broadcast_residual = True
    if cls is SyncBatchNormAct and not hasattr(out, "process_group"):
        out.process_group = None
    return out
