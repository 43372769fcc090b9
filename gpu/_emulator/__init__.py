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
in a shuffled order (a cooperative launch runs them all at once, so
``cooperative_groups::this_grid().sync()`` works), each CUDA thread is a fiber, threads switch only
at barriers and warp operations, in a fresh shuffled order at each; a divergent barrier, a
grid.sync that some thread never reaches, a warp operation that cannot complete, an overflow of
dynamic shared memory or a scalar argument of the wrong type raises ``EmulatorError`` naming the
kernel and the source line; shared memory starts every block as NaN and stays private to its
block.

Strict by default
-----------------
The emulator is at least as strict as a GPU. Each of these is on unless ``GPU_EMULATOR_RELAX``
names it (or ``modes(relax=...)``):

``launch_bounds``
    ``__launch_bounds__(maxThreads, minBlocks)`` is kept (``EmulatedKernel.max_threads_per_block``);
    a launch with more threads per block fails as CUDA's does (cudaErrorLaunchOutOfResources).
``shared_memory``
    Static + dynamic shared memory is held to the emulated device's limits, with CUDA's opt-in
    rule: a kernel may take ``48 KiB - static`` bytes of dynamic shared memory until its
    ``max_dynamic_shared_size_bytes`` (cudaFuncAttributeMaxDynamicSharedMemorySize, as on CuPy's
    RawKernel) is raised, at most to the opt-in limit minus its static shared memory.
    ``gpu._kernels.launch`` raises it above 48 KiB, as it does on CuPy.
``alignment``
    Kernels are built with ``-fsanitize=alignment``: an access through a pointer not aligned to its
    type (a ``float4`` load from an address that is not a multiple of 16) stops the launch with
    the kernel, block, thread, type and source line, where a GPU faults with "misaligned address".
``registers``
    Cooperative launches must fit the device at once counting registers too
    (``max_active_blocks_per_sm``): the kernel's register count is ptxas's for the emulated
    architecture (sm_90) through NVRTC where it is installed (cuda-bindings and
    nvidia-cuda-nvrtc, as for ``gpu._nvrtc_check``; the report is cached with the builds), else a
    conservative bound: the most registers its ``__launch_bounds__`` let the compiler
    use, or 255 (the per-thread maximum) without them.

Environment
-----------
``GPU_EMULATOR_ORDER``
    The order threads run between synchronization points: ``shuffle`` (default: a fresh seeded
    permutation of the blocks of a group and of the threads of a block at every sweep, so every
    phase between barriers interleaves differently), ``forward`` or ``reverse`` (fixed orders; a
    missing barrier shows up in one or the other).
``GPU_EMULATOR_SEED``
    An integer (default 1): seeds the shuffled thread order, and the block order unless
    ``GPU_EMULATOR_BLOCK_SEED`` is set. Each launch mixes it with the kernel's name and launch
    shape, so an order can be replayed alone.
``GPU_EMULATOR_BLOCK_SEED``
    An integer: run blocks in an order shuffled by this seed; ``0`` runs them in index order
    (default: ``GPU_EMULATOR_SEED``).
``GPU_EMULATOR_RELAX``
    Comma-separated checks to turn off: ``launch_bounds``, ``shared_memory``, ``alignment``,
    ``registers``, or ``all`` (default: none; see above).
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

import contextlib
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
from typing import Any, Iterator, Sequence

import numpy as np

from gpu._errors import KernelBuildError

__all__ = ["EmulatorError", "EmulatedKernel", "Module", "build_module", "build_flavour", "cache_dir", "DEVICE",
           "CHECKS", "device_attributes", "modes"]

_HERE = Path(__file__).resolve().parent
# cuda_fp16.h, cuda_bf16.h, cuda_runtime.h: empty stand-ins (cuda_emulator.h declares it all);
# cooperative_groups.h: the grid group. Found by the kernel's #include through -I on this directory.
_RUNTIME_FILES = ("cuda_emulator.h", "runtime.cpp", "cuda_fp16.h", "cuda_bf16.h", "cuda_runtime.h",
                  "cooperative_groups.h")
# Bump when the build steps below change what they produce from the same inputs.
_BUILD_VERSION = "2"

