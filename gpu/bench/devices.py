"""Devices: the CPU and the current CUDA device through CuPy; their arrays, random inputs,
timing, copy bandwidth and datasheet bandwidth."""
from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np

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

MIN_SAMPLES = 3           # a row's time budget never cuts it below this many timed calls


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
