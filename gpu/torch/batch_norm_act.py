"""Batch norm with a fused residual add and activation for torch tensors:
``y = act(weight * (x - mean) * invstd + bias + residual)`` in one pass forward and one backward.

`batch_norm` and `sync_batch_norm` are `gpu.torch`'s public functions: torch's signatures plus
the keyword-only ``residual`` (a tensor of the input's shape, dtype and device, or None) and
``activation`` (None or "relu"); without them they are `functional.batch_norm` and
`sync_batchnorm.sync_batch_norm` unchanged. With them they run two custom ops in the namespace
``gpu`` (fake implementations and autograd registered, so gradcheck and
``torch.compile(fullgraph=True)`` see one opaque op):

    gpu::batch_norm_act_fwd   (y, mean, invstd, running_mean', running_var', num_batches_tracked');
                              ``group``: the process group's name for the synchronized forward
                              (ONE allgather), or None
    gpu::batch_norm_act_bwd   (dx, dweight, dbias, dresidual); with "relu" the mask is y > 0 (the
                              saved output: no mask tensor); dresidual is the masked gradient

In evaluation mode the backward is elementwise and computed with torch's ops, as
`functional.batch_norm`'s.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ..ops import batch_norm as _bn
from . import _bridge as TB
from . import functional as F
from . import sync_batchnorm as S
from ._groups import communicator

__all__ = ["batch_norm", "sync_batch_norm", "ACTIVATIONS"]

#: the activations the fused epilogue applies (None: none)
ACTIVATIONS = (None, "relu")


def check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}")


def _check_residual(input: Tensor, residual: Optional[Tensor]) -> Optional[Tensor]:
    """`residual` in the input's memory format (no copy when they agree), checked against it."""
    if residual is None:
        return None
    TB.check_tensor(residual, "residual")
    if residual.shape != input.shape:
        raise ValueError(f"residual: expected the input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != input.dtype:
        raise TypeError(f"residual: expected the input's dtype {input.dtype}, got {residual.dtype}")
    if residual.device != input.device:
        raise ValueError(f"residual: expected a tensor on the input's device {input.device}, got one on "
                         f"{residual.device}")
    return residual.contiguous(memory_format=TB.memory_format(input))


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: Optional[float] = 0.1, eps: float = 1e-5, *, residual: Optional[Tensor] = None,
               activation: Optional[str] = None, num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """`torch.nn.functional.batch_norm` on the package's ops, followed in the same pass by the
    addition of ``residual`` and the ``activation``: ``act(F.batch_norm(input, ...) + residual)``.

    residual: None, or a tensor of input's shape, dtype and device (any memory format; it is
    read in the input's); its gradient is returned when it requires one. activation: None or
    "relu". The other arguments and the running statistics' update are `F.batch_norm`'s (and
    ``num_batches_tracked``, as `gpu.torch.functional.batch_norm`).

    >>> import torch, gpu.torch as gt
    >>> x, r = torch.randn(8, 3, 5, 5), torch.randn(8, 3, 5, 5)
    >>> y = gt.batch_norm(x, torch.zeros(3), torch.ones(3), training=True, residual=r, activation="relu")
    """
    if residual is None and activation is None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                            num_batches_tracked=num_batches_tracked)
    weight, bias, nbt = F.batch_norm_arguments(input, running_mean, running_var, weight, bias, training,
                                               momentum, eps, num_batches_tracked)
    check_activation(activation)
    residual = _check_residual(input, residual)
    y, _, _, rm, rv, nbt2 = torch.ops.gpu.batch_norm_act_fwd(
        TB.dense(input), weight, bias, residual, running_mean, running_var, nbt, bool(training),
        None if momentum is None else float(momentum), float(eps), activation, None)
    if training and running_mean is not None:
        F.store_running_stats((running_mean, running_var, nbt), (rm, rv, nbt2))
    return y


