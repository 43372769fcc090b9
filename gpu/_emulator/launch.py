"""Modules and launches: a loaded module and its kernels, the checks a launch passes first
(launch bounds, shared memory, a cooperative grid's fit with ptxas's register counts), the
arguments packed by the kernel's signature, and the launch in the configured order."""
from __future__ import annotations

import ctypes
import os
import re
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import trace as _trace
from .build import _cached, cached_library
from .config import DEFAULT_SHARED_MEM, DEVICE, EmulatorError, _launch_order, device_attributes, relaxed


def build_module(source: str, defines: Sequence[str], name: str = "kernels", nvrtc_options=None) -> "Module":
    """Build (or find in the cache) and load the emulated module for `source` with `-D` defines.

    ``nvrtc_options``: a callable giving NVRTC's ``-I`` options (``gpu._kernels`` passes ``gpu._toolchain``'s
    ``nvrtc_include_options``), so that the register check can ask ptxas; without it the check
    uses its conservative bound.

    >>> src = 'extern "C" __global__ void fill(float* y, float v) { y[threadIdx.x] = v; }'
    >>> k = build_module(src, []).get_function("fill")               # doctest: +SKIP
    """
    mod = _load(cached_library(source, defines, name))
    mod.source, mod.defines, mod.nvrtc_options = source, tuple(defines), nvrtc_options
    return mod


_loaded: dict[Path, "Module"] = {}
_load_lock = threading.Lock()


def _load(path: Path) -> "Module":
    with _load_lock:
        mod = _loaded.get(path)
        if mod is None:
            mod = _loaded[path] = Module(path)
        return mod


