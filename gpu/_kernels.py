"""The only module that builds and launches kernels: CUDA through CuPy, or the CPU emulator.

Op modules (``gpu/ops/*.py``) never touch CuPy's ``RawModule`` or the emulator directly; they ask
for a kernel and launch it with arguments named as in the ``.cu`` signature::

    from gpu import _kernels

    k = _kernels.get_kernel("softmax", "softmax_block", xp, dtype=z.dtype)
    _kernels.launch(k, grid, 256, k.args(out=y, z=z, rows=np.int64(rows), C=np.int32(C), ...),
                    shared_mem=smem)

``xp`` is ``numpy`` or ``cupy``. With ``cupy`` the kernel is compiled by NVRTC into a
``cupy.RawModule`` and launched on CuPy's current stream. With ``numpy`` the same source is compiled
by the system C++ compiler against the emulator's CUDA-compatibility header (``gpu/_emulator``) and
runs on the CPU, NumPy arrays standing in for device pointers: this is what
``GPU_BACKEND=emulate`` / ``gpu.use_backend("emulate")`` runs.

Launching
---------
``launch(kernel, grid, block, args, shared_mem=0)`` takes ``args`` as CuPy's ``RawKernel`` does:
arrays of the kernel's library, and scalars as NumPy scalars of the parameter's exact type
(``np.int32(n)`` for an ``int``, ``np.int64(n)`` for an ``index_t``/``long long``,
``np.float32(eps)`` for a ``float``). ``kernel.args(name=value, ...)`` builds that tuple by
parameter name from the kernel's signature, and raises for a missing or unknown name. A Python
``int`` is passed as 64 bits (CuPy's convention), so it matches only a 64-bit integer parameter;
the emulator rejects every mismatch of size or kind. ``shared_mem`` is checked against the device's
opt-in limit; above the default 48 KiB the loader sets the kernel's opt-in attribute
(``max_dynamic_shared_size_bytes``) once.

``launch(..., cooperative=True)`` is a cooperative launch (``cuLaunchCooperativeKernel``): every
block is resident at once, so the kernel may synchronize the whole grid with
``cooperative_groups::this_grid().sync()``. The grid must not exceed
``max_cooperative_grid(kernel, block, shared_mem)``, the device's co-resident blocks for that
kernel (CUDA's occupancy calculator; on the emulator, the same arithmetic from threads, blocks and
shared memory per SM); ``launch`` checks it.

``device_attributes(xp)`` gives the numbers grid arithmetic needs. For the emulator it is the small
device of ``gpu._emulator.DEVICE`` (4 SMs, H100 shared-memory limits), so test-sized inputs already
take grid-stride and multi-block paths.

``recording_launches()`` is the one seam between the host path and the device: inside it every
launch is recorded, and with ``run=False`` skipped (``gpu-bench --host`` measures the host path so).

Environment
-----------
``GPU_KERNEL_MODULE_LOG``: a file that every module built in the process (either backend) is appended to,
one JSON object a line (``{"family": path, "defines": {...}, "backend": ...}``): what
``scripts/gpu_check.sh`` compares with its precompile list (``gpu/bench/precompile.py``).

``GPU_EMULATOR_ORDER``, ``GPU_EMULATOR_SEED``, ``GPU_EMULATOR_BLOCK_SEED``, ``GPU_EMULATOR_RELAX``,
``GPU_EMULATOR_ASAN``, ``GPU_EMULATOR_TRACE``, ``GPU_EMULATOR_CACHE``, ``GPU_EMULATOR_FIBERS``,
``GPU_EMULATOR_SM_COUNT`` and ``CXX``: see ``gpu/_emulator/__init__.py``.
"""
from __future__ import annotations

import contextlib
import json
import operator
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from gpu import _backend, _toolchain
from gpu._errors import KernelBuildError
from gpu._sources import (Family, constants, cuda_src_dir, define_flags, dtype_defines, families,  # noqa: F401
                          family, family_dtypes, family_headers, family_source, family_variants,
                          normalize_defines)
from gpu._toolchain import nvrtc_include_options, nvrtc_version

__all__ = [
    "Family", "Kernel", "KernelBuildError", "LaunchLog", "get_kernel", "launch", "launches_run", "recording_launches",
    "build_module", "module_defines",
    "max_cooperative_grid", "device_attributes", "warmup", "family", "constants",
    "families", "family_headers", "family_source", "family_variants", "family_dtypes", "dtype_defines",
    "cuda_src_dir",
]

