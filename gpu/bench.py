"""gpu-bench: this library's ops held against their peers, as a fraction of what memory allows.

    gpu-bench --quick                       # tiny suite, on the GPU if there is one, else the CPU
    gpu-bench                               # the default suite of realistic shapes
    gpu-bench --op batchnorm --dtype float16 --json out.json --plot out.png
    gpu-bench --op ce_train --shape 8192x32000 --shape 4096x128256
    gpu-bench --cpu-check                   # the NumPy path's speed targets (float32, 2 threads)

Every op here is memory-bound, so each row is reported against the fewest bytes the op must move
through memory (`Op.min_bytes`, written next to each op below): effective GB/s, that as a
percentage of a device-to-device copy measured in the same run, and of the device's datasheet
bandwidth. `vs best` is the fastest other peer's time over this row's time (above 1: this row
wins by that factor).

How a row is measured:
1. Inputs are random (never zeros) and seeded. On the GPU, enough input sets are made to span
   three times the L2 cache, and the timed calls rotate through them, so a tensor smaller than L2
   is not timed from cache (``l2_resident`` in the JSON marks rows where that was not possible).
2. Each peer's result on the first set is checked against a float64 reference (the array
   expressions of this module in float64, NumPy on the CPU, CuPy on the GPU). A result off by more
   than the dtype's tolerance, non-finite, or of the wrong shape is reported as WRONG and not timed.
3. GPU: `cupyx.profiler.benchmark` (CUDA events around every call), warm-up, then the median of
   up to `--repeat` calls within a `--budget` of seconds per row. CuPy and PyTorch share one
   stream, so the events bracket the work of either library the same way. CPU: perf_counter
   around each call, median of up to `--repeat` calls.

Peers (each only where importable; `PEERS` is the registry):
    ours           this library: CUDA kernels for CuPy arrays, the NumPy path for NumPy arrays
    cupy           the same math as CuPy array expressions (float32 compute for float16 storage)
    torch-cudnn    PyTorch eager with cuDNN enabled (batch-norm ops; the softmax family has no
                   cuDNN path)
    torch          PyTorch eager with cuDNN disabled (its native CUDA kernels)
    torch-compile  torch.compile of the PyTorch forward (backward through AOTAutograd), one cache
                   for the run; rows after a total compile time (`--compile-budget`) are skipped
    seed           the seed's direct NumPy formulas (CPU)
    torch-cpu      PyTorch on the CPU (`--threads`)

The exit status is 1 when any result is WRONG or this library's op fails, else 0.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

import gpu

EPS = 1e-5
MOMENTUM = 0.1

#: bound on ||out - ref|| / ||ref|| against the float64 reference, by storage dtype. Looser than
#: the unit tests': peers sum in other orders, and float16 outputs carry 2^-11 rounding each.
TOLERANCE = {np.dtype(np.float16): 5e-3, np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}

#: Datasheet memory bandwidth (GB/s) by a substring of the CUDA device name, first match wins.
#: A name that matches none has no spec column.
SPEC_BANDWIDTH_GBPS = (
    ("GH200", None),        # HBM3 and HBM3e variants share the name
    ("H200", 4800.0),       # H200 SXM/NVL, HBM3e
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),       # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),       # 40 GB variants
)

ROTATE_L2_FACTOR = 3      # rotated input sets span at least this many L2 caches
MAX_INPUT_SETS = 256
MIN_SAMPLES = 3           # a row's time budget never cuts it below this many timed calls


# ---------------------------------------------------------------------------------------------
# Cases: an op on one shape, layout and dtype
# ---------------------------------------------------------------------------------------------

BN_LAYOUTS = ("nc", "nchw", "nhwc")


@dataclass(frozen=True)
class Case:
    """One op on one input shape.

    Batch-norm ops: `layout` names where the channels are: "nc" (2-D, reduce axis 0), "nchw"
    (channels on axis 1, reduce every other axis), "nhwc" (channels last). Softmax ops: classes
    are the last axis and `layout` is "".
    """
    op: "Op"
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

    def label(self) -> str:
        shape = "x".join(map(str, self.shape))
        return f"{shape} {self.layout}" if self.layout else shape


def parse_shape(spec: str) -> tuple[tuple[int, ...], str | None]:
    """'32x64x112x112' -> ((32, 64, 112, 112), None); '32x112x112x64:nhwc' -> (..., 'nhwc')."""
    dims, _, layout = spec.partition(":")
    try:
        shape = tuple(int(d) for d in dims.replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {spec!r}: expected sizes joined by 'x'") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape {spec!r}: expected at least 2 positive sizes")
    if layout and layout not in BN_LAYOUTS:
        raise argparse.ArgumentTypeError(f"--shape {spec!r}: layout must be one of {BN_LAYOUTS}")
    if layout == "nc" and len(shape) != 2 or layout in ("nchw", "nhwc") and len(shape) < 3:
        raise argparse.ArgumentTypeError(f"--shape {spec!r}: layout {layout} does not fit {len(shape)} dims")
    return shape, layout or None


# Default suites: (shape, batch-norm layout). Realistic sizes: dense layers from a small batch to
# a large one, CNN activations early (large H, W) and late (many channels), classifier heads from
# ImageNet to a 128k-token vocabulary.
SUITES = {
    "gpu": {
        "batchnorm": [((256, 1024), "nc"), ((8192, 1024), "nc"), ((262144, 256), "nc"),
                      ((32, 64, 112, 112), "nchw"), ((256, 256, 14, 14), "nchw"), ((64, 2048, 7, 7), "nchw"),
                      ((32, 112, 112, 64), "nhwc"), ((256, 14, 14, 256), "nhwc"), ((64, 7, 7, 2048), "nhwc")],
        "softmax": [((4096, 1000), ""), ((8192, 32000), ""), ((4096, 128256), "")],
    },
    "cpu": {
        "batchnorm": [((4096, 1024), "nc"), ((32, 64, 56, 56), "nchw"), ((32, 56, 56, 64), "nhwc")],
        "softmax": [((4096, 1000), ""), ((1024, 32000), "")],
    },
    "quick": {
        "batchnorm": [((256, 64), "nc"), ((8, 16, 8, 8), "nchw"), ((8, 8, 8, 16), "nhwc")],
        "softmax": [((256, 1000), "")],
    },
}
DEFAULT_DTYPES = {"gpu": ("float32", "float16"), "cpu": ("float32",)}

#: The NumPy path's speed targets (float32, median of 10, PyTorch on 2 threads): at least 2x the
#: seed's direct formulas and within 2.5x of PyTorch CPU, forward+backward.
CPU_CHECK = {"cases": [("bn_train", (4096, 1024), "nc"), ("ce_train", (4096, 1000), "")],
             "min_speedup_vs_seed": 2.0, "max_slowdown_vs_torch": 2.5, "repeat": 10, "threads": 2}


# ---------------------------------------------------------------------------------------------
# The math as array expressions (any array module): the float64 reference, and the CuPy peer
# ---------------------------------------------------------------------------------------------

def _kept(a, case: Case):
    """A per-channel vector as a broadcastable (keepdims) array."""
    shape = [1] * len(case.shape)
    shape[case.channel_axis] = case.channels
    return a.reshape(shape)


def _flat(a, case: Case):
    return a.reshape(case.channels)


def _expr_stats(xp, x, case: Case, ct):
    xc = x.astype(ct, copy=False)
    mean = xc.mean(axis=case.axes, keepdims=True)
    var = ((xc - mean) ** 2).mean(axis=case.axes, keepdims=True)
    return xc, mean, var


def expr_bn_stats(xp, inp, case, ct, out, momentum=None):
    _, mean, var = _expr_stats(xp, inp["x"], case, ct)
    return _flat(mean, case), _flat(var, case)


def expr_bn_forward(xp, inp, case, ct, out, momentum=None):
    """y, mean, invstd; with `momentum`, the running statistics are updated in place."""
    xc, mean, var = _expr_stats(xp, inp["x"], case, ct)
    invstd = 1 / xp.sqrt(var + EPS)
    y = ((xc - mean) * (invstd * _kept(inp["gamma"], case)) + _kept(inp["beta"], case)).astype(out)
    if momentum is not None:
        m = case.rows
        for name, stat in (("running_mean", mean), ("running_var", var * (m / (m - 1)))):
            r = inp[name]
            r *= 1 - momentum
            r += momentum * _flat(stat, case).astype(r.dtype)
    return y, _flat(mean, case), _flat(invstd, case)


def expr_bn_inference(xp, inp, case, ct, out, momentum=None):
    scale = _kept(inp["gamma"], case).astype(ct) / xp.sqrt(_kept(inp["running_var"], case).astype(ct) + EPS)
    shift = _kept(inp["beta"], case) - _kept(inp["running_mean"], case) * scale
    return ((inp["x"].astype(ct, copy=False) * scale + shift).astype(out),)


def _bn_backward(xp, dy, x, gamma, mean, invstd, case, ct, out):
    invstd = _kept(invstd, case).astype(ct)
    xhat = (x.astype(ct, copy=False) - _kept(mean, case)) * invstd
    dyc = dy.astype(ct, copy=False)
    dbeta = dyc.sum(axis=case.axes, keepdims=True)
    dgamma = (dyc * xhat).sum(axis=case.axes, keepdims=True)
    m = case.rows
    dx = ((_kept(gamma, case) * invstd / m) * (m * dyc - dbeta - xhat * dgamma)).astype(out)
    return dx, _flat(dgamma, case), _flat(dbeta, case)


def expr_bn_backward(xp, inp, case, ct, out, momentum=None):
    return _bn_backward(xp, inp["dy"], inp["x"], inp["gamma"], inp["mean"], inp["invstd"], case, ct, out)


def expr_bn_train(xp, inp, case, ct, out, momentum=None):
    y, mean, invstd = expr_bn_forward(xp, inp, case, ct, out, momentum)
    return (y,) + _bn_backward(xp, inp["dy"], inp["x"], inp["gamma"], mean, invstd, case, ct, out)


def _log_softmax(xp, z, ct):
    zc = z.astype(ct, copy=False)
    shifted = zc - zc.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def expr_softmax(xp, inp, case, ct, out, momentum=None):
    return (xp.exp(_log_softmax(xp, inp["z"], ct)).astype(out),)


def expr_log_softmax(xp, inp, case, ct, out, momentum=None):
    return (_log_softmax(xp, inp["z"], ct).astype(out),)


def _picked(xp, a, target, case):
    """a[row, target[row]] for every row (classes on the last axis)."""
    return a.reshape(case.rows, case.channels)[xp.arange(case.rows), target.reshape(-1)]


def expr_ce_forward(xp, inp, case, ct, out, momentum=None):
    logp = _log_softmax(xp, inp["z"], ct)
    return (-_picked(xp, logp, inp["target"], case).mean(),)


def expr_ce_train(xp, inp, case, ct, out, momentum=None):
    logp = _log_softmax(xp, inp["z"], ct)
    loss = -_picked(xp, logp, inp["target"], case).mean()
    dz = xp.exp(logp).reshape(case.rows, case.channels)
    dz[xp.arange(case.rows), inp["target"].reshape(-1)] -= 1
    dz *= 1 / case.rows
    return loss, dz.reshape(case.shape).astype(out)


# ---------------------------------------------------------------------------------------------
# Ops and their minimum-bytes models
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    """An op as benchmarked: what it returns, what it reads, the bytes it must move, its math.

    `min_bytes(case)`: each input read once and each output written once (E elements of s bytes,
    C channels or classes, R rows; per-channel vectors are float32). `expr` computes the outputs
    as array expressions; `updates_running`: the op updates running statistics in place.
    """
    name: str
    family: str
    title: str
    outputs: tuple[str, ...]
    needs: tuple[str, ...]
    min_bytes: Callable[[Case], int]
    expr: Callable[..., tuple]
    updates_running: bool = False


def _es(c: Case) -> int:
    return c.elements * c.itemsize


_BN_PARAMS = ("gamma", "beta", "running_mean", "running_var")
OPS: dict[str, Op] = {op.name: op for op in (
    # read x; write mean, var
    Op("batch_norm_stats", "batchnorm", "batch statistics", ("mean", "var"), ("x",),
       lambda c: _es(c) + 8 * c.channels, expr_bn_stats),
    # read x once (a kernel that keeps x on chip between stats and normalize), write y;
    # read gamma, beta, running stats; write mean, invstd, running stats
    Op("bn_forward", "batchnorm", "BN forward (training)", ("y", "mean", "invstd"), ("x",) + _BN_PARAMS,
       lambda c: 2 * _es(c) + 32 * c.channels, expr_bn_forward, updates_running=True),
    # read x, write y; read gamma, beta, running stats
    Op("bn_inference", "batchnorm", "BN inference", ("y",), ("x",) + _BN_PARAMS,
       lambda c: 2 * _es(c) + 16 * c.channels, expr_bn_inference),
    # read dy and x once (on chip between the reductions and dx), write dx;
    # read gamma, mean, invstd; write dgamma, dbeta
    Op("bn_backward", "batchnorm", "BN backward", ("dx", "dgamma", "dbeta"), ("dy", "x", "gamma", "mean", "invstd"),
       lambda c: 3 * _es(c) + 20 * c.channels, expr_bn_backward),
    # forward + backward of one training step: x is read again by the backward
    Op("bn_train", "batchnorm", "BN forward+backward", ("y", "dx", "dgamma", "dbeta"), ("x", "dy") + _BN_PARAMS,
       lambda c: 5 * _es(c) + 44 * c.channels, expr_bn_train, updates_running=True),
    # read z, write the probabilities
    Op("softmax_forward", "softmax", "softmax", ("y",), ("z",), lambda c: 2 * _es(c), expr_softmax),
    Op("log_softmax", "softmax", "log-softmax", ("y",), ("z",), lambda c: 2 * _es(c), expr_log_softmax),
    # read z and the int64 targets; the mean loss is one scalar
    Op("ce_forward", "softmax", "softmax + CE forward", ("loss",), ("z", "target"),
       lambda c: _es(c) + 8 * c.rows, expr_ce_forward),
    # read z and targets once, write dz (loss and gradient in one pass)
    Op("ce_train", "softmax", "softmax + CE forward+backward", ("loss", "dz"), ("z", "target"),
       lambda c: 2 * _es(c) + 8 * c.rows, expr_ce_train),
)}
FAMILIES = {fam: tuple(n for n, op in OPS.items() if op.family == fam) for fam in ("batchnorm", "softmax")}


def make_inputs(xp, rng, case: Case) -> dict[str, Any]:
    """The op's inputs: random, seeded, never zeros; per-channel vectors in float32.

    `rng` is a NumPy or CuPy Generator matching `xp`.
    """
    def normal(shape, scale=1.0, offset=0.0, dtype=case.dtype):
        wide = np.float64 if np.dtype(dtype) == np.float64 else np.float32
        return (rng.standard_normal(shape, dtype=wide) * scale + offset).astype(dtype, copy=False)

    c, f32 = (case.channels,), np.float32
    makers = {
        "x": lambda: normal(case.shape, 2.0, 0.5),
        "dy": lambda: normal(case.shape),
        "z": lambda: normal(case.shape, 3.0),
        "target": lambda: rng.integers(0, case.channels, case.shape[:-1], dtype=np.int64),
        "gamma": lambda: normal(c, 0.1, 1.0, f32),
        "beta": lambda: normal(c, 0.1, 0.0, f32),
        "running_mean": lambda: normal(c, 0.1, 0.0, f32),
        "running_var": lambda: (rng.random(c, dtype=f32) + 0.5),
    }
    inp = {name: makers[name]() for name in case.op.needs if name in makers}
    if "mean" in case.op.needs:  # the saved statistics of x, as a forward pass leaves them
        _, mean, var = _expr_stats(xp, inp["x"], case, f32)
        inp["mean"], inp["invstd"] = _flat(mean, case), _flat(1 / xp.sqrt(var + EPS), case)
    return inp


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------

class Unavailable(Exception):
    """The peer cannot run this case (reported, not an error of the peer)."""


class Skip(Exception):
    """The peer's row is not run this time (a time budget is spent)."""