class Module:
    """A loaded emulated module: the kernels of one source with one set of defines."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path), mode=os.RTLD_NOW | os.RTLD_LOCAL)
        lib.gpuemu_kernel_name.restype = ctypes.c_char_p
        lib.gpuemu_kernel_signature.restype = ctypes.c_char_p
        lib.gpuemu_last_error.restype = ctypes.c_char_p
        lib.gpuemu_launch.restype = ctypes.c_int
        lib.gpuemu_launch.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                      ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                      ctypes.c_ulonglong, ctypes.c_ulonglong, ctypes.c_int]
        lib.gpuemu_static_smem_bytes.restype = ctypes.c_uint
        self.path = path
        self.lib = lib
        # what it was built from (build_module sets them), for ptxas's register counts
        self.source: str | None = None
        self.defines: tuple[str, ...] = ()
        self.nvrtc_options = None           # () -> NVRTC's -I options, or None: no NVRTC compile
        self._ptxas: dict[str, tuple[int, int]] | None = None
        #: Static shared memory of all the module's kernels together (the emulator cannot tell which
        #: kernel declares which array): an upper bound for any one kernel's.
        self.static_smem_bytes = int(lib.gpuemu_static_smem_bytes())
        #: a trace build (GPU_EMULATOR_TRACE): every launch reports its memory traffic (trace.py)
        self.traced = _trace.traced(lib)
        self.kernels = {}
        for i in range(lib.gpuemu_kernel_count_()):
            name = lib.gpuemu_kernel_name(i).decode()
            sig = lib.gpuemu_kernel_signature(i).decode()
            self.kernels[name] = EmulatedKernel(self, i, name, sig.split(",") if sig else [],
                                                lib.gpuemu_kernel_max_threads(i), lib.gpuemu_kernel_min_blocks(i))

    def ptxas_info(self) -> dict[str, tuple[int, int]] | None:
        """kernel -> (registers, static shared memory bytes) as ptxas reports them for the emulated
        architecture, through NVRTC (cached on disk); None where NVRTC or the CUDA headers are
        missing or the compile fails."""
        if self._ptxas is None:
            self._ptxas = ({} if self.source is None or self.nvrtc_options is None
                           else _ptxas_info(self.source, self.defines, self.nvrtc_options))
        return self._ptxas or None

    def get_function(self, name: str) -> "EmulatedKernel":
        try:
            return self.kernels[name]
        except KeyError:
            raise KeyError(f"no kernel {name!r} in the module (kernels: {', '.join(self.kernels)})") from None


def _scalar_type(a: Any) -> str:
    """The C type CuPy passes for a scalar argument, as a NumPy dtype name."""
    if isinstance(a, np.generic):
        return a.dtype.name
    if isinstance(a, bool):
        return "bool"
    if isinstance(a, int):
        return "int64"  # CuPy passes a Python int as a 64-bit integer
    if isinstance(a, float):
        return "float64"
    raise TypeError(f"{type(a).__name__} is not a kernel argument")


_ENTRY_RE = re.compile(r"Compiling entry function '(\w+)'")
_USED_RE = re.compile(r"Used (\d+) registers(?:, (\d+) bytes smem)?")


def _ptxas_info(source: str, defines: Sequence[str], include_options) -> dict[str, tuple[int, int]]:
    """kernel -> (registers, static shared memory) from ptxas's report for the emulated
    architecture; {} where NVRTC (cuda-bindings + nvidia-cuda-nvrtc) or the CUDA headers are
    missing, or NVRTC rejects the source. The report is cached with the builds."""
    try:
        from cuda.bindings import nvrtc
        err, major, minor = nvrtc.nvrtcVersion()
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return {}
        cc = DEVICE["compute_capability"]
        opts = [f"--gpu-architecture=sm_{cc[0]}{cc[1]}", "-std=c++17", *include_options(), "--ptxas-options=-v",
                *defines]
    except Exception:  # no bindings, no libnvrtc, no headers: the estimate
        return {}

    def build(tmp: Path) -> Path:
        err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"kernel.cu", 0, [], [])
        try:
            result = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            buf = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, buf)
        finally:
            nvrtc.nvrtcDestroyProgram(prog)
        log = buf.rstrip(b"\0 ").decode(errors="replace")
        (tmp / "ptxas.log").write_text(log if result[0] == nvrtc.nvrtcResult.NVRTC_SUCCESS else "")
        return tmp / "ptxas.log"

    try:
        log = _cached(["ptxas", f"{major}.{minor}", *opts, source], "ptxas", ".log", build).read_text()
    except Exception:
        return {}
    out, name = {}, None
    for line in log.splitlines():
        m = _ENTRY_RE.search(line)
        if m:
            name = m.group(1)
            continue
        m = _USED_RE.search(line)
        if m and name is not None:
            out[name] = (int(m.group(1)), int(m.group(2) or 0))
            name = None
    return out


class EmulatedKernel:
    """One kernel of a Module; called like CuPy's RawKernel: ``k(grid, block, args, shared_mem)``.

    ``k(..., cooperative=True)`` launches as ``cuLaunchCooperativeKernel`` does: every block of the
    grid runs at once, so the kernel may call ``cooperative_groups::this_grid().sync()``; the grid
    must fit the device at once (``max_active_blocks_per_sm``).

    A launch past the kernel's ``__launch_bounds__`` or its shared-memory limit fails as on a GPU
    (``EmulatorError``); see "Strict by default" in the package's docstring.
    """

    def __init__(self, module: Module, index: int, name: str, params: list[str], max_threads: int = 0,
                 min_blocks: int = 0):
        self.module = module
        self.index = index
        self.name = name
        self.params = params  # "*float32" for a float*, "int32" for an int, "*any" for void*/char*
        #: __launch_bounds__(maxThreads, minBlocks); 0 where not declared
        self.launch_bounds = (max_threads, min_blocks)
        self._max_dynamic: int | None = None
        self._occupancy: dict[tuple, int] = {}

    @property
    def max_threads_per_block(self) -> int:
        """The most threads a launch may have (CuPy's attribute): the kernel's __launch_bounds__,
        else the device's limit."""
        return self.launch_bounds[0] or device_attributes()["max_threads_per_block"]

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        """cudaFuncAttributeMaxDynamicSharedMemorySize (CuPy's attribute): the most dynamic shared
        memory a launch may request; 48 KiB minus the static shared memory until raised."""
        if self._max_dynamic is not None:
            return self._max_dynamic
        return max(0, DEFAULT_SHARED_MEM - self.shared_size_bytes)

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        most = device_attributes()["max_shared_memory_per_block_optin"] - self.shared_size_bytes
        if not isinstance(value, (int, np.integer)) or not 0 <= value <= most:
            raise ValueError(f"kernel {self.name}: max_dynamic_shared_size_bytes={value!r} is outside [0, {most}] "
                             f"(the device's opt-in limit minus {self.shared_size_bytes} bytes of static shared "
                             "memory; CUDA: cudaErrorInvalidValue)")
        self._max_dynamic = int(value)

    def registers(self) -> tuple[int, str]:
        """(registers per thread, where the number comes from): ptxas's count for the emulated
        architecture through NVRTC, else the most the kernel's __launch_bounds__ allow (255, the
        per-thread maximum, without them)."""
        info = self.module.ptxas_info()
        if info and self.name in info:
            return info[self.name][0], "ptxas"
        dev = device_attributes()
        most = dev["max_registers_per_thread"]
        threads, blocks = self.launch_bounds
        if threads:
            warps = -(-threads // 32) * max(blocks, 1)
            most = min(most, dev["registers_per_sm"] // (warps * 32) // 8 * 8)
            return most, f"__launch_bounds__({threads}{f', {blocks}' if blocks else ''})"
        return most, "no NVRTC and no __launch_bounds__: the per-thread maximum"

    def max_active_blocks_per_sm(self, threads: int, dynamic_smem: int = 0) -> int:
        """Blocks of `threads` threads with `dynamic_smem` bytes that one SM holds at once (CUDA's
        occupancy calculator): limited by threads, blocks, shared memory (the module's static shared
        memory counted in every block, plus the 1 KiB the driver reserves) and, unless relaxed,
        registers (``registers()``, allocated per warp in units of 256 from 4 partitions of 16K)."""
        relax = relaxed()
        key = (threads, dynamic_smem, "registers" in relax, id(device_attributes()))
        most = self._occupancy.get(key)
        if most is None:
            dev = device_attributes()
            smem = self.shared_size_bytes + dynamic_smem + 1024
            most = min(dev["max_threads_per_sm"] // threads, dev["max_blocks_per_sm"],
                       dev["max_shared_memory_per_sm"] // smem)
            if "registers" not in relax:
                regs, _ = self.registers()
                per_warp = -(-regs * 32 // 256) * 256
                warps = 4 * (dev["registers_per_sm"] // 4 // per_warp)
                most = min(most, warps // -(-threads // 32))
            self._occupancy[key] = most
        return most

    def _check(self, grid: Sequence[int], block: Sequence[int], shared_mem: int, cooperative: bool) -> None:
        """What the CUDA driver refuses at launch, unless relaxed."""
        relax = relaxed()
        threads = block[0] * block[1] * block[2]
        if "launch_bounds" not in relax and self.launch_bounds[0] and threads > self.launch_bounds[0]:
            raise EmulatorError(f"kernel '{self.name}': too many resources requested for launch "
                                f"(cudaErrorLaunchOutOfResources): {threads} threads per block, but the kernel "
                                f"is declared __launch_bounds__({self.launch_bounds[0]})")
        if "shared_memory" not in relax and shared_mem > self.max_dynamic_shared_size_bytes:
            limit = self.max_dynamic_shared_size_bytes
            hint = (" (set kernel.max_dynamic_shared_size_bytes to opt in above 48 KiB, as gpu._kernels.launch does)"
                    if self._max_dynamic is None else "")
            raise EmulatorError(f"kernel '{self.name}': invalid argument (cudaErrorInvalidValue): {shared_mem} bytes "
                                f"of dynamic shared memory requested, the kernel's limit is {limit} "
                                f"(static: {self.shared_size_bytes}){hint}")
        if cooperative:
            blocks = grid[0] * grid[1] * grid[2]
            most = self.max_active_blocks_per_sm(threads, shared_mem) * device_attributes()["sm_count"]
            if blocks > most:
                regs = "" if "registers" in relax else " and %d registers per thread (%s)" % self.registers()
                raise EmulatorError(f"kernel '{self.name}': cooperative launch too large "
                                    f"(cudaErrorCooperativeLaunchTooLarge): {blocks} blocks of {threads} threads "
                                    f"with {shared_mem} bytes of dynamic shared memory{regs}; the device holds "
                                    f"{most} at once")

    def __repr__(self) -> str:
        return f"<EmulatedKernel {self.name}({', '.join(self.params)})>"

    def _pack(self, args: Sequence[Any]) -> tuple[np.ndarray, Any]:
        if len(args) != len(self.params):
            raise TypeError(f"kernel {self.name}({', '.join(self.params)}) takes {len(self.params)} "
                            f"arguments, got {len(args)}")
        values = np.zeros(max(len(args), 1), np.uint64)
        raw = values.view(np.uint8)
        for i, (param, a) in enumerate(zip(self.params, args)):
            where = f"kernel {self.name}, argument {i}"
            if param.startswith("*"):
                if not isinstance(a, np.ndarray):
                    raise TypeError(f"{where}: expected an array (pointer to {param[1:]}), got {type(a).__name__}")
                if param != "*any" and a.dtype.name != param[1:]:
                    raise TypeError(f"{where}: the kernel takes a pointer to {param[1:]}, got an array of {a.dtype}")
                values[i] = a.__array_interface__["data"][0]
            else:
                if isinstance(a, np.ndarray):
                    raise TypeError(f"{where}: the kernel takes a {param} scalar, got an array")
                got = _scalar_type(a)
                if got != param:
                    how = " (a Python int is passed as int64)" if type(a) is int else ""
                    raise TypeError(f"{where}: the kernel takes {param}, got {type(a).__name__} {a!r}{how}; "
                                    f"pass np.{param}(...)")
                b = np.asarray(a, dtype=a.dtype if isinstance(a, np.generic) else got).reshape(1).view(np.uint8)
                raw[8 * i:8 * i + b.size] = b
        base = values.ctypes.data
        argv = (ctypes.c_void_p * len(values))(*(base + 8 * i for i in range(len(values))))
        return values, argv

    @property
    def shared_size_bytes(self) -> int:
        """Static shared memory (as CuPy's ``RawKernel.shared_size_bytes``; here the module's total)."""
        return self.module.static_smem_bytes

    def __call__(self, grid: Sequence[int], block: Sequence[int], args: Sequence[Any], shared_mem: int = 0,
                 cooperative: bool = False) -> None:
        values, argv = self._pack(args)
        self._check(grid, block, shared_mem, cooperative)
        order, thread_seed, block_seed = _launch_order()
        g = (ctypes.c_uint * 3)(*grid)
        b = (ctypes.c_uint * 3)(*block)
        if self.module.traced:
            _trace.begin(self.module.lib, args)
        rc = self.module.lib.gpuemu_launch(self.index, g, b, shared_mem, argv, order, thread_seed, block_seed,
                                           int(cooperative))
        del values
        if self.module.traced:
            _trace.end(self.module.lib, self.name, grid, block, str(self.module.path))
        if rc != 0:
            raise EmulatorError(self.module.lib.gpuemu_last_error().decode())