#: Shared memory the CUDA driver reserves per resident block (sm_80 and later).
RESERVED_SHARED_MEM_PER_BLOCK = 1024


# ---------------------------------------------------------------------------------------------
# Kernels and modules
# ---------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Kernel:
    """A launchable kernel: what ``get_kernel`` returns and ``launch`` takes."""

    family: str
    name: str
    defines: tuple[tuple[str, str], ...]
    xp: Any
    function: Any                    # cupy.RawKernel, or gpu._emulator.EmulatedKernel
    params: tuple[str, ...] | None   # parameter names from the source (None: not found)
    device: dict                     # device_attributes of the device it was built for
    _static_smem: int | None = field(default=None, repr=False)
    _opted_in: int = field(default=0, repr=False)
    _coop: dict = field(default_factory=dict, repr=False)
    _pick: Any = field(default=None, repr=False)
    _shapes: dict = field(default_factory=dict, repr=False)
    _types_ok: set = field(default_factory=set, repr=False)

    def __repr__(self) -> str:
        d = " ".join(f"{k}={v}" for k, v in self.defines)
        return f"<Kernel {self.family}.{self.name} [{d}] on {self.xp.__name__}>"

    def args(self, **named: Any) -> tuple:
        """The argument tuple for ``launch``, from arguments named as in the kernel's signature.

        >>> k.args(y=y, x=x, n=np.int64(n))                        # doctest: +SKIP
        """
        return self.args_from(named)

    def args_from(self, named: Mapping[str, Any]) -> tuple:
        """``args`` from a mapping of parameter name -> value (exactly the kernel's parameters)."""
        pick = self._pick
        if pick is None:
            if self.params is None:
                raise TypeError(f"{self.name}: no signature found in the {self.family} source")
            pick = self._pick = operator.itemgetter(*self.params) if len(self.params) > 1 else (
                lambda d: (d[self.params[0]],) if self.params else ())
        try:
            if len(named) == len(self.params):
                return pick(named)
        except KeyError:
            pass
        missing = [n for n in self.params if n not in named]
        unknown = [n for n in named if n not in self.params]
        raise TypeError(f"{self.name}({', '.join(self.params)}): "
                        + (f"missing {', '.join(missing)}" if missing else "")
                        + ("; " if missing and unknown else "")
                        + (f"no parameter {', '.join(unknown)}" if unknown else ""))

    @property
    def static_smem(self) -> int:
        """Static shared memory of the kernel (a driver attribute, read once)."""
        if self._static_smem is None:
            self._static_smem = int(self.function.shared_size_bytes)
        return self._static_smem


_modules: dict[tuple, Any] = {}
_kernel_cache: dict[tuple, Kernel] = {}
_modules_lock = threading.Lock()


def _is_numpy(xp) -> bool:
    return xp is np


_emulator_module = None


def _emulator():
    """gpu._emulator, imported on first use (CuPy-only processes never load it)."""
    global _emulator_module
    if _emulator_module is None:
        from gpu import _emulator as module
        _emulator_module = module
    return _emulator_module


def _device_key(xp) -> tuple:
    """What a kernel object depends on besides its source: the device (for the emulator, its
    attribute dict, one per SM-count override and build flavour)."""
    if _is_numpy(xp):
        return ("emulator", id(_emulator().device_attributes()))
    return ("cuda", xp.cuda.runtime.getDevice())


def _module_key(xp) -> tuple:
    """What a built module depends on besides its source and defines."""
    if _is_numpy(xp):
        return ("emulator", _emulator().build_flavour())
    return ("cuda", xp.cuda.runtime.getDevice())


def _all_defines(fam: Family, dtype, defines) -> dict[str, str]:
    """All defines after checking the tuning ones are a declared variant."""
    tuning = normalize_defines(defines)
    if tuning not in fam.variants:
        raise ValueError(f"defines {tuning} are not a declared variant of {fam.path.name}; "
                         f"add them to its '// @variants' line (declared: {list(fam.variants)})")
    full = dict(tuning)
    if dtype is not None:
        full.update(dtype_defines(dtype))
    return dict(sorted(full.items()))


def _module(fam: Family, xp, defines: dict[str, str]):
    key = (str(fam.path), tuple(defines.items()), _module_key(xp))
    with _modules_lock:
        mod = _modules.get(key)
        if mod is None:
            mod = _build_module(fam, xp, defines)
            _modules[key] = mod
            _log_module(fam, xp, defines)
        return mod