class Wrong(Exception):
    """The result does not match the reference."""


Run = Callable[[], tuple]


class Peer:
    """An implementation to hold against the others.

    `device` is "cpu", "gpu" or "any". `build(case, sets)` does the untimed preparation (format
    conversion, autograd graphs, compilation) and returns one zero-argument callable per input
    set; each returns the op's outputs in `Op.outputs` order, None for an output it does not
    produce (it is then not checked).
    """
    name: str
    device: str

    def unavailable(self) -> str | None:
        """Why this peer cannot run on this machine, or None."""
        return None

    def supports(self, op: Op) -> bool:
        raise NotImplementedError

    def context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def build(self, case: Case, sets: list[dict]) -> list[Run]:
        raise NotImplementedError


class FunctionPeer(Peer):
    """A peer given as {op name: impl(case, inputs) -> run}."""

    def __init__(self, name: str, device: str, impls: dict[str, Callable[[Case, dict], Run]],
                 requires: str | None = None):
        self.name, self.device, self.impls, self.requires = name, device, impls, requires

    def unavailable(self) -> str | None:
        if self.requires:
            try:
                __import__(self.requires)
            except ImportError as e:
                return str(e)
        return None

    def supports(self, op: Op) -> bool:
        return op.name in self.impls

    def build(self, case: Case, sets: list[dict]) -> list[Run]:
        return [self.impls[case.op.name](case, inp) for inp in sets]


