"""The harness: peers, devices, timing, and checking before timing; one case -> rows.

Generic over the op records of `records.py`. `PEERS` is the registry of peers (the tests add
wrong ones to it); `run_case` checks every peer against the float64 reference, then times it;
`measure_host` times this library's Python dispatch with the kernel launch made a no-op.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

import gpu

from .records import MOMENTUM, OPS, TORCH_FUNCTIONAL, Case, Op, Run, make_inputs

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

# Default suites by family: (shape, batch-norm layout). Realistic sizes: dense layers from a small
# batch to a large one, CNN activations early (large H, W) and late (many channels), classifier
# heads from ImageNet to a 128k-token vocabulary.
SUITES = {
    "gpu": {
        "batch_norm": [((256, 1024), "nc"), ((8192, 1024), "nc"), ((262144, 256), "nc"),
                       ((32, 64, 112, 112), "nchw"), ((256, 256, 14, 14), "nchw"), ((64, 2048, 7, 7), "nchw"),
                       ((32, 112, 112, 64), "nhwc"), ((256, 14, 14, 256), "nhwc"), ((64, 7, 7, 2048), "nhwc")],
        "softmax": [((4096, 1000), ""), ((8192, 32000), ""), ((4096, 128256), "")],
    },
    "cpu": {
        "batch_norm": [((4096, 1024), "nc"), ((32, 64, 56, 56), "nchw"), ((32, 56, 56, 64), "nhwc")],
        "softmax": [((4096, 1000), ""), ((1024, 32000), "")],
    },
    "quick": {
        "batch_norm": [((256, 64), "nc"), ((8, 16, 8, 8), "nchw"), ((8, 8, 8, 16), "nhwc")],
        "softmax": [((256, 1000), "")],
    },
    # `--headline`: the shapes of the headline, for a short GPU run (scripts/gpu_check.sh): a dense
    # layer and an early CNN activation; an ImageNet head and an LLM vocabulary
    "headline": {
        "batch_norm": [((4096, 1024), "nc"), ((32, 64, 56, 56), "nchw")],
        "softmax": [((4096, 1000), ""), ((8192, 32000), "")],
    },
}
DEFAULT_DTYPES = {"gpu": ("float32", "float16"), "cpu": ("float32",)}

#: The NumPy path's speed targets (float32, median of 10, PyTorch on 2 threads): at least 2x the
#: seed's direct formulas, and against PyTorch CPU within 1.2x for BN forward+backward and at or
#: better for softmax-CE forward+backward (`max_slowdown_vs_torch`, per case).
CPU_CHECK = {"cases": [("batch_norm_train", (4096, 1024), "nc"), ("softmax_cross_entropy_train", (4096, 1000), "")],
             "min_speedup_vs_seed": 2.0,
             "max_slowdown_vs_torch": {"batch_norm_train": 1.2, "softmax_cross_entropy_train": 1.0},
             "repeat": 10, "threads": 2}

#: `--host`: the goal for this library's Python dispatch per public call, and how it is timed
#: (the median over batches of calls; `--repeat` sets the calls per batch)
HOST = {"goal_us": 25.0, "batches": 7, "calls": 300, "warmup": 5}


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------

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
    FunctionPeer("cupy", "gpu", {name: _cupy_impl(op) for name, op in OPS.items()}, requires="cupy"),
    TorchPeer("torch-cudnn", "gpu", cudnn=True, families=("batch_norm",)),
    TorchPeer("torch", "gpu", cudnn=False),
    TorchPeer("torch-compile", "gpu", compiled=True),
    FunctionPeer("seed", "cpu", {name: op.seed for name, op in OPS.items() if op.seed is not None}),
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
    interop_ms: float | None = None     # ours-torch only: its time minus ours' (the interop overhead)

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
        reference = case.op.reference(case, sets[0], np.float64)
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
    done = [r for r in rows if r.status == "ok"]
    ours = next((r for r in done if r.peer == "ours"), None)
    for peer, r in zip(peers, rows):
        if isinstance(peer, TorchInteropPeer) and r.status == "ok" and ours is not None:
            try:
                r.interop_ms = interop_overhead(case, sets, next(p for p in peers if p.name == "ours"), peer,
                                                device, settings)
            except Exception as e:
                r.detail = f"interop: {_one_line(e)}"
                device.release()
    del sets, reference
    device.release()

    for r in done:
        others = [o.time_ms for o in done if o is not r]
        r.speedup = min(others) / r.time_ms if others else None
    return rows


def interop_overhead(case: Case, sets: list[dict], ours: Peer, through: Peer, device, settings: Settings) -> float:
    """ms that calling this library through PyTorch adds: the median of paired differences, each
    sample two pairs back to back on the same inputs, `through` then `ours`, then `ours` then
    `through`, so that both see the same machine state (warm caches, the same load) and the order
    cancels: the second call of a pair pays for what the first left behind (at 1 GB a call, the
    first touch of memory the allocator just returned to the system: +-200 ms of order bias seen
    on a CPU with one order only). Two medians measured minutes apart on a shared machine differ
    by more than the overhead itself."""
    with ours.context(), through.context():
        a, b = itertools.cycle(ours.build(case, sets)), itertools.cycle(through.build(case, sets))
        for _ in range(max(1, settings.warmup)):
            next(a)()
            next(b)()
        diffs, start = [], time.perf_counter()
        while len(diffs) < settings.repeat:
            tb = device.time(lambda: next(b)(), 1, 0, math.inf)[0]
            ta = device.time(lambda: next(a)(), 1, 0, math.inf)[0]
            ta2 = device.time(lambda: next(a)(), 1, 0, math.inf)[0]
            tb2 = device.time(lambda: next(b)(), 1, 0, math.inf)[0]
            diffs.append((tb - ta + tb2 - ta2) / 2)
            if time.perf_counter() - start > settings.budget and len(diffs) >= MIN_SAMPLES:
                break
        a = b = None
    return float(np.median(diffs)) * 1e3




# ---------------------------------------------------------------------------------------------
# The host path: Python dispatch per public call, the kernel launch a no-op
# ---------------------------------------------------------------------------------------------

@dataclass
class HostRow:
    """One op's host-path figures: microseconds and kernel launches per public call, PyTorch
    CPU's own time per call on the same inputs as the anchor."""
    op: str
    title: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    status: str = "ok"          # ok | error
    detail: str = ""
    us_per_call: float | None = None
    launches_per_call: float | None = None
    calls: int = 0
    torch_us_per_call: float | None = None
    torch_status: str = "unavailable"   # ok | unavailable | error: ...
    goal_us: float = HOST["goal_us"]

    @property
    def meets_goal(self) -> bool | None:
        return None if self.us_per_call is None else self.us_per_call <= self.goal_us

    def as_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"], d["meets_goal"] = list(self.shape), self.meets_goal
        return d


