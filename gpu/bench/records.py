"""The op records: one `Op` per op, all the benchmark knows about it.

A record names the op (the public function's name) and its family, lists the outputs it returns
and the inputs it needs, and gives its minimum-bytes formula, its reference (from `reference.py`)
and each peer's implementation: this library's call, the seed's direct NumPy formulas, and the
PyTorch call (eager, cuDNN or torch.compile, on the GPU or the CPU). The CuPy peer is the
reference itself in float32. `host_shape`: the shape of the op's row in `gpu-bench --host`.
Everything else in the package is generic over `OPS`; adding an op is adding a record here.
"""
from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import gpu

from . import reference as ref

EPS = 1e-5
MOMENTUM = 0.1
BN_LAYOUTS = ("nc", "nchw", "nhwc")

Run = Callable[[], tuple]   # one call of a peer on prepared inputs; returns the op's outputs


@dataclass(frozen=True)
class Op:
    """An op as benchmarked.

    `min_bytes(case)`: each input read once and each output written once (E elements of s bytes,
    C channels or classes, R rows; per-channel vectors are float32). `reference(case, inputs,
    dtype, momentum)`: the outputs computed in `dtype`; with a `momentum`, the running statistics
    are updated in place as this library does. `ours`, `seed`: (case, inputs) -> run. `torch`:
    (case, tensors, wrap) -> run, where `wrap` is the identity or torch.compile. A peer's run
    returns the outputs in `outputs` order, None for one it does not produce (not checked).
    `unfused`: a fused op's composition of this library's unfused ops (the `ours-unfused` peer).
    `public`: the public function the op times, when its name is not one.
    """
    name: str
    family: str
    title: str
    outputs: tuple[str, ...]
    needs: tuple[str, ...]
    min_bytes: Callable[["Case"], int]
    reference: Callable[..., tuple]
    ours: Callable[["Case", dict], Run]
    seed: Callable[["Case", dict], Run] | None = None
    torch: Callable[["Case", dict, Callable], Run] | None = None
    updates_running: bool = False
    host_shape: tuple[int, ...] | None = None
    unfused: Callable[["Case", dict], Run] | None = None
    public: str | None = None


@dataclass(frozen=True)
class Case:
    """One op on one input shape, layout and dtype.

    Batch-norm ops: `layout` names where the channels are: "nc" (2-D, reduce axis 0), "nchw"
    (channels on axis 1, reduce every other axis), "nhwc" (channels last). Softmax family: classes
    are the last axis and `layout` is "".
    """
    op: Op
    shape: tuple[int, ...]
    layout: str
    dtype: np.dtype

    @property
    def channel_axis(self) -> int:
        if self.op.family == "softmax" or self.layout == "nhwc":
            return len(self.shape) - 1
        return 1

    @property
    def axes(self) -> tuple[int, ...]:
        """Batch norm: the reduced axes. Softmax family: the class axis."""
        c = self.channel_axis
        if self.op.family == "softmax":
            return (c,)
        return tuple(i for i in range(len(self.shape)) if i != c)

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def channels(self) -> int:
        """Batch norm: features (C). Softmax family: classes."""
        return self.shape[self.channel_axis]

    @property
    def rows(self) -> int:
        return self.elements // self.channels

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def kept(self, a):
        """A per-channel vector as a broadcastable (keepdims) array."""
        shape = [1] * len(self.shape)
        shape[self.channel_axis] = self.channels
        return a.reshape(shape)

    def flat(self, a):
        """A keepdims per-channel array as a vector."""
        return a.reshape(self.channels)

    def label(self) -> str:
        shape = "x".join(map(str, self.shape))
        return f"{shape} {self.layout}" if self.layout else shape


def _es(c: Case) -> int:
    return c.elements * c.itemsize


#: the functional module the PyTorch builders call: torch.nn.functional, or gpu.torch while the
#: `ours-torch` peer builds its runs (this library's ops through PyTorch, `--framework torch`)
TORCH_FUNCTIONAL: contextvars.ContextVar = contextvars.ContextVar("torch_functional", default=None)


def _torch():
    import torch
    return torch, TORCH_FUNCTIONAL.get() or torch.nn.functional


# ---------------------------------------------------------------------------------------------
# Batch norm: shared pieces
# ---------------------------------------------------------------------------------------------

