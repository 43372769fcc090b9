"""The kernel source model: the families of ``cuda_src/``, their declared headers, variants and
dtypes, the source text each is compiled from, its kernel signatures and its ``#define`` constants,
each read and parsed once. ``gpu._kernels`` builds and launches what this describes (and re-exports
its public names); the NVRTC compile check and the emulator compile the same text.

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
"""
from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from gpu._backend import BFLOAT16

__all__ = ["Family", "family", "families", "family_headers", "family_source", "family_variants", "family_dtypes",
           "dtype_defines", "constants", "cuda_src_dir", "normalize_defines", "define_flags", "kernel_signatures"]

#: The CUDA types a storage dtype maps to: (SCALAR_T, ACC_T, flag macro).
_DTYPE_DEFINES: dict[str, tuple[str, str, str]] = {
    "float16": ("__half", "float", "SCALAR_IS_HALF"),
    "bfloat16": ("__nv_bfloat16", "float", "SCALAR_IS_BF16"),
    "float32": ("float", "float", "SCALAR_IS_FLOAT"),
    "float64": ("double", "double", "SCALAR_IS_DOUBLE"),
}

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
                  tuple(_declared_dtypes(path, text)), kernel_signatures(source), _int_constants(source))


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
        return [normalize_defines(v) for v in variants]
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


def normalize_defines(defines: Mapping[str, Any] | None) -> dict[str, str]:
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


def define_flags(defines: Mapping[str, str]) -> list[str]:
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


def kernel_signatures(source: str) -> dict[str, tuple[str, ...]]:
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
