"""`batch_norm` and `cross_entropy` for torch tensors, with the signatures, defaults, dtype rules,
results and exceptions of `torch.nn.functional`'s, running the package's ops.

Each is a `torch.library.custom_op` in the namespace ``gpu`` with a fake implementation and its
autograd registered, so autograd, `torch.autograd.gradcheck` and `torch.compile(fullgraph=True)`
see one opaque op:

    gpu::batch_norm_fwd      (y, mean, invstd); updates running_mean, running_var and
                             num_batches_tracked in place (training with running statistics)
    gpu::batch_norm_bwd      (dx, dweight, dbias) from the saved mean and invstd
    gpu::cross_entropy_fwd   (loss, dz): dz, the gradient of the loss, written by the same fused
                             pass when the input needs a gradient (else an empty tensor)
    gpu::cross_entropy_bwd   dz scaled by the loss's upstream gradient (no softmax recomputed)

The backward ops are not differentiable: a double backward raises a RuntimeError saying so.
Argument checks that need only shapes, dtypes and devices run before the op (in eager mode and
while torch.compile traces); target values are checked by the op itself.
"""
import functools
import math
import numbers
from typing import Optional, Tuple

import torch
import torch.utils._python_dispatch
from torch import Tensor

from ..ops import batch_norm as _bn
from ..ops import softmax as _sm
from ..ops.softmax.cross_entropy import check_z_loss_softcap
from . import _bridge as TB
from ._groups import group_name

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("none", "mean", "sum")


# ---------------------------------------------------------------------------------------------
# Batch norm
# ---------------------------------------------------------------------------------------------

def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: Optional[float] = 0.1, eps: float = 1e-5, *,
               num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """`torch.nn.functional.batch_norm` on the package's batch-norm ops.

    input (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), contiguous or channels_last; the
    output keeps its memory format. Training updates running_mean and running_var in place
    (unbiased variance, as torch). One addition, keyword-only: ``num_batches_tracked`` (torch's
    BatchNorm buffer, an int64 tensor of one element) is incremented in place when the running
    statistics are updated, and ``momentum=None`` then takes the cumulative average
    1 / num_batches_tracked, on the device (torch's module computes it on the host).

    >>> import torch, gpu.torch as gt
    >>> x = torch.randn(8, 3, 5, 5)
    >>> y = gt.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
    """
    weight, bias, num_batches_tracked = batch_norm_arguments(input, running_mean, running_var, weight, bias,
                                                             training, momentum, eps, num_batches_tracked)
    y, _, _, rm, rv, nbt = torch.ops.gpu.batch_norm_fwd(
        TB.dense(input), weight, bias, running_mean, running_var, num_batches_tracked, bool(training),
        None if momentum is None else float(momentum), float(eps))
    if training and running_mean is not None:
        store_running_stats((running_mean, running_var, num_batches_tracked), (rm, rv, nbt))
    return y