def _per_call_us(fn: Callable[[], Any], calls: int, batches: int, warmup: int) -> float:
    """The median over `batches` of the mean time of `calls` back-to-back calls, in microseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return float(np.median(times)) * 1e6


def host_cases(names: Sequence[str] | None = None) -> list[Case]:
    """The `--host` cases: every op (of `names`) with a `host_shape`, float32, NumPy arrays."""
    ops = [OPS[n] for n in (names or OPS) if OPS[n].host_shape is not None]
    return [Case(op, op.host_shape, "nc" if op.family == "batch_norm" else "", np.dtype(np.float32)) for op in ops]


def measure_host(cases: Sequence[Case], calls: int = HOST["calls"], batches: int = HOST["batches"],
                 warmup: int = HOST["warmup"], seed: int = 0,
                 tick: Callable[[], None] = lambda: None) -> list[HostRow]:
    """This library's host path per public call under the emulate backend, with every kernel
    launch recorded and skipped (`gpu._kernels.recording_launches(run=False)`); beside it PyTorch
    CPU's time per call for the same op. Needs no GPU and no CuPy; the first call builds the
    emulated kernels (g++, seconds), untimed."""
    from gpu._kernels import recording_launches

    try:
        import torch
        torch_missing = None
    except ImportError as e:
        torch, torch_missing = None, f"unavailable: {e}"
    rows = []
    for case in cases:
        op = case.op
        row = HostRow(op.name, op.title, case.shape, case.dtype.name, calls=calls * batches)
        inp = make_inputs(np, np.random.default_rng(seed), case)
        try:
            run = op.ours(case, inp)
            with gpu.use_backend("emulate"), recording_launches(run=False) as log:
                for _ in range(warmup):
                    run()
                before = log.count
                row.us_per_call = _per_call_us(run, calls, batches, warmup=0)
                row.launches_per_call = (log.count - before) / (calls * batches)
        except Exception as e:
            row.status, row.detail = "error", _one_line(e)
        if torch is None:
            row.torch_status = torch_missing
        elif op.torch is None:
            row.torch_status = "unavailable: no PyTorch call for this op"
        else:
            try:
                trun = op.torch(case, {k: torch.from_numpy(v) for k, v in inp.items()}, lambda f: f)
                row.torch_us_per_call = _per_call_us(trun, calls, batches, warmup)
                row.torch_status = "ok"
            except Exception as e:
                row.torch_status = f"error: {_one_line(e)}"
        rows.append(row)
        tick()
    return rows