_BN_PARAMS = ("gamma", "beta", "running_mean", "running_var")


def _ref_forward(c: Case, i: dict, dt, momentum=None) -> tuple:
    y, mean, invstd, var = ref.batch_norm_forward(i["x"], c.kept(i["gamma"]), c.kept(i["beta"]), c.axes, EPS,
                                                  dtype=dt)
    if momentum is not None:
        ref.update_running_stats(i["running_mean"], i["running_var"], mean, var, c.rows, momentum)
    return y, c.flat(mean), c.flat(invstd)


def _ref_backward(c: Case, i: dict, dt, mean, invstd) -> tuple:
    dx, dgamma, dbeta = ref.batch_norm_backward(i["dy"], i["x"], c.kept(i["gamma"]), c.kept(mean),
                                                c.kept(invstd), c.axes, dtype=dt)
    return dx, c.flat(dgamma), c.flat(dbeta)


def _ours_forward(c: Case, i: dict) -> tuple:
    # through the `gpu` module's attributes at run time, so a test can swap one out
    return gpu.batch_norm_forward(i["x"], i["gamma"], i["beta"], axis=c.axes, eps=EPS,
                                  running_mean=i["running_mean"], running_var=i["running_var"],
                                  momentum=MOMENTUM)


def _ours_train(c: Case, i: dict) -> tuple:
    y, mean, invstd = _ours_forward(c, i)
    return (y,) + gpu.batch_norm_backward(i["dy"], i["x"], i["gamma"], mean, invstd, axis=c.axes)


def _ref_train(c: Case, i: dict, dt, momentum=None) -> tuple:
    y, mean, invstd = _ref_forward(c, i, dt, momentum)
    return (y,) + _ref_backward(c, i, dt, mean, invstd)


def _seed_stats(c: Case, x):
    """The seed's statistics: mean, ((z - mean)**2).mean."""
    mean = x.mean(c.axes, keepdims=True)
    return mean, ((x - mean) ** 2).mean(c.axes, keepdims=True)


def _seed_forward(c: Case, i: dict) -> tuple:
    """The seed's forward: gamma (z - mean) / sqrt(var + eps) + beta; (y, mean, var)."""
    mean, var = _seed_stats(c, i["x"])
    return c.kept(i["gamma"]) * ((i["x"] - mean) / np.sqrt(var + EPS)) + c.kept(i["beta"]), mean, var


def _seed_outputs(c: Case, i: dict) -> tuple:
    """The forward's outputs as the seed has them: y and mean (it keeps var, not invstd)."""
    y, mean, _ = _seed_forward(c, i)
    return y, c.flat(mean), None


def _seed_backward(c: Case, i: dict, mean, var) -> tuple:
    """The seed's backward is the textbook chain rule: the reference's, in the storage dtype."""
    return _ref_backward(c, i, i["x"].dtype, c.flat(mean), c.flat(1 / np.sqrt(var + EPS)))


def _seed_saved_backward(c: Case, i: dict) -> Run:
    """The seed's backward reads the forward's cache (mean, var): rebuilt here, untimed."""
    mean, var = c.kept(i["mean"]), 1 / c.kept(i["invstd"]) ** 2 - EPS
    return lambda: _seed_backward(c, i, mean, var)


def _seed_train(c: Case, i: dict) -> tuple:
    y, mean, var = _seed_forward(c, i)
    return (y,) + _seed_backward(c, i, mean, var)


def _torch_bn_args(c: Case, t: dict, *names):
    """PyTorch wants channels on axis 1: x and dy are viewed so (NHWC becomes channels_last)."""
    return [t[n].movedim(c.channel_axis, 1) if n in ("x", "dy", "residual") else t[n] for n in names]


def _torch_bn_grads(c: Case, t: dict, wrap, with_forward: bool) -> Run:
    """autograd.grad of F.batch_norm; without the forward, on a graph built once, untimed."""
    torch, F = _torch()
    f = wrap(lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS))
    x, dy, w = _torch_bn_args(c, t, "x", "dy", "gamma")
    b = t["beta"] if "beta" in t else torch.zeros_like(w)
    leaves = (x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_())
    ax = c.channel_axis
    if with_forward:
        def run():
            y = f(*leaves, t["running_mean"], t["running_var"])
            dx, dw, db = torch.autograd.grad(y, leaves, dy)
            return y.detach().movedim(1, ax), dx.movedim(1, ax), dw, db
        return run
    y = f(*leaves, None, None)   # PyTorch saves mean and invstd of x, as given to this library

    def run():
        dx, dw, db = torch.autograd.grad(y, leaves, dy, retain_graph=True)
        return dx.movedim(1, ax), dw, db
    return run