def batch_norm_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps, nbt):
    """`batch_norm`'s checks: (weight, bias, num_batches_tracked) as the op takes them (1-D
    parameters; the count None unless training updates running statistics)."""
    if type(training) is not bool:          # torch's argument parser takes a bool only
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    C = _check_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, nbt)
    weight, bias = (None if p is None else p.view(C) if p.dim() != 1 else p for p in (weight, bias))
    if not training:
        for name, r in (("running_mean", running_mean), ("running_var", running_var)):
            if r is None:
                raise RuntimeError(f"{name}: must be defined in evaluation mode (training=False)")
    elif (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: must either both be None or neither be None")
    if momentum is None:
        if not training or running_mean is None:
            raise TypeError("momentum: expected a float, got None (None, the cumulative average, applies "
                            "to training with running statistics and num_batches_tracked only)")
        if nbt is None:
            raise TypeError("momentum: None (the cumulative average) needs num_batches_tracked, the count of "
                            "updates (use gpu.torch.BatchNorm*d, or pass num_batches_tracked=)")
    if not training or running_mean is None:
        nbt = None          # counts running-statistics updates only
    return weight, bias, nbt


def store_running_stats(buffers, values) -> None:
    """The op's new running statistics into the caller's buffers (running_mean, running_var,
    num_batches_tracked or None): the ops return them rather than mutate their inputs, which
    torch does not allow an op with autograd."""
    with torch.no_grad():
        for buf, new in zip(buffers, values):
            if buf is not None:
                buf.copy_(new)


def _check_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, nbt) -> int:
    TB.check_tensor(input, "input")
    for name, p in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias), ("num_batches_tracked", nbt)):
        TB.check_tensor(p, name, optional=True)
    TB.check_devices(input=input, running_mean=running_mean, running_var=running_var, weight=weight,
                     bias=bias, num_batches_tracked=nbt)
    if input.dtype not in _FLOATS:
        raise NotImplementedError(f'input: "batch_norm" not implemented for dtype {input.dtype} '
                                  "(expected float16, bfloat16, float32 or float64)")
    if input.dim() < 2:
        raise RuntimeError(f"input: expected at least 2 dimensions (N, C, ...), got shape {tuple(input.shape)}")
    C = input.shape[1]
    # parameters: all of one dtype, the input's, or float32 for a float16/bfloat16 input (torch's
    # mixed type, as under autocast)
    params = [(n, p) for n, p in (("running_mean", running_mean), ("running_var", running_var),
                                  ("weight", weight), ("bias", bias)) if p is not None]
    for name, p in params:
        if p.numel() != C:
            raise RuntimeError(f"{name}: should contain {C} elements (input's channels, dimension 1 of "
                               f"shape {tuple(input.shape)}), not {p.numel()}")
        if p.dtype not in _FLOATS:
            raise RuntimeError(f"{name}: expected a floating dtype, got {p.dtype}")
        if name.startswith("running") and p.dim() != 1:
            raise RuntimeError(f"{name}: expected a 1-D tensor of {C} elements, got shape {tuple(p.shape)}")
    for name, r in (("running_mean", running_mean), ("running_var", running_var)):
        if r is not None and r.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{name}: batch_norm is not differentiable with respect to the running "
                               "statistics; this input cannot have requires_grad True")
    if params:
        dt = params[0][1].dtype
        ok = (input.dtype,) + ((torch.float32,) if input.dtype in (torch.float16, torch.bfloat16) else ())
        for name, p in params:
            if p.dtype != dt or p.dtype not in ok:
                raise RuntimeError(f"{name}: dtype {p.dtype} does not match the input's {input.dtype} "
                                   f"(parameters and running statistics share one dtype: the input's, "
                                   f"or float32 for a float16/bfloat16 input)")
    if nbt is not None and (nbt.dtype != torch.int64 or nbt.numel() != 1):
        raise TypeError(f"num_batches_tracked: expected an int64 tensor of one element, got {nbt.dtype} "
                        f"of {nbt.numel()} elements")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if momentum is not None and (not isinstance(momentum, numbers.Real) or isinstance(momentum, bool)):
        raise TypeError(f"momentum: expected a float or None, got {type(momentum).__name__}")
    if training:
        if math.prod(input.shape) // max(C, 1) == 1:
            raise ValueError("input: expected more than 1 value per channel when training, got input size "
                             f"{input.shape}")
        if not eps > 0 and _torch_rejects_eps0():
            raise ValueError(f"eps: must be positive during training, got {eps}")
    for name, v in (("eps", eps), ("momentum", momentum)):
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite number, got {v}")
    return C


@functools.lru_cache(maxsize=None)
def _torch_rejects_eps0() -> bool:
    """Whether this torch's F.batch_norm refuses eps <= 0 in training (newer releases do; 2.4
    does not): we follow the installed release."""
    try:
        torch.nn.functional.batch_norm(torch.ones(2, 1), None, None, training=True, eps=0.0)
    except ValueError:
        return True
    return False