def _ours_bn_train(c: Case, i: dict) -> Run:
    def run():
        y, mean, invstd = gpu.batch_norm_forward(i["x"], i["gamma"], i["beta"], axis=c.axes, eps=EPS,
                                                 running_mean=i["running_mean"],
                                                 running_var=i["running_var"], momentum=MOMENTUM)
        return (y,) + gpu.batch_norm_backward(i["dy"], i["x"], i["gamma"], mean, invstd, axis=c.axes)
    return run


# Calls go through the `gpu` module's attributes at run time, so a test can swap one out.
OURS = {
    "batch_norm_stats": lambda c, i: lambda: gpu.batch_stats(i["x"], axis=c.axes),
    "bn_forward": lambda c, i: lambda: gpu.batch_norm_forward(
        i["x"], i["gamma"], i["beta"], axis=c.axes, eps=EPS, running_mean=i["running_mean"],
        running_var=i["running_var"], momentum=MOMENTUM),
    "bn_inference": lambda c, i: lambda: (gpu.batch_norm_inference(
        i["x"], i["gamma"], i["beta"], i["running_mean"], i["running_var"], axis=c.axes, eps=EPS),),
    "bn_backward": lambda c, i: lambda: gpu.batch_norm_backward(
        i["dy"], i["x"], i["gamma"], i["mean"], i["invstd"], axis=c.axes),
    "bn_train": _ours_bn_train,
    "softmax_forward": lambda c, i: lambda: (gpu.softmax(i["z"], axis=-1),),
    "log_softmax": lambda c, i: lambda: (gpu.log_softmax(i["z"], axis=-1),),
    "ce_forward": lambda c, i: lambda: (gpu.softmax_cross_entropy(i["z"], i["target"], axis=-1),),
    "ce_train": lambda c, i: lambda: gpu.softmax_cross_entropy(i["z"], i["target"], axis=-1, return_grad=True),
}