def _torch_bn(training: bool) -> Callable:
    def build(c: Case, t: dict, wrap) -> Run:
        _, F = _torch()
        f = wrap(lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS))
        args = _torch_bn_args(c, t, "x", *_BN_PARAMS)
        if training:
            return lambda: (f(*args).movedim(1, c.channel_axis), None, None)
        return lambda: (f(*args).movedim(1, c.channel_axis),)
    return build


def _torch_batch_stats(c: Case, t: dict, wrap) -> Run:
    torch, _ = _torch()
    f = wrap(lambda x: torch.var_mean(x, dim=c.axes, correction=0))
    return lambda: f(t["x"])[::-1]


# ---------------------------------------------------------------------------------------------
# Batch norm + residual add + ReLU (a ResNet block's end), fused
# ---------------------------------------------------------------------------------------------

def _ref_add_relu_train(c: Case, i: dict, dt, momentum=None) -> tuple:
    y, mean, invstd = _ref_forward(c, i, dt, momentum)
    y = ref.add_relu(y, i["residual"])
    dz = ref.relu_backward(i["dy"], y, dtype=dt)
    dx, dgamma, dbeta = ref.batch_norm_backward(dz, i["x"], c.kept(i["gamma"]), c.kept(mean), c.kept(invstd),
                                                c.axes, dtype=dt)
    return y, dx, c.flat(dgamma), c.flat(dbeta), dz


def _ref_add_relu_inference(c: Case, i: dict, dt, momentum=None) -> tuple:
    y = ref.batch_norm_inference(i["x"], *map(c.kept, (i[n] for n in _BN_PARAMS)), c.axes, EPS, dtype=dt)
    return (ref.add_relu(y, i["residual"]),)


def _ours_add_relu_train(c: Case, i: dict) -> tuple:
    y, mean, invstd = gpu.batch_norm_forward(i["x"], i["gamma"], i["beta"], axis=c.axes, eps=EPS,
                                             running_mean=i["running_mean"], running_var=i["running_var"],
                                             momentum=MOMENTUM, residual=i["residual"], activation="relu")
    return (y,) + tuple(gpu.batch_norm_backward(i["dy"], i["x"], i["gamma"], mean, invstd, axis=c.axes,
                                                activation="relu", y=y, residual_grad=True))


def _unfused_add_relu_train(c: Case, i: dict) -> tuple:
    """Three of this library's calls and two elementwise passes: what the fused op replaces."""
    xp = ref.array_module(i["x"])
    y, mean, invstd = _ours_forward(c, i)
    y = xp.maximum(y + i["residual"], 0)
    dz = xp.where(y > 0, i["dy"], xp.zeros_like(i["dy"]))
    return (y,) + tuple(gpu.batch_norm_backward(dz, i["x"], i["gamma"], mean, invstd, axis=c.axes)) + (dz,)


def _ours_add_relu_inference(c: Case, i: dict) -> tuple:
    return (gpu.batch_norm_inference(i["x"], i["gamma"], i["beta"], i["running_mean"], i["running_var"],
                                     axis=c.axes, eps=EPS, residual=i["residual"], activation="relu"),)


def _unfused_add_relu_inference(c: Case, i: dict) -> tuple:
    xp = ref.array_module(i["x"])
    y = gpu.batch_norm_inference(i["x"], i["gamma"], i["beta"], i["running_mean"], i["running_var"],
                                 axis=c.axes, eps=EPS)
    return (xp.maximum(y + i["residual"], 0),)


def _seed_add_relu_train(c: Case, i: dict) -> tuple:
    y, mean, var = _seed_forward(c, i)
    y = np.maximum(y + i["residual"], 0)
    dz = i["dy"] * (y > 0)
    return (y,) + _seed_backward(c, dict(i, dy=dz), mean, var) + (dz,)