@torch.library.custom_op("gpu::batch_norm_fwd", mutates_args=())
def _batch_norm_fwd(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    num_batches_tracked: Optional[Tensor], training: bool, momentum: Optional[float],
                    eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, running_mean', running_var', num_batches_tracked'): the updated running
    statistics are new tensors (an op with autograd may not mutate its inputs), written by the
    package's fused update; `batch_norm` copies them into the buffers. Absent ones are empty."""
    C, acc = input.shape[1], TB.compute_dtype(input.dtype)
    none = input.new_empty((0,), dtype=acc)
    if not training:                        # mean and invstd are those of the running statistics
        if input.numel() == 0:
            return torch.empty_like(input), none, none.clone(), none.clone(), none.clone(), none.clone()
        last = TB.channels_last(input)
        with TB.running_on(input.device):
            y = _bn.batch_norm_inference(TB.to_array(TB.features_last(input, last)), TB.to_array(weight),
                                         TB.to_array(bias), TB.to_array(running_mean), TB.to_array(running_var),
                                         axis=TB.bn_axis(input.dim(), last), eps=eps)
            y = TB.features_first(TB.from_array(y), last)
        return TB.like(y, input), none, none.clone(), none.clone(), none.clone(), none.clone()
    rm, rv, nbt = (none.clone() if r is None else r.clone() for r in (running_mean, running_var, num_batches_tracked))
    if input.numel() == 0:                  # as torch: an empty y, statistics untouched
        if num_batches_tracked is not None:
            nbt += 1
        return torch.empty_like(input), input.new_zeros((C,), dtype=acc), input.new_zeros((C,), dtype=acc), rm, rv, nbt
    y, mean, invstd = _train_forward(input, weight, bias, rm if running_mean is not None else None,
                                     rv if running_var is not None else None,
                                     nbt if num_batches_tracked is not None else None, momentum, eps)
    return y, mean, invstd, rm, rv, nbt


def _check_ce_options(reduction, ignore_index, label_smoothing) -> None:
    """torch's checks of F.cross_entropy's options, with its exception types (a negative
    label_smoothing is accepted, as torch does)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: {reduction!r} is not a valid value (expected 'none', 'mean' or 'sum')")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if not isinstance(label_smoothing, numbers.Real) or isinstance(label_smoothing, bool):
        raise TypeError(f"label_smoothing: expected a float, got {type(label_smoothing).__name__}")
    if not label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing: must be between 0.0 and 1.0, got {label_smoothing}")


def _train_forward(input, weight, bias, rm, rv, nbt, momentum, eps, comm=None):
    """(y, mean, invstd) of the package's training forward on the tensors' arrays (no copies), the
    running statistics rm/rv/nbt (or None) updated in place; ``comm``: synchronized over ranks."""
    last = TB.channels_last(input)
    with TB.running_on(input.device):
        y, mean, invstd = _bn.batch_norm_forward(
            TB.to_array(TB.features_last(input, last)), TB.to_array(weight), TB.to_array(bias),
            axis=TB.bn_axis(input.dim(), last), eps=eps,
            running_mean=None if rm is None else TB.to_array(rm),
            running_var=None if rv is None else TB.to_array(rv), momentum=momentum,
            num_batches_tracked=None if nbt is None else TB.to_array(nbt), comm=comm)
        y = TB.features_first(TB.from_array(y), last)
        mean, invstd = TB.from_array(mean), TB.from_array(invstd)
    return TB.like(y, input), mean, invstd


@_batch_norm_fwd.register_fake
def forward_fake(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps):
    acc = TB.compute_dtype(input.dtype)
    n = input.shape[1] if training else 0
    rm, rv, nbt = (input.new_empty((0,), dtype=acc) if r is None or not training else torch.empty_like(r)
                   for r in (running_mean, running_var, num_batches_tracked))
    return (torch.empty_like(input), input.new_empty((n,), dtype=acc), input.new_empty((n,), dtype=acc),
            rm, rv, nbt)


@torch.library.custom_op("gpu::batch_norm_bwd", mutates_args=())
def _batch_norm_bwd(grad_out: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor,
                    invstd: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    pdt = weight.dtype if weight is not None else input.dtype
    if input.numel() == 0:
        C = input.shape[1]
        return torch.empty_like(input), input.new_zeros((C,), dtype=pdt), input.new_zeros((C,), dtype=pdt)
    last = TB.channels_last(input)
    grad_out = grad_out.contiguous(memory_format=TB.memory_format(input))   # no copy when formats agree
    with TB.running_on(input.device):
        dx, dw, db = _bn.batch_norm_backward(
            TB.to_array(TB.features_last(grad_out, last)), TB.to_array(TB.features_last(input, last)),
            TB.to_array(weight), TB.to_array(mean), TB.to_array(invstd), axis=TB.bn_axis(input.dim(), last))
        dx = TB.features_first(TB.from_array(dx), last)
        dw, db = TB.from_array(dw), TB.from_array(db)
    return TB.like(dx, input), dw, db


@_batch_norm_bwd.register_fake
def _(grad_out, input, weight, mean, invstd):
    pdt = weight.dtype if weight is not None else input.dtype
    C = input.shape[1]
    return torch.empty_like(input), input.new_empty((C,), dtype=pdt), input.new_empty((C,), dtype=pdt)


def _bn_setup_context(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, _, training, _, eps = inputs
    _, mean, invstd, rm, rv, _ = output
    ctx.mark_non_differentiable(mean, invstd, rm, rv)
    ctx.set_materialize_grads(False)        # no zeros for the statistics' (absent) gradients
    ctx.training, ctx.eps = training, eps
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    if training:
        ctx.save_for_backward(input, weight, mean, invstd)
    else:   # eval: the running statistics are constants of the affine map y = a x + b
        ctx.save_for_backward(input, weight, running_mean, running_var)


def eval_affine_backward(dz, input, weight, running_mean, running_var, eps):
    """(dx, dweight, dbias) of eval-mode batch norm, y = (x - rm) * invstd * w + b per channel,
    from dz, the gradient at that affine output: elementwise, with torch's ops."""
    shape = (1, -1) + (1,) * (input.dim() - 2)
    acc = TB.compute_dtype(input.dtype)
    istd = torch.rsqrt(running_var.to(acc) + eps)
    scale = istd if weight is None else istd * weight.to(acc)
    dx = (dz.to(acc) * scale.view(shape)).to(input.dtype)
    red = [0] + list(range(2, input.dim()))
    pdt = weight.dtype if weight is not None else input.dtype
    db = dz.to(acc).sum(red).to(pdt)
    dw = (dz.to(acc) * (input.to(acc) - running_mean.to(acc).view(shape))).sum(red).mul(istd).to(pdt)
    return dx, dw, db


def _bn_backward(ctx, grad_y, *_grad_stats):
    if grad_y is None:
        return None, None, None, None, None, None, None, None, None
    input, weight, s1, s2 = ctx.saved_tensors
    if ctx.training:
        dx, dw, db = torch.ops.gpu.batch_norm_bwd(grad_y, input, weight, s1, s2)
    else:
        dx, dw, db = eval_affine_backward(grad_y, input, weight, s1, s2, ctx.eps)
    return (dx, dw if ctx.has_weight else None, db if ctx.has_bias else None,
            None, None, None, None, None, None)


_batch_norm_fwd.register_autograd(_bn_backward, setup_context=_bn_setup_context)


# ---------------------------------------------------------------------------------------------
# Cross-entropy
# ---------------------------------------------------------------------------------------------

def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                  size_average: Optional[bool] = None, ignore_index: int = -100,
                  reduce: Optional[bool] = None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: Optional[float] = None,
                  return_z_loss: bool = False, process_group=None):
    """`torch.nn.functional.cross_entropy` on the package's fused softmax + cross-entropy op.

    input (C,), (N, C) or (N, C, d1, ...), contiguous or channels_last; target class indices
    (int64 or uint8) of input's shape without C, or class probabilities of input's shape. The
    gradient is the dz written by the forward pass, scaled by the upstream gradient. Under autocast
    the input is taken in float32, as torch's cross_entropy.

    Additions, keyword-only (Liger-Kernel's ``lse_square_scale``, ``softcap``, ``return_z_loss``):
    ``z_loss`` (>= 0) adds z_loss * logsumexp(row)^2 per non-ignored row ('mean' averages it over
    those rows; class weights do not scale it); ``softcap`` (None or > 0) reads
    softcap * tanh(z / softcap) for the logits; both with exact gradients in the same fused pass.
    ``return_z_loss=True`` returns ``(loss, z_term)``: the z-loss part of the loss (included in
    it) under the same reduction, detached (for logging, as Liger-Kernel's). ``process_group``
    (a torch.distributed group): vocabulary-parallel, see gpu/torch/vocab_parallel.py.

    >>> import torch, gpu.torch as gt
    >>> loss = gt.cross_entropy(torch.randn(4, 10, requires_grad=True), torch.tensor([1, 2, 3, 4]))
    """
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction
        reduction = _reduction.legacy_get_string(size_average, reduce)
    TB.check_tensor(input, "input")
    TB.check_tensor(target, "target")
    TB.check_tensor(weight, "weight", optional=True)
    TB.check_devices(input=input, target=target, weight=weight)
    if _autocast_enabled(input.device.type):
        # torch's autocast runs cross_entropy in float32 (its fp32 op list)
        input = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        target = target.float() if target.dtype in (torch.float16, torch.bfloat16) else target
        weight = weight.float() if weight is not None and weight.dtype in (torch.float16, torch.bfloat16) else weight
    _check_ce_options(reduction, ignore_index, label_smoothing)
    z_loss, softcap = _check_z_loss_softcap(z_loss, softcap)
    if input.dtype not in _FLOATS:
        raise NotImplementedError(f'input: "cross_entropy" not implemented for dtype {input.dtype} '
                                  "(expected float16, bfloat16, float32 or float64)")
    if input.dim() == 0:
        raise RuntimeError("input: expected 1 or more dimensions (C,), (N, C) or (N, C, d1, ...), got a scalar")
    axis = 1 if input.dim() >= 2 else 0
    C = input.shape[axis]
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != C):
        raise RuntimeError(f"weight: should be defined either for all {C} classes or no classes, but got "
                           f"a weight tensor of shape {tuple(weight.shape)}")
    # torch's order: a floating target of input's shape holds probabilities; any other target is
    # checked as class indices (batch size, then shape, then dtype)
    probs = target.dtype.is_floating_point and target.shape == input.shape
    if probs:
        if ignore_index >= 0:
            raise RuntimeError(f"ignore_index: {ignore_index} is not supported for floating point target "
                               "(class probabilities); only a negative ignore_index (ignoring nothing)")
        # torch computes probability targets with type promotion over input, target and weight
        dt = torch.promote_types(input.dtype, target.dtype)
        if weight is not None:
            dt = torch.promote_types(dt, weight.dtype)
        input, target = input.to(dt), target.to(dt)
        weight = None if weight is None else weight.to(dt)
    else:
        rows = input.shape[:axis] + input.shape[axis + 1:]
        if target.shape != rows:
            batch = target.shape[0] if target.dim() else 0      # torch counts a 0-d target as a batch of 0
            if input.dim() >= 2 and batch != input.shape[0]:
                raise ValueError(f"target: expected input batch_size ({input.shape[0]}) to match target "
                                 f"batch_size ({batch})")
            raise RuntimeError(f"target: expected size {list(rows)}, got {list(target.shape)}")
        if target.dtype not in (torch.int64, torch.uint8):
            raise RuntimeError(f"target: expected dtype int64 (class indices) or a floating dtype (class "
                               f"probabilities of input's shape {tuple(input.shape)}), got {target.dtype}")
        if target.dtype == torch.uint8 and input.dim() > 2:     # torch's spatial loss takes int64 only
            raise RuntimeError(f"target: expected dtype int64 for an input of {input.dim()} dimensions "
                               "(N, C, d1, ...), got uint8")
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("weight: cross_entropy with class indices is not differentiable with respect "
                               "to the class weights; this input cannot have requires_grad True")
        if weight is not None and weight.dtype != input.dtype:
            raise RuntimeError(f"weight: expected dtype {input.dtype} (the input's), got {weight.dtype}")
    need_grad = torch.is_grad_enabled() and input.requires_grad
    args = (TB.dense(input), target, weight, int(ignore_index), reduction, float(label_smoothing), need_grad, z_loss,
            softcap, bool(return_z_loss))
    if process_group is None:
        loss, _, z_term = torch.ops.gpu.cross_entropy_fwd(*args)
    else:       # input holds this rank's classes (gpu/torch/vocab_parallel.py registers the op)
        if probs:
            raise ValueError("target: class indices only with process_group (the classes are split over ranks)")
        loss, _, z_term = torch.ops.gpu.vocab_parallel_cross_entropy_fwd(*args, group_name(process_group))
    return (loss, z_term) if return_z_loss else loss


