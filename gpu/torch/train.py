"""`gpu-train --framework torch`: the same MLP as a torch model, with this library's modules; or
(``--model resnet``) a small ResNet on the images, with ``--fuse`` its fused batch norm + add + ReLU.

`to_torch(model)` turns a `gpu.nn.Sequential` (as built by `gpu.train.build_model`) into a
`torch.nn.Sequential` with the same weights: Standardize -> a fixed affine module, Linear ->
`torch.nn.Linear` (W transposed), BatchNorm -> `gpu.torch.BatchNorm1d`, the activations ->
torch's. `fit` trains it with the loss `gpu.torch.CrossEntropyLoss` and autograd, on the same
mini-batches, validation schedule and optimizer as `gpu.nn.fit`: the optimizer is `gpu.nn`'s own,
updating the torch parameters through zero-copy array views of them. From one seed the two paths
start from identical weights and follow the same curve up to float32 rounding.

`resnet` builds the ResNet (a conv stem and two BasicBlocks, the second downsampling, with
gpu.torch.BatchNorm2d); ``--fuse`` trains it unfused and then, from the same initial weights
and batches, as `gpu.torch.fuse` rewrites it, and prints both times per epoch and the largest
difference between the two loss curves (in float64, rounding: ``--torch-dtype float64``).
"""
from __future__ import annotations

import copy
import math
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..nn import layers as L
from ..nn.data import minibatches
from ..nn.layers import Parameter
from ..nn.trainer import History, end_epoch
from . import _bridge as TB
from .fuse import fuse
from .modules import BatchNorm1d, BatchNorm2d, CrossEntropyLoss

_ACTIVATIONS = {L.ReLU: nn.ReLU, L.Sigmoid: nn.Sigmoid, L.Tanh: nn.Tanh}


class Standardize(nn.Module):
    """y = (x - mean) / std with fixed buffers (fit on the training set by gpu.nn)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a.get() if hasattr(a, "get") else a))


def to_torch(model: L.Sequential, device: str = "cpu") -> nn.Sequential:
    """The gpu.nn MLP as a torch model with gpu.torch's BatchNorm1d, the same weights, on `device`."""
    out = []
    for layer in model.layers:
        if isinstance(layer, L.Standardize):
            out.append(Standardize(_t(layer.mean), _t(layer.std)))
        elif isinstance(layer, L.Linear):
            lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.b is not None)
            with torch.no_grad():
                lin.weight.copy_(_t(layer.W.data).T)
                if layer.b is not None:
                    lin.bias.copy_(_t(layer.b.data))
            out.append(lin)
        elif isinstance(layer, L.BatchNorm):
            bn = BatchNorm1d(layer.num_features[0], eps=layer.eps, momentum=layer.momentum)
            with torch.no_grad():
                bn.weight.copy_(_t(layer.gamma.data))
                bn.bias.copy_(_t(layer.beta.data))
                bn.running_mean.copy_(_t(layer.running_mean))
                bn.running_var.copy_(_t(layer.running_var))
            out.append(bn)
        elif type(layer) in _ACTIVATIONS:
            out.append(_ACTIVATIONS[type(layer)]())
        else:
            raise TypeError(f"model: no torch counterpart for layer {type(layer).__name__}")
    return nn.Sequential(*out).to(device)


