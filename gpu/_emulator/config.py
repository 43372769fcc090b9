"""The emulator's configuration: the emulated device, the environment (strict checks, thread
and block orders, build flavour; ``modes`` sets them for a block of code), the build flags, the
C++ compiler and the cache directory. The variables are described in the package's docstring."""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Iterator, Sequence

from gpu._errors import KernelBuildError

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
               _ENV_DATA.get(b"GPU_EMULATOR_FIBERS"), _ENV_DATA.get(b"GPU_EMULATOR_RELAX"),
               _ENV_DATA.get(b"GPU_EMULATOR_TRACE"))
    else:
        key = (os.environ.get("GPU_EMULATOR_SM_COUNT"), os.environ.get("GPU_EMULATOR_ASAN"),
               os.environ.get("GPU_EMULATOR_FIBERS"), os.environ.get("GPU_EMULATOR_RELAX"),
               os.environ.get("GPU_EMULATOR_TRACE"))
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


def _trace() -> bool:
    on = _env("GPU_EMULATOR_TRACE", b"GPU_EMULATOR_TRACE") not in ("", "0")
    if on and _asan():
        raise ValueError("GPU_EMULATOR_TRACE=1 and GPU_EMULATOR_ASAN=1 exclude each other: the trace "
                         "flavour defines the AddressSanitizer callbacks itself")
    return on


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
    """Which kind of module builds now: ``release``, ``asan`` or ``trace``, plus ``-ucontext`` if
    selected and ``-unaligned`` without the alignment check."""
    kind = "trace" if _trace() else "asan" if _asan() else "release"
    return (kind + ("-ucontext" if _fibers() == "ucontext" else "")
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
    elif _trace():
        # the runtime reads the accesses of the kernel code (instrument_flags) in this flavour;
        # -g1: call sites named by function, file and line
        flags += ["-O2", "-g1", "-DGPUEMU_TRACE"]
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


def _instrument_flags() -> list[str]:
    """The trace flavour's extra flags for the kernel source alone: every load and store becomes a
    call of an AddressSanitizer callback that runtime.cpp defines (no libasan, no shadow memory).
    No scalar replacement of aggregates and no vectorizer: a float4 copy stays one 16-byte access
    and scalar loops stay scalar, as the CUDA compiler emits them."""
    if not _trace():
        return []
    return ["-fsanitize=address", "--param", "asan-instrumentation-with-call-threshold=0",
            "--param", "asan-stack=0", "--param", "asan-globals=0", "-fno-tree-sra", "-fno-tree-vectorize",
            "-fno-tree-slp-vectorize"]


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