def _log_module(fam: Family, xp, defines: dict[str, str]) -> None:
    """Append the module just built to ``$GPU_KERNEL_MODULE_LOG`` (one short line, appended: safe
    across the processes of a pytest-xdist run)."""
    path = os.environ.get("GPU_KERNEL_MODULE_LOG")
    if path:
        line = json.dumps({"family": str(fam.path), "defines": defines,
                           "backend": "emulator" if _is_numpy(xp) else "cuda", "pid": os.getpid()})
        with open(path, "a") as f:
            f.write(line + "\n")


def module_defines(family_name: str | os.PathLike, dtype=None, defines: Mapping[str, Any] | None = None
                   ) -> dict[str, str]:
    """Every define of the module ``get_kernel(family_name, ..., dtype, defines)`` builds (dtype and
    tuning, sorted): what identifies the module besides its source. Raises as ``get_kernel`` does
    for defines that are not a declared variant.

    >>> module_defines("softmax", np.float32)
    {'ACC_T': 'float', 'SCALAR_IS_FLOAT': '1', 'SCALAR_T': 'float'}
    """
    return _all_defines(family(family_name), dtype, defines)


def build_module(family_name: str | os.PathLike, xp, dtype=None, defines: Mapping[str, Any] | None = None):
    """Build the module of (family, dtype, defines) for ``xp`` now, as ``get_kernel`` would on first
    use: with CuPy, compiled into CuPy's kernel cache (keyed by source and options, so a later
    process finds it); on the emulator, the cached g++ build. ``scripts/gpu_check.sh`` uses it."""
    fam = family(family_name)
    mod = _module(fam, xp, _all_defines(fam, dtype, defines))
    if not _is_numpy(xp):
        mod.compile()
    return mod


def _build_module(fam: Family, xp, defines: dict[str, str]):
    if _is_numpy(xp):
        # the register estimate's NVRTC compile (cuda.bindings') takes that NVRTC's headers
        return _emulator().build_module(fam.source, define_flags(defines), name=fam.name,
                                        nvrtc_options=nvrtc_include_options)
    # the headers of NVRTC's own CUDA major, whatever else the machine has
    options = ("-std=c++17", *nvrtc_include_options(nvrtc_version(xp)[0]), *define_flags(defines))
    try:
        return xp.RawModule(code=fam.source, options=options)
    except Exception as e:  # CuPy raises its own types for a missing NVRTC or driver
        raise KernelBuildError(f"{fam.path.name} {defines}: could not build the CUDA module ({e}). "
                               f"NVRTC: {_toolchain.nvrtc_hint()}; the CUDA runtime comes from the NVIDIA driver") from e


def get_kernel(family_name: str | os.PathLike, name: str, xp, dtype=None,
               defines: Mapping[str, Any] | None = None) -> Kernel:
    """The kernel ``name`` of ``cuda_src/<family>.cu``, built for ``xp`` (numpy: emulator; cupy: CUDA).

    ``dtype`` adds ``SCALAR_T``/``ACC_T``/``SCALAR_IS_*``; ``defines`` must be one of the family's
    declared ``// @variants``. The module is built on first use; the kernel is kept per
    (family, kernel, dtype, defines, device), so a warm call is one dictionary look-up.

    >>> k = get_kernel("softmax", "softmax_block", np, dtype=np.float32)   # doctest: +SKIP
    """
    key = (family_name, name, None if dtype is None else np.dtype(dtype),
           tuple(defines.items()) if defines else (), _device_key(xp))
    k = _kernel_cache.get(key)
    if k is not None:
        return k
    fam = family(family_name)
    full = _all_defines(fam, dtype, defines)
    mod = _module(fam, xp, full)
    try:
        fn = mod.get_function(name)
    except Exception as e:
        raise KernelBuildError(f"{fam.path.name}: no kernel {name!r} "
                               f"(it must be an extern \"C\" __global__ function): {e}") from e
    k = Kernel(fam.name, name, tuple(full.items()), xp, fn, fam.signatures.get(name), device_attributes(xp))
    _kernel_cache[key] = k
    return k


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------

_cuda_attrs: dict[int, dict[str, Any]] = {}