def _cupy_impl(op: Op) -> Callable[[Case, dict], Run]:
    def impl(case: Case, inp: dict) -> Run:
        import cupy
        ct = np.float64 if case.dtype == np.float64 else np.float32
        momentum = MOMENTUM if op.updates_running else None
        return lambda: op.expr(cupy, inp, case, ct, case.dtype, momentum)
    return impl


# ----- the seed's direct formulas (NumPy) -----------------------------------------------------

def _seed_forward(case, z, gamma, beta):
    ax = case.axes
    mean = z.mean(ax, keepdims=True)
    var = ((z - mean) ** 2).mean(ax, keepdims=True)
    z_norm = (z - mean) / np.sqrt(var + EPS)
    return _kept(gamma, case) * z_norm + _kept(beta, case), mean, var, z_norm


def _seed_backward(case, dy, z, gamma, mean, var, z_norm):
    """The textbook backward pass through mean, variance and normalization."""
    ax, m = case.axes, case.rows
    std_inv = 1 / np.sqrt(var + EPS)
    z_mu = z - mean
    dz_norm = dy * _kept(gamma, case)
    dvar = (dz_norm * z_mu).sum(ax, keepdims=True) * -0.5 * std_inv ** 3
    dmean = (-dz_norm * std_inv).sum(ax, keepdims=True) + dvar * (-2 * z_mu).mean(ax, keepdims=True)
    dz = dz_norm * std_inv + dvar * 2 * z_mu / m + dmean / m
    return dz, _flat((dy * z_norm).sum(ax), case), _flat(dy.sum(ax), case)


def _seed_softmax(z):
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _seed_ce(case, z, target, grad):
    a = _seed_softmax(z)
    rows = np.arange(case.rows)
    loss = -np.log(a.reshape(case.rows, -1)[rows, target.reshape(-1)]).mean()
    if not grad:
        return (loss,)
    y = np.zeros_like(a).reshape(case.rows, -1)
    y[rows, target.reshape(-1)] = 1
    return loss, (a - y.reshape(a.shape)) / case.rows


def _seed_bn_forward(c, i):
    def run():
        y, mean, var, _ = _seed_forward(c, i["x"], i["gamma"], i["beta"])
        return y, _flat(mean, c), None
    return run


def _seed_bn_stats(c, i):
    def run():
        mean = i["x"].mean(c.axes, keepdims=True)
        return _flat(mean, c), _flat(((i["x"] - mean) ** 2).mean(c.axes), c)
    return run


def _seed_bn_backward(c, i):
    # The seed's backward reads the forward's cache (mean, var, z_norm): rebuilt here, untimed.
    mean = _kept(i["mean"], c)
    var = 1 / _kept(i["invstd"], c) ** 2 - EPS
    z_norm = (i["x"] - mean) / np.sqrt(var + EPS)
    return lambda: _seed_backward(c, i["dy"], i["x"], i["gamma"], mean, var, z_norm)


def _seed_bn_train(c, i):
    def run():
        y, mean, var, z_norm = _seed_forward(c, i["x"], i["gamma"], i["beta"])
        return (y,) + _seed_backward(c, i["dy"], i["x"], i["gamma"], mean, var, z_norm)
    return run


SEED = {
    "batch_norm_stats": _seed_bn_stats,
    "bn_forward": _seed_bn_forward,
    "bn_inference": lambda c, i: lambda: (
        (i["x"] - _kept(i["running_mean"], c)) / np.sqrt(_kept(i["running_var"], c) + EPS)
        * _kept(i["gamma"], c) + _kept(i["beta"], c),),
    "bn_backward": _seed_bn_backward,
    "bn_train": _seed_bn_train,
    "softmax_forward": lambda c, i: lambda: (_seed_softmax(i["z"]),),
    "log_softmax": lambda c, i: lambda: (np.log(_seed_softmax(i["z"])),),
    "ce_forward": lambda c, i: lambda: _seed_ce(c, i["z"], i["target"], grad=False),
    "ce_train": lambda c, i: lambda: _seed_ce(c, i["z"], i["target"], grad=True),
}


# ----- PyTorch --------------------------------------------------------------------------------

def _torch_builders():
    """{op name: builder(case, tensors, wrap) -> run}; `wrap` is identity or torch.compile.

    Batch norm sees x with channels moved to axis 1 (a view: NHWC becomes channels_last); the
    backward ops time `torch.autograd.grad` on a graph built once per input set.
    """
    import torch
    F = torch.nn.functional

    def bn(case, t, *names):
        c = case.channel_axis
        return [t[n].movedim(c, 1) if n in ("x", "dy") else t[n] for n in names]

    def bn_forward(case, t, wrap):
        f = wrap(lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS))
        args = bn(case, t, "x", "gamma", "beta", "running_mean", "running_var")
        return lambda: (f(*args).movedim(1, case.channel_axis), None, None)

    def bn_inference(case, t, wrap):
        f = wrap(lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, False, 0.0, EPS))
        args = bn(case, t, "x", "gamma", "beta", "running_mean", "running_var")
        return lambda: (f(*args).movedim(1, case.channel_axis),)

    def bn_grads(case, t, wrap, with_forward):
        f = wrap(lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS))
        x, dy, w = bn(case, t, "x", "dy", "gamma")
        b = t["beta"] if "beta" in t else torch.zeros_like(w)
        leaves = (x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_())
        c = case.channel_axis
        if with_forward:
            def run():
                y = f(*leaves, t["running_mean"], t["running_var"])
                dx, dw, db = torch.autograd.grad(y, leaves, dy)
                return y.detach().movedim(1, c), dx.movedim(1, c), dw, db
            return run
        # the graph whose backward is timed; PyTorch saves mean and invstd of x as given to us
        y = f(*leaves, None, None)

        def run():
            dx, dw, db = torch.autograd.grad(y, leaves, dy, retain_graph=True)
            return dx.movedim(1, c), dw, db
        return run

    def classes_at_1(case, z):
        """cross_entropy wants classes on axis 1."""
        return z.movedim(-1, 1) if z.ndim > 2 else z

    def ce_forward(case, t, wrap):
        f = wrap(lambda z, y: F.cross_entropy(z, y))
        z = classes_at_1(case, t["z"])
        return lambda: (f(z, t["target"]),)

    def ce_train(case, t, wrap):
        f = wrap(lambda z, y: F.cross_entropy(z, y))
        z = classes_at_1(case, t["z"]).detach().requires_grad_()

        def run():
            loss = f(z, t["target"])
            (dz,) = torch.autograd.grad(loss, z)
            return loss.detach(), dz.movedim(1, -1) if dz.ndim > 2 else dz
        return run

    def unary(fn):
        def build(case, t, wrap):
            f = wrap(fn)
            return lambda: (f(t["z"]),)
        return build

    def batch_norm_stats(case, t, wrap):
        f = wrap(lambda x: torch.var_mean(x, dim=case.axes, correction=0))
        return lambda: f(t["x"])[::-1]

    return {
        "batch_norm_stats": batch_norm_stats,
        "bn_forward": bn_forward,
        "bn_inference": bn_inference,
        "bn_backward": functools.partial(bn_grads, with_forward=False),
        "bn_train": functools.partial(bn_grads, with_forward=True),
        "softmax_forward": unary(lambda z: torch.softmax(z, -1)),
        "log_softmax": unary(lambda z: torch.log_softmax(z, -1)),
        "ce_forward": ce_forward,
        "ce_train": ce_train,
    }