def _check_z_loss_softcap(z_loss, softcap) -> Tuple[float, Optional[float]]:
    """Python numbers only (a tensor would be read back to the host): z_loss >= 0, softcap None or
    > 0, both finite; TypeError / ValueError naming the argument."""
    for name, v in (("z_loss", z_loss), ("softcap", softcap)):
        if v is not None and (not isinstance(v, numbers.Real) or isinstance(v, bool)):
            raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    if z_loss is None:
        raise TypeError("z_loss: expected a float, got NoneType")
    return check_z_loss_softcap(float(z_loss), None if softcap is None else float(softcap))


def _autocast_enabled(device_type: str) -> bool:
    if device_type not in ("cpu", "cuda"):
        return False
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:                           # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _ce_layout(input: Tensor):
    """(the input as the kernels take it, its class axis, whether it is channels-last)."""
    last = TB.channels_last(input)
    return TB.features_last(input, last), (input.dim() - 1 if last else 1 if input.dim() >= 2 else 0), last


@torch.library.custom_op("gpu::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                       reduction: str, label_smoothing: float, need_grad: bool, z_loss: float,
                       softcap: Optional[float], return_z: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return ce_forward(input, target, weight, ignore_index, reduction, label_smoothing, need_grad, z_loss, softcap,
                      return_z)


def ce_forward(input, target, weight, ignore_index, reduction, label_smoothing, need_grad, z_loss, softcap,
               return_z, comm=None):
    """(loss, dz or an empty tensor, z_term or an empty tensor) of the package's op; ``comm``:
    vocabulary-parallel, input's classes this rank's slice."""
    z, axis, last = _ce_layout(input)
    probs = target.dtype.is_floating_point
    t = TB.features_last(target, last) if probs else target
    with TB.running_on(input.device):
        try:
            out = _sm.softmax_cross_entropy(TB.to_array(z), TB.to_array(t), axis=axis, reduction=reduction,
                                            ignore_index=ignore_index, label_smoothing=label_smoothing,
                                            weight=TB.to_array(weight), z_loss=z_loss, softcap=softcap,
                                            return_grad=need_grad, return_z_loss=return_z, comm=comm)
        except ValueError as e:
            if str(e).startswith("target: class index"):
                raise IndexError(str(e)) from None      # torch's exception type for a target out of range
            raise
        out = out if isinstance(out, tuple) else (out,)
        loss, z_term, dz = out[0], (out[1] if return_z else None), (out[-1] if need_grad else None)
        loss = TB.from_array(loss)
        z_term = TB.from_array(z_term) if return_z else input.new_empty((0,))
        if dz is not None:
            dz = TB.like(TB.features_first(TB.from_array(dz), last), input)
    if dz is None:
        dz = input.new_empty((0,))
    return loss, dz, z_term


@_cross_entropy_fwd.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, need_grad, z_loss, softcap, return_z):
    axis = 1 if input.dim() >= 2 else 0
    shape = (input.shape[:axis] + input.shape[axis + 1:]) if reduction == "none" else ()
    return (input.new_empty(shape), (torch.empty_like(input) if need_grad else input.new_empty((0,))),
            input.new_empty(shape if return_z else (0,)))


