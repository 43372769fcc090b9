"""What each kernel costs in the SASS: registers and spills (ptxas), instructions per element of
its hot loops (nvdisasm), and the two bounds of a launch: bytes over copy bandwidth, warp
instructions over issue slots.

    python -m gpu.bench.sass                 # the figures of every kernel (sm_90), against the record
    python -m gpu.bench.sass --record        # re-record tests/sass_budget.json on purpose
    gpu-bench --bounds                       # both bounds per kernel at the headline shapes, H100 and H200

The CUBIN is NVRTC's (``gpu._nvrtc_check.compile_image``: the exact source and options of the
compile check, cached on disk beside its logs), disassembled by ``nvdisasm`` (the pip wheel
``nvidia-cuda-nvdisasm``, in the ``test`` extra). No GPU is needed.

The hot loops of a kernel
-------------------------
In the SASS, a loop is a backward branch. A loop that loads data (``LDG``/``LDS``, not the
``.STRONG`` loads of a grid barrier's spin) with no such loop inside it is a candidate (a loop
over rows or tiles around the element loops is not; a loop inside a candidate that loads
nothing is cold and not counted). Where the kernel has 16-byte loads (``.128``), only loops with
one are hot (the others are scalar tails); their elements per trip are the 16-byte loads of one
kind on the lean trip (below) times ``16 / sizeof(SCALAR_T)``, else loads of ``sizeof(SCALAR_T)`` bytes of one kind count
one element each (a warp-per-row kernel ``*_warp_n<N>``: N a trip); divided by the tensors read
per element (``STREAMS``: ``x`` and ``dy`` in batch norm's backward). A trip is counted along one path from the loop's top to its backward
branch, every element in range: at each branch the way that does more, except into a call (the
slow path of an IEEE division), so every runtime flag's work is done (``per_element``, the upper
figure); and again with every branch on a runtime flag (a uniform or loop-invariant predicate)
taking its jump (``per_element_lean``, the lower figure: which way skips a flag's work is the
compiler's layout, so neither is one real setting; with the flags compiled out, the two meet).
Hot loops are grouped by the kinds of memory they touch (``LDG``, ``LDS``, ``STG``, ``STS``):
one group per pass over the data (statistics; cached fill, cached read and write), the unrolled
main loop and its remainders in one group; a group's figure is its cheapest loop per element,
and the kernel's the sum over its groups. A kernel that chooses at run time between a cached and
a re-reading pass counts both, an upper bound of either.

The bounds
----------
For one launch over E elements moving B bytes, on a device of S SMs at clock f with copy
bandwidth W: ``max(B / W, E x instructions per element / 32 / (4 x S x f))``, 4 warp instructions
issued per SM per clock (one per scheduler) at best.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from gpu import _kernels

ROOT = Path(__file__).resolve().parents[2]
BUDGET = ROOT / "tests" / "sass_budget.json"
RECORD_COMMAND = "python -m gpu.bench.sass --record"
ARCH = "sm_90"                      # the instruction counts: H100 and H200
REGISTER_ARCHS = ("sm_80", "sm_90")  # the architectures the kernels are tuned for

#: Tensors a kernel's hot loops read per element (default 1).
STREAMS = {"batch_norm_backward_reduce": 2, "batch_norm_backward_apply": 2, "batch_norm_backward_onchip": 2}

#: Kernels whose elements per trip are in their name: a warp per row, n elements a lane (the loop
#: over rows is the hot loop; the 4-byte loads of a float32 row look like the per-class weights').
_PER_LANE = re.compile(r"_warp_n(\d+)$")

#: The devices of the bounds: SMs, boost clock (GHz), copy bandwidth (GB/s; measured where known).
DEVICES = {
    "H100 SXM": {"sms": 132, "clock_ghz": 1.98, "copy_gbps": 3000.0,
                 "note": "copy ~90% of the 3.35 TB/s datasheet (not yet measured here)"},
    "H200": {"sms": 132, "clock_ghz": 1.98, "copy_gbps": 4300.0,
             "note": "copy ~4.3 TB/s of the 4.8 TB/s datasheet (docs/BENCHMARKS.md)"},
}

_INSTR_RE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", re.MULTILINE)
_LABEL_RE = re.compile(r"^(\.L\w+):")
_BRANCH_RE = re.compile(r"\bBRA(?:\.\w+)*\s.*?`\((\.L\w+)\)")
_PRED_RE = re.compile(r"^@!?U?P[T\d]+\s+")


def unavailable_reason() -> str | None:
    """Why the figures cannot be computed here (NVRTC or nvdisasm missing), or None."""
    from gpu import _nvrtc_check
    why = _nvrtc_check.unavailable_reason()
    if why:
        return why
    if nvdisasm() is None:
        return "nvdisasm not found: pip install 'nvidia-cuda-nvdisasm>=13,<14' (the test extra has it)"
    return None


def nvdisasm() -> str | None:
    """The nvdisasm executable: on PATH, a CUDA toolkit's, or the pip wheel's."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    candidates = [Path(p) for p in ("/usr/local/cuda/bin",)]
    try:
        import nvidia
        for base in nvidia.__path__:
            candidates += sorted(Path(base).glob("*/bin"))
    except ImportError:
        pass
    for d in candidates:
        if (d / "nvdisasm").is_file() and os.access(d / "nvdisasm", os.X_OK):
            return str(d / "nvdisasm")
    return None