def sync_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    momentum: Optional[float] = 0.1, eps: float = 1e-5, process_group: Any = None, *,
                    residual: Optional[Tensor] = None, activation: Optional[str] = None,
                    num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """`gpu.torch.sync_batch_norm` (training-mode batch norm over the batch concatenated across
    `process_group`'s ranks) with `batch_norm`'s ``residual`` and ``activation`` fused in.

    >>> y = gt.sync_batch_norm(x, rm, rv, weight, bias, residual=r, activation="relu")  # doctest: +SKIP
    """
    if residual is None and activation is None:
        return S.sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, process_group,
                                 num_batches_tracked=num_batches_tracked)
    group, weight, bias, running_mean, running_var, nbt = S.sync_arguments(
        input, running_mean, running_var, weight, bias, momentum, eps, process_group, num_batches_tracked)
    check_activation(activation)
    residual = _check_residual(input, residual)
    y, _, _, rm, rv, nbt2 = torch.ops.gpu.batch_norm_act_fwd(
        TB.dense(input), weight, bias, residual, running_mean, running_var, nbt, True,
        None if momentum is None else float(momentum), float(eps), activation, group.group_name)
    if running_mean is not None:
        F.store_running_stats((running_mean, running_var, nbt), (rm, rv, nbt2))
    return y


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

def _comm(group: Optional[str]):
    return None if group is None else communicator(group)