def _torch_add_relu(training: bool) -> Callable:
    """relu(F.batch_norm(x) + r) as torch runs it (eager or compiled); through gpu.torch (the
    `ours-torch` peer), its fused call."""
    def build(c: Case, t: dict, wrap) -> Run:
        torch, F = _torch()
        if F is torch.nn.functional:
            f = wrap(lambda x, r, w, b, rm, rv: torch.relu(F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)
                                                           + r))
        else:
            f = wrap(lambda x, r, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS, residual=r,
                                                             activation="relu"))
        x, r, w, b, rm, rv = _torch_bn_args(c, t, "x", "residual", *_BN_PARAMS)
        ax = c.channel_axis
        if not training:
            return lambda: (f(x, r, w, b, rm, rv).movedim(1, ax),)
        (dy,) = _torch_bn_args(c, t, "dy")
        leaves = tuple(v.detach().requires_grad_() for v in (x, r, w, b))

        def run():
            y = f(*leaves, rm, rv)
            dx, dr, dw, db = torch.autograd.grad(y, leaves, dy)
            return y.detach().movedim(1, ax), dx.movedim(1, ax), dw, db, dr.movedim(1, ax)
        return run
    return build


# ---------------------------------------------------------------------------------------------
# The softmax family: shared pieces
# ---------------------------------------------------------------------------------------------

def _seed_softmax(z):
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _seed_ce(c: Case, z, target, grad: bool) -> tuple:
    """The seed's CE: -log of the picked probability; dZ = (A - Y) / m with a one-hot Y."""
    a = _seed_softmax(z)
    rows = np.arange(c.rows)
    loss = -np.log(a.reshape(c.rows, -1)[rows, target.reshape(-1)]).mean()
    if not grad:
        return (loss,)
    y = np.zeros_like(a).reshape(c.rows, -1)
    y[rows, target.reshape(-1)] = 1
    return loss, (a - y.reshape(a.shape)) / c.rows


def _classes_at_1(z):
    """F.cross_entropy wants the classes on axis 1."""
    return z.movedim(-1, 1) if z.ndim > 2 else z


def _torch_ce(grad: bool) -> Callable:
    def build(c: Case, t: dict, wrap) -> Run:
        torch, F = _torch()
        f = wrap(lambda z, y: F.cross_entropy(z, y))
        z = _classes_at_1(t["z"])
        if not grad:
            return lambda: (f(z, t["target"]),)
        z = z.detach().requires_grad_()

        def run():
            loss = f(z, t["target"])
            (dz,) = torch.autograd.grad(loss, z)
            return loss.detach(), dz.movedim(1, -1) if dz.ndim > 2 else dz
        return run
    return build


def _torch_unary(name: str) -> Callable:
    def build(c: Case, t: dict, wrap) -> Run:
        torch, _ = _torch()
        f = wrap(lambda z: getattr(torch, name)(z, -1))
        return lambda: (f(t["z"]),)
    return build


# ---------------------------------------------------------------------------------------------
# The records
# ---------------------------------------------------------------------------------------------