class TorchPeer(Peer):
    """PyTorch on the GPU (cuDNN on or off, eager or torch.compile) or on the CPU.

    Tensors are views of the benchmark's arrays (DLPack on the GPU, from_numpy on the CPU).
    """

    def __init__(self, name: str, device: str, *, cudnn: bool | None = None, compiled: bool = False,
                 families: Sequence[str] = ("batchnorm", "softmax")):
        self.name, self.device, self.cudnn, self.compiled = name, device, cudnn, compiled
        self.families = tuple(families)
        self.compile_budget = 0.0    # seconds of compilation left (torch.compile only)

    def unavailable(self) -> str | None:
        try:
            import torch
        except ImportError as e:
            return str(e)
        if self.device == "gpu" and not torch.cuda.is_available():
            return "torch.cuda is not available"
        if self.compiled:
            try:
                import triton  # noqa: F401  (inductor's GPU code generator)
            except ImportError as e:
                return f"torch.compile needs triton: {e}"
        return None

    def supports(self, op: Op) -> bool:
        return op.family in self.families

    def context(self):
        if self.cudnn is None:
            return contextlib.nullcontext()
        import torch
        return torch.backends.cudnn.flags(enabled=self.cudnn)

    def build(self, case: Case, sets: list[dict]) -> list[Run]:
        import torch
        builder = _torch_builders()[case.op.name]
        tensors = [{k: _to_torch(v) for k, v in inp.items()} for inp in sets]
        if not self.compiled:
            return [builder(case, t, lambda f: f) for t in tensors]
        if self.compile_budget <= 0:
            raise Skip("torch.compile time budget spent (--compile-budget)")
        # One cache across cases, as in use (new shapes recompile, dynamic after the first); past
        # the recompile limit dynamo would run eager silently, so the limit is raised.
        config = torch._dynamo.config
        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, limit):
                setattr(config, limit, max(getattr(config, limit), 1024))
        # bn_backward replays one compiled backward (retain_graph), which donated buffers forbid
        if hasattr(torch._functorch.config, "donated_buffer"):
            torch._functorch.config.donated_buffer = False
        start = time.perf_counter()
        try:
            runs = [builder(case, t, torch.compile) for t in tensors]
            runs[0]()  # compiles for this shape and dtype
        finally:
            self.compile_budget -= time.perf_counter() - start
        return runs


def _to_torch(a):
    import torch
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.from_dlpack(a)


#: The peers, in table order. Tests add entries to check how a wrong one is reported.
PEERS: list[Peer] = [
    FunctionPeer("ours", "any", OURS),
    FunctionPeer("cupy", "gpu", {name: _cupy_impl(op) for name, op in OPS.items()}, requires="cupy"),
    TorchPeer("torch-cudnn", "gpu", cudnn=True, families=("batchnorm",)),
    TorchPeer("torch", "gpu", cudnn=False),
    TorchPeer("torch-compile", "gpu", compiled=True),
    FunctionPeer("seed", "cpu", SEED),
    TorchPeer("torch-cpu", "cpu"),
]


# ---------------------------------------------------------------------------------------------
# Devices: arrays, timing, copy bandwidth
# ---------------------------------------------------------------------------------------------

def spec_bandwidth_gbps(name: str) -> float | None:
    for key, gbps in SPEC_BANDWIDTH_GBPS:
        if key in name:
            return gbps
    return None


