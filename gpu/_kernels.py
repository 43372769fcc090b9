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

Kernel sources
--------------
A *family* is one file ``cuda_src/<family>.cu`` (``"batch_norm"``, ``"softmax"``). Its source text
is ``cuda_src/common.cuh``, then the shared engine headers the family declares in one line::

    // @headers rows.cuh

then the ``.cu`` itself, each after a ``#line`` marker (so diagnostics name the real file and
line), never ``#include``-d through ``-I``: CuPy's disk cache hashes only the source string, so a
header edit must change that string. Kernels are ``extern "C" __global__`` functions, compiled with
``-std=c++17``; ``<cuda_fp16.h>``, ``<cuda_bf16.h>`` and ``<cooperative_groups.h>`` come from the
CUDA runtime headers of NVRTC's own major version (``cupy.cuda.nvrtc.getVersion()``): NVRTC 12 with
CUDA 12's (the ``nvidia-cuda-runtime-cu12`` wheel or a CUDA 12 toolkit), NVRTC 13 with CUDA 13's
(``nvidia-cuda-runtime`` 13.x or a CUDA 13 toolkit), never whichever is found first; the
``<nv/target>`` that cooperative_groups.h includes comes from a CCCL that supports that major (the
``nvidia-cuda-cccl-cu12`` / ``nvidia-cuda-cccl`` 13.x wheel, a toolkit, or the copy bundled with
CuPy). ``gpu._toolchain`` finds them.

Everything about a family (its source text, headers, variants, dtypes, kernel signatures and
``#define`` constants) is read once and kept (``family()``); kernels are kept per (family, kernel,
dtype, defines, device), so a warm ``get_kernel`` or ``launch`` does no file I/O, no parsing and no
driver query.

Defines
-------
``dtype`` (float16, bfloat16 from ``ml_dtypes``, float32, float64) adds:

==================  ==================  =========  ===================
dtype               ``SCALAR_T``        ``ACC_T``  flag macro
==================  ==================  =========  ===================
float16             ``__half``          float      ``SCALAR_IS_HALF``
bfloat16            ``__nv_bfloat16``   float      ``SCALAR_IS_BF16``
float32             ``float``           float      ``SCALAR_IS_FLOAT``
float64             ``double``          double     ``SCALAR_IS_DOUBLE``
==================  ==================  =========  ===================

``defines`` (a dict, e.g. ``{"BN_VECTOR": 1}``) adds tuning ``-DNAME=VALUE`` flags. Each family
declares every tuning variant it may be built with, in one line of its ``.cu`` file::

    // @variants [{"BN_VECTOR": 0}, {"BN_VECTOR": 1}]

(a JSON list of define dicts; without the line the only variant is ``{}``), and optionally the
dtypes it is built for (default: all four; ``none`` for a family without dtype defines)::

    // @dtypes float32 float64

``get_kernel`` refuses defines that are not declared, so ``warmup()`` and the NVRTC compile check
(``gpu/_nvrtc_check.py``: every family x dtype x variant x sm_75..sm_90) cover every module that
can ever be launched.