@torch.library.custom_op("gpu::batch_norm_act_fwd", mutates_args=())
def _fwd(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
         running_mean: Optional[Tensor], running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
         training: bool, momentum: Optional[float], eps: float, activation: Optional[str],
         group: Optional[str]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """gpu::batch_norm_fwd with the residual added and the activation applied by the same pass."""
    C, acc = input.shape[1], TB.compute_dtype(input.dtype)
    none = input.new_empty((0,), dtype=acc)
    last = TB.channels_last(input)
    axis = TB.bn_axis(input.dim(), last)
    if residual is not None:            # in x's memory format (no copy when they agree)
        residual = residual.contiguous(memory_format=TB.memory_format(input))

    def arrays():
        """x and the residual as the kernels' (N, ..., C) views when channels-last."""
        return (TB.to_array(TB.features_last(input, last)),
                None if residual is None else TB.to_array(TB.features_last(residual, last)))
    if not training:
        if input.numel() == 0:
            return torch.empty_like(input), none, none.clone(), none.clone(), none.clone(), none.clone()
        with TB.running_on(input.device):
            x, r = arrays()
            y = _bn.batch_norm_inference(x, TB.to_array(weight), TB.to_array(bias), TB.to_array(running_mean),
                                         TB.to_array(running_var), axis=axis, eps=eps, residual=r,
                                         activation=activation)
            y = TB.features_first(TB.from_array(y), last)
        return TB.like(y, input), none, none.clone(), none.clone(), none.clone(), none.clone()
    rm, rv, nbt = (none.clone() if t is None else t.clone() for t in (running_mean, running_var, num_batches_tracked))
    if input.numel() == 0 and group is None:     # as torch: an empty y, statistics untouched
        if num_batches_tracked is not None:
            nbt += 1
        return torch.empty_like(input), input.new_zeros((C,), dtype=acc), input.new_zeros((C,), dtype=acc), rm, rv, nbt
    stats = running_mean is not None
    with TB.running_on(input.device):
        x, r = arrays()
        y, mean, invstd = _bn.batch_norm_forward(
            x, TB.to_array(weight), TB.to_array(bias), axis=axis, eps=eps,
            running_mean=TB.to_array(rm) if stats else None, running_var=TB.to_array(rv) if stats else None,
            momentum=momentum, num_batches_tracked=TB.to_array(nbt) if num_batches_tracked is not None else None,
            comm=_comm(group), residual=r, activation=activation)
        y = TB.features_first(TB.from_array(y), last)
        mean, invstd = TB.from_array(mean), TB.from_array(invstd)
    return TB.like(y, input), mean, invstd, rm, rv, nbt


@_fwd.register_fake
def _(input, weight, bias, residual, running_mean, running_var, num_batches_tracked, training, momentum, eps,
      activation, group):
    return F.forward_fake(input, weight, bias, running_mean, running_var, num_batches_tracked, training,
                          momentum, eps)


@torch.library.custom_op("gpu::batch_norm_act_bwd", mutates_args=())
def _bwd(grad_out: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor,
         y: Optional[Tensor], activation: Optional[str], residual_grad: bool,
         group: Optional[str]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual) of the training forward; dresidual is empty unless
    residual_grad. ``group``: dx from the sums over every rank (ONE all-reduce)."""
    pdt = weight.dtype if weight is not None else input.dtype
    C = input.shape[1]
    if input.numel() == 0 and group is None:
        return (torch.empty_like(input), input.new_zeros((C,), dtype=pdt), input.new_zeros((C,), dtype=pdt),
                torch.empty_like(input) if residual_grad else input.new_empty((0,)))
    last = TB.channels_last(input)
    fmt = TB.memory_format(input)
    grad_out = grad_out.contiguous(memory_format=fmt)       # no copy when formats agree
    y = None if y is None else y.contiguous(memory_format=fmt)
    with TB.running_on(input.device):
        y = None if y is None else TB.to_array(TB.features_last(y, last))
        out = _bn.batch_norm_backward(
            TB.to_array(TB.features_last(grad_out, last)), TB.to_array(TB.features_last(input, last)),
            TB.to_array(weight), TB.to_array(mean), TB.to_array(invstd), axis=TB.bn_axis(input.dim(), last),
            activation=activation, y=y, residual_grad=residual_grad, comm=_comm(group))
        dx = TB.like(TB.features_first(TB.from_array(out[0]), last), input)
        dw, db = TB.from_array(out[1]), TB.from_array(out[2])
        dr = TB.like(TB.features_first(TB.from_array(out[3]), last), input) if residual_grad else input.new_empty((0,))
    return dx, dw, db, dr


@_bwd.register_fake
def _(grad_out, input, weight, mean, invstd, y, activation, residual_grad, group):
    pdt = weight.dtype if weight is not None else input.dtype
    C = input.shape[1]
    return (torch.empty_like(input), input.new_empty((C,), dtype=pdt), input.new_empty((C,), dtype=pdt),
            torch.empty_like(input) if residual_grad else input.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    input, weight, bias, residual, running_mean, running_var, _, training, _, eps, activation, group = inputs
    y, mean, invstd, rm, rv, nbt = output
    ctx.mark_non_differentiable(mean, invstd, rm, rv, nbt)
    ctx.set_materialize_grads(False)
    ctx.training, ctx.eps, ctx.activation, ctx.group = training, eps, activation, group
    ctx.has_weight, ctx.has_bias, ctx.has_residual = weight is not None, bias is not None, residual is not None
    saved_y = y if activation is not None else None     # the mask's source
    if training:
        ctx.save_for_backward(input, weight, mean, invstd, saved_y)
    else:
        ctx.save_for_backward(input, weight, running_mean, running_var, saved_y)


def _backward(ctx, grad_y, *_grad_stats):
    nones = (None,) * 8
    if grad_y is None:
        return (None,) * 4 + nones
    input, weight, s1, s2, y = ctx.saved_tensors
    want_r = ctx.has_residual and ctx.needs_input_grad[3]
    if ctx.training:
        # no input gradient: no collective, as torch's SyncBatchNorm
        group = ctx.group if ctx.needs_input_grad[0] else None
        dx, dw, db, dr = torch.ops.gpu.batch_norm_act_bwd(grad_y, input, weight, s1, s2, y, ctx.activation,
                                                          want_r, group)
    else:
        # y = act(a x + b + r) per channel: elementwise, with torch's ops
        dz = grad_y if y is None else torch.where(y > 0, grad_y, torch.zeros_like(grad_y))
        dx, dw, db = F.eval_affine_backward(dz, input, weight, s1, s2, ctx.eps)
        dr = dz
    return (dx, dw if ctx.has_weight else None, db if ctx.has_bias else None, dr if want_r else None) + nones


_fwd.register_autograd(_backward, setup_context=_setup_context)
_bwd.register_autograd(F._no_double_backward("batch_norm"), setup_context=lambda ctx, inputs, output: None)
