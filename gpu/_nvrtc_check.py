"""Compile kernel families with NVRTC for every target architecture: no GPU and no driver needed.

CuPy's compiler wrapper needs a CUDA driver; NVRTC itself does not. With NVRTC, ``cuda-bindings`` of
the same major (its ``nvrtc`` module), the CUDA runtime headers (``cuda_fp16.h``,
``cooperative_groups.h``) and CCCL (``nv/target``, which cooperative_groups.h includes) installed, this
compiles the exact source CuPy would (``gpu._kernels.family_source``) to CUBIN for sm_75..sm_90 on any
machine, and reads ptxas's report. The headers are those of NVRTC's major version
(``gpu._toolchain.header_dirs``), as for CuPy:

- CUDA 12 (the ``nvrtc`` and ``test`` extras): ``nvidia-cuda-nvrtc-cu12``, ``cuda-bindings>=12,<13``,
  ``nvidia-cuda-runtime-cu12``, ``nvidia-cuda-cccl-cu12``;
- CUDA 13 (the ``nvrtc13`` extra, in a venv of its own: cuda-bindings 12 and 13 cannot share one):
  ``nvidia-cuda-nvrtc``, ``cuda-bindings``, ``nvidia-cuda-runtime``, ``nvidia-cuda-cccl``, all 13.x.

A family is clean when every dtype x declared variant x architecture compiles with no warning, and
ptxas reports no spill stores or loads on sm_80 and sm_90 (the architectures the kernels are tuned
for; a spill there is a performance bug).

>>> from gpu import _nvrtc_check
>>> _nvrtc_check.unavailable_reason() is None or True
True
>>> problems = _nvrtc_check.check_family("softmax")        # doctest: +SKIP
>>> assert not problems, "\\n".join(problems)              # doctest: +SKIP

Kernel authors' tests call ``check_family`` (or ``check_variant``) for their family;
``tests/test_nvrtc.py`` runs ``check_variant`` for every ``cuda_src/*.cu`` x dtype x variant, one test
each, so pytest-xdist spreads the compiles. Successful compiles are cached on disk.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable

from gpu import _kernels, _toolchain

__all__ = ["ARCHS", "SPILL_ARCHS", "NvrtcError", "unavailable_reason", "nvrtc_major", "compile_cubin", "compile_image",
           "variants", "check_variant", "check_family"]

ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")
SPILL_ARCHS = ("sm_80", "sm_90")

_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


class NvrtcError(RuntimeError):
    """NVRTC rejected the source (the message holds its log)."""


def _nvrtc():
    from cuda.bindings import nvrtc
    return nvrtc


def unavailable_reason() -> str | None:
    """Why the check cannot run here (a sentence naming the package to install), or None."""
    try:
        nvrtc = _nvrtc()
    except ImportError:
        return ("cuda-bindings is not installed: pip install the 'nvrtc' extra (CUDA 12) or the 'nvrtc13' "
                "extra (CUDA 13)")
    try:
        err, major, _ = nvrtc.nvrtcVersion()
    except Exception as e:  # the bindings load libnvrtc lazily and raise on its absence
        return f"NVRTC cannot be loaded ({e}): {_wheel_hint()}"
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return f"NVRTC is not usable ({err}): {_wheel_hint()}"
    try:
        _toolchain.nvrtc_include_options(major)
    except _kernels.KernelBuildError as e:
        return str(e)
    return None


def _wheel_hint() -> str:
    """The NVRTC wheel of the installed cuda-bindings' major version."""
    from importlib import metadata
    try:
        major = int(metadata.version("cuda-bindings").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        major = 12
    w = _toolchain.CUDA_WHEELS.get(major, _toolchain.CUDA_WHEELS[12])
    return f"pip install '{w['nvrtc']}' (cuda-bindings {major}.x needs NVRTC {major})"


def nvrtc_major() -> int:
    """The major version of the NVRTC that ``cuda.bindings`` loads."""
    return _toolchain.nvrtc_version()[0]


def _check(nvrtc, result, what: str) -> None:
    err = result[0] if isinstance(result, tuple) else result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise NvrtcError(f"{what}: {err}")


#: Files whose contents version an include directory (the CUDA runtime's, CCCL's): the cache key
#: holds these, not the directory's path, so venvs with the same wheels share the compiled logs.
_VERSION_FILES = ("cuda_runtime_api.h", "cuda_fp16.h", "cuda_bf16.h", "cuda/std/__cccl/version.h")


def _log_cache(source: str, opts: list[str]) -> Path:
    from gpu._emulator import cache_dir
    nvrtc = _nvrtc()
    version = nvrtc.nvrtcVersion()[1:]
    headers, rest = [], []
    for o in opts:
        if o.startswith("-I"):
            for f in _VERSION_FILES:
                path = os.path.join(o[2:], f)
                if os.path.isfile(path):
                    with open(path, "rb") as fh:
                        headers.append((f, hashlib.sha256(fh.read()).hexdigest()))
        else:
            rest.append(o)
    key = hashlib.sha256(repr((version, headers, rest, source)).encode()).hexdigest()[:32]
    return cache_dir() / "nvrtc" / f"{key}.log"


def compile_cubin(source: str, arch: str, defines: Iterable[str] = (), name: str = "kernel.cu") -> str:
    """Compile `source` to CUBIN for `arch` (e.g. "sm_90") with ``-D`` flags; returns the log.

    The log includes ptxas's per-kernel report (registers, stack, spills). Raises NvrtcError with
    the log if compilation fails. Logs of successful compiles are cached (keyed by the NVRTC
    version, options and source) next to the emulator's builds, so a re-run checks only what
    changed; the CUBIN is kept beside the log (``compile_image``).
    """
    cached = _log_cache(source, _options(arch, defines))
    if cached.is_file():
        return cached.read_text()
    return compile_image(source, arch, defines, name)[1]


def compile_image(source: str, arch: str, defines: Iterable[str] = (), name: str = "kernel.cu") -> tuple[bytes, str]:
    """``compile_cubin``'s compile, returning (CUBIN, log), both cached: what the SASS figures
    (``gpu/bench/sass.py``) disassemble. One process compiles a given key at a time (a file lock),
    so pytest-xdist workers asking for the same module wait for it instead of compiling it twice."""
    import fcntl
    opts = _options(arch, defines)
    log_path = _log_cache(source, opts)
    image_path = log_path.with_suffix(".cubin")
    if log_path.is_file() and image_path.is_file():
        return image_path.read_bytes(), log_path.read_text()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if log_path.is_file() and image_path.is_file():
            return image_path.read_bytes(), log_path.read_text()
        log, image = _compile(source, opts, name)
        for path, data in ((image_path, image), (log_path, log.encode())):
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
    return image, log


def _options(arch: str, defines: Iterable[str]) -> list[str]:
    return [f"--gpu-architecture={arch}", "-std=c++17", *_toolchain.nvrtc_include_options(nvrtc_major()),
            "--ptxas-options=-v", *defines]


def _compile(source: str, opts: list[str], name: str) -> tuple[str, bytes]:
    nvrtc = _nvrtc()
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    _check(nvrtc, err, "nvrtcCreateProgram")
    try:
        result = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        err, size = nvrtc.nvrtcGetProgramLogSize(prog)
        _check(nvrtc, err, "nvrtcGetProgramLogSize")
        buf = b" " * size
        _check(nvrtc, nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.rstrip(b"\0 ").decode(errors="replace")
        if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise NvrtcError(f"{name} {' '.join(opts)}:\n{log}")
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(nvrtc, err, "nvrtcGetCUBINSize")
        image = b" " * size
        _check(nvrtc, nvrtc.nvrtcGetCUBIN(prog, image), "nvrtcGetCUBIN")
        return log, image
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def variants(family: str | os.PathLike) -> list[tuple[object, dict[str, str]]]:
    """Every (dtype, tuning defines) pair the family is built with: its NVRTC check matrix."""
    return [(dt, v) for dt in _kernels.family_dtypes(family) for v in _kernels.family_variants(family)]


def check_variant(family: str | os.PathLike, dtype, variant: dict[str, str], archs: Iterable[str] = ARCHS,
                  spill_archs: Iterable[str] = SPILL_ARCHS) -> list[str]:
    """Compile one dtype x variant of `family` for `archs`; returns the problems found.

    A problem is a compile error, any warning line, or a spill on one of `spill_archs`. An empty
    list means clean.
    """
    source = _kernels.family_source(family)
    name = os.path.basename(os.fspath(family)) if isinstance(family, os.PathLike) else f"{family}.cu"
    defines = dict(variant)
    if dtype is not None:
        defines.update(_kernels.dtype_defines(dtype))
    flags = [f"-D{k}={v}" for k, v in sorted(defines.items())]
    label = f"{name} [{'no dtype' if dtype is None else dtype.name}{''.join(f' {k}={v}' for k, v in variant.items())}]"
    problems = []
    for arch in archs:
        try:
            log = compile_cubin(source, arch, flags, name)
        except NvrtcError as e:
            problems.append(f"{label} {arch}: does not compile:\n{e}")
            continue
        problems += [f"{label} {arch}: {line.strip()}" for line in log.splitlines() if "warning" in line.lower()]
        if arch in set(spill_archs):
            spilled = [m for m in _SPILL_RE.finditer(log) if int(m[1]) or int(m[2])]
            if spilled:
                problems.append(f"{label} {arch}: ptxas spills in {len(spilled)} kernel(s):\n{log}")
    return problems


def check_family(family: str | os.PathLike, archs: Iterable[str] = ARCHS,
                 spill_archs: Iterable[str] = SPILL_ARCHS) -> list[str]:
    """``check_variant`` over the family's whole matrix (every dtype x declared variant)."""
    archs, spill_archs = tuple(archs), tuple(spill_archs)
    return [p for dt, v in variants(family) for p in check_variant(family, dt, v, archs, spill_archs)]