def module_image(family: str, dtype, variant: dict[str, str], arch: str = ARCH) -> tuple[bytes, str]:
    """(CUBIN, ptxas log) of one module, through the compile check's cache."""
    from gpu import _nvrtc_check
    return _nvrtc_check.compile_image(_kernels.family_source(family), arch, _flags(family, dtype, variant),
                                      f"{family}.cu")


def module_log(family: str, dtype, variant: dict[str, str], arch: str) -> str:
    """ptxas's log of one module: the compile check's own, cached (tests/test_nvrtc.py compiles it too)."""
    from gpu import _nvrtc_check
    return _nvrtc_check.compile_cubin(_kernels.family_source(family), arch, _flags(family, dtype, variant),
                                      f"{family}.cu")


def _flags(family: str, dtype, variant: dict[str, str]) -> list[str]:
    return [f"-D{k}={v}" for k, v in sorted(_kernels.module_defines(family, dtype, variant).items())]


def disassemble(image: bytes) -> str:
    """nvdisasm's SASS of a CUBIN (cached by the CUBIN's hash beside the compile check's logs)."""
    from gpu._emulator import cache_dir
    tool = nvdisasm()
    if tool is None:
        raise RuntimeError(unavailable_reason())
    path = cache_dir() / "nvrtc" / f"{hashlib.sha256(image).hexdigest()[:32]}.sass"
    if path.is_file():
        return path.read_text()
    tmp = path.with_suffix(f".{os.getpid()}.cubin")
    tmp.write_bytes(image)
    try:
        text = subprocess.run([tool, "-c", str(tmp)], capture_output=True, text=True, check=True).stdout
    finally:
        tmp.unlink()
    out = path.with_suffix(f".{os.getpid()}.tmp")
    out.write_text(text)
    os.replace(out, path)
    return text


def registers(log: str) -> dict[str, dict[str, int]]:
    """kernel -> {"registers", "spill_stores", "spill_loads"} from ptxas's report."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?(\w+)'?", line)
        if m:
            current = m[1]
            out.setdefault(current, {"registers": 0, "spill_stores": 0, "spill_loads": 0})
            continue
        if current is None:
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[current]["registers"] = int(m[1])
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[current]["spill_stores"], out[current]["spill_loads"] = int(m[1]), int(m[2])
    return {k: v for k, v in out.items() if not k.startswith("$")}


@dataclass
class Loop:
    start: int                  # instruction index of the loop's top
    end: int                    # index of its backward branch
    instructions: int           # one trip, every runtime flag's work done
    elements: float             # per trip
    kinds: tuple[str, ...]      # memory it touches: LDG LDS STG STS
    lean: int = 0               # one trip, every runtime flag's branch taken

    @property
    def per_element(self) -> float:
        return self.instructions / self.elements

    @property
    def per_element_lean(self) -> float:
        return self.lean / self.elements


@dataclass
class KernelSass:
    name: str
    instructions: int
    loops: list[Loop] = field(default_factory=list)
    groups: dict[str, float] = field(default_factory=dict)   # kinds -> cheapest per element
    groups_lean: dict[str, float] = field(default_factory=dict)

    @property
    def per_element(self) -> float:
        return sum(self.groups.values())

    @property
    def per_element_lean(self) -> float:
        return sum(self.groups_lean.values())


def _opcode(instr: str) -> str:
    return _PRED_RE.sub("", instr).split()[0]


def _load_width(op: str) -> int | None:
    """Bytes of a data load (LDG/LDS, not a .STRONG barrier or flag load), else None."""
    if not (op.startswith("LDG") or op.startswith("LDS")) or ".STRONG" in op:
        return None
    parts = op.split(".")
    for bits, width in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if bits in parts:
            return width
    return 4


def functions(sass: str) -> dict[str, tuple[list[str], dict[str, int]]]:
    """kernel -> (instructions, label -> index) from nvdisasm's text."""
    out = {}
    pieces = re.split(r"^\.text\.(\S+):\s*$", sass, flags=re.MULTILINE)
    for name, body in zip(pieces[1::2], pieces[2::2]):
        instrs, labels = [], {}
        for line in body.splitlines():
            m = _LABEL_RE.match(line)
            if m:
                labels[m[1]] = len(instrs)
                continue
            m = _INSTR_RE.match(line)
            if m:
                instrs.append(m[1])
        out[name] = (instrs, labels)
    return out