Constants shared with Python
----------------------------
``constants(family)`` gives every ``#define NAME <integer>`` of the family's source (headers
included): block sizes, vector widths, flags and path limits have one source, the ``.cu``.

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
``GPU_EMULATOR_ORDER``, ``GPU_EMULATOR_SEED``, ``GPU_EMULATOR_BLOCK_SEED``, ``GPU_EMULATOR_RELAX``,
``GPU_EMULATOR_ASAN``, ``GPU_EMULATOR_CACHE``, ``GPU_EMULATOR_FIBERS``, ``GPU_EMULATOR_SM_COUNT`` and
``CXX``: see ``gpu/_emulator/__init__.py``.
"""
from __future__ import annotations

import contextlib
import json
import operator
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from gpu import _backend
from gpu._backend import BFLOAT16
from gpu import _toolchain
from gpu._errors import KernelBuildError
from gpu._toolchain import nvrtc_include_options, nvrtc_version

__all__ = [
    "Family", "Kernel", "KernelBuildError", "LaunchLog", "get_kernel", "launch", "launches_run", "recording_launches",
    "max_cooperative_grid", "device_attributes", "warmup", "family", "constants",
    "families", "family_headers", "family_source", "family_variants", "family_dtypes", "dtype_defines",
    "cuda_src_dir",
]

#: The CUDA types a storage dtype maps to: (SCALAR_T, ACC_T, flag macro).
_DTYPE_DEFINES: dict[str, tuple[str, str, str]] = {
    "float16": ("__half", "float", "SCALAR_IS_HALF"),
    "bfloat16": ("__nv_bfloat16", "float", "SCALAR_IS_BF16"),
    "float32": ("float", "float", "SCALAR_IS_FLOAT"),
    "float64": ("double", "double", "SCALAR_IS_DOUBLE"),
}

#: Shared memory the CUDA driver reserves per resident block (sm_80 and later).
RESERVED_SHARED_MEM_PER_BLOCK = 1024

_VARIANTS_RE = re.compile(r"^\s*//\s*@variants\s+(.*)$", re.MULTILINE)
_DTYPES_RE = re.compile(r"^\s*//\s*@dtypes\s+(.*)$", re.MULTILINE)
_HEADERS_RE = re.compile(r"^\s*//\s*@headers\s+(.*)$", re.MULTILINE)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

_src_dir: Path | None = None


def cuda_src_dir() -> Path:
    """The directory holding ``common.cuh``, the engine headers and the ``<family>.cu`` files.

    In an installed wheel it is ``gpu/cuda_src``; in a source checkout, ``cuda_src/`` next to ``gpu/``.
    """
    global _src_dir
    if _src_dir is None:
        here = Path(__file__).resolve().parent
        for d in (here / "cuda_src", here.parent / "cuda_src"):
            if (d / "common.cuh").is_file():
                _src_dir = d
                break
        else:
            raise FileNotFoundError(f"cuda_src/common.cuh not found next to {here}: the package is installed "
                                    "without its kernel sources (package data gpu/cuda_src missing)")
    return _src_dir


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


@dataclass(frozen=True)
class Family:
    """Everything the loader knows about one ``.cu`` file, read once."""

    name: str
    path: Path
    headers: tuple[str, ...]                       # pasted in this order before the .cu
    source: str                                    # the exact text every compiler sees
    variants: tuple[dict[str, str], ...]           # declared tuning define sets
    dtypes: tuple[Any, ...]                        # storage dtypes (None: no dtype defines)
    signatures: Mapping[str, tuple[str, ...]]      # kernel -> parameter names, in order
    constants: Mapping[str, int]                   # every #define NAME <integer>


_families: dict[Any, Family] = {}
_families_lock = threading.Lock()


def family(name: str | os.PathLike) -> Family:
    """The family ``name`` (a ``cuda_src/`` stem, or a path to a ``.cu`` file elsewhere, e.g. test
    kernels), read and parsed on first use and kept for the process."""
    fam = _families.get(name)
    if fam is None:
        with _families_lock:
            path = _family_path(name)
            fam = _families.get(path) or _read_family(path)
            _families[path] = _families[name] = fam
    return fam


def _read_family(path: Path) -> Family:
    text = path.read_text()
    headers = _declared_headers(path, text)
    source = "".join(f'#line 1 "{h}"\n{(cuda_src_dir() / h).read_text()}\n' for h in headers)
    source += f'#line 1 "{path.name}"\n{text}'
    return Family(path.stem, path, tuple(headers), source, tuple(_declared_variants(path, text)),
                  tuple(_declared_dtypes(path, text)), _kernel_signatures(source), _int_constants(source))


def _declared_headers(path: Path, text: str) -> list[str]:
    found = _HEADERS_RE.findall(text)
    if len(found) > 1:
        raise ValueError(f"{path.name}: more than one '// @headers' line")
    names = found[0].split() if found else []
    for n in names:
        if n == "common.cuh" or not (cuda_src_dir() / n).is_file():
            raise ValueError(f"{path.name}: '// @headers' names {n!r}, not a header of {cuda_src_dir()} "
                             "(common.cuh is always pasted first)")
    return ["common.cuh"] + names


def _declared_variants(path: Path, text: str) -> list[dict[str, str]]:
    found = _VARIANTS_RE.findall(text)
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


def _declared_dtypes(path: Path, text: str) -> list:
    found = _DTYPES_RE.findall(text)
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


def family_headers(family_name: str | os.PathLike) -> list[str]:
    """The headers pasted in front of the family's ``.cu``, in order: ``common.cuh``, then those
    it declares with ``// @headers rows.cuh channels.cuh`` (files of ``cuda_src/``)."""
    return list(family(family_name).headers)


def family_source(family_name: str | os.PathLike) -> str:
    """The exact source text every compiler sees: ``common.cuh``, the headers the family declares
    (``// @headers``), then the family's ``.cu``, each after a ``#line`` marker.

    >>> family_source("softmax").splitlines()[0]                   # doctest: +SKIP
    '#line 1 "common.cuh"'
    """
    return family(family_name).source


def family_variants(family_name: str | os.PathLike) -> list[dict[str, str]]:
    """The tuning define sets the family declares with ``// @variants [...]`` (default ``[{}]``)."""
    return [dict(v) for v in family(family_name).variants]


def family_dtypes(family_name: str | os.PathLike) -> list[np.dtype | None]:
    """The storage dtypes the family is built for (``// @dtypes``; default: all supported).

    ``[None]`` for a family declared ``// @dtypes none`` (no dtype defines at all).
    """
    return list(family(family_name).dtypes)


