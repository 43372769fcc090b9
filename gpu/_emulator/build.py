"""Building: the cached g++ build of the runtime and of a kernel module (its kernels found in the
preprocessed source, their table, the shared-memory aliases), one builder per cache entry across
processes. The build steps are described in the package's docstring."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from gpu._errors import KernelBuildError

from .config import _asan, _check_asan_loaded, _compiler, _flags, _instrument_flags, _link_flags, cache_dir

_HERE = Path(__file__).resolve().parent
# cuda_fp16.h, cuda_bf16.h, cuda_runtime.h: empty stand-ins (cuda_emulator.h declares it all);
# cooperative_groups.h: the grid group. Found by the kernel's #include through -I on this directory.
_RUNTIME_FILES = ("cuda_emulator.h", "runtime.cpp", "cuda_fp16.h", "cuda_bf16.h", "cuda_runtime.h",
                  "cooperative_groups.h", "trace_runtime.inc")
# Bump when the build steps below change what they produce from the same inputs.
_BUILD_VERSION = "2"

# A kernel in the preprocessed source (GPUEMU_FIND_KERNELS): the __global__ marker, then `void`,
# then optionally the __launch_bounds__ marker (its arguments are read with _balanced_args).
_KERNEL_RE = re.compile(
    r'extern\s+"C"\s+__attribute__\s*\(\(\s*noinline\s*,\s*used\s*,\s*section\s*\(\s*"\.text\.gpuemu_kernels"\s*\)\s*\)\)'
    r"\s+void\s+(gpuemu_launch_bounds\s*\(|\w+\s*\()")
_NAME_RE = re.compile(r"\s*(\w+)\s*\(")


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
    _run([*common, *_instrument_flags(), "-c", "module.cpp", "-o", "module.o"], "compiling the kernel source", tmp)
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


def cached_library(source: str, defines: Sequence[str], name: str = "kernels") -> Path:
    """The shared library of `source` with `-D` defines, built once per source + flags + compiler +
    runtime and found in the cache after."""
    if _asan():
        _check_asan_loaded()
    cmd, ident = _compiler()
    flags = _flags()
    key = [ident, *flags, *_instrument_flags(), *defines, source, *_runtime_key()]
    return _cached(key, name, ".so", lambda tmp: _build_library(source, flags, list(defines), tmp))
