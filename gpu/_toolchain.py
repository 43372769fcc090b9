"""Where NVRTC's headers come from: the CUDA runtime headers and the CCCL of NVRTC's own major
version, found among NVIDIA's wheels, ``$CUDA_PATH``, ``/usr/local/cuda*`` and CuPy's CCCL, and the
wheel or extra to name when a piece is missing. Used by the kernel loader (``gpu._kernels``), the
NVRTC compile check (``gpu._nvrtc_check``) and the emulator's register check.

NVRTC 12 compiles with CUDA 12's runtime headers (the ``nvidia-cuda-runtime-cu12`` wheel or a CUDA
12 toolkit), NVRTC 13 with CUDA 13's, never whichever is found first (NVRTC 12 cannot compile CUDA
13's headers); ``<nv/target>``, which cooperative_groups.h includes, comes from a CCCL that supports
that major. See ``choose_header_dirs``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from gpu._errors import KernelBuildError

__all__ = ["CUDA_WHEELS", "CCCL_CUDA_MAJORS", "runtime_headers_major", "cccl_headers_major", "choose_header_dirs",
           "installed_cupy_cuda_major", "nvrtc_version", "nvrtc_hint", "header_dirs", "cuda_include_dir",
           "cccl_include_dir", "nvrtc_include_options"]

#: What a CUDA major version's headers and compiler come from as pip wheels, and the project extra
#: that brings them. CUDA 13's wheels dropped the -cu12 style suffix and share one ``nvidia/cu13``
#: tree.
CUDA_WHEELS: dict[int, dict[str, str]] = {
    12: {"runtime": "nvidia-cuda-runtime-cu12", "cccl": "nvidia-cuda-cccl-cu12", "nvrtc": "nvidia-cuda-nvrtc-cu12",
         "bindings": "cuda-bindings>=12,<13", "cupy": "cupy-cuda12x", "extra": "cuda12"},
    13: {"runtime": "nvidia-cuda-runtime>=13,<14", "cccl": "nvidia-cuda-cccl>=13,<14",
         "nvrtc": "nvidia-cuda-nvrtc>=13,<14", "bindings": "cuda-bindings>=13,<14", "cupy": "cupy-cuda13x",
         "extra": "cuda13"},
}

#: The CUDA majors a CCCL major supports, its own toolkit's first (CCCL 2 shipped with CUDA 12,
#: CCCL 3 with CUDA 13 and supports CUDA 12 too).
CCCL_CUDA_MAJORS: dict[int, tuple[int, ...]] = {2: (12, 11), 3: (13, 12)}

_CUDART_VERSION_RE = re.compile(r"^\s*#\s*define\s+CUDART_VERSION\s+(\d+)", re.MULTILINE)
_CCCL_VERSION_RE = re.compile(r"^\s*#\s*define\s+CCCL_VERSION\s+(\d+)", re.MULTILINE)


def runtime_headers_major(d: str | os.PathLike) -> int | None:
    """The CUDA major version of the runtime headers in ``d`` (``CUDART_VERSION`` of its
    ``cuda_runtime_api.h``), or None if ``d`` has no ``cuda_fp16.h`` or no readable version."""
    d = Path(d)
    try:
        if not (d / "cuda_fp16.h").is_file():
            return None
        m = _CUDART_VERSION_RE.search((d / "cuda_runtime_api.h").read_text(errors="replace"))
    except OSError:
        return None
    return int(m[1]) // 1000 if m else None


def cccl_headers_major(d: str | os.PathLike) -> int | None:
    """The CCCL major version of the headers in ``d`` (``CCCL_VERSION`` of
    ``cuda/std/__cccl/version.h``), or None if ``d`` has no ``nv/target`` or no readable version."""
    d = Path(d)
    try:
        if not (d / "nv" / "target").is_file():
            return None
        m = _CCCL_VERSION_RE.search((d / "cuda" / "std" / "__cccl" / "version.h").read_text(errors="replace"))
    except OSError:
        return None
    return int(m[1]) // 1000000 if m else None


def _unique(paths) -> list[str]:
    out = []
    for p in paths:
        if p and p not in out:
            out.append(p)
    return out


def _header_candidates() -> tuple[list[str], list[str]]:
    """(runtime header directories, CCCL directories) that may hold CUDA headers, in order of
    preference: NVIDIA's pip wheels (every ``nvidia/`` tree on ``sys.path``, and what
    ``cuda.pathfinder`` finds), ``$CUDA_PATH``, ``$CUDA_HOME``, ``/usr/local/cuda`` and
    ``/usr/local/cuda-*``, then (CCCL) the copy bundled with CuPy. Their versions decide."""
    import glob
    import sys
    runtime, cccl = [], []
    for entry in sys.path:
        nv = os.path.join(entry or ".", "nvidia")
        if not os.path.isdir(nv):
            continue
        runtime.append(os.path.join(nv, "cuda_runtime", "include"))                   # -cu12 wheels
        cccl.append(os.path.join(nv, "cuda_cccl", "include"))
        for tree in sorted(glob.glob(os.path.join(nv, "cu[0-9]*")), reverse=True):     # nvidia/cu13, ...
            runtime.append(os.path.join(tree, "include"))
            cccl.append(os.path.join(tree, "include", "cccl"))
    try:
        from cuda.pathfinder import find_nvidia_header_directory
        runtime.append(find_nvidia_header_directory("cudart"))
        cccl.append(find_nvidia_header_directory("cccl"))
    except Exception:  # no cuda-pathfinder, or one without header lookup: the scan above covers the wheels
        pass
    roots = [os.environ.get(v) for v in ("CUDA_PATH", "CUDA_HOME")] + ["/usr/local/cuda"]
    roots += sorted(glob.glob("/usr/local/cuda-[0-9]*"), reverse=True)
    for root in filter(None, roots):
        runtime.append(os.path.join(root, "include"))
        cccl += [os.path.join(root, "include", "cccl"), os.path.join(root, "include")]   # CUDA 13, CUDA 12
    try:
        import cupy
        cccl.append(os.path.join(os.path.dirname(cupy.__file__), "_core", "include", "cupy", "_cccl", "libcudacxx"))
    except Exception:  # no CuPy, or one that does not import here
        pass
    return _unique(runtime), _unique(cccl)


def choose_header_dirs(nvrtc_major: int, runtime: Sequence[str], cccl: Sequence[str]) -> tuple[str, str]:
    """(runtime header dir, CCCL dir) for NVRTC of major version ``nvrtc_major``, from candidate
    directories in order of preference.

    The runtime headers (``cuda_fp16.h``, ``cooperative_groups.h``) must be of the same CUDA major
    as NVRTC: NVRTC 12 cannot parse CUDA 13's ``cuda_fp8.hpp``, which ``cooperative_groups.h``
    pulls in. CCCL must support that CUDA major (``CCCL_CUDA_MAJORS``); one of the same toolkit
    (CCCL 2 for CUDA 12, 3 for 13) is preferred, then the first that supports it. Directories
    whose version cannot be read are skipped. Raises ``KernelBuildError`` naming the wheels of
    that CUDA major, and what was found, when none fits.

    >>> choose_header_dirs(12, ["/opt/cuda13/include", "/venv/nvidia/cuda_runtime/include"],
    ...                    ["/venv/nvidia/cuda_cccl/include"])     # doctest: +SKIP
    ('/venv/nvidia/cuda_runtime/include', '/venv/nvidia/cuda_cccl/include')
    """
    wheels = CUDA_WHEELS.get(nvrtc_major)
    found_rt = [(d, runtime_headers_major(d)) for d in runtime]
    rt = next((d for d, major in found_rt if major == nvrtc_major), None)
    found_cc = [(d, cccl_headers_major(d)) for d in cccl]
    fits = [(CCCL_CUDA_MAJORS.get(major, ()).index(nvrtc_major), i, d) for i, (d, major) in enumerate(found_cc)
            if nvrtc_major in CCCL_CUDA_MAJORS.get(major, ())]
    cc = min(fits)[2] if fits else None
    if rt is not None and cc is not None:
        return rt, cc

    def seen(found, what):
        have = [f"{d} ({what} {major})" for d, major in found if major is not None]
        return "found only " + ", ".join(have) if have else "found none"

    hint = (f"pip install '{wheels['runtime']}' '{wheels['cccl']}' (or the '{wheels['extra']}' extra: "
            f"pip install 'gpu[{wheels['extra']}]'), or install a CUDA {nvrtc_major} toolkit and set CUDA_PATH"
            if wheels else f"install a CUDA {nvrtc_major} toolkit and set CUDA_PATH")
    if rt is None:
        raise KernelBuildError(f"CUDA {nvrtc_major} runtime headers (cuda_fp16.h), matching NVRTC {nvrtc_major}, "
                               f"not found ({seen(found_rt, 'CUDA')}): {hint}")
    raise KernelBuildError(f"CCCL headers (nv/target, needed by cooperative_groups.h) for CUDA {nvrtc_major} "
                           f"not found ({seen(found_cc, 'CCCL')}): {hint}")


def installed_cupy_cuda_major() -> int | None:
    """The CUDA major of the installed CuPy wheel (``cupy-cuda12x`` -> 12), or None."""
    from importlib import metadata
    for major, names in ((13, ("cupy-cuda13x",)), (12, ("cupy-cuda12x",)), (11, ("cupy-cuda11x",))):
        for name in names:
            try:
                metadata.version(name)
                return major
            except metadata.PackageNotFoundError:
                continue
    return None


def nvrtc_version(xp=None) -> tuple[int, int]:
    """(major, minor) of the NVRTC that compiles the kernels: CuPy's (``cupy.cuda.nvrtc.getVersion()``)
    for ``xp`` = cupy, else that of ``cuda.bindings`` (the GPU-free compile check's).

    Raises ``KernelBuildError`` naming the package to install when NVRTC cannot be loaded."""
    try:
        if xp is not None and getattr(xp, "__name__", "") != "numpy":
            return tuple(xp.cuda.nvrtc.getVersion())
        from cuda.bindings import nvrtc
        err, major, minor = nvrtc.nvrtcVersion()
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(str(err))
        return major, minor
    except Exception as e:  # CuPy and cuda.bindings raise their own types for a missing libnvrtc
        raise KernelBuildError(f"NVRTC cannot be loaded ({type(e).__name__}: {e}): {nvrtc_hint()}") from e


def nvrtc_hint() -> str:
    major = installed_cupy_cuda_major()
    if major in CUDA_WHEELS:
        w = CUDA_WHEELS[major]
        return (f"{w['cupy']} is installed: pip install '{w['nvrtc']}' (or the '{w['extra']}' extra, "
                f"or {w['cupy']}[ctk])")
    return ("pip install nvidia-cuda-nvrtc-cu12 with cupy-cuda12x, or 'nvidia-cuda-nvrtc>=13,<14' with "
            "cupy-cuda13x (the cuda12 / cuda13 extras)")


_chosen_dirs: dict[int, tuple[str, str]] = {}


def header_dirs(nvrtc_major: int | None = None) -> tuple[str, str]:
    """(CUDA runtime header dir, CCCL dir) for NVRTC ``nvrtc_major`` (default: ``nvrtc_version()``'s),
    chosen once per major by ``choose_header_dirs`` from the directories this machine has."""
    major = nvrtc_version()[0] if nvrtc_major is None else int(nvrtc_major)
    dirs = _chosen_dirs.get(major)
    if dirs is None:
        dirs = _chosen_dirs[major] = choose_header_dirs(major, *_header_candidates())
    return dirs


def cuda_include_dir(nvrtc_major: int | None = None) -> str:
    """The directory with ``cuda_fp16.h``/``cuda_bf16.h``/``cooperative_groups.h`` of the CUDA major
    of NVRTC (not needed by the emulator): see ``header_dirs``."""
    return header_dirs(nvrtc_major)[0]


def cccl_include_dir(nvrtc_major: int | None = None) -> str:
    """The directory with CCCL's ``nv/target``, which ``cooperative_groups.h`` includes (NVRTC only),
    of a CCCL that supports NVRTC's CUDA major: see ``header_dirs``."""
    return header_dirs(nvrtc_major)[1]


def nvrtc_include_options(nvrtc_major: int | None = None) -> list[str]:
    """The ``-I`` options every NVRTC compile of a family gets: the CUDA runtime headers of NVRTC's
    major version, then CCCL."""
    rt, cc = header_dirs(nvrtc_major)
    return [f"-I{rt}", f"-I{cc}"]