def constants(family_name: str | os.PathLike) -> Mapping[str, int]:
    """Every ``#define NAME <integer>`` of the family's source, headers included (the last wins).

    >>> constants("batch_norm")["BN_ONCHIP_ROWS"]                 # doctest: +SKIP
    8
    """
    return family(family_name).constants


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


# ---------------------------------------------------------------------------------------------
# Signatures and constants, parsed from the source once
# ---------------------------------------------------------------------------------------------

_COMMENT_RE = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)
_DEFINE_RE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)(\([^)]*\))?[ \t]*(.*)$", re.MULTILINE)
_INT_DEFINE_RE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(-?(?:0x[0-9a-fA-F]+|\d+))[uUlL]*[ \t]*(?://.*)?$",
                            re.MULTILINE)
_KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^()]*\)\s*)?(\w+)\s*\(')


def _int_constants(source: str) -> dict[str, int]:
    return {name: int(value, 0) for name, value in _INT_DEFINE_RE.findall(source)}


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis that closes the one at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError("unbalanced parentheses")


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside parentheses, brackets and angle brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _expand(text: str, macros: dict[str, tuple[list[str] | None, str]]) -> str:
    """``text`` with the macros that generate kernels or parameter lists expanded (a small subset
    of the C preprocessor: object-like and function-like macros, ``##`` pasting)."""
    names = re.compile(r"\b(" + "|".join(map(re.escape, macros)) + r")\b") if macros else None
    for _ in range(8):
        if names is None:
            break
        out, pos, changed = [], 0, False
        for m in names.finditer(text):
            if m.start() < pos:
                continue
            params, body = macros[m.group(1)]
            end = m.end()
            if params is not None:
                j = end
                while j < len(text) and text[j] in " \t\n":
                    j += 1
                if j >= len(text) or text[j] != "(":
                    continue
                close = _balanced(text, j)
                args = _split_top(text[j + 1:close - 1])
                for p, a in zip(params, args):
                    body = re.sub(rf"\b{re.escape(p)}\b", a, body)
                body = re.sub(r"\s*##\s*", "", body)
                end = close
            out.append(text[pos:m.start()])
            out.append(body)
            pos, changed = end, True
        out.append(text[pos:])
        text = "".join(out)
        if not changed:
            break
    return text


def _kernel_signatures(source: str) -> dict[str, tuple[str, ...]]:
    """kernel name -> parameter names, for every ``extern "C" __global__`` function of the source,
    macro-generated ones included. Kernels under an ``#if`` are all listed."""
    text = _COMMENT_RE.sub(" ", source.replace("\\\n", " "))
    macros = {}
    for name, params, body in _DEFINE_RE.findall(text):
        # only the macros that can make up a kernel or a parameter list need expanding
        if "__global__" in body or "," in body and params == "":
            macros[name] = ([p.strip() for p in params[1:-1].split(",")] if params else None, body)
    text = re.sub(r"^[ \t]*#[^\n]*$", " ", text, flags=re.MULTILINE)
    text = _expand(text, macros)
    out = {}
    for m in _KERNEL_RE.finditer(text):
        params = _split_top(text[m.end():_balanced(text, m.end() - 1) - 1])
        names = [re.findall(r"\w+", p)[-1] for p in params if p and p != "void"]
        out[m.group(1)] = tuple(names)
    return out


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
    tuning = _normalize_defines(defines)
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
        return mod


def _build_module(fam: Family, xp, defines: dict[str, str]):
    if _is_numpy(xp):
        # the register estimate's NVRTC compile (cuda.bindings') takes that NVRTC's headers
        return _emulator().build_module(fam.source, _define_flags(defines), name=fam.name,
                                        nvrtc_options=nvrtc_include_options)
    # the headers of NVRTC's own CUDA major, whatever else the machine has
    options = ("-std=c++17", *nvrtc_include_options(nvrtc_version(xp)[0]), *_define_flags(defines))
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
    if set(types) <= _SCALAR_TYPES | {array_type}:
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
    """What ``recording_launches`` collects: one ``(kernel name, grid, block)`` per launch."""

    run: bool
    launches: list = field(default_factory=list)

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
def recording_launches(run: bool = False) -> Iterator[LaunchLog]:
    """Record every launch inside the block; with ``run=False`` the launch itself is a no-op, so
    the block measures the host path alone (``gpu-bench --host``). Everything before the driver or
    emulator call (argument checks, plans, allocations) still runs.

    >>> with recording_launches() as log:                                # doctest: +SKIP
    ...     gpu.softmax(z)
    >>> log.count                                                        # doctest: +SKIP
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
    for name in families():
        fam = family(name)
        for dt in fam.dtypes:
            for variant in fam.variants:
                mod = _module(fam, xp, _all_defines(fam, dt, variant))
                if not _is_numpy(xp):
                    mod.compile()
                count += 1
    return count