def _flag_branches(instrs: list[str], a: int, b: int) -> set[int]:
    """The branches of the loop (a, b) that test a runtime flag: on a uniform predicate, on a
    predicate not written inside the loop before them (loop-invariant), or on one a PLOP3 makes
    from a uniform one."""
    writer: dict[str, int] = {}
    flags = set()
    for i in range(a, b + 1):
        s = instrs[i]
        m = re.match(r"^@!?(U?P[T\d]+)\s", s)
        body = _PRED_RE.sub("", s)
        if m and _BRANCH_RE.search(s):
            j = writer.get(m[1])
            if m[1].startswith("U") or j is None or (
                    _opcode(instrs[j]).startswith("PLOP3") and re.search(r"\bUP\d", instrs[j])):
                flags.add(i)
        parts = body.split(None, 1)
        if len(parts) == 2:
            dest = parts[1].split(",", 1)[0].strip()
            if re.fullmatch(r"P\d", dest):
                writer[dest] = i
    return flags


def _trip(instrs: list[str], labels: dict[str, int], a: int, b: int, cold: set[int], lean: bool) -> list[int]:
    """The instructions of one trip of the loop (a, b) with every element in range: a branch takes
    whichever way does more (every runtime flag's work done), except into a call (the slow path of
    an IEEE division or square root); with ``lean``, a branch on a runtime flag takes its jump (the
    compiler's layout decides whether that skips the flag's work, so this is not one real setting:
    a lower figure, the other an upper one). Instructions in ``cold`` cost nothing."""
    ninf = -(1 << 60)

    def weight(j: int) -> int:
        return 0 if j in cold else -(1 << 30) if _opcode(instrs[j]).startswith("CALL") else 1
    dist = {a: weight(a)}
    prev: dict[int, int] = {}
    flags = _flag_branches(instrs, a, b) if lean else set()
    for i in range(a, b + 1):
        d = dist.get(i, ninf)
        if d == ninf:
            continue
        s = instrs[i]
        op = _opcode(s)
        m = _BRANCH_RE.search(s)
        target = labels.get(m[1], -1) if m else -1
        forward = a <= target <= b and target > i
        if m and not _PRED_RE.match(s):               # an unconditional jump
            succ = [target] if forward else []
        elif m and i in flags and forward:
            succ = [target]
        elif op in ("EXIT", "RET", "RET.REL.NODEC") and not _PRED_RE.match(s):
            succ = []
        else:
            succ = ([target] if forward else []) + [i + 1]
        for j in succ:
            if j <= b and d + weight(j) > dist.get(j, ninf):
                dist[j], prev[j] = d + weight(j), i
    if b not in dist:
        return [i for i in range(a, b + 1) if i not in cold]
    path, i = [b], b
    while i != a:
        i = prev[i]
        path.append(i)
    return [i for i in path[::-1] if i not in cold]


