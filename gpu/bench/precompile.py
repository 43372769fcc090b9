"""The kernel modules a GPU check loads, compiled before its tests; and the proof that the list is
complete.

    python -m gpu.bench.precompile list                      # one module label a line
    python -m gpu.bench.precompile build LABEL [LABEL ...]   # build each through gpu._kernels
    python -m gpu.bench.precompile build --all --jobs 16     # every module, one process each
    python -m gpu.bench.precompile build --all --dry-run     # resolve each (family, dtype, variant) only
    python -m gpu.bench.precompile check LOG [--exclude LABEL ...]

A module is one (family, dtype, tuning defines): its label is ``family[:dtype][:NAME=V,...]``, e.g.
``batch_norm:float16:BN_VECTOR=1``, ``softmax:float32``, ``tests/kernels/emulator_features.cu:float64``.
``build`` goes through ``gpu._kernels.build_module``, the path ``get_kernel`` takes, so with CuPy it
compiles into CuPy's kernel cache (keyed by source text and options) exactly what a test process
will look up. ``scripts/gpu_check.sh`` runs one ``build`` process per module, in parallel.

``modules()`` is every module the loader can build: each family of ``cuda_src/`` and each test
kernel file of ``TEST_FAMILIES`` (the GPU-marked tests load them) x its declared dtypes x its
declared variants. ``get_kernel`` refuses defines that are not a declared variant, so a new kernel,
dtype or ``// @variants`` entry joins the list by being declared. ``check`` holds a run's
``$GPU_KERNEL_MODULE_LOG`` (every module a process built, appended by ``gpu._kernels``) against
the list and names each module built outside it: a module that would compile inside a timed step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from gpu import _kernels

ROOT = Path(__file__).resolve().parents[2]

#: Test kernel files that GPU-marked tests load (tests/test_emulator.py's GPU-against-emulator
#: comparison), relative to the checkout; absent in an installed wheel, then left out.
TEST_FAMILIES = ("tests/kernels/emulator_features.cu",)


def _dtype_name(dt) -> str | None:
    if dt is None:
        return None
    return "bfloat16" if "bfloat16" in str(dt) else np.dtype(dt).name


def label(family: str, dtype, defines: dict[str, str]) -> str:
    """``family[:dtype][:NAME=V,...]`` for a family name or test-kernel path, a dtype (or None)
    and the tuning defines."""
    parts = [family]
    name = _dtype_name(dtype)
    if name:
        parts.append(name)
    if defines:
        parts.append(",".join(f"{k}={v}" for k, v in sorted(defines.items())))
    return ":".join(parts)


def parse(text: str) -> tuple[str | Path, object, dict[str, str]]:
    """A label back into (family name or path, dtype or None, tuning defines)."""
    family, *rest = text.split(":")
    dtype, defines = None, {}
    for part in rest:
        if "=" in part:
            defines.update(kv.split("=", 1) for kv in part.split(","))
        elif part:
            from gpu._backend import BFLOAT16
            dtype = BFLOAT16 if part == "bfloat16" else np.dtype(part)
    fam: str | Path = family
    if family.endswith(".cu"):
        fam = Path(family) if Path(family).is_absolute() else ROOT / family
    return fam, dtype, defines


def _families() -> list[tuple[str, str | Path]]:
    out: list[tuple[str, str | Path]] = [(name, name) for name in _kernels.families()]
    out += [(rel, ROOT / rel) for rel in TEST_FAMILIES if (ROOT / rel).is_file()]
    return out


def modules() -> list[str]:
    """Every module label the GPU check compiles ahead: each family x declared dtype x variant."""
    return [label(name, dt, variant) for name, fam in _families()
            for dt in _kernels.family_dtypes(fam) for variant in _kernels.family_variants(fam)]


def _key(family: str | Path, defines: dict[str, str]) -> tuple[str, tuple]:
    return str(_kernels.family(family).path), tuple(sorted(defines.items()))


def _label_of_key(key: tuple[str, tuple]) -> str:
    """A logged module's label: its family's name (or path under the checkout), dtype, tuning."""
    path, defines = Path(key[0]), dict(key[1])
    name = path.stem if path.parent == _kernels.cuda_src_dir() else (
        str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    scalar = defines.pop("SCALAR_T", None)
    defines.pop("ACC_T", None)
    flag = next((k for k in list(defines) if k.startswith("SCALAR_IS_")), None)
    defines.pop(flag, None)
    dtype = {"__half": "float16", "__nv_bfloat16": "bfloat16", "float": "float32",
             "double": "float64"}.get(scalar or "", None)
    return ":".join([name] + ([dtype] if dtype else []) +
                    ([",".join(f"{k}={v}" for k, v in sorted(defines.items()))] if defines else []))


def _logged(log: str | os.PathLike) -> set[tuple[str, tuple]]:
    seen = set()
    path = Path(log)
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except ValueError:        # a line cut short by a killed process
            continue
        seen.add((rec["family"], tuple(sorted(rec["defines"].items()))))
    return seen


def built(log: str | os.PathLike) -> list[str]:
    """The labels of the modules a ``$GPU_KERNEL_MODULE_LOG`` records, sorted, each once."""
    return sorted({_label_of_key(k) for k in _logged(log)})


def missing(log: str | os.PathLike, listed: Iterable[str]) -> tuple[list[str], int]:
    """(labels of the modules ``log`` records that ``listed`` lacks, sorted; modules recorded)."""
    keys = set()
    for lab in listed:
        fam, dt, tuning = parse(lab)
        keys.add(_key(fam, _kernels.module_defines(fam, dt, tuning)))
    seen = _logged(log)
    return sorted(_label_of_key(k) for k in seen if k not in keys), len(seen)


def build(labels: Sequence[str], dry_run: bool = False) -> int:
    """Build (or, dry, resolve) each module through ``gpu._kernels``; one line each. Returns 0, or 1
    if any failed."""
    xp = np
    if not dry_run:
        try:
            import cupy
        except ImportError as e:
            for lab in labels:
                print(f"{lab}: FAILED (CuPy is not importable: {e})", flush=True)
            return 1
        xp = cupy
    status = 0
    for lab in labels:
        t0 = time.perf_counter()
        try:
            fam, dt, tuning = parse(lab)
            if dry_run:
                _kernels.module_defines(fam, dt, tuning)
            else:
                _kernels.build_module(fam, xp, dt, tuning)
        except Exception as e:  # report every module; the step fails on any
            print(f"{lab}: FAILED ({type(e).__name__}: {str(e)[:300]})", flush=True)
            status = 1
            continue
        print(f"{lab}: {'resolved' if dry_run else 'compiled'} in {time.perf_counter() - t0:.1f} s", flush=True)
    return status


def build_parallel(labels: Sequence[str], jobs: int) -> int:
    """``build`` of each module in a process of its own, ``jobs`` at a time (NVRTC compiles one
    module on one core); one line per module as each ends, then the wall time and the slowest.
    Returns 0, or 1 if any failed."""
    def one(lab: str) -> tuple[str, int, str, float]:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "gpu.bench.precompile", "build", lab],
                              capture_output=True, text=True)
        out = next((line for line in proc.stdout.splitlines() if line.startswith(f"{lab}: ")), "")
        if proc.returncode and not out:
            out = f"{lab}: FAILED (rc {proc.returncode}: {proc.stderr.strip()[-300:]})"
        print(f"{out} ({time.perf_counter() - t0:.1f} s with the interpreter's start)", flush=True)
        return lab, proc.returncode, out, time.perf_counter() - t0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        done = list(pool.map(one, labels))
    failed = [lab for lab, rc, _, _ in done if rc]
    slowest = max(done, key=lambda d: d[3], default=None)
    print(f"{len(done) - len(failed)} of {len(done)} modules compiled in {time.perf_counter() - t0:.1f} s, "
          f"{jobs} jobs" + (f"; slowest {slowest[0]} {slowest[3]:.1f} s" if slowest else "")
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpu.bench.precompile", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="every module label, one a line")
    b = sub.add_parser("build", help="build modules through gpu._kernels (CuPy: into its kernel cache)")
    b.add_argument("labels", nargs="*")
    b.add_argument("--all", action="store_true", help="every module of `list`")
    b.add_argument("--jobs", type=int, default=0,
                   help="with --all: one process per module, this many at a time (0: in this process)")
    b.add_argument("--dry-run", action="store_true", help="resolve family, dtype and variant only")
    c = sub.add_parser("check", help="every module a run's GPU_KERNEL_MODULE_LOG records is listed")
    c.add_argument("log")
    c.add_argument("--exclude", action="append", default=[], metavar="LABEL",
                   help="leave a module out of the list (the check's own test plants one so)")
    args = p.parse_args(argv)
    if args.cmd == "list":
        print("\n".join(modules()))
        return 0
    if args.cmd == "build":
        labels = modules() if args.all else args.labels
        if not labels:
            p.error("build: name modules, or --all")
        if args.jobs and not args.dry_run:
            return build_parallel(labels, args.jobs)
        t0 = time.perf_counter()
        status = build(labels, args.dry_run)
        print(f"{len(labels)} modules {'resolved' if args.dry_run else 'built'} in {time.perf_counter() - t0:.1f} s "
              f"(one process)", flush=True)
        return status
    listed = [m for m in modules() if m not in set(args.exclude)]
    gone, seen = missing(args.log, listed)
    if gone:
        print(f"{len(gone)} of {seen} modules built in this run are not in the precompile list (they compiled "
              f"inside a timed step): {', '.join(gone)}. Declare the variant in the .cu's '// @variants' "
              f"line, or add the test kernel file to TEST_FAMILIES in gpu/bench/precompile.py")
        return 1
    print(f"all {seen} modules built in this run are in the precompile list ({len(listed)} listed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
