"""`fused_linear_cross_entropy` for torch tensors: the cross-entropy of a language model's head,
``F.cross_entropy(F.linear(input, weight, bias), target)``, without ever holding the logits.

It runs `gpu.fused_linear_cross_entropy` (chunks of rows: logits, fused loss + gradient, the
gradient matmuls) and is a `torch.library.custom_op` with a fake implementation and autograd,
as Liger-Kernel's `LigerFusedLinearCrossEntropyFunction`:

    gpu::fused_linear_cross_entropy          (loss, z_term, dh, dW, dbias): when an input needs a
                                             gradient, the same chunked pass writes the gradients
                                             of the loss (for reductions 'mean' and 'sum')
    gpu::fused_linear_cross_entropy_bwd      those gradients scaled by the loss's upstream
                                             gradient (nothing recomputed)
    gpu::fused_linear_cross_entropy_rows_bwd reduction 'none': the chunked pass again with the
                                             upstream gradient of every row folded into its
                                             logits' gradient (dW and dbias sum over rows, so
                                             they cannot be scaled after the fact)

The backward ops are not differentiable: a double backward raises a RuntimeError saying so.

Devices, as for the other ops (`gpu.torch._bridge`): CPU tensors run the NumPy path (matmuls by
NumPy's BLAS) with no copy of the inputs; CUDA tensors run the kernels and cuBLAS through CuPy
on torch's current stream, every allocation from torch's caching allocator, with no
synchronization. bfloat16: on the CPU through ml_dtypes views (the op computes in float32); on
CUDA, where CuPy has no bfloat16 arithmetic for the matmuls, input, weight and bias are
converted to float32 by torch first and the gradients back to bfloat16 (the op itself converts
the weight to float32 for every narrow dtype; the extra is the float32 copy of the input).
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops import linear_cross_entropy as _lce
from . import _bridge as TB
from ._groups import communicator, group_name
from .functional import _FLOATS, _check_ce_options, _check_z_loss_softcap, _saved_released, _unit_scale


def fused_linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                               ce_weight: Optional[Tensor] = None, ignore_index: int = -100,
                               reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                               softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                               return_z_loss: bool = False, process_group=None):
    """``F.cross_entropy(F.linear(input, weight, bias), target, weight=ce_weight, ...)`` with the
    logits held one chunk of rows at a time.

    input (..., H) hidden states; weight (V, H) the head's weight (a Linear's, or a tied
    embedding); target int64 class indices of input's shape without H; bias (V,) or None;
    ce_weight (V,) class weights (torch's ``weight`` of cross_entropy, Liger-Kernel's name). The
    options are `gpu.torch.cross_entropy`'s: ignore_index, reduction, label_smoothing, z_loss
    (Liger-Kernel's ``lse_square_scale``), softcap. chunk_size: rows of logits at once (None:
    chosen from the memory, see `gpu.fused_linear_cross_entropy`). return_z_loss=True returns
    ``(loss, z_term)``, z_term detached (for logging). The loss has input's dtype.

    process_group (a torch.distributed group): vocabulary-parallel (gpu/torch/vocab_parallel.py):
    weight, bias and ce_weight are this rank's rows of the vocabulary, target holds global class
    indices and input and target are the same on every rank; the loss is the same on every rank,
    input's gradient the full one (already summed over the ranks), weight's and bias's this
    rank's rows.

    When input, weight or bias needs a gradient, the forward pass computes all three with the
    loss, and the backward only scales them by the upstream gradient (reduction 'none' runs the
    chunked pass again in the backward, with the per-row upstream gradients).

    >>> import torch, gpu.torch as gt
    >>> h = torch.randn(8, 16, requires_grad=True)
    >>> head = torch.nn.Linear(16, 50, bias=False)
    >>> loss = gt.fused_linear_cross_entropy(h, head.weight, torch.randint(0, 50, (8,)))
    >>> loss.backward()
    """
    _check(input, weight, target, bias, ce_weight, ignore_index, reduction, label_smoothing, chunk_size)
    z_loss, softcap = _check_z_loss_softcap(z_loss, softcap)
    needs = any(t is not None and t.requires_grad for t in (input, weight, bias))
    need_grad = torch.is_grad_enabled() and needs
    group = None if process_group is None else group_name(process_group)
    loss, z_term, _, _, _ = torch.ops.gpu.fused_linear_cross_entropy(
        input.contiguous(), weight.contiguous(), target.contiguous(), bias, ce_weight, int(ignore_index), reduction,
        float(label_smoothing), z_loss, softcap, None if chunk_size is None else int(chunk_size),
        need_grad and reduction != "none", bool(return_z_loss), group)
    return (loss, z_term) if return_z_loss else loss


def _check(input, weight, target, bias, ce_weight, ignore_index, reduction, label_smoothing, chunk_size) -> None:
    """Shapes, dtypes, devices and options, with the exception types of F.linear + F.cross_entropy."""
    for name, t in (("input", input), ("weight", weight), ("target", target)):
        TB.check_tensor(t, name)
    TB.check_tensor(bias, "bias", optional=True)
    TB.check_tensor(ce_weight, "ce_weight", optional=True)
    TB.check_devices(input=input, weight=weight, target=target, bias=bias, ce_weight=ce_weight)
    _check_ce_options(reduction, ignore_index, label_smoothing)
    if chunk_size is not None:
        if not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool):
            raise TypeError(f"chunk_size: expected an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected at least 1 row, got {chunk_size}")
    if input.dtype not in _FLOATS:
        raise NotImplementedError(f'input: "fused_linear_cross_entropy" not implemented for dtype {input.dtype} '
                                  "(expected float16, bfloat16, float32 or float64)")
    if weight.dtype != input.dtype:
        raise RuntimeError(f"weight: expected input's dtype {input.dtype}, got {weight.dtype}")
    if input.dim() < 1:
        raise RuntimeError("input: expected (..., H) hidden states, got a scalar")
    if weight.dim() != 2:
        raise RuntimeError(f"weight: expected a 2-D (vocab, hidden) tensor, got shape {tuple(weight.shape)}")
    V, H = weight.shape
    if input.shape[-1] != H:
        raise RuntimeError(f"input: its last dimension ({input.shape[-1]}) must match weight's hidden size "
                           f"(weight.shape[1] = {H})")
    if bias is not None:
        if bias.shape != (V,):
            raise RuntimeError(f"bias: expected shape ({V},), one per class, got {tuple(bias.shape)}")
        if bias.dtype != input.dtype:
            raise RuntimeError(f"bias: expected input's dtype {input.dtype}, got {bias.dtype}")
    if ce_weight is not None:
        if ce_weight.dim() != 1 or ce_weight.shape[0] != V:
            raise RuntimeError(f"ce_weight: should be defined either for all {V} classes or no classes, but got "
                               f"a weight tensor of shape {tuple(ce_weight.shape)}")
        if ce_weight.dtype not in _FLOATS:
            raise RuntimeError(f"ce_weight: expected a floating dtype, got {ce_weight.dtype}")
        if ce_weight.requires_grad and torch.is_grad_enabled():    # as F.cross_entropy's class weight
            raise RuntimeError("ce_weight: cross_entropy with class indices is not differentiable with respect "
                               "to the class weights; this input cannot have requires_grad True")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"target: expected dtype int64 (class indices), got {target.dtype}")
    if target.shape != input.shape[:-1]:
        raise ValueError(f"target: expected input's shape without its last dimension, {list(input.shape[:-1])}, "
                         f"got {list(target.shape)}")


def _run(input, weight, target, bias, ce_weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
         chunk_size, grad: bool, return_z: bool, group: Optional[str], dloss=1.0):
    """(loss, z_term or None, dh, dW, dbias) from the package's op (the gradients None unless `grad`);
    `group`: the name of the process group of a vocabulary-parallel head, or None."""
    wide = input.device.type == "cuda" and input.dtype == torch.bfloat16   # CuPy: no bfloat16 matmul
    h, W, b = (None if t is None else t.float() if wide else t for t in (input, weight, bias))
    if ce_weight is not None and ce_weight.dtype in (torch.float16, torch.bfloat16):
        ce_weight = ce_weight.float()
    if isinstance(dloss, Tensor) and dloss.dtype == torch.bfloat16 and wide:
        dloss = dloss.float()
    with TB.running_on(input.device):
        try:
            out = _lce.fused_linear_cross_entropy(
                TB.to_array(h), TB.to_array(W), TB.to_array(target), TB.to_array(b), chunk_size=chunk_size,
                reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                weight=TB.to_array(ce_weight), z_loss=z_loss, softcap=softcap, return_grad=grad,
                return_z_loss=return_z, dloss=TB.to_array(dloss) if isinstance(dloss, Tensor) else dloss,
                comm=None if group is None else communicator(group))
        except ValueError as e:
            if str(e).startswith("target: class index"):
                raise IndexError(str(e)) from None      # torch's exception type for a target out of range
            raise
        out = out if isinstance(out, tuple) else (out,)
        out = tuple(None if a is None else TB.from_array(a) for a in out)
    loss, z_term = out[0], (out[1] if return_z else None)
    dh = dW = db = None
    if grad:
        dh, dW, db = out[-3:]
        if wide:
            dh, dW = dh.to(input.dtype), dW.to(weight.dtype)
            db = None if db is None else db.to(bias.dtype)
    if wide:
        loss = loss.to(input.dtype)
        z_term = None if z_term is None else z_term.to(input.dtype)
    return loss, z_term, dh, dW, db


@torch.library.custom_op("gpu::fused_linear_cross_entropy", mutates_args=())
def _flce(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ce_weight: Optional[Tensor],
          ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, softcap: Optional[float],
          chunk_size: Optional[int], need_grad: bool, return_z: bool,
          group: Optional[str]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss, z_term, dh, dW, db = _run(input, weight, target, bias, ce_weight, ignore_index, reduction, label_smoothing,
                                    z_loss, softcap, chunk_size, need_grad, return_z, group)
    none = lambda: input.new_empty((0,))    # noqa: E731 - each absent output its own tensor
    return (loss, none() if z_term is None else z_term, none() if dh is None else dh,
            none() if dW is None else dW, none() if db is None else db)


@_flce.register_fake
def _(input, weight, target, bias, ce_weight, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size,
      need_grad, return_z, group):
    shape = input.shape[:-1] if reduction == "none" else ()
    none = lambda: input.new_empty((0,))    # noqa: E731
    grads = need_grad
    return (input.new_empty(shape), input.new_empty(shape) if return_z else none(),
            torch.empty_like(input) if grads else none(), torch.empty_like(weight) if grads else none(),
            torch.empty_like(bias) if grads and bias is not None else none())


@torch.library.custom_op("gpu::fused_linear_cross_entropy_bwd", mutates_args=())
def _flce_bwd(grad_loss: Tensor, dh: Tensor, dW: Tensor, dbias: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return dh * grad_loss, dW * grad_loss, dbias * grad_loss      # a 0-dim factor: the gradients keep their dtype


@_flce_bwd.register_fake
def _(grad_loss, dh, dW, dbias):
    return torch.empty_like(dh), torch.empty_like(dW), torch.empty_like(dbias)


@torch.library.custom_op("gpu::fused_linear_cross_entropy_rows_bwd", mutates_args=())
def _flce_rows_bwd(grad_loss: Tensor, input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                   ce_weight: Optional[Tensor], ignore_index: int, label_smoothing: float, z_loss: float,
                   softcap: Optional[float], chunk_size: Optional[int],
                   group: Optional[str]) -> Tuple[Tensor, Tensor, Tensor]:
    _, _, dh, dW, db = _run(input, weight, target, bias, ce_weight, ignore_index, "none", label_smoothing, z_loss,
                            softcap, chunk_size, True, False, group, dloss=grad_loss.contiguous())
    return dh, dW, input.new_empty((0,)) if db is None else db


@_flce_rows_bwd.register_fake
def _(grad_loss, input, weight, target, bias, ce_weight, ignore_index, label_smoothing, z_loss, softcap, chunk_size,
      group):
    return (torch.empty_like(input), torch.empty_like(weight),
            input.new_empty((0,)) if bias is None else torch.empty_like(bias))


def _flce_setup_context(ctx, inputs, output):
    (input, weight, target, bias, ce_weight, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size,
     need_grad, _, group) = inputs
    _, z_term, dh, dW, db = output
    ctx.mark_non_differentiable(z_term)
    # dh, dW and dbias stay differentiable (their graph leads a double backward to the clear error
    # of the backward ops); their gradients are never asked for: no zeros of their size
    ctx.set_materialize_grads(False)
    ctx.rows, ctx.need_grad, ctx.has_bias = reduction == "none", need_grad, bias is not None
    if ctx.rows:    # the pass runs again in the backward, with the per-row upstream gradients
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap, chunk_size, group)
        ctx.save_for_backward(input, weight, target, bias, ce_weight)
    else:
        ctx.save_for_backward(dh, dW, db)


def _flce_backward(ctx, grad_loss, *_grad_rest):
    nothing = (None,) * 14
    if grad_loss is None:
        return nothing
    if ctx.rows:
        input, weight, target, bias, ce_weight = ctx.saved_tensors
        dh, dW, db = torch.ops.gpu.fused_linear_cross_entropy_rows_bwd(grad_loss, input, weight, target, bias,
                                                                        ce_weight, *ctx.options)
    else:
        if not ctx.need_grad:
            raise RuntimeError("gpu.torch.fused_linear_cross_entropy: the gradients were not computed in the "
                               "forward pass (it ran without grad mode)")
        dh, dW, db = ctx.saved_tensors
        # loss.backward() of a CPU loss, the graph freed after it: the saved gradients as they are
        if not (_unit_scale(grad_loss) and _saved_released()):
            dh, dW, db = torch.ops.gpu.fused_linear_cross_entropy_bwd(grad_loss, dh, dW, db)
    need = ctx.needs_input_grad
    return ((dh if need[0] else None, dW if need[1] else None, None, db if ctx.has_bias and need[3] else None)
            + nothing[4:])


_flce.register_autograd(_flce_backward, setup_context=_flce_setup_context)
def _no_double_backward(ctx, *grads):
    raise RuntimeError("gpu.torch.fused_linear_cross_entropy: double backward (a gradient of the gradient) is not "
                       "supported; use torch.nn.functional.cross_entropy(torch.nn.functional.linear(...)) where "
                       "second derivatives are needed")


for _op in (_flce_bwd, _flce_rows_bwd):
    _op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


class FusedLinearCrossEntropyLoss(nn.Module):
    """Liger-Kernel's `LigerFusedLinearCrossEntropyLoss` on `fused_linear_cross_entropy`: the
    module holds the options, ``forward(lin_weight, _input, target, bias=None)`` takes the head's
    weight FIRST (Liger-Kernel's order), then the hidden states, the targets and the head's bias.
    ``z_loss`` is Liger-Kernel's ``lse_square_scale``; with ``return_z_loss=True`` forward returns
    ``(loss, z_term)``. ce_weight is a buffer (it follows ``.to()``, and is in the state_dict when
    given, as torch.nn.CrossEntropyLoss's ``weight``). ``process_group``: a vocabulary-parallel
    head, lin_weight and bias this rank's rows (see `fused_linear_cross_entropy`).

    >>> import torch, gpu.torch as gt
    >>> head, crit = torch.nn.Linear(16, 50, bias=False), gt.FusedLinearCrossEntropyLoss(label_smoothing=0.1)
    >>> loss = crit(head.weight, torch.randn(8, 16), torch.randint(0, 50, (8,)))
    """

    def __init__(self, ce_weight: Optional[Tensor] = None, ignore_index: int = -100, z_loss: float = 0.0,
                 label_smoothing: float = 0.0, reduction: str = "mean", softcap: Optional[float] = None,
                 return_z_loss: bool = False, chunk_size: Optional[int] = None, process_group=None):
        super().__init__()
        self.register_buffer("ce_weight", ce_weight)
        self.ignore_index, self.z_loss, self.label_smoothing = ignore_index, z_loss, label_smoothing
        self.reduction, self.softcap, self.return_z_loss, self.chunk_size = reduction, softcap, return_z_loss, chunk_size
        self.process_group = process_group

    def forward(self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Optional[Tensor] = None):
        return fused_linear_cross_entropy(_input, lin_weight, target, bias, ce_weight=self.ce_weight,
                                          ignore_index=self.ignore_index, reduction=self.reduction,
                                          label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                                          softcap=self.softcap, chunk_size=self.chunk_size,
                                          return_z_loss=self.return_z_loss, process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, z_loss={self.z_loss}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}, softcap={self.softcap}, return_z_loss={self.return_z_loss}, "
                f"chunk_size={self.chunk_size}")