# A kernel in the preprocessed source (GPUEMU_FIND_KERNELS): the __global__ marker, then `void`,
# then optionally the __launch_bounds__ marker (its arguments are read with _balanced_args).
_KERNEL_RE = re.compile(
    r'extern\s+"C"\s+__attribute__\s*\(\(\s*noinline\s*,\s*used\s*,\s*section\s*\(\s*"\.text\.gpuemu_kernels"\s*\)\s*\)\)'
    r"\s+void\s+(gpuemu_launch_bounds\s*\(|\w+\s*\()")
_NAME_RE = re.compile(r"\s*(\w+)\s*\(")


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
    # the register file (sm_70..sm_90): 64K 32-bit registers per SM in 4 partitions, allocated
    # per warp in units of 256, at most 255 per thread
    "registers_per_sm": 65536,
    "max_registers_per_thread": 255,
}

#: The checks that make the emulator as strict as a GPU (all on unless GPU_EMULATOR_RELAX names them).
CHECKS = ("launch_bounds", "shared_memory", "alignment", "registers")
_ORDERS = {"forward": 0, "reverse": 1, "shuffle": 2}

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
               _ENV_DATA.get(b"GPU_EMULATOR_FIBERS"), _ENV_DATA.get(b"GPU_EMULATOR_RELAX"))
    else:
        key = (os.environ.get("GPU_EMULATOR_SM_COUNT"), os.environ.get("GPU_EMULATOR_ASAN"),
               os.environ.get("GPU_EMULATOR_FIBERS"), os.environ.get("GPU_EMULATOR_RELAX"))
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


_relax_cache: dict[str, frozenset] = {}


def relaxed() -> frozenset:
    """The checks ``GPU_EMULATOR_RELAX`` turns off (a subset of ``CHECKS``)."""
    raw = _env("GPU_EMULATOR_RELAX", b"GPU_EMULATOR_RELAX")
    out = _relax_cache.get(raw)
    if out is None:
        names = {n.strip() for n in raw.replace(" ", ",").split(",") if n.strip()}
        if "all" in names:
            names = (names - {"all"}) | set(CHECKS)
        unknown = sorted(names - set(CHECKS))
        if unknown:
            raise ValueError(f"GPU_EMULATOR_RELAX={raw!r}: unknown check(s) {', '.join(unknown)}; "
                             f"expected some of {', '.join(CHECKS)} or 'all'")
        out = _relax_cache[raw] = frozenset(names)
    return out


def build_flavour() -> str:
    """Which kind of module builds now: ``release`` or ``asan``, plus ``-ucontext`` if selected and
    ``-unaligned`` without the alignment check."""
    return (("asan" if _asan() else "release") + ("-ucontext" if _fibers() == "ucontext" else "")
            + ("-unaligned" if "alignment" in relaxed() else ""))


@contextlib.contextmanager
def modes(order: str | None = None, seed: int | None = None, block_seed: int | None = None,
          relax: Sequence[str] | None = None) -> Iterator[None]:
    """Run the block with other emulator modes (the environment variables above, restored after).

    >>> with modes(order="forward", block_seed=0, relax=["alignment"]):    # doctest: +SKIP
    ...     launch(...)
    """
    values = {"GPU_EMULATOR_ORDER": order, "GPU_EMULATOR_SEED": seed, "GPU_EMULATOR_BLOCK_SEED": block_seed,
              "GPU_EMULATOR_RELAX": None if relax is None else ",".join(relax)}
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = str(v)
        relaxed()
        _launch_order()
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    if "alignment" in relaxed():
        if _asan():
            flags.append("-fno-sanitize=alignment")
    elif not _asan():
        # checks only: the handler is runtime.cpp's, so the link (below) leaves UBSan's library out
        flags.append("-fsanitize=alignment")
    return flags


def _link_flags(flags: list[str]) -> list[str]:
    return [f for f in flags if f != "-fsanitize=alignment"]


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


def _find_kernels(pre: str) -> dict[str, tuple[str, str]]:
    """kernel name -> (maxThreads, minBlocks) expressions ("0" where not declared), from the
    preprocessed source."""
    out: dict[str, tuple[str, str]] = {}
    for m in _KERNEL_RE.finditer(pre):
        bounds = ("0", "0")
        rest = m.end(1) - 1  # at the "(" that ends the match
        if m.group(1).startswith("gpuemu_launch_bounds"):
            depth, i = 0, rest
            while True:
                depth += {"(": 1, ")": -1}.get(pre[i], 0)
                if depth == 0:
                    break
                i += 1
            args = _split_args(pre[rest + 1:i])
            bounds = (f"({args[0]})", f"({args[1]})" if len(args) > 1 else "0")
            name = _NAME_RE.match(pre, i + 1)
            if name is None:
                continue
            kernel = name.group(1)
        else:
            kernel = re.match(r"\w+", m.group(1)).group(0)
        out.setdefault(kernel, bounds)
    return out