def _elements(ops: list[str], scalar_bytes: int) -> float:
    """Elements loaded per iteration: the most 16-byte loads of one kind (a cached pass reads its
    row from shared memory and, predicated off, from global memory: one element each), else
    the most loads of one kind of ``sizeof(SCALAR_T)`` bytes."""
    for width, per in ((16, 16 / scalar_bytes), (scalar_bytes, 1)):
        counts: dict[str, int] = {}
        for op in ops:
            if _load_width(op) == width:
                counts[op] = counts.get(op, 0) + 1
        if counts:
            return max(counts.values()) * per
    return 0


def analyze_kernel(name: str, instrs: list[str], labels: dict[str, int], scalar_bytes: int) -> KernelSass:
    """The hot loops of one kernel's SASS (see the module's docstring)."""
    k = KernelSass(name, len(instrs))
    loops = []
    for i, s in enumerate(instrs):
        m = _BRANCH_RE.search(s)
        if m and m[1] in labels and labels[m[1]] <= i:
            loops.append((labels[m[1]], i))
    streams = STREAMS.get(name, 1)
    found = []
    loads = {lp for lp in loops if any(_load_width(_opcode(instrs[i])) for i in range(lp[0], lp[1] + 1))}
    for a, b in loops:
        nested = [o for o in loops if o != (a, b) and a <= o[0] and o[1] <= b]
        if any(o in loads for o in nested):     # a loop over rows or tiles around the element loops
            continue
        cold = {i for o in nested for i in range(o[0], o[1] + 1)}
        own = [_opcode(instrs[i]) for i in range(a, b + 1) if i not in cold]
        if not any(map(_load_width, own)):
            continue
        path = _trip(instrs, labels, a, b, cold, lean=False)
        lean_path = _trip(instrs, labels, a, b, cold, lean=True)
        # elements from the lean trip: a flag's own stream (probability targets, say) loads vectors
        # of the same kind as the data's
        elements = (_elements([_opcode(instrs[i]) for i in lean_path], scalar_bytes)
                    or _elements([_opcode(instrs[i]) for i in path], scalar_bytes))
        n, lean = len(path), len(lean_path)
        per_lane = _PER_LANE.search(name)
        if per_lane:
            elements = int(per_lane[1]) * streams
        if not elements:          # the trip skips the loads: count the loop's own body
            n = lean = len(own)
            elements = _elements(own, scalar_bytes)
        if not elements:
            continue
        kinds = tuple(sorted({op[:3] for op in own if op[:3] in ("LDG", "LDS", "STG", "STS")}))
        found.append((any(_load_width(op) == 16 for op in own), Loop(a, b, n, elements / streams, kinds, lean)))
    vector = any(v for v, _ in found)
    k.loops = [lp for v, lp in found if v or not vector]
    for lp in k.loops:
        key = "+".join(lp.kinds)
        k.groups[key] = min(k.groups.get(key, float("inf")), lp.per_element)
        k.groups_lean[key] = min(k.groups_lean.get(key, float("inf")), lp.per_element_lean)
    return k


def _scalar_bytes(dtype) -> int:
    return 2 if "bfloat16" in str(dtype) else np.dtype(dtype).itemsize


def module_figures(family: str, dtype, variant: dict[str, str]) -> dict[str, dict]:
    """kernel -> {"per_element", "groups", "registers": {arch: n}, "spills": {arch: bytes}} of one
    module: instructions at ``ARCH``, registers and spills at ``REGISTER_ARCHS``."""
    out: dict[str, dict] = {}
    image, log_at = module_image(family, dtype, variant, ARCH)
    for arch in REGISTER_ARCHS:
        log = log_at if arch == ARCH else module_log(family, dtype, variant, arch)
        for name, r in registers(log).items():
            d = out.setdefault(name, {"registers": {}, "spills": {}})
            d["registers"][arch] = r["registers"]
            d["spills"][arch] = r["spill_stores"] + r["spill_loads"]
    for name, (instrs, labels) in functions(disassemble(image)).items():
        if name not in out:
            continue
        k = analyze_kernel(name, instrs, labels, _scalar_bytes(dtype))
        out[name]["per_element"] = round(k.per_element, 2)
        out[name]["per_element_lean"] = round(k.per_element_lean, 2)
        out[name]["groups"] = {g: round(v, 2) for g, v in sorted(k.groups.items())}
    return out


