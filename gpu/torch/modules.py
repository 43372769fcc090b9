"""`BatchNorm1d/2d/3d` and `CrossEntropyLoss` running the package's ops, and `convert(model)`.

The modules subclass torch's own (`torch.nn.BatchNorm2d`, ...), so the constructor, attributes,
parameters and buffers (weight, bias, running_mean, running_var, num_batches_tracked), state_dict
keys, `train()/eval()`, `extra_repr` and the input checks are torch's; only `forward` differs. A
torch checkpoint loads into them and theirs into torch's modules.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from . import functional as F


class _BatchNormForward:
    """torch's `_BatchNorm.forward` with our batch_norm; num_batches_tracked goes into the op, which
    increments it and, for momentum=None, takes 1 / num_batches_tracked on the tensor's device
    (torch's module reads the count back to the host for that)."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        running_mean, running_var, bn_training, momentum, nbt = forward_arguments(self)
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, momentum,
                            self.eps, num_batches_tracked=nbt)


def forward_arguments(bn: nn.modules.batchnorm._NormBase):
    """(running_mean, running_var, bn_training, momentum, num_batches_tracked) a batch-norm
    module's forward passes on, as torch's _BatchNorm.forward decides them: the buffers when
    they are used, batch statistics in training or without buffers, and num_batches_tracked
    (incremented on the device by the op) only when the running statistics are updated."""
    update = bn.training and bn.track_running_stats
    nbt = bn.num_batches_tracked if update else None
    momentum = bn.momentum
    if momentum is None and nbt is None:
        momentum = 0.0                      # torch's factor when nothing is updated
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use = not bn.training or bn.track_running_stats
    return (bn.running_mean if use else None, bn.running_var if use else None, bn_training, momentum, nbt)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """`torch.nn.BatchNorm1d` (input (N, C) or (N, C, L)) on the package's batch norm."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """`torch.nn.BatchNorm2d` (input (N, C, H, W), contiguous or channels_last) on the package's
    batch norm."""


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """`torch.nn.BatchNorm3d` (input (N, C, D, H, W), contiguous or channels_last_3d) on the
    package's batch norm."""


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """`torch.nn.CrossEntropyLoss` (same arguments: weight, size_average, ignore_index, reduce,
    reduction, label_smoothing) on the package's fused softmax + cross-entropy, with
    `gpu.torch.cross_entropy`'s keyword-only additions ``z_loss``, ``softcap`` and
    ``return_z_loss`` (forward then returns ``(loss, z_term)``)."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None, return_z_loss: bool = False, **kwargs) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing, **kwargs)
        self.z_loss, self.softcap, self.return_z_loss = z_loss, softcap, return_z_loss

    def forward(self, input: Tensor, target: Tensor):
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               z_loss=self.z_loss, softcap=self.softcap, return_z_loss=self.return_z_loss)

    def extra_repr(self) -> str:
        # torch's (empty) when the additions keep their defaults
        extra = [f"{k}={v!r}" for k, v, d in (("z_loss", self.z_loss, 0.0), ("softcap", self.softcap, None),
                                              ("return_z_loss", self.return_z_loss, False)) if v != d]
        return ", ".join(filter(None, [super().extra_repr()] + extra))


_SWAP = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def convert(module: nn.Module) -> nn.Module:
    """Swap every `torch.nn.BatchNorm1d/2d/3d` in `module` (itself included) for ours, keeping its
    parameters and buffers (the same tensors: device, dtype and requires_grad unchanged), its
    arguments and its training mode; everything else is left as it is. Returns the converted
    module (a new one only when `module` itself is a batch norm), as
    `torch.nn.SyncBatchNorm.convert_sync_batchnorm`.

    >>> import torch, gpu.torch as gt
    >>> model = gt.convert(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)))
    """
    ours = _SWAP.get(type(module))
    out = module
    if ours is not None:
        out = ours.__new__(ours)
        nn.Module.__init__(out)
        # the same attributes (arguments, hooks' dicts), parameters and buffers, not copies
        out.__dict__.update({k: v for k, v in module.__dict__.items()
                             if k not in ("_parameters", "_buffers", "_modules")})
        out._parameters = dict(module._parameters)
        out._buffers = dict(module._buffers)
        out._modules = dict(module._modules)
    for name, child in list(out.named_children()):
        new = convert(child)
        if new is not child:
            out._modules[name] = new
    return out