def device_attributes(xp) -> dict[str, Any]:
    """What the grid arithmetic needs to know about the device that runs ``xp``'s kernels (read
    once per device; the returned dict is shared, do not modify it).

    Keys: ``sm_count``, ``max_threads_per_block``, ``max_block_dims``, ``max_grid_dims``,
    ``max_shared_memory_per_block`` (48 KiB without opt-in), ``max_shared_memory_per_block_optin``,
    ``max_shared_memory_per_sm``, ``max_threads_per_sm``, ``max_blocks_per_sm``, ``warp_size``,
    ``l2_bytes``, ``compute_capability``, ``name``.

    >>> device_attributes(np)["sm_count"]      # the emulated device
    4
    """
    if _is_numpy(xp):
        return _emulator().device_attributes()
    dev = xp.cuda.runtime.getDevice()
    attrs = _cuda_attrs.get(dev)
    if attrs is None:
        p = xp.cuda.runtime.getDeviceProperties(dev)
        attrs = {
            "name": p["name"].decode() if isinstance(p["name"], bytes) else p["name"],
            "sm_count": p["multiProcessorCount"],
            "max_threads_per_block": p["maxThreadsPerBlock"],
            "max_block_dims": tuple(p["maxThreadsDim"]),
            "max_grid_dims": tuple(p["maxGridSize"]),
            "max_shared_memory_per_block": p["sharedMemPerBlock"],
            "max_shared_memory_per_block_optin": p["sharedMemPerBlockOptin"],
            "max_shared_memory_per_sm": p["sharedMemPerMultiprocessor"],
            "max_threads_per_sm": p["maxThreadsPerMultiProcessor"],
            "max_blocks_per_sm": p["maxBlocksPerMultiProcessor"],
            "warp_size": p["warpSize"],
            "l2_bytes": p["l2CacheSize"],
            "compute_capability": (p["major"], p["minor"]),
        }
        _cuda_attrs[dev] = attrs
    return attrs


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------

def _dims(value, name: str, limits: Sequence[int]) -> tuple[int, int, int]:
    if type(value) is int:                       # the common case, without the general checks
        t = (value, 1, 1)
    else:
        t = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
        if not 1 <= len(t) <= 3 or not all(isinstance(v, (int, np.integer)) for v in t):
            raise TypeError(f"{name}: expected an int or a tuple of 1 to 3 ints, got {value!r}")
        t = tuple(int(v) for v in t) + (1,) * (3 - len(t))
    for v, lim, axis in zip(t, limits, "xyz"):
        if not 1 <= v <= lim:
            raise ValueError(f"{name}.{axis} = {v} is outside [1, {lim}]")
    return t  # type: ignore[return-value]


_SCALARS = (np.generic, int, float, bool)


#: The scalar types a kernel argument may have (NumPy scalars of C types, and Python's).
_SCALAR_TYPES = frozenset({np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                           np.float16, np.float32, np.float64, np.bool_, int, float, bool})


def _check_args(kernel: Kernel, args: Sequence[Any]) -> tuple:
    if type(args) is not tuple:
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"args: expected a tuple, got {type(args).__name__}")
        args = tuple(args)
    types = tuple(map(type, args))
    if types in kernel._types_ok:    # these argument types passed before
        return args
    array_type = np.ndarray if _is_numpy(kernel.xp) else kernel.xp.ndarray
    # the emulator's device arrays (an ndarray subclass) pass as arrays of their library
    if all(t in _SCALAR_TYPES or issubclass(t, array_type) for t in types):
        if len(kernel._types_ok) < 64:
            kernel._types_ok.add(types)
        return args
    for i, a in enumerate(args):
        if isinstance(a, array_type):
            continue
        if isinstance(a, np.ndarray):
            raise TypeError(f"{kernel.name} argument {i}: a {type(a).__module__} array given to a kernel "
                            f"built for {kernel.xp.__name__}")
        if not isinstance(a, _SCALARS):
            raise TypeError(f"{kernel.name} argument {i}: expected an array or a NumPy scalar, "
                            f"got {type(a).__name__}")
    return args


def _block_threads(block, dev) -> tuple[tuple[int, int, int], int]:
    b = _dims(block, "block", dev["max_block_dims"])
    threads = b[0] * b[1] * b[2]
    if threads > dev["max_threads_per_block"]:
        raise ValueError(f"block {b} has {threads} threads; the device allows {dev['max_threads_per_block']}")
    return b, threads


def _check_shared_mem(shared_mem) -> int:
    if not isinstance(shared_mem, (int, np.integer)) or shared_mem < 0:
        raise ValueError(f"shared_mem: expected a non-negative int, got {shared_mem!r}")
    return int(shared_mem)