@torch.library.custom_op("gpu::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd(dz: Tensor, grad_loss: Tensor) -> Tensor:
    if grad_loss.dim():     # reduction 'none': one upstream gradient per row, broadcast over the classes
        grad_loss = grad_loss.unsqueeze(1)
    return dz * grad_loss.to(dz.dtype)


@_cross_entropy_bwd.register_fake
def _(dz, grad_loss):
    return torch.empty_like(dz)


def _ce_setup_context(ctx, inputs, output):
    input, target, weight, _, reduction, label_smoothing, need_grad, _, softcap, _ = inputs
    _, dz, z_term = output
    ctx.mark_non_differentiable(z_term)     # the z-loss part, returned for logging (as Liger-Kernel's)
    # dz stays differentiable (its graph leads a double backward to the clear error of
    # cross_entropy_bwd); its gradient is never asked for: no zeros of z's size for it
    ctx.set_materialize_grads(False)
    ctx.need_grad, ctx.reduction, ctx.label_smoothing, ctx.softcap = need_grad, reduction, label_smoothing, softcap
    probs = target.dtype.is_floating_point
    # probability targets: the target's and the class weights' gradients (torch computes both)
    probs_grad = probs and (target.requires_grad or (weight is not None and weight.requires_grad))
    ctx.probs_grad = probs_grad
    if probs_grad:          # they need log-softmax: saved inputs, computed by torch
        ctx.save_for_backward(dz, input, weight, target)
    else:
        ctx.save_for_backward(dz)


def _ce_backward(ctx, grad_loss, _grad_dz, _grad_z_term):
    dz = ctx.saved_tensors[0]
    grad_input = grad_target = None
    if grad_loss is None:
        return (None,) * 10
    if ctx.needs_input_grad[0]:
        if not ctx.need_grad:
            raise RuntimeError("gpu.torch.cross_entropy: the input's gradient was not computed in the forward "
                               "pass (it ran without grad mode)")
        if _unit_scale(grad_loss) and _saved_released():
            grad_input = dz         # loss.backward() of the loss itself: dz is the gradient, no pass
        else:
            grad_input = torch.ops.gpu.cross_entropy_bwd(dz, grad_loss)
    grad_weight = None
    if ctx.probs_grad and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
        _, input, weight, target = ctx.saved_tensors
        axis = 1 if input.dim() >= 2 else 0
        if ctx.softcap is not None:         # the loss reads the capped logits (z-loss: no target in it)
            input = ctx.softcap * torch.tanh(input / ctx.softcap)
        # torch smooths the target only for label_smoothing > 0 (a negative one is taken as 0)
        ls = max(ctx.label_smoothing, 0.0)
        logp = torch.log_softmax(input, axis)
        gl = grad_loss.unsqueeze(axis) if grad_loss.dim() else grad_loss
        if ctx.reduction == "mean":
            gl = gl / (input.numel() // max(input.shape[axis], 1))
        w_shape = (-1,) + (1,) * (input.dim() - axis - 1)
        if ctx.needs_input_grad[1]:
            g = -logp * (1.0 - ls)
            if weight is not None:
                g = g * weight.view(w_shape)
            grad_target = g * gl
        if weight is not None and ctx.needs_input_grad[2]:    # loss = -sum_c w_c y'_c logp_c per row
            y = target * (1.0 - ls) + ls / input.shape[axis] if ls > 0 else target
            per = -(logp * y) * gl
            grad_weight = per.sum([d for d in range(input.dim()) if d != axis]) if input.dim() > 1 else per
    return (grad_input, grad_target, grad_weight) + (None,) * 7


def _saved_released() -> bool:
    """Whether this backward pass frees the graph's saved tensors after the node runs (no
    retain_graph, no create_graph), so a saved gradient may be handed out as the gradient itself:
    no later backward reads it, and the leaf's ``.grad`` accumulating into it in place is safe."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep is not None and not keep()


def _unit_scale(grad_loss: Tensor) -> bool:
    """Whether the upstream gradient is the scalar 1 and may be skipped: read only for a CPU
    tensor (on CUDA that would synchronize), outside torch.compile's tracing, and without
    create_graph (the returned dz has no graph)."""
    if type(grad_loss) is not torch.Tensor or grad_loss.device.type != "cpu" or grad_loss.dim():
        return False                        # fake and functional tensors (tracing) are subclasses
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    mode = getattr(torch.utils._python_dispatch, "_get_current_dispatch_mode", lambda: None)()
    return not compiling and mode is None and not torch.is_grad_enabled() and bool(grad_loss == 1)


_cross_entropy_fwd.register_autograd(_ce_backward, setup_context=_ce_setup_context)


# ---------------------------------------------------------------------------------------------
# The backward ops are not differentiable
# ---------------------------------------------------------------------------------------------

def _no_double_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"gpu.torch.{op}: double backward (a gradient of the gradient) is not supported; "
                           f"use torch.nn.functional.{op} where second derivatives are needed")
    return backward


_batch_norm_bwd.register_autograd(_no_double_backward("batch_norm"), setup_context=lambda ctx, inputs, output: None)
_cross_entropy_bwd.register_autograd(_no_double_backward("cross_entropy"),
                                     setup_context=lambda ctx, inputs, output: None)