OPS: dict[str, Op] = {op.name: op for op in (
    Op("batch_stats", "batch_norm", "batch statistics", ("mean", "var"), ("x",),
       # read x; write mean, var
       min_bytes=lambda c: _es(c) + 8 * c.channels,
       reference=lambda c, i, dt, momentum=None: tuple(map(c.flat, ref.batch_stats(i["x"], c.axes, dtype=dt))),
       ours=lambda c, i: lambda: gpu.batch_stats(i["x"], axis=c.axes),
       seed=lambda c, i: lambda: tuple(map(c.flat, _seed_stats(c, i["x"]))),
       torch=_torch_batch_stats, host_shape=(64, 256)),

    Op("batch_norm_forward", "batch_norm", "BN forward (training)", ("y", "mean", "invstd"), ("x",) + _BN_PARAMS,
       # read x once (a kernel that keeps x on chip between stats and normalize), write y;
       # read gamma, beta, running stats; write mean, invstd, running stats
       min_bytes=lambda c: 2 * _es(c) + 32 * c.channels,
       reference=_ref_forward,
       ours=lambda c, i: lambda: _ours_forward(c, i),
       seed=lambda c, i: lambda: _seed_outputs(c, i),
       torch=_torch_bn(training=True), updates_running=True, host_shape=(64, 256)),

    Op("batch_norm_inference", "batch_norm", "BN inference", ("y",), ("x",) + _BN_PARAMS,
       # read x, write y; read gamma, beta, running stats
       min_bytes=lambda c: 2 * _es(c) + 16 * c.channels,
       reference=lambda c, i, dt, momentum=None: (ref.batch_norm_inference(
           i["x"], *map(c.kept, (i[n] for n in _BN_PARAMS)), c.axes, EPS, dtype=dt),),
       ours=lambda c, i: lambda: (gpu.batch_norm_inference(
           i["x"], i["gamma"], i["beta"], i["running_mean"], i["running_var"], axis=c.axes, eps=EPS),),
       seed=lambda c, i: lambda: (
           (i["x"] - c.kept(i["running_mean"])) / np.sqrt(c.kept(i["running_var"]) + EPS)
           * c.kept(i["gamma"]) + c.kept(i["beta"]),),
       torch=_torch_bn(training=False), host_shape=(64, 256)),

    Op("batch_norm_backward", "batch_norm", "BN backward", ("dx", "dgamma", "dbeta"),
       ("dy", "x", "gamma", "mean", "invstd"),
       # read dy and x once (on chip between the reductions and dx), write dx;
       # read gamma, mean, invstd; write dgamma, dbeta
       min_bytes=lambda c: 3 * _es(c) + 20 * c.channels,
       reference=lambda c, i, dt, momentum=None: _ref_backward(c, i, dt, i["mean"], i["invstd"]),
       ours=lambda c, i: lambda: gpu.batch_norm_backward(i["dy"], i["x"], i["gamma"], i["mean"], i["invstd"],
                                                         axis=c.axes),
       seed=_seed_saved_backward,
       torch=lambda c, t, wrap: _torch_bn_grads(c, t, wrap, with_forward=False), host_shape=(64, 256)),

    Op("batch_norm_train", "batch_norm", "BN forward+backward", ("y", "dx", "dgamma", "dbeta"),
       ("x", "dy") + _BN_PARAMS,
       # forward + backward of one training step: x is read again by the backward
       min_bytes=lambda c: 5 * _es(c) + 44 * c.channels,
       reference=_ref_train,
       ours=lambda c, i: lambda: _ours_train(c, i),
       seed=lambda c, i: lambda: _seed_train(c, i),
       torch=lambda c, t, wrap: _torch_bn_grads(c, t, wrap, with_forward=True), updates_running=True),

    Op("batch_norm_add_relu_train", "batch_norm", "BN + add + ReLU fwd+bwd",
       ("y", "dx", "dgamma", "dbeta", "dresidual"), ("x", "residual", "dy") + _BN_PARAMS,
       # forward: read x and the residual, write y (x on chip between stats and normalize): 3 E*s;
       # backward: read dy, y (the mask) and x, write dx and the residual's gradient: 5 E*s
       min_bytes=lambda c: 8 * _es(c) + 44 * c.channels,
       reference=_ref_add_relu_train,
       ours=lambda c, i: lambda: _ours_add_relu_train(c, i),
       unfused=lambda c, i: lambda: _unfused_add_relu_train(c, i),
       seed=lambda c, i: lambda: _seed_add_relu_train(c, i),
       torch=_torch_add_relu(training=True), updates_running=True, public="batch_norm_forward"),

    Op("batch_norm_add_relu_inference", "batch_norm", "BN + add + ReLU inference", ("y",),
       ("x", "residual") + _BN_PARAMS,
       # read x and the residual, write y; read gamma, beta, running stats
       min_bytes=lambda c: 3 * _es(c) + 16 * c.channels,
       reference=_ref_add_relu_inference,
       ours=lambda c, i: lambda: _ours_add_relu_inference(c, i),
       unfused=lambda c, i: lambda: _unfused_add_relu_inference(c, i),
       seed=lambda c, i: lambda: (np.maximum(
           (i["x"] - c.kept(i["running_mean"])) / np.sqrt(c.kept(i["running_var"]) + EPS) * c.kept(i["gamma"])
           + c.kept(i["beta"]) + i["residual"], 0),),
       torch=_torch_add_relu(training=False), public="batch_norm_inference"),

    Op("softmax", "softmax", "softmax", ("y",), ("z",),
       # read z, write the probabilities
       min_bytes=lambda c: 2 * _es(c),
       reference=lambda c, i, dt, momentum=None: (ref.softmax(i["z"], -1, dtype=dt),),
       ours=lambda c, i: lambda: (gpu.softmax(i["z"], axis=-1),),
       seed=lambda c, i: lambda: (_seed_softmax(i["z"]),),
       torch=_torch_unary("softmax"), host_shape=(64, 1000)),

    Op("log_softmax", "softmax", "log-softmax", ("y",), ("z",),
       # read z, write the log-probabilities
       min_bytes=lambda c: 2 * _es(c),
       reference=lambda c, i, dt, momentum=None: (ref.log_softmax(i["z"], -1, dtype=dt),),
       ours=lambda c, i: lambda: (gpu.log_softmax(i["z"], axis=-1),),
       seed=lambda c, i: lambda: (np.log(_seed_softmax(i["z"])),),
       torch=_torch_unary("log_softmax"), host_shape=(64, 1000)),

    Op("softmax_cross_entropy", "softmax", "softmax + CE forward", ("loss",), ("z", "target"),
       # read z and the int64 targets; the mean loss is one scalar
       min_bytes=lambda c: _es(c) + 8 * c.rows,
       reference=lambda c, i, dt, momentum=None: ref.softmax_cross_entropy(i["z"], i["target"], grad=False,
                                                                           dtype=dt)[:1],
       ours=lambda c, i: lambda: (gpu.softmax_cross_entropy(i["z"], i["target"], axis=-1),),
       seed=lambda c, i: lambda: _seed_ce(c, i["z"], i["target"], grad=False),
       torch=_torch_ce(grad=False), host_shape=(64, 256)),

    Op("softmax_cross_entropy_train", "softmax", "softmax + CE forward+backward", ("loss", "dz"), ("z", "target"),
       # read z and targets once, write dz (loss and gradient in one pass)
       min_bytes=lambda c: 2 * _es(c) + 8 * c.rows,
       reference=lambda c, i, dt, momentum=None: ref.softmax_cross_entropy(i["z"], i["target"], dtype=dt),
       ours=lambda c, i: lambda: gpu.softmax_cross_entropy(i["z"], i["target"], axis=-1, return_grad=True),
       seed=lambda c, i: lambda: _seed_ce(c, i["z"], i["target"], grad=True),
       torch=_torch_ce(grad=True), host_shape=(64, 256)),
)}

