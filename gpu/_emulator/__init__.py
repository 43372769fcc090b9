"""The CPU emulator: the project's CUDA kernels, unchanged, compiled by the system C++ compiler.

``gpu._kernels`` is its only caller: ``get_kernel(..., xp=numpy)`` builds a module here and
``launch`` calls the returned ``EmulatedKernel`` with NumPy arrays standing in for device memory.

How a module is built (once per source + flags + compiler, cached on disk):

1. The kernel source (``common.cuh`` + ``<family>.cu``, as CuPy sees it) is preprocessed with
   ``cuda_emulator.h`` force-included, to find its ``extern "C" __global__`` kernels.
2. It is compiled together with a table of those kernels (a typed invoker and a parameter
   signature for each), then every ``extern __shared__`` array it declares is aliased to the one
   dynamic shared-memory buffer, and all is linked with ``runtime.cpp`` (the fiber scheduler) into
   a shared library loaded with ctypes.

Execution model and what it catches: see ``runtime.cpp``. In short: blocks run one after another
(a cooperative launch runs them all at once, so ``cooperative_groups::this_grid().sync()`` works),
each CUDA thread is a fiber, threads switch only at barriers and warp operations; a divergent
barrier, a grid.sync that some thread never reaches, a warp operation that cannot complete, an
overflow of dynamic shared memory or a scalar argument of the wrong type raises ``EmulatorError``
naming the kernel and the source line; shared memory starts every block as NaN and stays private
to its block.

Environment
-----------
``GPU_EMULATOR_ORDER``
    ``forward`` (default) or ``reverse``: the order threads run between synchronization points.
    A missing barrier shows up in one order or the other: run kernel tests under both.
``GPU_EMULATOR_BLOCK_SEED``
    An integer: run blocks in an order shuffled by this seed (default: in order).
``GPU_EMULATOR_ASAN``
    ``1``: build with ``-fsanitize=address,undefined``, so out-of-bounds accesses to arrays,
    stacks and past the dynamic shared memory abort with a report. Python must then run with
    ASan preloaded::

        LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \\
            GPU_EMULATOR_ASAN=1 python -m pytest -m kernel

    (``scripts/test_kernels_asan.sh PYTHON`` does this in both thread orders).
``GPU_EMULATOR_FIBERS``
    ``asm`` (default on x86-64) or ``ucontext``: the fiber context switch.
``GPU_EMULATOR_CACHE``
    The build cache directory (default ``$XDG_CACHE_HOME/gpu-emulator``, else
    ``~/.cache/gpu-emulator``). Safe to share between processes building at once.
``CXX``
    The C++ compiler (default: the first of ``g++``, ``c++``, ``clang++`` on PATH).
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gpu._errors import KernelBuildError

__all__ = ["EmulatorError", "EmulatedKernel", "Module", "build_module", "build_flavour", "cache_dir", "DEVICE",
           "device_attributes"]

_HERE = Path(__file__).resolve().parent
# cuda_fp16.h, cuda_bf16.h, cuda_runtime.h: empty stand-ins (cuda_emulator.h declares it all);
# cooperative_groups.h: the grid group. Found by the kernel's #include through -I on this directory.
_RUNTIME_FILES = ("cuda_emulator.h", "runtime.cpp", "cuda_fp16.h", "cuda_bf16.h", "cuda_runtime.h",
                  "cooperative_groups.h")
# Bump when the build steps below change what they produce from the same inputs.
_BUILD_VERSION = "1"

_KERNEL_RE = re.compile(
    r'extern\s+"C"\s+__attribute__\s*\(\(\s*noinline\s*,\s*used\s*,\s*section\s*\(\s*"\.text\.gpuemu_kernels"\s*\)\s*\)\)'
    r"\s+void\s+(\w+)\s*\(")


#: Dynamic shared memory a kernel gets without opting in (CUDA's limit on every architecture).
DEFAULT_SHARED_MEM = 48 * 1024

#: The emulated device: H100 limits, but few SMs so that small inputs take multi-block paths
#: (``GPU_EMULATOR_SM_COUNT`` overrides the SM count).
DEVICE = {
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

_device_cache: dict[tuple, dict] = {}

# os.environ.get costs about 0.7 us (the key is encoded, the value decoded); the device and the
# build flavour are looked up on every emulated op call, so read CPython's mapping behind
# os.environ directly (it is kept in step with every os.environ change), bytes keys and values.
try:
    _ENV_DATA = os.environ._data      # type: ignore[attr-defined]
    _ENV_BYTES = isinstance(next(iter(_ENV_DATA), b""), bytes)
except AttributeError:               # pragma: no cover - not CPython's os._Environ
    _ENV_DATA, _ENV_BYTES = None, False


def _env(name: str, key: bytes, default: str = "") -> str:
    """``os.environ.get(name, default)``, without the encoding round trip where possible."""
    if _ENV_DATA is None or not _ENV_BYTES:
        return os.environ.get(name, default)
    v = _ENV_DATA.get(key)
    return default if v is None else os.fsdecode(v)


def device_attributes() -> dict:
    """The emulated device's attributes (the same keys as ``gpu._kernels.device_attributes``).

    The returned dict is shared: callers must not modify it.
    """
    # one dict per SM-count override and build flavour (plans keep their kernels by it), found by
    # the raw environment values: this runs on every emulated op call
    if _ENV_DATA is not None and _ENV_BYTES:
        key = (_ENV_DATA.get(b"GPU_EMULATOR_SM_COUNT"), _ENV_DATA.get(b"GPU_EMULATOR_ASAN"),
               _ENV_DATA.get(b"GPU_EMULATOR_FIBERS"))
    else:
        key = (os.environ.get("GPU_EMULATOR_SM_COUNT"), os.environ.get("GPU_EMULATOR_ASAN"),
               os.environ.get("GPU_EMULATOR_FIBERS"))
    attrs = _device_cache.get(key)
    if attrs is None:
        sm = _env("GPU_EMULATOR_SM_COUNT", b"GPU_EMULATOR_SM_COUNT")
        build_flavour()                # an invalid GPU_EMULATOR_FIBERS is an error here too
        attrs = dict(DEVICE)
        if sm:
            if not sm.isdigit() or int(sm) < 1:
                raise ValueError(f"GPU_EMULATOR_SM_COUNT={sm!r}: expected a positive integer")
            attrs["sm_count"] = int(sm)
        _device_cache[key] = attrs
    return attrs


class EmulatorError(RuntimeError):
    """A kernel misbehaved in the emulator (the message names the kernel, block and source line)."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