def gpu_unavailable() -> str | None:
    """Why no CUDA GPU can be used through CuPy here, or None."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as e:  # ImportError, or CUDARuntimeError without a driver or device
        return f"{type(e).__name__}: {e}"
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        model = None
    return f"{model or platform.machine()}, {os.cpu_count()} logical cores"


class CpuDevice:
    kind = "cpu"
    xp = np
    l2_bytes = 0

    def __init__(self):
        self.name = _cpu_name()
        self.spec_gbps = None
        self.copy_gbps = None

    def rng(self, seed: int):
        return np.random.default_rng(seed)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        yield

    def measure_copy(self) -> None:
        """Copy bandwidth (read + write) of 64 MiB, beyond the last-level cache, median of 5."""
        src = np.full(2 ** 26 // 8, 1.5)
        dst = np.empty_like(src)
        times = self.time(lambda: np.copyto(dst, src), repeat=5, warmup=1, budget=math.inf)
        self.copy_gbps = 2 * src.nbytes / float(np.median(times)) / 1e9

    def time(self, fn: Callable[[], Any], repeat: int, warmup: int, budget: float) -> np.ndarray:
        for _ in range(warmup):
            fn()
        times, start = [], time.perf_counter()
        while len(times) < repeat:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if time.perf_counter() - start > budget and len(times) >= MIN_SAMPLES:
                break
        return np.asarray(times)

    def release(self) -> None:
        pass


class GpuDevice:
    """The current CUDA device through CuPy; PyTorch, when used, runs on the same stream."""
    kind = "gpu"

    def __init__(self):
        import cupy
        self.cp = self.xp = cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        self.name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        self.l2_bytes = int(props["l2CacheSize"])
        self.spec_gbps = spec_bandwidth_gbps(self.name)
        self.copy_gbps = None
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def rng(self, seed: int):
        return self.cp.random.default_rng(seed)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make one stream current for CuPy, this library and (if imported) PyTorch."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.stream)
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available():
                stack.enter_context(torch.cuda.stream(torch.cuda.ExternalStream(self.stream.ptr)))
            yield

    def measure_copy(self) -> None:
        """Device-to-device copy bandwidth (read + write) of 512 MiB, median of 20."""
        src = self.cp.random.default_rng(0).random(2 ** 29 // 4, dtype=np.float32)
        dst = self.cp.empty_like(src)
        times = self.time(lambda: dst.data.copy_from_device_async(src.data, src.nbytes),
                          repeat=20, warmup=3, budget=math.inf)
        self.copy_gbps = 2 * src.nbytes / float(np.median(times)) / 1e9
        del src, dst
        self.release()

    def time(self, fn: Callable[[], Any], repeat: int, warmup: int, budget: float) -> np.ndarray:
        from cupyx.profiler import benchmark
        return benchmark(fn, n_repeat=repeat, n_warmup=warmup, max_duration=budget).gpu_times[0]

    def release(self) -> None:
        self.stream.synchronize()
        self.cp.get_default_memory_pool().free_all_blocks()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Checking and timing one case
# ---------------------------------------------------------------------------------------------

def _as_array(a, xp):
    """A peer's output as an array of xp; a torch tensor is viewed, anything else must be xp's."""
    if type(a).__module__.startswith("torch"):
        a = a.detach()
        return a.numpy() if xp is np else xp.from_dlpack(a)
    if xp is np:
        return np.asarray(a)
    if not isinstance(a, xp.ndarray):
        raise Wrong(f"returned {type(a).__module__}.{type(a).__name__} for CuPy inputs")
    return a


def check(outputs: tuple, reference: tuple, case: Case, xp) -> float:
    """The largest relative error over the checked outputs; raises Wrong past the tolerance."""
    names = case.op.outputs
    if not isinstance(outputs, tuple) or len(outputs) != len(names):
        raise Wrong(f"returned {type(outputs).__name__} of {len(outputs) if isinstance(outputs, tuple) else 1}"
                    f" items, expected {len(names)} ({', '.join(names)})")
    if outputs[0] is None:
        raise Wrong(f"no {names[0]}")
    tol, worst = TOLERANCE[case.dtype], 0.0
    for name, out, ref in zip(names, outputs, reference):
        if out is None:
            continue
        out = _as_array(out, xp)
        if out.shape != ref.shape:
            raise Wrong(f"{name}: shape {out.shape}, expected {ref.shape}")
        out = out.astype(np.float64)
        if not bool(xp.isfinite(out).all()):
            raise Wrong(f"{name}: non-finite values")
        den = float(xp.linalg.norm(ref.ravel()))
        err = float(xp.linalg.norm((out - ref).ravel())) / (den or 1.0)
        worst = max(worst, err)
        if not err <= tol:
            raise Wrong(f"{name}: relative error {err:.3g} > {tol:g}")
    return worst


@dataclass
class Row:
    op: str
    title: str
    shape: tuple[int, ...]
    layout: str
    axis: tuple[int, ...]
    dtype: str
    device: str
    peer: str
    status: str = "ok"          # ok | WRONG | error | unavailable | skipped
    detail: str = ""
    max_rel_err: float | None = None
    time_ms: float | None = None
    samples: int = 0
    input_sets: int = 1
    l2_resident: bool = False
    bytes: int = 0
    gbps: float | None = None
    pct_copy: float | None = None
    pct_spec: float | None = None
    speedup: float | None = None

    def case_label(self) -> str:
        return " ".join(filter(None, ("x".join(map(str, self.shape)), self.layout, self.dtype)))

    def as_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"], d["axis"] = list(self.shape), list(self.axis)
        return d


@dataclass
class Settings:
    repeat: int
    warmup: int
    budget: float
    deadline: float     # time.perf_counter() after which the remaining rows are skipped
    seed: int = 0


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def run_case(case: Case, peers: Sequence[Peer], device, settings: Settings,
             tick: Callable[[], None] = lambda: None) -> list[Row]:
    """Check, then time, every peer on one case; rows in `peers` order."""
    rows = [Row(case.op.name, case.op.title, case.shape, case.layout, case.axes, case.dtype.name,
                device.kind, p.name, bytes=case.op.min_bytes(case)) for p in peers]
    if time.perf_counter() > settings.deadline:
        for row in rows:
            row.status, row.detail = "skipped", "time limit (--time-limit)"
            tick()
        return rows
    xp = device.xp
    try:
        rng = device.rng(settings.seed)
        sets = [make_inputs(xp, rng, case)]
        set_bytes = sum(a.nbytes for a in sets[0].values())
        n_sets = 1
        if device.l2_bytes:
            n_sets = min(MAX_INPUT_SETS, max(1, -(-ROTATE_L2_FACTOR * device.l2_bytes // set_bytes)))
        sets += [make_inputs(xp, rng, case) for _ in range(n_sets - 1)]
        wide = np.float64
        reference = case.op.expr(xp, sets[0], case, wide, wide)
    except Exception as e:  # out of memory for a --shape, typically
        for row in rows:
            row.status, row.detail = "error", f"inputs/reference: {_one_line(e)}"
            tick()
        device.release()
        return rows

    for peer, row in zip(peers, rows):
        row.input_sets, row.l2_resident = n_sets, n_sets * set_bytes < 2 * device.l2_bytes
        if time.perf_counter() > settings.deadline:
            row.status, row.detail = "skipped", "time limit (--time-limit)"
            tick()
            continue
        try:
            with peer.context():
                runs = peer.build(case, sets)
                row.max_rel_err = check(runs[0](), reference, case, xp)
                cycle = itertools.cycle(runs)
                times = device.time(lambda: next(cycle)(), settings.repeat, settings.warmup, settings.budget)
            row.time_ms = float(np.median(times)) * 1e3
            row.samples = len(times)
            row.gbps = row.bytes / (row.time_ms * 1e-3) / 1e9
            if device.copy_gbps:
                row.pct_copy = 100 * row.gbps / device.copy_gbps
            if device.spec_gbps:
                row.pct_spec = 100 * row.gbps / device.spec_gbps
        except Wrong as e:
            row.status, row.detail = "WRONG", str(e)
        except (Unavailable, NotImplementedError) as e:
            row.status, row.detail = "unavailable", str(e) or type(e).__name__
        except Skip as e:
            row.status, row.detail = "skipped", str(e)
        except Exception as e:
            row.status, row.detail = "error", _one_line(e)
            device.release()
        finally:
            runs = cycle = None  # the peer's closures hold its tensors and graphs: drop them now
        tick()
    del sets, reference
    device.release()

    done = [r for r in rows if r.status == "ok"]
    for r in done:
        others = [o.time_ms for o in done if o is not r]
        r.speedup = min(others) / r.time_ms if others else None
    return rows


# ---------------------------------------------------------------------------------------------
# Reporting: terminal table, JSON, plot, the CPU speed check
# ---------------------------------------------------------------------------------------------

def _fmt(v, spec: str, width: int) -> str:
    return (format(v, spec) if v is not None else "").rjust(width)


def format_table(rows: Sequence[Row]) -> str:
    head = (f"{'op':<16} {'shape':<20} {'dtype':<7} {'peer':<13} {'ms':>9} {'GB/s':>8} "
            f"{'%copy':>6} {'%spec':>6} {'vs best':>8}  status")
    lines, prev = [head, "-" * len(head)], None
    for r in rows:
        key = (r.op, r.shape, r.layout, r.dtype)
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        shape = " ".join(filter(None, ("x".join(map(str, r.shape)), r.layout)))
        status = "" if r.status == "ok" else f"{r.status}: {r.detail}"
        lines.append(f"{r.op:<16} {shape:<20} {r.dtype:<7} {r.peer:<13} {_fmt(r.time_ms, '.4g', 9)}"
                     f" {_fmt(r.gbps, '.1f', 8)} {_fmt(r.pct_copy, '.0f', 6)} {_fmt(r.pct_spec, '.0f', 6)}"
                     f" {_fmt(r.speedup, '.2f', 7)}{'x' if r.speedup is not None else ' '}  {status}")
    return "\n".join(lines)


def cpu_check_report(rows: Sequence[Row]) -> tuple[str, list[dict]]:
    """The NumPy path against the seed's formulas and PyTorch CPU, with the targets."""
    lo, hi = CPU_CHECK["min_speedup_vs_seed"], CPU_CHECK["max_slowdown_vs_torch"]
    out, lines = [], [f"{'workload':<42} {'ours ms':>8} {'seed ms':>8} {'torch ms':>8}"
                      f"   seed/ours (>= {lo:g})   ours/torch (<= {hi:g})"]
    for op, shape, layout in CPU_CHECK["cases"]:
        t = {r.peer: r.time_ms for r in rows if r.op == op and r.shape == shape and r.status == "ok"}
        ours, seed, torch = t.get("ours"), t.get("seed"), t.get("torch-cpu")
        vs_seed = seed / ours if ours and seed else None
        vs_torch = ours / torch if ours and torch else None
        verdict = lambda v, good: "n/a" if v is None else f"{v:.2f}x {'ok' if good(v) else 'MISSED'}"
        name = f"{OPS[op].title} {'x'.join(map(str, shape))}"
        lines.append(f"{name:<42} {_fmt(ours, '.2f', 8)} {_fmt(seed, '.2f', 8)} {_fmt(torch, '.2f', 8)}"
                     f"   {verdict(vs_seed, lambda v: v >= lo):<20}   {verdict(vs_torch, lambda v: v <= hi)}")
        out.append({"op": op, "shape": list(shape), "ours_ms": ours, "seed_ms": seed, "torch_ms": torch,
                    "seed_over_ours": vs_seed, "ours_over_torch": vs_torch})
    return "\n".join(lines), out


