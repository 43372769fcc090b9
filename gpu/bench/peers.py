"""The peers: the implementations a case is held against, and their registry `PEERS` (the
tests add wrong ones to it). A peer's run may raise `Unavailable` or `Skip`; `Wrong` is what
checking its result raises."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Sequence

import numpy as np

from .records import MOMENTUM, OPS, TORCH_FUNCTIONAL, Case, Op, Run

class Unavailable(Exception):
    """The peer cannot run this case (reported, not an error of the peer)."""


class Skip(Exception):
    """The peer's row is not run this time (a time budget is spent)."""


class Wrong(Exception):
    """The result does not match the reference."""


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


def _cupy_impl(op: Op) -> Callable[[Case, dict], Run]:
    """The reference in CuPy expressions: float32 compute (float64 for float64), outputs of x's
    shape stored in x's dtype, per-channel vectors and the loss in the compute dtype."""
    def impl(case: Case, inp: dict) -> Run:
        ct = np.float64 if case.dtype == np.float64 else np.float32
        momentum = MOMENTUM if op.updates_running else None

        def run() -> tuple:
            out = op.reference(case, inp, ct, momentum)
            return tuple(o.astype(case.dtype, copy=False) if o is not None and o.shape == case.shape else o
                         for o in out)
        return run
    return impl


class TorchPeer(Peer):
    """PyTorch on the GPU (cuDNN on or off, eager or torch.compile) or on the CPU.

    Tensors are views of the benchmark's arrays (DLPack on the GPU, from_numpy on the CPU).
    """

    def __init__(self, name: str, device: str, *, cudnn: bool | None = None, compiled: bool = False,
                 families: Sequence[str] = ("batch_norm", "softmax")):
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
        return op.torch is not None and op.family in self.families

    def context(self):
        if self.cudnn is None:
            return contextlib.nullcontext()
        import torch
        return torch.backends.cudnn.flags(enabled=self.cudnn)

    def build(self, case: Case, sets: list[dict]) -> list[Run]:
        import torch
        builder = case.op.torch
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
        # batch_norm_backward replays one compiled backward (retain_graph), which donated buffers forbid
        if hasattr(torch._functorch.config, "donated_buffer"):
            torch._functorch.config.donated_buffer = False
        start = time.perf_counter()
        try:
            runs = [builder(case, t, torch.compile) for t in tensors]
            runs[0]()  # compiles for this shape and dtype
        finally:
            self.compile_budget -= time.perf_counter() - start
        return runs


class TorchInteropPeer(TorchPeer):
    """This library's ops called through PyTorch (`gpu.torch`): the PyTorch peer's builders with
    `gpu.torch` in place of torch.nn.functional, on the device's tensors (`--framework torch`)."""

    OPS = ("batch_norm_forward", "batch_norm_inference", "batch_norm_backward", "batch_norm_train",
           "batch_norm_add_relu_train", "batch_norm_add_relu_inference",
           "softmax_cross_entropy", "softmax_cross_entropy_train")

    def __init__(self, name: str = "ours-torch"):
        super().__init__(name, "any")

    def unavailable(self) -> str | None:
        try:
            import gpu.torch  # noqa: F401
        except ImportError as e:
            return str(e)
        return None

    def supports(self, op: Op) -> bool:
        return op.name in self.OPS

    def build(self, case: Case, sets: list[dict]) -> list[Run]:
        import gpu.torch
        token = TORCH_FUNCTIONAL.set(gpu.torch)
        try:
            return super().build(case, sets)
        finally:
            TORCH_FUNCTIONAL.reset(token)


#: `gpu-bench --framework torch`: this library through PyTorch, beside this library on arrays and
#: PyTorch's own ops; the interop overhead is ours-torch's time minus ours'
TORCH_FRAMEWORK_PEERS = ("ours", "ours-torch", "torch-cudnn", "torch", "torch-cpu")
INTEROP_PEER = TorchInteropPeer()


def _to_torch(a):
    import torch
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.from_dlpack(a)


#: The peers, in table order. Tests add entries to check how a wrong one is reported.
PEERS: list[Peer] = [
    FunctionPeer("ours", "any", {name: op.ours for name, op in OPS.items()}),
    # a fused op as the composition of this library's unfused ops
    FunctionPeer("ours-unfused", "any", {name: op.unfused for name, op in OPS.items() if op.unfused is not None}),
    FunctionPeer("cupy", "gpu", {name: _cupy_impl(op) for name, op in OPS.items()}, requires="cupy"),
    TorchPeer("torch-cudnn", "gpu", cudnn=True, families=("batch_norm",)),
    TorchPeer("torch", "gpu", cudnn=False),
    TorchPeer("torch-compile", "gpu", compiled=True),
    FunctionPeer("seed", "cpu", {name: op.seed for name, op in OPS.items() if op.seed is not None}),
    TorchPeer("torch-cpu", "cpu"),
]