def _asan() -> bool:
    return _env("GPU_EMULATOR_ASAN", b"GPU_EMULATOR_ASAN") not in ("", "0")


def _fibers() -> str:
    v = _env("GPU_EMULATOR_FIBERS", b"GPU_EMULATOR_FIBERS", "asm") or "asm"
    if v not in ("asm", "ucontext"):
        raise ValueError(f"GPU_EMULATOR_FIBERS={v!r}: expected 'asm' or 'ucontext'")
    return v


def build_flavour() -> str:
    """Which kind of module builds now: ``release`` or ``asan``, plus ``-ucontext`` if selected."""
    return ("asan" if _asan() else "release") + ("-ucontext" if _fibers() == "ucontext" else "")


def cache_dir() -> Path:
    """The directory holding built modules (``GPU_EMULATOR_CACHE``, else the XDG cache)."""
    if os.environ.get("GPU_EMULATOR_CACHE"):
        return Path(os.environ["GPU_EMULATOR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpu-emulator"


def _flags() -> list[str]:
    flags = ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-fno-gnu-unique", "-fno-strict-aliasing", "-pthread"]
    if _asan():
        # -fsanitize=undefined includes bounds: indexing a fixed-size __shared__ array out of range.
        flags += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=all"]
    else:
        flags += ["-O2"]
    if _fibers() == "ucontext":
        flags.append("-DGPUEMU_UCONTEXT")
    return flags


_compiler_cache: dict[str, tuple[list[str], str]] = {}


def _compiler() -> tuple[list[str], str]:
    """(command, identity): the C++ compiler and a string that changes when it does."""
    env = os.environ.get("CXX", "")
    cached = _compiler_cache.get(env)
    if cached:
        return cached
    if env:
        cmd = shlex.split(env)
    else:
        found = next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
        if found is None:
            raise KernelBuildError("the kernel emulator needs a C++17 compiler and none was found: "
                                   "apt-get install g++ (or set CXX)")
        cmd = [found]
    try:
        version = subprocess.run([*cmd, "--version"], capture_output=True, text=True, check=True).stdout
        machine = subprocess.run([*cmd, "-dumpmachine"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise KernelBuildError(f"C++ compiler {cmd} does not run ({e}): apt-get install g++ (or set CXX)") from e
    result = (cmd, f"{shutil.which(cmd[-1]) or cmd[-1]} {version.splitlines()[0]} {machine.strip()}")
    _compiler_cache[env] = result
    return result


def _check_asan_loaded() -> None:
    with open("/proc/self/maps") as f:
        if "libasan" in f.read():
            return
    raise EmulatorError("GPU_EMULATOR_ASAN=1 needs AddressSanitizer loaded first: run Python as "
                        "LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python ... "
                        "(scripts/test_kernels_asan.sh does this for the kernel tests)")


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

def _run(cmd: Sequence[str], what: str, cwd: Path) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        log = (proc.stderr or proc.stdout).strip()
        if len(log) > 8000:
            log = log[:8000] + "\n[...]"
        raise KernelBuildError(f"emulator: {what} failed:\n{log}\ncommand: {shlex.join(cmd)}")
    return proc.stdout


class _Lock:
    """An exclusive file lock: one builder per cache entry across processes (pytest-xdist)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _cached(key_parts: list[str], name: str, suffix: str, build) -> Path:
    """The cache entry for `key_parts`, calling build(tmp_path) under the lock if it is missing."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:24]
    final = root / f"{name}-{digest}{suffix}"
    if final.exists():
        return final
    with _Lock(root / f"{name}-{digest}.lock"):
        if not final.exists():
            with tempfile.TemporaryDirectory(dir=root, prefix=f".build-{name}-") as tmp:
                out = build(Path(tmp))
                os.replace(out, final)
    return final


def _runtime_key() -> list[str]:
    return [_BUILD_VERSION, *(f"{f}:{(_HERE / f).read_text()}" for f in _RUNTIME_FILES)]


def _runtime_object(cmd: list[str], ident: str, flags: list[str]) -> Path:
    def build(tmp: Path) -> Path:
        out = tmp / "runtime.o"
        _run([*cmd, *flags, "-c", str(_HERE / "runtime.cpp"), "-o", str(out)], "building runtime.cpp", tmp)
        return out
    return _cached([ident, *flags, *_runtime_key()], "runtime", ".o", build)


def _undefined_tls_symbols(obj: Path) -> list[str]:
    """Names of the TLS symbols `obj` uses but does not define: its `extern __shared__` arrays."""
    data = obj.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise KernelBuildError(f"emulator: {obj.name} is not a 64-bit ELF object")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = []
    for _, sh_type, _, _, off, size, link, _, _, entsize in sections:
        if sh_type != 2:  # SHT_SYMTAB
            continue
        str_off = sections[link][4]
        for pos in range(off, off + size, entsize):
            st_name, st_info, _, st_shndx = struct.unpack_from("<IBBH", data, pos)
            if st_info & 0xF == 6 and st_info >> 4 in (1, 2) and st_shndx == 0:  # TLS, global/weak, UND
                end = data.index(b"\0", str_off + st_name)
                names.append(data[str_off + st_name:end].decode())
    return [n for n in names if n != "gpuemu_dynamic_smem"]


def _build_library(source: str, flags: list[str], defines: list[str], tmp: Path) -> Path:
    cmd, _ = _compiler()
    runtime = _runtime_object(cmd, _compiler()[1], flags)
    common = [*cmd, *flags, *defines, "-include", str(_HERE / "cuda_emulator.h"), "-I", str(_HERE)]
    (tmp / "kernel.cpp").write_text(source)
    pre = _run([*common, "-E", "kernel.cpp"], "preprocessing the kernel source", tmp)
    kernels = list(dict.fromkeys(_KERNEL_RE.findall(pre)))
    if not kernels:
        raise KernelBuildError('emulator: the source defines no extern "C" __global__ kernel')
    entries = ",\n    ".join(f"GPUEMU_KERNEL_ENTRY({k})" for k in kernels)
    (tmp / "module.cpp").write_text(
        '#include "kernel.cpp"\n'
        f"extern const gpuemu::KernelEntry gpuemu_kernel_table[] = {{\n    {entries}\n}};\n"
        f"extern const int gpuemu_kernel_count = {len(kernels)};\n")
    _run([*common, "-c", "module.cpp", "-o", "module.o"], "compiling the kernel source", tmp)
    # Every extern __shared__ array is one buffer: alias each name to gpuemu_dynamic_smem.
    aliases = "".join(
        f'extern __thread unsigned char gpuemu_alias_{i}[GPUEMU_BYTES] __asm__("{name}") '
        f'__attribute__((alias("gpuemu_dynamic_smem")));\n'
        for i, name in enumerate(_undefined_tls_symbols(tmp / "module.o")))
    (tmp / "smem.cpp").write_text(
        "#define GPUEMU_BYTES (227 * 1024 + 1024)  // capacity + guard zone, as in runtime.cpp\n"
        "__attribute__((aligned(256))) __thread unsigned char gpuemu_dynamic_smem[GPUEMU_BYTES];\n"
        + aliases)
    _run([*cmd, *flags, "-c", "smem.cpp", "-o", "smem.o"], "compiling the shared-memory aliases", tmp)
    out = tmp / "module.so"
    _run([*cmd, *flags, "-shared", "-o", str(out), "module.o", "smem.o", str(runtime), "-ldl"],
         "linking the kernel module", tmp)
    return out


def build_module(source: str, defines: Sequence[str], name: str = "kernels") -> "Module":
    """Build (or find in the cache) and load the emulated module for `source` with `-D` defines.

    >>> src = 'extern "C" __global__ void fill(float* y, float v) { y[threadIdx.x] = v; }'
    >>> k = build_module(src, []).get_function("fill")               # doctest: +SKIP
    """
    if _asan():
        _check_asan_loaded()
    cmd, ident = _compiler()
    flags = _flags()
    key = [ident, *flags, *defines, source, *_runtime_key()]
    path = _cached(key, name, ".so", lambda tmp: _build_library(source, flags, list(defines), tmp))
    return _load(path)


_loaded: dict[Path, "Module"] = {}
_load_lock = threading.Lock()


def _load(path: Path) -> "Module":
    with _load_lock:
        mod = _loaded.get(path)
        if mod is None:
            mod = _loaded[path] = Module(path)
        return mod


# ---------------------------------------------------------------------------------------------
# Modules and launches
# ---------------------------------------------------------------------------------------------

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
                                      ctypes.c_ulonglong, ctypes.c_int]
        lib.gpuemu_static_smem_bytes.restype = ctypes.c_uint
        self.path = path
        self.lib = lib
        #: Static shared memory of all the module's kernels together (the emulator cannot tell which
        #: kernel declares which array): an upper bound for any one kernel's.
        self.static_smem_bytes = int(lib.gpuemu_static_smem_bytes())
        self.kernels = {}
        for i in range(lib.gpuemu_kernel_count_()):
            name = lib.gpuemu_kernel_name(i).decode()
            sig = lib.gpuemu_kernel_signature(i).decode()
            self.kernels[name] = EmulatedKernel(self, i, name, sig.split(",") if sig else [])

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


def _env_order() -> tuple[int, int]:
    order = os.environ.get("GPU_EMULATOR_ORDER", "forward") or "forward"
    if order not in ("forward", "reverse"):
        raise ValueError(f"GPU_EMULATOR_ORDER={order!r}: expected 'forward' or 'reverse'")
    seed = os.environ.get("GPU_EMULATOR_BLOCK_SEED", "") or "0"
    try:
        seed_value = int(seed)
    except ValueError:
        raise ValueError(f"GPU_EMULATOR_BLOCK_SEED={seed!r}: expected an integer") from None
    return int(order == "reverse"), seed_value & (2**64 - 1)


class EmulatedKernel:
    """One kernel of a Module; called like CuPy's RawKernel: ``k(grid, block, args, shared_mem)``.

    ``k(..., cooperative=True)`` launches as ``cuLaunchCooperativeKernel`` does: every block of the
    grid runs at once, so the kernel may call ``cooperative_groups::this_grid().sync()``. The
    caller (``gpu._kernels.launch``) checks that the grid fits the emulated device.
    """

    def __init__(self, module: Module, index: int, name: str, params: list[str]):
        self.module = module
        self.index = index
        self.name = name
        self.params = params  # "*float32" for a float*, "int32" for an int, "*any" for void*/char*

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
        reverse, seed = _env_order()
        g = (ctypes.c_uint * 3)(*grid)
        b = (ctypes.c_uint * 3)(*block)
        rc = self.module.lib.gpuemu_launch(self.index, g, b, shared_mem, argv, reverse, seed, int(cooperative))
        del values
        if rc != 0:
            raise EmulatorError(self.module.lib.gpuemu_last_error().decode())
