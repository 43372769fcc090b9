"""`fuse(model)`: every batch norm followed by a ReLU, or by a residual add then a ReLU, becomes one
call of the fused op (`gpu.torch.batch_norm`'s ``residual`` and ``activation``).

The model is traced by `torch.fx` with every batch-norm module a leaf, and the graph rewritten:

    bn(x) -> relu                    becomes  fused(x)             act(bn(x))
    bn(x) -> add(., r) -> relu       becomes  fused(x, r)          act(bn(x) + r), either operand order

where bn is torch's or gpu.torch's BatchNorm1d/2d/3d or SyncBatchNorm, and relu is `nn.ReLU`,
`F.relu`, `torch.relu`, `torch.relu_` or the `relu`/`relu_` method, in place or not. A pattern
fuses only when each intermediate result has that one user (a batch norm whose output is also
read elsewhere stays as it is: fusing would change what the other user reads), when the add is
a plain two-operand add of another traced value (a constant, ``alpha=`` or an add that writes
into the residual stays unfused), and when nothing between the batch norm and the fused call
reads the batch norm's input. A residual that turns out at run time not to have the input's
shape, dtype and device (a broadcast operand) is added unfused by the fused module, exactly as
the model did. A module called from several places fuses only when every call does.

The fused module replaces the batch norm at the same name and shares its parameters, buffers
and attributes (the same tensors), so state_dict keys are unchanged and an optimizer built on
the model before `fuse` keeps training the fused one. The model itself is not modified.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as TF
from torch import nn

from .act_modules import fusable, fused_module

__all__ = ["fuse"]

_RELU_FUNCTIONS = (TF.relu, TF.relu_, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


class _Tracer(fx.Tracer):
    """torch.fx's tracer with every batch-norm module a leaf (gpu.torch's are not under torch.nn)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.modules.batchnorm._NormBase) or super().is_leaf_module(m, qualname)


def _relu_input(node: fx.Node, modules: dict) -> fx.Node | None:
    """The tensor a ReLU node applies to, or None when the node is not a ReLU."""
    if node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU:
        return node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        extra = dict(node.kwargs)
        if len(node.args) == 2:
            extra["inplace"] = node.args[1]
        ok = len(node.args) in (1, 2) and set(extra) <= {"inplace"} and isinstance(extra.get("inplace", False), bool)
        return node.args[0] if ok else None
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return node.args[0] if len(node.args) == 1 and not node.kwargs else None
    return None


def _add_operands(node: fx.Node) -> tuple | None:
    """(a, b) of ``a + b`` (a ``+=`` or ``add_`` writes into a), or None for anything else."""
    if node.kwargs or len(node.args) != 2:
        return None
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return node.args
    if node.op == "call_method" and node.target in ("add", "add_"):
        return node.args
    return None


def _in_place(node: fx.Node) -> bool:
    return node.target is operator.iadd or node.target == "add_"


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _match(bn: fx.Node, modules: dict) -> tuple | None:
    """(last node, residual node or None) of the pattern starting at a batch-norm call, or None."""
    if len(bn.args) != 1 or bn.kwargs or not isinstance(bn.args[0], fx.Node):
        return None
    user = _only_user(bn)
    if user is None:
        return None
    if _relu_input(user, modules) is bn:
        return user, None
    operands = _add_operands(user)
    if operands is None or bn not in operands or operands[0] is operands[1]:
        return None
    other = operands[1] if operands[0] is bn else operands[0]
    if not isinstance(other, fx.Node) or (_in_place(user) and operands[0] is not bn):
        return None
    relu = _only_user(user)
    if relu is None or _relu_input(relu, modules) is not user:
        return None
    return relu, other


def _reads_between(first: fx.Node, last: fx.Node, value: fx.Node) -> bool:
    """Whether a node strictly between `first` and `last` takes `value` as an argument."""
    node = first.next
    while node is not last:
        if value in node.all_input_nodes:
            return True
        node = node.next
    return False


def fuse(model: nn.Module) -> fx.GraphModule:
    """`model` as a `torch.fx.GraphModule` in which each batch norm -> ReLU and batch norm -> add
    -> ReLU is one fused call (see the module's docstring for the rules). Train and eval modes,
    outputs, gradients and running statistics are the model's; its parameters and buffers are
    the same tensors.

    >>> import torch, gpu.torch as gt
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(inplace=True))
    >>> fused = gt.fuse(m)
    >>> type(fused.get_submodule("1")).__name__
    'BatchNormAct2d'
    """
    tracer = _Tracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    modules = dict(gm.named_modules())
    plans, claimed = {}, set()
    sites: dict[str, int] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._NormBase):
            continue
        sites[node.target] = sites.get(node.target, 0) + 1
        if not fusable(modules[node.target]):
            continue
        found = _match(node, modules)
        if found is None:
            continue
        last, residual = found
        chain = {last} if residual is None else {_only_user(node), last}
        if claimed & chain or _reads_between(node, last, node.args[0]):
            continue
        claimed |= chain
        plans.setdefault(node.target, []).append((node, last, residual))
    for target, matches in plans.items():
        if len(matches) != sites[target]:       # some call of this module stays plain batch norm
            continue
        gm.set_submodule(target, fused_module(modules[target], "relu"))
        for bn, last, residual in matches:
            add = _only_user(bn)
            if residual is not None:    # read now: an earlier rewrite may have replaced the node
                residual = add.args[1] if add.args[0] is bn else add.args[0]
            with graph.inserting_before(last):
                args = (bn.args[0],) if residual is None else (bn.args[0], residual)
                call = graph.call_module(target, args)
            last.replace_all_uses_with(call)
            dead = [last] if residual is None else [last, add]
            for n in dead + [bn]:
                graph.erase_node(n)
    graph.lint()
    gm.recompile()
    return gm
