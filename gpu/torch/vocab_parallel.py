"""Vocabulary-parallel cross-entropy for torch tensors: the output layer of a language model split
by vocabulary over the ranks of a torch.distributed process group (tensor parallelism, as
Megatron-LM's ``vocab_parallel_cross_entropy``).

Each rank holds a contiguous slice of the classes, in rank order (rank 0 the first classes; the
slices may be unequal, or empty): its logits ``input[:, lo:hi]``, or its rows ``weight[lo:hi]``
(and ``bias[lo:hi]``, ``ce_weight[lo:hi]``) of the head. ``target`` holds GLOBAL class indices and
is the same on every rank. The keyword that turns it on is ``process_group=`` of

    gpu.torch.cross_entropy(input, target, ..., process_group=group)
    gpu.torch.fused_linear_cross_entropy(input, weight, target, bias, ..., process_group=group)
    gpu.torch.FusedLinearCrossEntropyLoss(..., process_group=group)

and the array API underneath is the same functions' ``comm=`` (gpu.distributed.wrap(group)):

- the loss (and the z-loss term) is the same on every rank, bitwise, and equals the
  single-process loss on the concatenated logits;
- autograd gives ``input`` its FULL gradient: for cross_entropy the input is this rank's logits,
  so that is its slice of the single-process gradient; for fused linear CE the input is the
  hidden states, replicated, and their gradient is already summed over the ranks (no further
  all-reduce); ``weight`` and ``bias`` get their local rows;
- every option works (reduction, ignore_index, label_smoothing, class weights, z_loss, softcap,
  return_z_loss); class-probability targets do not (they would be split too);
- every rank of the group must call with the same rows, options and dtype (a mismatch is a
  ValueError on every rank) and take part in the backward.

The collectives run inside the ops, eagerly: the forward one packed collective per chunk of rows
(per call for cross_entropy), fused linear CE's input gradient one all-reduce, and the backward
of cross_entropy and of fused linear CE for 'mean' and 'sum' none (the gradients come from the
forward pass, scaled). fused linear CE with reduction 'none' runs its chunked pass again in the
backward, collectives included.

The op here, ``gpu::vocab_parallel_cross_entropy_fwd``, is ``gpu::cross_entropy_fwd`` with the
group's name as a last argument (custom ops take no Python objects; the group is found again by
name); its backward is cross_entropy's. fused linear CE's ops take the name as their ``group``
argument (gpu/torch/linear_cross_entropy.py). All have fake implementations, so
``torch.compile(fullgraph=True)`` traces them as opaque ops whose collectives run when the
compiled graph does (tests/test_torch_vocab_parallel.py compiles both on 2 gloo ranks).

    import torch.distributed as dist, gpu.torch as gt
    rank, P = dist.get_rank(), dist.get_world_size()
    lo, hi = rank * V // P, (rank + 1) * V // P               # this rank's classes
    head = torch.nn.Linear(H, hi - lo)                          # rows lo:hi of the vocabulary
    loss = gt.fused_linear_cross_entropy(h, head.weight, tokens, head.bias, process_group=dist.group.WORLD)
    loss.backward()          # h.grad: the full gradient; head.weight.grad: rows lo:hi
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import functional as F
from ._groups import communicator


@torch.library.custom_op("gpu::vocab_parallel_cross_entropy_fwd", mutates_args=())
def _vp_cross_entropy_fwd(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                          reduction: str, label_smoothing: float, need_grad: bool, z_loss: float,
                          softcap: Optional[float], return_z: bool, group: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, dz, z_term) as gpu::cross_entropy_fwd, input's classes this rank's slice of the
    classes of the group `group` (by name): the loss over all of them, dz this rank's slice."""
    return F.ce_forward(input, target, weight, ignore_index, reduction, label_smoothing, need_grad, z_loss, softcap,
                        return_z, comm=communicator(group))


@_vp_cross_entropy_fwd.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, need_grad, z_loss, softcap, return_z, group):
    axis = 1 if input.dim() >= 2 else 0
    shape = (input.shape[:axis] + input.shape[axis + 1:]) if reduction == "none" else ()
    return (input.new_empty(shape), (torch.empty_like(input) if need_grad else input.new_empty((0,))),
            input.new_empty(shape if return_z else (0,)))


def _setup_context(ctx, inputs, output):
    F._ce_setup_context(ctx, inputs[:-1], output)


def _backward(ctx, *grads):
    # dz is this rank's slice of the gradient of the replicated loss: scaling it needs no collective
    return F._ce_backward(ctx, *grads) + (None,)


_vp_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)