class BasicBlock(nn.Module):
    """ResNet's BasicBlock: conv-bn-relu, conv-bn, + the identity (a strided 1x1 conv and batch
    norm when the shape changes), relu; in-place ReLU and add, as torchvision writes it."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity
        return self.relu(out)


def resnet(scale: L.Standardize, num_classes: int, width: int = 16, seed: int = 0) -> nn.Sequential:
    """A small ResNet on flat square images (digits: 64 features, 8 x 8): the training set's
    standardization, a 3x3 conv stem with batch norm and ReLU, a BasicBlock of `width` channels
    and one of 2 x width at stride 2, global average pooling and a Linear head."""
    features = scale.mean.shape[-1]
    side = math.isqrt(features)
    if side * side != features:
        raise ValueError(f"--model resnet: the examples must be square images, got {features} features")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            Standardize(_t(scale.mean), _t(scale.std)), nn.Unflatten(1, (1, side, side)),
            nn.Conv2d(1, width, 3, 1, 1, bias=False), BatchNorm2d(width), nn.ReLU(inplace=True),
            BasicBlock(width, width), BasicBlock(width, 2 * width, stride=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


class _Views:
    """gpu.nn Parameters whose arrays are views of the torch parameters (no copies): gpu.nn's
    optimizers update the torch model in place."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.views = [Parameter(TB.to_array(p.data)) for p in params]

    def refresh_grads(self) -> None:
        for v, p in zip(self.views, self.params):
            v.grad = TB.to_array(p.grad)


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode; the mode is restored afterwards."""
    was = model.training
    model.eval()
    crit = CrossEntropyLoss(reduction="sum")
    loss, correct = 0.0, 0
    try:
        for s in range(0, len(X), batch_size):
            logits = model(X[s:s + batch_size])
            loss += float(crit(logits, y[s:s + batch_size]))
            correct += int((logits.argmax(1) == y[s:s + batch_size]).sum())
    finally:
        model.train(was)
    return loss / len(X), correct / len(X)


def fit(model: nn.Module, make_optimizer: Callable[[list], Any], train, val, *, epochs: int, batch_size: int,
        seed: int = 0, schedule: Callable[[int], float] | None = None, eval_every: int | None = None,
        max_steps: int | None = None, progress: bool = True, desc: str = "") -> History:
    """`gpu.nn.fit` for a torch model: train = (X, y) tensors on the model's device; the optimizer
    is a gpu.nn optimizer built by `make_optimizer(parameters)` over views of the torch tensors."""
    X, y = train
    device = X.device
    params = [p for p in model.parameters() if p.requires_grad]
    views = _Views(params)
    opt = make_optimizer(views.views)
    crit = CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    hist = History()
    model.train()

    def validate(step: int) -> None:
        hist.validate(step, None if val is None else lambda: evaluate(model, *val))

    start = time.perf_counter()
    validate(0)
    step = 0
    for epoch in range(epochs):
        if schedule is not None:
            opt.lr = schedule(epoch)
        t0 = time.perf_counter()
        batches = list(minibatches(len(X), batch_size, rng))
        # each step's (loss, correct) stays on the device; read back once, at the epoch's end
        stats = torch.zeros((2, len(batches)), dtype=torch.float64, device=device)
        order = torch.from_numpy(np.concatenate(batches)).to(device) if batches else None
        at = 0
        for i, idx in enumerate(batches):
            idx_t = order[at:at + len(idx)]
            at += len(idx)
            xb, yb = X[idx_t], y[idx_t]
            for p in params:
                p.grad = None
            logits = model(xb)
            loss_t = crit(logits, yb)
            loss_t.backward()
            views.refresh_grads()
            with TB.running_on(device):
                opt.step()
            with torch.no_grad():
                stats[0, i] = loss_t.detach()
                stats[1, i] = (logits.argmax(1) == yb).sum()
            step += 1
            if eval_every and step % eval_every == 0:
                validate(step)
            if max_steps is not None and step >= max_steps:
                break
        done = i + 1 if batches else 0
        losses, hits = stats[:, :done].cpu().numpy()
        sizes = np.array([len(b) for b in batches[:done]])
        hist.step_loss.extend(losses.tolist())
        validate(step)
        end_epoch(hist, epoch, epochs, step, opt.lr, float(losses @ sizes), int(hits.sum()), int(sizes.sum()), t0,
                  progress=progress, desc=desc, tag=" [torch]")
        if max_steps is not None and step >= max_steps:
            break
    hist.wall_time = time.perf_counter() - start
    return hist


def run(args, model: L.Sequential, train, val, label: str = "") -> History:
    """gpu.train's `run` for `--framework torch`: the gpu.nn model converted by `to_torch`, on
    torch tensors of args.device (cpu, or gpu: CUDA), trained by `fit`."""
    from ..nn.optim import DEFAULT_LR, inverse_time_decay, make_optimizer
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    torch.set_num_threads(args.threads)     # as the BLAS limit of the gpu.nn path (--threads)
    tmodel = to_torch(model, device)

    def tensors(d):
        return (torch.from_numpy(np.ascontiguousarray(d[0], np.float32)).to(device),
                torch.from_numpy(np.asarray(d[1], np.int64)).to(device))
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    train_t, val_t = tensors(train), tensors(val)
    dtype = getattr(torch, getattr(args, "torch_dtype", "float32"))
    if getattr(args, "model", "mlp") == "resnet":
        tmodel = resnet(model.layers[0], int(train[1].max()) + 1, seed=args.seed).to(device)
    runs = {"": tmodel.to(dtype)}
    if getattr(args, "fuse", False):
        runs = {"unfused": tmodel, "fused": fuse(copy.deepcopy(tmodel))}
    train_t, val_t = ((d[0].to(dtype), d[1]) for d in (train_t, val_t))
    hists = {}
    for name, m in runs.items():
        evaluate(m, *(t[:2] for t in val_t))     # the first custom-op calls load torch's op machinery
        hists[name] = fit(m, lambda params: make_optimizer(args.optimizer, params, lr), train_t, val_t,
                          epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                          schedule=inverse_time_decay(lr, args.lr_decay) if args.lr_decay else None,
                          eval_every=args.eval_every, max_steps=args.max_steps, progress=not args.quiet,
                          desc=label + (f"[{name}] " if name else ""))
    if "fused" in hists:
        report_fusion(hists["unfused"], hists["fused"])
    return hists["fused" if "fused" in hists else ""]


def report_fusion(unfused: History, fused: History) -> dict[str, float]:
    """Print and return the two runs' seconds per epoch (the median over epochs, the first, which
    loads the ops, left out when there are more) and their loss curves' largest difference; the
    fused run's History keeps it as ``fusion``."""
    def per_epoch(h: History) -> float:
        secs = [e["seconds"] for e in h.epochs]
        return float(np.median(secs[1:] if len(secs) > 1 else secs))
    diff = float(np.max(np.abs(np.subtract(unfused.step_loss, fused.step_loss)))) if fused.step_loss else 0.0
    out = {"unfused_s_per_epoch": per_epoch(unfused), "fused_s_per_epoch": per_epoch(fused),
           "max_loss_difference": diff}
    print(f"--fuse: {out['unfused_s_per_epoch']:.3f} s per epoch unfused, {out['fused_s_per_epoch']:.3f} s fused "
          f"({out['unfused_s_per_epoch'] / max(out['fused_s_per_epoch'], 1e-12):.2f}x); loss curves differ by "
          f"at most {diff:.3g}", file=sys.stderr)
    fused.fusion = out
    return out