def plot(rows: Sequence[Row], device, path: str) -> None:
    """GB/s per case and peer, one panel per op, with the measured copy bandwidth as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r.op for r in rows))
    ncol = min(3, len(ops))
    nrow = -(-len(ops) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6 * ncol, 4.2 * nrow), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        mine = [r for r in rows if r.op == op]
        labels = list(dict.fromkeys(r.case_label() for r in mine))
        for peer in dict.fromkeys(r.peer for r in mine):
            pts = [(labels.index(r.case_label()), r.gbps) for r in mine if r.peer == peer and r.gbps is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", lw=1, label=peer)
        if device.copy_gbps:
            ax.axhline(device.copy_gbps, color="k", lw=1, ls="--", label="copy (measured)")
        if device.spec_gbps:
            ax.axhline(device.spec_gbps, color="gray", lw=1, ls=":", label="spec")
        ax.set_title(OPS[op].title)
        ax.set_ylabel("GB/s (minimum bytes)")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    fig.suptitle(f"gpu-bench on {device.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(v: float) -> float | None:
    """JSON has no infinity: an unlimited setting is written as null."""
    return v if math.isfinite(v) else None


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    out = {"gpu": gpu.__version__, "python": platform.python_version(), "numpy": np.__version__}
    for name in ("cupy", "torch"):
        mod = sys.modules.get(name)
        out[name] = getattr(mod, "__version__", None) if mod else None
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _csv(choices: Sequence[str] | None = None, expand: dict[str, Sequence[str]] | None = None):
    def parse(text: str) -> list[str]:
        out = []
        for item in filter(None, (s.strip() for s in text.split(","))):
            items = list(expand[item]) if expand and item in expand else [item]
            bad = [i for i in items if choices is not None and i not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad[0]!r}: expected one of {', '.join(choices)}"
                                                 + (f" or {', '.join(expand)}" if expand else ""))
            out += items
        return out
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Ops: " + ", ".join(OPS) + ". Peers: " + ", ".join(p.name for p in PEERS)
                                + ". Bytes models and method: docs/BENCHMARKS.md.")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: the GPU when CuPy sees one, else the CPU comparison")
    p.add_argument("--quick", action="store_true", help="a tiny suite (seconds)")
    p.add_argument("--cpu-check", action="store_true",
                   help="the NumPy path against the seed's formulas and PyTorch CPU: BN and softmax-CE "
                        "forward+backward, float32, median of 10, PyTorch on 2 threads")
    p.add_argument("--op", type=_csv(list(OPS), FAMILIES), help="ops or families (batchnorm, softmax)")
    p.add_argument("--shape", action="append", type=parse_shape, metavar="AxBx..[:LAYOUT]",
                   help="replace the suite's shapes (repeatable); LAYOUT nc|nchw|nhwc for batch norm")
    p.add_argument("--dtype", type=_csv(["float32", "float16", "float64"]),
                   help="default: float32,float16 on the GPU, float32 on the CPU")
    p.add_argument("--peer", type=_csv([p.name for p in PEERS]), help="only these peers")
    p.add_argument("--repeat", type=int, help="timed calls per row at most (GPU 100, CPU 10)")
    p.add_argument("--warmup", type=int, help="untimed calls per row after the check (GPU 3, CPU 1)")
    p.add_argument("--budget", type=float, help="seconds of timed calls per row (GPU 0.1, CPU 1)")
    p.add_argument("--time-limit", type=float, default=math.inf, metavar="SECONDS",
                   help="skip the rows that would start after this many seconds")
    p.add_argument("--compile-budget", type=float, default=90.0, metavar="SECONDS",
                   help="total seconds torch.compile may spend compiling before its rows are skipped")
    p.add_argument("--threads", type=int, help="PyTorch CPU threads (default: PyTorch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every row and the run's context as JSON")
    p.add_argument("--plot", metavar="PATH", help="GB/s per shape and peer as an image (matplotlib)")
    args = p.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat: at least 1")
    if args.cpu_check and (args.quick or args.shape or args.op):
        p.error("--cpu-check runs its own cases: drop --quick, --shape and --op")
    return args


def build_cases(args: argparse.Namespace, device_kind: str) -> list[Case]:
    """Cases ordered dtype-major (float32 first), so a time limit cuts float16 rows first."""
    if args.cpu_check:
        return [Case(OPS[op], shape, layout, np.dtype(np.float32)) for op, shape, layout in CPU_CHECK["cases"]]
    suite = SUITES["quick" if args.quick else device_kind]
    dtypes = args.dtype or DEFAULT_DTYPES[device_kind]
    cases = []
    for dt in dtypes:
        for name in args.op or list(OPS):
            op = OPS[name]
            if args.shape:
                shapes = [(s, "" if op.family == "softmax" else layout or ("nc" if len(s) == 2 else "nchw"))
                          for s, layout in args.shape]
            else:
                shapes = suite[op.family]
            cases += [Case(op, shape, layout, np.dtype(dt)) for shape, layout in shapes]
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; see the module docstring. Returns the exit status."""
    args = parse_args(argv)
    started = time.perf_counter()
    kind = "cpu" if args.cpu_check else args.device
    why_not = gpu_unavailable() if kind in ("auto", "gpu") else "not asked for"
    if kind == "gpu" and why_not:
        print(f"gpu-bench: --device gpu, but no GPU is usable: {why_not}", file=sys.stderr)
        return 2
    device = GpuDevice() if kind != "cpu" and not why_not else CpuDevice()
    if args.cpu_check:
        args.threads = args.threads or CPU_CHECK["threads"]
    on_gpu = device.kind == "gpu"
    def given(value, default):
        return default if value is None else value
    settings = Settings(repeat=given(args.repeat, CPU_CHECK["repeat"] if args.cpu_check else 100 if on_gpu else 10),
                        warmup=given(args.warmup, 3 if on_gpu else 1),
                        budget=given(args.budget, math.inf if args.cpu_check else 0.1 if on_gpu else 1.0),
                        deadline=started + args.time_limit, seed=args.seed)

    peer_status: dict[str, str] = {}
    peers = []
    for peer in PEERS:
        if peer.device not in ("any", device.kind) or (args.peer and peer.name not in args.peer):
            continue
        reason = peer.unavailable()
        peer_status[peer.name] = reason or "ok"
        if reason is None:
            peers.append(peer)
            if isinstance(peer, TorchPeer) and peer.compiled:
                peer.compile_budget = args.compile_budget
    if args.threads and any(p.name == "torch-cpu" for p in peers):
        import torch
        torch.set_num_threads(args.threads)

    cases = build_cases(args, device.kind)
    rows: list[Row] = []
    interrupted = False
    print(f"gpu-bench {gpu.__version__} on {device.kind}: {device.name}", flush=True)
    for name, status in peer_status.items():
        if status != "ok":
            print(f"  peer {name} unavailable: {status}")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        with device.active():
            device.measure_copy()
            print(f"  copy bandwidth (read + write, measured): {device.copy_gbps:.1f} GB/s"
                  + (f"; spec {device.spec_gbps:.0f} GB/s" if device.spec_gbps else ""), flush=True)
            total = sum(1 for c in cases for p in peers if p.supports(c.op))
            with _progress(total) as bar:
                for case in cases:
                    here = [p for p in peers if p.supports(case.op)]
                    bar.set_description(f"{case.op.name} {case.label()} {case.dtype.name}")
                    rows += run_case(case, here, device, settings, tick=lambda: bar.update(1))
    except KeyboardInterrupt:
        interrupted = True
        print("gpu-bench: interrupted; reporting the rows done so far", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, old_term)

    print(format_table(rows))
    report = {
        "schema": 1, "tool": "gpu-bench",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(), "host": platform.node(), "argv": list(sys.argv[1:] if argv is None else argv),
        "device": {"kind": device.kind, "name": device.name, "copy_gbps": device.copy_gbps,
                   "spec_gbps": device.spec_gbps, "l2_bytes": device.l2_bytes},
        "versions": _versions(), "peers": peer_status,
        "settings": {"repeat": settings.repeat, "warmup": settings.warmup, "seed": settings.seed,
                     "budget_s": _finite(settings.budget), "time_limit_s": _finite(args.time_limit),
                     "threads": args.threads, "compile_budget_s": args.compile_budget},
        "interrupted": interrupted, "seconds": round(time.perf_counter() - started, 1),
        "rows": [r.as_json() for r in rows],
    }
    if args.cpu_check:
        text, report["cpu_check"] = cpu_check_report(rows)
        print(f"\nNumPy path speed check (float32, median of {settings.repeat}, "
              f"PyTorch on {args.threads} threads)\n{text}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    if args.plot:
        try:
            plot(rows, device, args.plot)
        except ImportError as e:
            print(f"gpu-bench: --plot needs matplotlib ({e})", file=sys.stderr)

    wrong = [r for r in rows if r.status == "WRONG" or (r.peer == "ours" and r.status == "error")]
    summary = {s: sum(r.status == s for r in rows) for s in ("ok", "WRONG", "error", "unavailable", "skipped")}
    print("\n" + ", ".join(f"{n} {s}" for s, n in summary.items() if n)
          + f" rows in {time.perf_counter() - started:.0f} s" + (" (interrupted)" if interrupted else ""))
    return 1 if wrong or interrupted else 0


@contextlib.contextmanager
def _progress(total: int):
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None:
        class _Silent:
            def set_description(self, text):
                pass

            def update(self, n):
                pass
        yield _Silent()
        return
    with tqdm(total=total, file=sys.stderr, disable=None, leave=False, unit="row") as bar:
        yield bar


if __name__ == "__main__":
    sys.exit(main())