def matrix() -> list[tuple[str, str, object, dict[str, str]]]:
    """(label, family, dtype, variant) of every module of ``cuda_src/``."""
    from .precompile import label
    return [(label(f, dt, v), f, dt, v) for f in _kernels.families()
            for dt in _kernels.family_dtypes(f) for v in _kernels.family_variants(f)]


def load_budget(path: Path = BUDGET) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"modules": {}}


def record(path: Path = BUDGET) -> dict:
    """Every module's figures, written to ``path`` (the budget the tests hold the kernels to)."""
    data = {"about": f"per-kernel SASS figures: instructions per element of the hot loops at {ARCH} "
                     f"(gpu/bench/sass.py), registers and spills at {', '.join(REGISTER_ARCHS)}. "
                     f"Re-record on purpose: {RECORD_COMMAND}",
            "nvrtc": _nvrtc_version(),
            "modules": {lab: module_figures(f, dt, v) for lab, f, dt, v in matrix()}}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


def budget_problems(label: str, recorded: dict | None, now: dict) -> list[str]:
    """What the module's figures ``now`` break of its record: a spill at ``REGISTER_ARCHS``, a
    register count that changed, a hot loop's instructions per element grown past the record, a
    kernel without a record. Every problem but a spill ends with the command that re-records."""
    redo = f"if the change is meant, re-record: {RECORD_COMMAND} (and commit {BUDGET.relative_to(ROOT)})"
    problems = []
    for name, fig in sorted(now.items()):
        spilled = {a: n for a, n in fig["spills"].items() if n}
        if spilled:
            problems.append(f"{label} {name}: ptxas spills ({', '.join(f'{n} bytes at {a}' for a, n in spilled.items())})")
        rec = (recorded or {}).get(name)
        if rec is None:
            problems.append(f"{label} {name}: no recorded registers or instruction budget; {redo}")
            continue
        for arch, n in sorted(fig["registers"].items()):
            if rec["registers"].get(arch) != n:
                problems.append(f"{label} {name}: {n} registers at {arch}, recorded {rec['registers'].get(arch)}; {redo}")
        for key, what in (("per_element", "every flag's work done"), ("per_element_lean", "every flag branch taken")):
            if fig.get(key, 0) > rec.get(key, 0) + 0.01:
                problems.append(f"{label} {name}: {fig[key]} SASS instructions per element in its hot loops ({what}; "
                                f"by pass: {fig.get('groups')}), budget {rec.get(key)} ({rec.get('groups')}); {redo}")
    return problems


def _nvrtc_version() -> str:
    from gpu import _toolchain
    return ".".join(map(str, _toolchain.nvrtc_version()))


def bound_us(elements: int, nbytes: int, per_element: float, device: dict) -> tuple[float, float]:
    """(bytes bound, instruction bound) in microseconds of one launch on ``device`` (``DEVICES``)."""
    t_bytes = nbytes / (device["copy_gbps"] * 1e9) * 1e6
    warp_instructions = elements * per_element / 32
    t_instr = warp_instructions / (4 * device["sms"] * device["clock_ghz"] * 1e9) * 1e6
    return t_bytes, t_instr


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpu.bench.sass", description=__doc__.split("\n\n")[0])
    p.add_argument("--record", action="store_true", help=f"write {BUDGET.relative_to(ROOT)} from the current kernels")
    args = p.parse_args(argv)
    why = unavailable_reason()
    if why:
        print(f"SASS figures unavailable: {why}", file=sys.stderr)
        return 1
    if args.record:
        data = record()
        print(f"recorded {sum(len(m) for m in data['modules'].values())} kernels of {len(data['modules'])} "
              f"modules into {BUDGET}")
        return 0
    budget = load_budget()["modules"]
    print(f"{'module':<32} {'kernel':<34} {'instr/elem':>11} {'recorded':>11} {'regs sm_80/90':>14}")
    span = lambda d: f"{d.get('per_element_lean', 0):.1f}-{d.get('per_element', 0):.1f}"  # noqa: E731
    for lab, f, dt, v in matrix():
        for name, fig in module_figures(f, dt, v).items():
            rec = budget.get(lab, {}).get(name, {})
            regs = "/".join(str(fig["registers"].get(a, "-")) for a in REGISTER_ARCHS)
            print(f"{lab:<32} {name:<34} {span(fig):>11} {span(rec) if rec else '-':>11} {regs:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