def _split_args(text: str) -> list[str]:
    """``text`` split at its top-level commas."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def _build_library(source: str, flags: list[str], defines: list[str], tmp: Path) -> Path:
    cmd, _ = _compiler()
    runtime = _runtime_object(cmd, _compiler()[1], flags)
    common = [*cmd, *flags, *defines, "-include", str(_HERE / "cuda_emulator.h"), "-I", str(_HERE)]
    (tmp / "kernel.cpp").write_text(source)
    pre = _run([*common, "-DGPUEMU_FIND_KERNELS", "-E", "kernel.cpp"], "preprocessing the kernel source", tmp)
    kernels = _find_kernels(pre)
    if not kernels:
        raise KernelBuildError('emulator: the source defines no extern "C" __global__ kernel')
    entries = ",\n    ".join(f"GPUEMU_KERNEL_ENTRY({k}, {bounds[0]}, {bounds[1]})" for k, bounds in kernels.items())
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
    _run([*cmd, *_link_flags(flags), "-shared", "-o", str(out), "module.o", "smem.o", str(runtime), "-ldl"],
         "linking the kernel module", tmp)
    return out


def build_module(source: str, defines: Sequence[str], name: str = "kernels", nvrtc_options=None) -> "Module":
    """Build (or find in the cache) and load the emulated module for `source` with `-D` defines.

    ``nvrtc_options``: a callable giving NVRTC's ``-I`` options (``gpu._kernels`` passes ``gpu._toolchain``'s
    ``nvrtc_include_options``), so that the register check can ask ptxas; without it the check
    uses its conservative bound.

    >>> src = 'extern "C" __global__ void fill(float* y, float v) { y[threadIdx.x] = v; }'
    >>> k = build_module(src, []).get_function("fill")               # doctest: +SKIP
    """
    if _asan():
        _check_asan_loaded()
    cmd, ident = _compiler()
    flags = _flags()
    key = [ident, *flags, *defines, source, *_runtime_key()]
    path = _cached(key, name, ".so", lambda tmp: _build_library(source, flags, list(defines), tmp))
    mod = _load(path)
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


_order_cache: dict[tuple, tuple[int, int, int]] = {}


def _launch_order() -> tuple[int, int, int]:
    """(order, thread seed, block seed) from GPU_EMULATOR_ORDER / _SEED / _BLOCK_SEED."""
    key = (_env("GPU_EMULATOR_ORDER", b"GPU_EMULATOR_ORDER"), _env("GPU_EMULATOR_SEED", b"GPU_EMULATOR_SEED"),
           _env("GPU_EMULATOR_BLOCK_SEED", b"GPU_EMULATOR_BLOCK_SEED"))
    out = _order_cache.get(key)
    if out is None:
        order, seed, block_seed = key
        if (order or "shuffle") not in _ORDERS:
            raise ValueError(f"GPU_EMULATOR_ORDER={order!r}: expected 'shuffle', 'forward' or 'reverse'")
        values = []
        for name, v in (("GPU_EMULATOR_SEED", seed or "1"), ("GPU_EMULATOR_BLOCK_SEED", block_seed or seed or "1")):
            try:
                values.append(int(v) & (2**64 - 1))
            except ValueError:
                raise ValueError(f"{name}={v!r}: expected an integer") from None
        out = _order_cache[key] = (_ORDERS[order or "shuffle"], values[0], values[1])
    return out


class EmulatedKernel:
    """One kernel of a Module; called like CuPy's RawKernel: ``k(grid, block, args, shared_mem)``.

    ``k(..., cooperative=True)`` launches as ``cuLaunchCooperativeKernel`` does: every block of the
    grid runs at once, so the kernel may call ``cooperative_groups::this_grid().sync()``; the grid
    must fit the device at once (``max_active_blocks_per_sm``).

    A launch past the kernel's ``__launch_bounds__`` or its shared-memory limit fails as on a GPU
    (``EmulatorError``); see "Strict by default" above.
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
        rc = self.module.lib.gpuemu_launch(self.index, g, b, shared_mem, argv, order, thread_seed, block_seed,
                                           int(cooperative))
        del values
        if rc != 0:
            raise EmulatorError(self.module.lib.gpuemu_last_error().decode())