def _opt_in(kernel: Kernel, shared_mem: int, dev) -> None:
    """Check static + dynamic shared memory against the device; above 48 KiB, set the CuPy
    kernel's opt-in attribute (once, to the most the device allows)."""
    if shared_mem == 0 or shared_mem <= kernel._opted_in:
        return
    limit = dev["max_shared_memory_per_block_optin"]
    # the emulator holds kernels to the same rule and attribute (gpu._emulator: "shared_memory")
    static = kernel.static_smem
    if static + shared_mem > limit:
        raise ValueError(f"{kernel.name}: {static} bytes static + {shared_mem} dynamic shared memory "
                         f"exceed the device's {limit} bytes per block")
    if static + shared_mem > dev["max_shared_memory_per_block"]:
        kernel.function.max_dynamic_shared_size_bytes = limit - static
        kernel._opted_in = limit - static
    else:
        kernel._opted_in = shared_mem


def max_cooperative_grid(kernel: Kernel, block, shared_mem: int = 0) -> int:
    """The most blocks of ``block`` threads with ``shared_mem`` bytes of dynamic shared memory that
    can be resident at once: the largest grid ``launch(..., cooperative=True)`` accepts (0 if the
    block cannot run at all). Computed once per (kernel, block, shared_mem).

    On CuPy: CUDA's occupancy calculator (registers, shared memory, threads) times the SM count.
    On the emulator: the same arithmetic (``EmulatedKernel.max_active_blocks_per_sm``): threads,
    blocks and shared memory per SM, counting the module's static shared memory in every block, and
    registers (ptxas's count through NVRTC, else a conservative bound from ``__launch_bounds__``).

    >>> k = get_kernel("batch_norm", "batch_norm_forward_onchip", np, np.float32, {"BN_VECTOR": 1})  # doctest: +SKIP
    >>> max_cooperative_grid(k, 256, 4096)                        # doctest: +SKIP
    32
    """
    dev = kernel.device
    key = (block, shared_mem)
    most = kernel._coop.get(key)
    if most is not None:
        return most
    _, threads = _block_threads(block, dev)
    shared_mem = _check_shared_mem(shared_mem)
    _opt_in(kernel, shared_mem, dev)
    fn = kernel.function
    if _is_numpy(kernel.xp):
        per_sm = fn.max_active_blocks_per_sm(threads, shared_mem)
    else:
        per_sm = kernel.xp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, shared_mem)
    most = kernel._coop[key] = per_sm * dev["sm_count"]
    return most


def _check_launch(kernel: Kernel, grid, block, shared_mem, cooperative: bool) -> tuple[tuple, tuple]:
    """(grid, block) as 3-tuples, after checking them and the shared memory against the device
    (and the opt-in above 48 KiB set)."""
    dev = kernel.device
    g = _dims(grid, "grid", dev["max_grid_dims"])
    b, _ = _block_threads(block, dev)
    shared_mem = _check_shared_mem(shared_mem)
    _opt_in(kernel, shared_mem, dev)
    if cooperative:
        most = max_cooperative_grid(kernel, b, shared_mem)
        if g[0] * g[1] * g[2] > most:
            raise ValueError(f"{kernel.name}: a cooperative grid of {g[0] * g[1] * g[2]} blocks of {b} threads "
                             f"({shared_mem} bytes of dynamic shared memory) exceeds the {most} the device "
                             f"holds at once")
    return g, b