#: --op families: the ops of each module of gpu/ops/
FAMILIES: dict[str, tuple[str, ...]] = {
    fam: tuple(n for n, op in OPS.items() if op.family == fam) for fam in dict.fromkeys(
        op.family for op in OPS.values())}


def make_inputs(xp, rng, case: Case) -> dict[str, Any]:
    """The inputs `case.op.needs`: random, seeded, never zeros; per-channel vectors in float32
    (float64 for float64 x).

    `rng` is a NumPy or CuPy Generator matching `xp`. The saved statistics of a backward (`mean`,
    `invstd`) are those of x, as a forward pass leaves them.
    """
    def normal(shape, scale=1.0, offset=0.0, dtype=case.dtype):
        wide = np.float64 if np.dtype(dtype) == np.float64 else np.float32
        return (rng.standard_normal(shape, dtype=wide) * scale + offset).astype(dtype, copy=False)

    c = (case.channels,)
    vec = np.float64 if case.dtype == np.float64 else np.float32   # per-channel vectors
    makers: dict[str, Callable[[], Any]] = {
        "x": lambda: normal(case.shape, 2.0, 0.5),
        "dy": lambda: normal(case.shape),
        "residual": lambda: normal(case.shape),
        "z": lambda: normal(case.shape, 3.0),
        "target": lambda: rng.integers(0, case.channels, case.shape[:-1], dtype=np.int64),
        "gamma": lambda: normal(c, 0.1, 1.0, vec),
        "beta": lambda: normal(c, 0.1, 0.0, vec),
        "running_mean": lambda: normal(c, 0.1, 0.0, vec),
        "running_var": lambda: (rng.random(c, dtype=vec) + 0.5),
    }
    inp = {name: makers[name]() for name in case.op.needs if name in makers}
    if "mean" in case.op.needs:
        mean, var = ref.batch_stats(inp["x"], case.axes, dtype=vec)
        inp["mean"], inp["invstd"] = case.flat(mean), case.flat(1 / xp.sqrt(var + EPS))
    return inp
