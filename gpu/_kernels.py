"""The only module that builds and launches kernels: CUDA through CuPy, or the CPU emulator.

Op modules (``gpu/ops/batch_norm.py``, ``gpu/ops/softmax.py``) never touch CuPy's ``RawModule`` or the
emulator directly; they ask for a kernel and launch it::

    from gpu import _kernels

    k = _kernels.get_kernel("softmax", "softmax_fwd", xp, dtype=z.dtype, defines={"ROWS_PER_BLOCK": 1})
    dev = _kernels.device_attributes(xp)
    grid = min(rows, 8 * dev["sm_count"])
    _kernels.launch(k, grid, 256, (y, z, np.int64(rows), np.int32(cols)), shared_mem=smem)

``xp`` is ``numpy`` or ``cupy``. With ``cupy`` the kernel is compiled by NVRTC into a
``cupy.RawModule`` and launched on CuPy's current stream. With ``numpy`` the same source is compiled
by the system C++ compiler against the emulator's CUDA-compatibility header (``gpu/_emulator``) and
runs on the CPU, NumPy arrays standing in for device pointers: this is what
``GPU_BACKEND=emulate`` / ``gpu.use_backend("emulate")`` runs.

Kernel sources
--------------
A *family* is one file ``cuda_src/<family>.cu`` (``"batchnorm"``, ``"softmax"``). Its source text is
``cuda_src/common.cuh`` pasted in front of the ``.cu`` (with ``#line`` markers, so diagnostics name
the real file and line), never ``#include``-d through ``-I``: CuPy's disk cache hashes only the source
string, so a header edit must change that string. Kernels are ``extern "C" __global__`` functions,
compiled with ``-std=c++17``; ``<cuda_fp16.h>``, ``<cuda_bf16.h>`` and ``<cooperative_groups.h>``
come from the CUDA runtime headers (the ``nvidia-cuda-runtime-cu12`` wheel or a CUDA toolkit), and
the ``<nv/target>`` that cooperative_groups.h includes from CCCL (the ``nvidia-cuda-cccl-cu12`` wheel,
a CUDA toolkit, or the copy bundled with CuPy).

Defines
-------
``dtype`` (float16, bfloat16 from ``ml_dtypes``, float32, float64) adds:

==================  ==============  ======  ===================
dtype               ``SCALAR_T``    ``ACC_T``  flag macro
==================  ==============  ======  ===================
float16             ``__half``          float   ``SCALAR_IS_HALF``
bfloat16            ``__nv_bfloat16``   float   ``SCALAR_IS_BF16``
float32             ``float``           float   ``SCALAR_IS_FLOAT``
float64             ``double``          double  ``SCALAR_IS_DOUBLE``
==================  ==============  ======  ===================

``defines`` (a dict, e.g. ``{"ROWS_PER_BLOCK": 4}``) adds tuning ``-DNAME=VALUE`` flags. Each
family declares every tuning variant it may be built with, in one line of its ``.cu`` file::

    // @variants [{"ROWS_PER_BLOCK": 1}, {"ROWS_PER_BLOCK": 4}]

(a JSON list of define dicts; without the line the only variant is ``{}``), and optionally the
dtypes it is built for (default: all four; ``none`` for a family without dtype defines)::

    // @dtypes float32 float64

``get_kernel`` refuses defines that are not declared, so ``warmup()`` and the NVRTC compile check
(``gpu/_nvrtc_check.py``: every family x dtype x variant x sm_75..sm_90) cover every module that
can ever be launched. Modules are cached per (family, defines, device).

Launching
---------
``launch(kernel, grid, block, args, shared_mem=0)`` takes ``args`` exactly as CuPy's ``RawKernel``
does: arrays of the kernel's library, and scalars as NumPy scalars of the parameter's exact type
(``np.int32(n)`` for an ``int``, ``np.int64(n)`` for an ``index_t``/``long long``,
``np.float32(eps)`` for a ``float``). A Python ``int`` is passed as 64 bits (CuPy's convention), so it
matches only a 64-bit integer parameter; the emulator rejects every mismatch of size or kind, and
pointer parameters to arithmetic types must receive arrays of that dtype. ``shared_mem`` is checked
against the device's opt-in limit; above the default 48 KiB the loader sets the kernel's opt-in
attribute (``max_dynamic_shared_size_bytes``) before launching.

``launch(..., cooperative=True)`` is a cooperative launch (``cuLaunchCooperativeKernel``): every
block is resident at once, so the kernel may synchronize the whole grid with
``cooperative_groups::this_grid().sync()``. The grid must not exceed
``max_cooperative_grid(kernel, block, shared_mem)``, the device's co-resident blocks for that
kernel (CUDA's occupancy calculator; on the emulator, the same arithmetic from threads, blocks and
shared memory per SM); ``launch`` checks it. The emulator runs such a launch as one group of fibers
(see ``gpu/_emulator/runtime.cpp``).

``device_attributes(xp)`` gives the numbers grid arithmetic needs. For the emulator it is a small
fixed device (4 SMs, H100 shared-memory limits; ``GPU_EMULATOR_SM_COUNT`` overrides the SM count), so
test-sized inputs already take grid-stride and multi-block paths.

Environment
-----------
``GPU_EMULATOR_ORDER``, ``GPU_EMULATOR_BLOCK_SEED``, ``GPU_EMULATOR_ASAN``, ``GPU_EMULATOR_CACHE``,
``GPU_EMULATOR_FIBERS``, ``GPU_EMULATOR_SM_COUNT`` and ``CXX``: see ``gpu/_emulator/__init__.py``.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from gpu._backend import BFLOAT16

__all__ = [
    "Kernel", "KernelBuildError", "LaunchLog", "get_kernel", "launch", "recording_launches", "max_cooperative_grid", "device_attributes", "warmup",
    "families", "family_headers", "family_source", "family_variants", "family_dtypes", "dtype_defines",
    "cuda_src_dir", "cuda_include_dir", "cccl_include_dir", "nvrtc_include_options",
]

#: The CUDA types a storage dtype maps to: (SCALAR_T, ACC_T, flag macro).
_DTYPE_DEFINES: dict[str, tuple[str, str, str]] = {
    "float16": ("__half", "float", "SCALAR_IS_HALF"),
    "bfloat16": ("__nv_bfloat16", "float", "SCALAR_IS_BF16"),
    "float32": ("float", "float", "SCALAR_IS_FLOAT"),
    "float64": ("double", "double", "SCALAR_IS_DOUBLE"),
}

#: Dynamic shared memory a kernel gets without opting in (CUDA's limit on every architecture).
DEFAULT_SHARED_MEM = 48 * 1024

#: Shared memory the CUDA driver reserves per resident block (sm_80 and later).
RESERVED_SHARED_MEM_PER_BLOCK = 1024

#: The emulated device: H100 limits, but few SMs so that small inputs take multi-block paths.
EMULATED_DEVICE = {
    "name": "gpu emulator (CPU)",
    "sm_count": 4,
    "max_threads_per_block": 1024,
    "max_block_dims": (1024, 1024, 64),
    "max_grid_dims": (2**31 - 1, 65535, 65535),
    "max_shared_memory_per_block": DEFAULT_SHARED_MEM,
    "max_shared_memory_per_block_optin": 227 * 1024,
    "max_shared_memory_per_sm": 228 * 1024,
    "max_threads_per_sm": 2048,
    "max_blocks_per_sm": 32,
    "warp_size": 32,
    "l2_bytes": 50 * 1024 * 1024,
    "compute_capability": (9, 0),
}

_VARIANTS_RE = re.compile(r"^\s*//\s*@variants\s+(.*)$", re.MULTILINE)
_DTYPES_RE = re.compile(r"^\s*//\s*@dtypes\s+(.*)$", re.MULTILINE)
_HEADERS_RE = re.compile(r"^\s*//\s*@headers\s+(.*)$", re.MULTILINE)


class KernelBuildError(RuntimeError):
    """A kernel module could not be built (compiler error or a missing toolchain piece)."""


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

def cuda_src_dir() -> Path:
    """The directory holding ``common.cuh`` and the ``<family>.cu`` files.

    In an installed wheel it is ``gpu/cuda_src``; in a source checkout, ``cuda_src/`` next to ``gpu/``.
    """
    here = Path(__file__).resolve().parent
    for d in (here / "cuda_src", here.parent / "cuda_src"):
        if (d / "common.cuh").is_file():
            return d
    raise FileNotFoundError(f"cuda_src/common.cuh not found next to {here}: the package is installed "
                            "without its kernel sources (package data gpu/cuda_src missing)")


def families() -> list[str]:
    """Names of every kernel family (``cuda_src/*.cu`` stems), sorted."""
    return sorted(p.stem for p in cuda_src_dir().glob("*.cu"))


def _family_path(family: str | os.PathLike) -> Path:
    if isinstance(family, os.PathLike):
        path = Path(family)
    elif isinstance(family, str) and re.fullmatch(r"\w+", family):
        path = cuda_src_dir() / f"{family}.cu"
    else:
        raise ValueError(f"family: expected a cuda_src/*.cu stem or a path to a .cu file, got {family!r}")
    if not path.is_file():
        raise FileNotFoundError(f"family {family!r}: no such kernel source {path} "
                                f"(families: {', '.join(families()) or 'none'})")
    return path.resolve()


def family_headers(family: str | os.PathLike) -> list[str]:
    """The headers pasted in front of the family's ``.cu``, in order: ``common.cuh``, then those
    it declares with ``// @headers rows.cuh channels.cuh`` (files of ``cuda_src/``)."""
    path = _family_path(family)
    found = _HEADERS_RE.findall(path.read_text())
    if len(found) > 1:
        raise ValueError(f"{path.name}: more than one '// @headers' line")
    names = found[0].split() if found else []
    for n in names:
        if n == "common.cuh" or not (cuda_src_dir() / n).is_file():
            raise ValueError(f"{path.name}: '// @headers' names {n!r}, not a header of {cuda_src_dir()} "
                             "(common.cuh is always pasted first)")
    return ["common.cuh"] + names


def family_source(family: str | os.PathLike) -> str:
    """The exact source text every compiler sees: ``common.cuh``, the headers the family declares
    (``// @headers``), then the family's ``.cu``, each after a ``#line`` marker.

    ``family`` is a ``cuda_src/`` stem, or a path to a ``.cu`` file elsewhere (test kernels).

    >>> src = family_source("softmax")                 # doctest: +SKIP
    >>> src.splitlines()[0]                            # doctest: +SKIP
    '#line 1 "common.cuh"'
    """
    path = _family_path(family)
    parts = [f'#line 1 "{h}"\n{(cuda_src_dir() / h).read_text()}\n' for h in family_headers(family)]
    return "".join(parts) + f'#line 1 "{path.name}"\n{path.read_text()}'


def family_variants(family: str | os.PathLike) -> list[dict[str, str]]:
    """The tuning define sets the family declares with ``// @variants [...]`` (default ``[{}]``)."""
    path = _family_path(family)
    found = _VARIANTS_RE.findall(path.read_text())
    if not found:
        return [{}]
    if len(found) > 1:
        raise ValueError(f"{path.name}: more than one '// @variants' line")
    try:
        variants = json.loads(found[0])
        if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
            raise ValueError("not a list of objects")
        return [_normalize_defines(v) for v in variants]
    except ValueError as e:
        raise ValueError(f"{path.name}: '// @variants' must be a JSON list of define objects, "
                         f"e.g. [{{\"BLOCK\": 256}}]: {e}") from None


def family_dtypes(family: str | os.PathLike) -> list[np.dtype | None]:
    """The storage dtypes the family is built for (``// @dtypes``; default: all supported).

    ``[None]`` for a family declared ``// @dtypes none`` (no dtype defines at all).
    """
    path = _family_path(family)
    found = _DTYPES_RE.findall(path.read_text())
    if not found:
        return [np.dtype(n) if n != "bfloat16" else BFLOAT16 for n in _DTYPE_DEFINES
                if n != "bfloat16" or BFLOAT16 is not None]
    names = found[0].split()
    if names == ["none"]:
        return [None]
    unknown = [n for n in names if n not in _DTYPE_DEFINES]
    if unknown:
        raise ValueError(f"{path.name}: '// @dtypes' names unknown dtypes {unknown}; "
                         f"expected some of {', '.join(_DTYPE_DEFINES)} or 'none'")
    return [BFLOAT16 if n == "bfloat16" else np.dtype(n) for n in names
            if n != "bfloat16" or BFLOAT16 is not None]


def dtype_defines(dtype) -> dict[str, str]:
    """The ``-D`` defines for a storage dtype.

    >>> dtype_defines(np.float16)
    {'SCALAR_T': '__half', 'ACC_T': 'float', 'SCALAR_IS_HALF': '1'}
    """
    dt = np.dtype(dtype)
    name = "bfloat16" if BFLOAT16 is not None and dt == BFLOAT16 else dt.name
    if name not in _DTYPE_DEFINES:
        raise TypeError(f"dtype: {dt} has no kernel variant; expected one of {', '.join(_DTYPE_DEFINES)}")
    scalar, acc, flag = _DTYPE_DEFINES[name]
    return {"SCALAR_T": scalar, "ACC_T": acc, flag: "1"}


def _normalize_defines(defines: Mapping[str, Any] | None) -> dict[str, str]:
    out = {}
    for k, v in (defines or {}).items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_]\w*", k):
            raise ValueError(f"defines: {k!r} is not a macro name")
        if isinstance(v, bool):
            v = int(v)
        if not isinstance(v, (int, str)):
            raise TypeError(f"defines: {k}={v!r}: values are ints or strings")
        out[k] = str(v)
    return dict(sorted(out.items()))


def _define_flags(defines: Mapping[str, str]) -> list[str]:
    return [f"-D{k}={v}" for k, v in defines.items()]


def _wheel_header_dirs(library: str) -> list[str]:
    """The header directory of NVIDIA's pip wheel for ``library`` ("cudart", "cccl"), if installed."""
    try:
        from cuda.pathfinder import find_nvidia_header_directory
    except ImportError:
        return []
    found = find_nvidia_header_directory(library)
    return [found] if found else []


def cuda_include_dir() -> str:
    """The directory with ``cuda_fp16.h``/``cuda_bf16.h`` for NVRTC (not needed by the emulator).

    Looks in the ``nvidia-cuda-runtime-cu12`` wheel, then ``$CUDA_PATH``/``$CUDA_HOME``, then
    ``/usr/local/cuda``.
    """
    candidates = _wheel_header_dirs("cudart")
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    candidates.append("/usr/local/cuda/include")
    for d in candidates:
        if os.path.isfile(os.path.join(d, "cuda_fp16.h")):
            return d
    raise KernelBuildError("CUDA headers (cuda_fp16.h) not found: pip install nvidia-cuda-runtime-cu12 "
                           "(or install a CUDA toolkit and set CUDA_PATH)")


def cccl_include_dir() -> str:
    """The directory with CCCL's ``nv/target``, which ``cooperative_groups.h`` includes (NVRTC only).

    Looks in the ``nvidia-cuda-cccl-cu12`` wheel, then ``$CUDA_PATH``/``$CUDA_HOME`` and
    ``/usr/local/cuda`` (``include``, or ``include/cccl`` from CUDA 13), then CuPy's bundled copy.
    """
    candidates = _wheel_header_dirs("cccl")
    for root in [os.environ.get(v) for v in ("CUDA_PATH", "CUDA_HOME")] + ["/usr/local/cuda"]:
        if root:
            candidates += [os.path.join(root, "include"), os.path.join(root, "include", "cccl")]
    try:
        import cupy
        candidates.append(os.path.join(os.path.dirname(cupy.__file__), "_core", "include", "cupy", "_cccl",
                                       "libcudacxx"))
    except ImportError:
        pass
    for d in candidates:
        if os.path.isfile(os.path.join(d, "nv", "target")):
            return d
    raise KernelBuildError("CCCL headers (nv/target, needed by cooperative_groups.h) not found: "
                           "pip install nvidia-cuda-cccl-cu12 (or install a CUDA toolkit and set CUDA_PATH)")


def nvrtc_include_options() -> list[str]:
    """The ``-I`` options every NVRTC compile of a family gets: CUDA runtime headers, then CCCL."""
    return [f"-I{cuda_include_dir()}", f"-I{cccl_include_dir()}"]


# ---------------------------------------------------------------------------------------------
# Kernels and modules
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kernel:
    """A launchable kernel: what ``get_kernel`` returns and ``launch`` takes."""

    family: str
    name: str
    defines: tuple[tuple[str, str], ...]
    xp: Any
    function: Any  # cupy.RawKernel, or gpu._emulator.EmulatedKernel

    def __repr__(self) -> str:
        d = " ".join(f"{k}={v}" for k, v in self.defines)
        return f"<Kernel {self.family}.{self.name} [{d}] on {self.xp.__name__}>"


_modules: dict[tuple, Any] = {}
_modules_lock = threading.Lock()


def _is_numpy(xp) -> bool:
    return xp is np


def _device_key(xp) -> tuple:
    if _is_numpy(xp):
        from gpu import _emulator
        return ("emulator", _emulator.build_flavour())
    return ("cuda", xp.cuda.Device().id)


def _all_defines(family, dtype, defines) -> tuple[dict[str, str], dict[str, str]]:
    """(tuning defines, all defines) after checking the tuning ones are a declared variant."""
    tuning = _normalize_defines(defines)
    if tuning not in family_variants(family):
        raise ValueError(f"defines {tuning} are not a declared variant of {Path(_family_path(family)).name}; "
                         f"add them to its '// @variants' line (declared: {family_variants(family)})")
    full = dict(tuning)
    if dtype is not None:
        full.update(dtype_defines(dtype))
    return tuning, dict(sorted(full.items()))


def _module(family, xp, defines: dict[str, str]):
    path = _family_path(family)
    key = (str(path), tuple(defines.items()), _device_key(xp))
    with _modules_lock:
        mod = _modules.get(key)
        if mod is None:
            mod = _build_module(path, xp, defines)
            _modules[key] = mod
        return mod


def _build_module(path: Path, xp, defines: dict[str, str]):
    source = family_source(path)
    if _is_numpy(xp):
        from gpu import _emulator
        return _emulator.build_module(source, _define_flags(defines), name=path.stem)
    options = ("-std=c++17", *nvrtc_include_options(), *_define_flags(defines))
    try:
        return xp.RawModule(code=source, options=options)
    except Exception as e:  # CuPy raises its own types for a missing NVRTC or driver
        raise KernelBuildError(f"{path.name} {defines}: could not build the CUDA module ({e}). "
                               "NVRTC comes from pip install nvidia-cuda-nvrtc-cu12 (or cupy-cuda12x[ctk]); "
                               "the CUDA runtime from the NVIDIA driver") from e


def get_kernel(family: str | os.PathLike, name: str, xp, dtype=None,
               defines: Mapping[str, Any] | None = None) -> Kernel:
    """The kernel ``name`` of ``cuda_src/<family>.cu``, built for ``xp`` (numpy: emulator; cupy: CUDA).

    ``dtype`` adds ``SCALAR_T``/``ACC_T``/``SCALAR_IS_*``; ``defines`` must be one of the family's
    declared ``// @variants``. The module is built on first use and cached per
    (family, defines, device).

    >>> k = get_kernel("softmax", "softmax_fwd", np, dtype=np.float32)   # doctest: +SKIP
    """
    tuning, full = _all_defines(family, dtype, defines)
    mod = _module(family, xp, full)
    try:
        fn = mod.get_function(name)
    except Exception as e:
        raise KernelBuildError(f"{_family_path(family).name}: no kernel {name!r} "
                               f"(it must be an extern \"C\" __global__ function): {e}") from e
    fam = family if isinstance(family, str) else Path(family).stem
    return Kernel(fam, name, tuple(full.items()), xp, fn)


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------

_cuda_attrs: dict[int, dict[str, Any]] = {}


def device_attributes(xp) -> dict[str, Any]:
    """What the grid arithmetic needs to know about the device that runs ``xp``'s kernels.

    Keys: ``sm_count``, ``max_threads_per_block``, ``max_block_dims``, ``max_grid_dims``,
    ``max_shared_memory_per_block`` (48 KiB without opt-in), ``max_shared_memory_per_block_optin``,
    ``max_shared_memory_per_sm``, ``max_threads_per_sm``, ``max_blocks_per_sm``, ``warp_size``, ``l2_bytes``,
    ``compute_capability``, ``name``.

    >>> device_attributes(np)["sm_count"]      # the emulated device
    4
    """
    if _is_numpy(xp):
        attrs = dict(EMULATED_DEVICE)
        sm = os.environ.get("GPU_EMULATOR_SM_COUNT")
        if sm:
            if not sm.isdigit() or int(sm) < 1:
                raise ValueError(f"GPU_EMULATOR_SM_COUNT={sm!r}: expected a positive integer")
            attrs["sm_count"] = int(sm)
        return attrs
    dev = xp.cuda.Device().id
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
    return dict(attrs)


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------

def _dims(value, name: str, limits: Sequence[int]) -> tuple[int, int, int]:
    t = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(t) <= 3 or not all(isinstance(v, (int, np.integer)) for v in t):
        raise TypeError(f"{name}: expected an int or a tuple of 1 to 3 ints, got {value!r}")
    t = tuple(int(v) for v in t) + (1,) * (3 - len(t))
    for v, lim, axis in zip(t, limits, "xyz"):
        if not 1 <= v <= lim:
            raise ValueError(f"{name}.{axis} = {v} is outside [1, {lim}]")
    return t  # type: ignore[return-value]


def _check_args(kernel: Kernel, args: Sequence[Any]) -> tuple:
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args: expected a tuple, got {type(args).__name__}")
    array_type = np.ndarray if _is_numpy(kernel.xp) else kernel.xp.ndarray
    for i, a in enumerate(args):
        if isinstance(a, (np.ndarray, array_type)):
            if not isinstance(a, array_type):
                raise TypeError(f"{kernel.name} argument {i}: a {type(a).__module__} array given to a kernel "
                                f"built for {kernel.xp.__name__}")
        elif not isinstance(a, (np.generic, int, float, bool)):
            raise TypeError(f"{kernel.name} argument {i}: expected an array or a NumPy scalar, "
                            f"got {type(a).__name__}")
    return tuple(args)


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
    fn = kernel.function
    limit = dev["max_shared_memory_per_block_optin"]
    if _is_numpy(kernel.xp):
        if shared_mem > limit:
            raise ValueError(f"shared_mem={shared_mem} exceeds the device's {limit} bytes per block")
        return
    static = fn.shared_size_bytes
    if static + shared_mem > limit:
        raise ValueError(f"{kernel.name}: {static} bytes static + {shared_mem} dynamic shared memory "
                         f"exceed the device's {limit} bytes per block")
    if static + shared_mem > dev["max_shared_memory_per_block"] and fn.max_dynamic_shared_size_bytes < shared_mem:
        fn.max_dynamic_shared_size_bytes = limit - static


def max_cooperative_grid(kernel: Kernel, block, shared_mem: int = 0) -> int:
    """The most blocks of ``block`` threads with ``shared_mem`` bytes of dynamic shared memory that
    can be resident at once: the largest grid ``launch(..., cooperative=True)`` accepts (0 if the
    block cannot run at all).

    On CuPy: CUDA's occupancy calculator (registers, shared memory, threads) times the SM count.
    On the emulator: the same limits without registers (the CPU has no register file): threads,
    blocks and shared memory per SM, counting the module's static shared memory in every block.

    >>> k = get_kernel("batch_norm", "batch_norm_forward_onchip", np, np.float32, {"BN_VECTOR": 1})  # doctest: +SKIP
    >>> max_cooperative_grid(k, 256, 4096)                        # doctest: +SKIP
    32
    """
    dev = device_attributes(kernel.xp)
    _, threads = _block_threads(block, dev)
    shared_mem = _check_shared_mem(shared_mem)
    _opt_in(kernel, shared_mem, dev)
    fn = kernel.function
    if _is_numpy(kernel.xp):
        smem = fn.shared_size_bytes + shared_mem + RESERVED_SHARED_MEM_PER_BLOCK
        per_sm = min(dev["max_threads_per_sm"] // threads, dev["max_blocks_per_sm"],
                     dev["max_shared_memory_per_sm"] // smem)
    else:
        per_sm = kernel.xp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, shared_mem)
    return per_sm * dev["sm_count"]


def launch(kernel: Kernel, grid, block, args: Sequence[Any], shared_mem: int = 0, cooperative: bool = False) -> None:
    """Launch ``kernel`` with ``grid`` blocks of ``block`` threads (ints or 1-3 tuples).

    On CuPy: CuPy's current stream. On the emulator: runs to completion on the CPU and raises
    ``gpu._emulator.EmulatorError`` for a divergent barrier, a bad shuffle, a scalar of the wrong
    type or an overflow of dynamic shared memory.

    ``cooperative=True``: all blocks resident at once, so the kernel may call
    ``cooperative_groups::this_grid().sync()``; a grid larger than ``max_cooperative_grid`` is a
    ``ValueError``.

    >>> x = np.arange(256, dtype=np.float32); y = np.empty_like(x)       # doctest: +SKIP
    >>> launch(get_kernel("softmax", "softmax_fwd", np, np.float32),     # doctest: +SKIP
    ...        1, 256, (y, x, np.int64(1), np.int32(256)))
    """
    dev = device_attributes(kernel.xp)
    g = _dims(grid, "grid", dev["max_grid_dims"])
    b, _ = _block_threads(block, dev)
    shared_mem = _check_shared_mem(shared_mem)
    _opt_in(kernel, shared_mem, dev)
    args = _check_args(kernel, args)
    if cooperative:
        most = max_cooperative_grid(kernel, b, shared_mem)
        if g[0] * g[1] * g[2] > most:
            raise ValueError(f"{kernel.name}: a cooperative grid of {g[0] * g[1] * g[2]} blocks of {b} threads "
                             f"({shared_mem} bytes of dynamic shared memory) exceeds the {most} the device "
                             f"holds at once")
    fn = kernel.function
    log = _launch_log
    if log is not None:
        log.launches.append((kernel.name, g, b))
        if not log.run:
            return
    if _is_numpy(kernel.xp):
        fn(g, b, args, shared_mem, cooperative=cooperative)
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
    """What ``recording_launches`` collects: one ``(kernel name, grid, block)`` per launch."""

    run: bool
    launches: list = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.launches)


_launch_log: LaunchLog | None = None


@contextlib.contextmanager
def recording_launches(run: bool = False) -> Iterator[LaunchLog]:
    """Record every launch inside the block; with ``run=False`` the launch itself is a no-op, so
    the block measures the host path alone (``gpu-bench --host``). Everything before the driver or
    emulator call (argument checks, plans, allocations) still runs.

    >>> with recording_launches() as log:                                # doctest: +SKIP
    ...     gpu.softmax(z)
    >>> log.count
    1
    """
    global _launch_log
    saved, _launch_log = _launch_log, LaunchLog(run)
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
    for fam in families():
        for dt in family_dtypes(fam):
            for variant in family_variants(fam):
                _, full = _all_defines(fam, dt, variant)
                mod = _module(fam, xp, full)
                if not _is_numpy(xp):
                    mod.compile()
                count += 1
    return count