def launch(kernel: Kernel, grid, block, args: Sequence[Any], shared_mem: int = 0, cooperative: bool = False) -> None:
    """Launch ``kernel`` with ``grid`` blocks of ``block`` threads (ints or 1-3 tuples).

    On CuPy: CuPy's current stream. On the emulator: runs to completion on the CPU and raises
    ``gpu._emulator.EmulatorError`` for a divergent barrier, a bad shuffle, a scalar of the wrong
    type, an overflow of dynamic shared memory, a misaligned access, or a launch past the
    kernel's ``__launch_bounds__`` or shared-memory limit.

    ``cooperative=True``: all blocks resident at once, so the kernel may call
    ``cooperative_groups::this_grid().sync()``; a grid larger than ``max_cooperative_grid`` is a
    ``ValueError``.

    >>> x = np.arange(256, dtype=np.float32); y = np.empty_like(x)       # doctest: +SKIP
    >>> k = get_kernel("softmax", "softmax_block", np, np.float32)      # doctest: +SKIP
    >>> launch(k, 1, 256, k.args(out=y, z=x, rows=np.int64(1), C=np.int32(256), ...))  # doctest: +SKIP
    """
    try:
        key = (grid, block, shared_mem, cooperative)
        shape = kernel._shapes.get(key)
    except TypeError:          # a list for grid or block: checked every time
        key, shape = None, None
    if shape is None:          # checked once per launch shape and kept
        shape = _check_launch(kernel, grid, block, shared_mem, cooperative)
        if key is not None:
            if len(kernel._shapes) > 1024:
                kernel._shapes.clear()
            kernel._shapes[key] = shape
    g, b = shape
    args = _check_args(kernel, args)
    log = _launch_log
    if log is not None:
        log.launches.append((kernel.name, g, b))
        if log.calls is not None:
            log.calls.append((kernel, g, b, args))
        if not log.run:
            return
    fn = kernel.function
    if _is_numpy(kernel.xp):
        if _backend.counting():
            _backend.count_launch_args(args)
        try:
            fn(g, b, args, shared_mem, cooperative=cooperative)
        except BaseException:
            # stopped part way: the thread's workspace counters may not be back at zero
            from gpu import _workspace
            _workspace.discard(np)
            raise
        if launch_observer is not None:
            launch_observer(kernel, g, b, shared_mem, args)
    elif cooperative:
        # RawKernel passes its module's enable_cooperative_groups flag (which changes nothing in an
        # NVRTC compile) to the underlying Function; calling that directly chooses per launch
        # (cuLaunchCooperativeKernel, CuPy's current stream)
        fn.kernel(g, b, args, shared_mem=shared_mem, enable_cooperative_groups=True)
    else:
        fn(g, b, args, shared_mem=shared_mem)


# ---------------------------------------------------------------------------------------------
# The launch seam: host-overhead measurement and launch counting
# ---------------------------------------------------------------------------------------------

@dataclass
class LaunchLog:
    """What ``recording_launches`` collects: one ``(kernel name, grid, block)`` per launch; with
    ``detail``, ``calls`` holds ``(Kernel, grid, block, args)`` too (the arrays kept alive)."""

    run: bool
    launches: list = field(default_factory=list)
    calls: list | None = None

    @property
    def count(self) -> int:
        return len(self.launches)


_launch_log: LaunchLog | None = None

#: called after every emulated launch as ``launch_observer(kernel, grid, block, shared_mem, args)``
#: (None: nothing is called). The tests' launch-hash recorder (``GPU_LAUNCH_HASH``) sets it.
launch_observer: Callable[..., None] | None = None


def launches_run() -> bool:
    """False inside ``recording_launches(run=False)``: kernels do not run, so their outputs hold
    nothing to read back."""
    log = _launch_log
    return log is None or log.run


@contextlib.contextmanager
def recording_launches(run: bool = False, detail: bool = False) -> Iterator[LaunchLog]:
    """Record every launch inside the block; with ``run=False`` the launch itself is a no-op, so
    the block measures the host path alone (``gpu-bench --host``). Everything before the driver or
    emulator call (argument checks, plans, allocations) still runs.

    >>> with recording_launches() as log:                                # doctest: +SKIP
    ...     gpu.softmax(z)
    >>> log.count                                                        # doctest: +SKIP
    1
    """
    global _launch_log
    saved, _launch_log = _launch_log, LaunchLog(run, calls=[] if detail else None)
    try:
        yield _launch_log
    finally:
        _launch_log = saved


# ---------------------------------------------------------------------------------------------
# Warm-up
# ---------------------------------------------------------------------------------------------

def _default_xp():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # no CuPy, no driver or no device: the emulator is the device
        pass
    return np


def warmup(xp=None) -> int:
    """Build every module (family x dtype x declared variant) ahead of first use.

    ``xp`` defaults to CuPy when a CUDA device is usable, else NumPy (the emulator). Returns the
    number of modules built or found in the cache. Exposed as ``gpu.warmup()``.

    >>> warmup(np) >= 0                                                  # doctest: +SKIP
    True
    """
    xp = _default_xp() if xp is None else xp
    count = 0
    for name in families():
        fam = family(name)
        for dt in fam.dtypes:
            for variant in fam.variants:
                mod = _module(fam, xp, _all_defines(fam, dt, variant))
                if not _is_numpy(xp):
                    mod.compile()
                count += 1
    return count
