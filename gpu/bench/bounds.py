"""Two bounds per kernel launch: bytes over copy bandwidth, and warp instructions over issue slots.

    gpu-bench --bounds                       # the headline cases, float32 and bfloat16, H100 and H200
    python -m gpu.bench.bounds               # the same

An op's launches are those of its public call on the emulate backend with the launch a no-op
(``gpu._kernels.recording_launches(run=False, detail=True)``), planned for a 132-SM device
(``GPU_EMULATOR_SM_COUNT``), on inputs that are never touched (zeros, which NumPy allocates
lazily, so 4096 x 128,256 costs nothing). For each launch: E, the elements of its largest array;
B, the bytes of its arrays of E elements, each read or written once (an in-place array passed twice
counts twice: read and write); and the SASS instructions per element of its hot loops
(``gpu/bench/sass.py``, at sm_90; from tests/sass_budget.json where NVRTC or nvdisasm is missing).
Then, per device of ``sass.DEVICES``::

    bytes bound = B / copy bandwidth
    instruction bound = E x instructions per element / 32 / (4 x SMs x clock)
    predicted = max(bytes bound, instruction bound)

A launch without a hot loop (a finalize over channels, say) counts its bytes only.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

import gpu
from gpu import _kernels

from . import sass
from .precompile import label as module_label
from .records import OPS, Case
from .suites import SUITES

#: (op, shape, layout, dtype): the headline shapes of both families, and the 128k-token vocabulary
CASES = [(op, shape, layout, dt)
         for fam, ops in (("batch_norm", ("batch_norm_forward", "batch_norm_backward")),
                          ("softmax", ("softmax", "softmax_cross_entropy_train")))
         for op in ops for shape, layout in SUITES["headline"][fam] for dt in ("float32", "bfloat16")]
CASES.append(("softmax_cross_entropy_train", (4096, 128256), "", "bfloat16"))


@dataclass
class Launch:
    kernel: str
    module: str
    grid: tuple
    block: tuple
    elements: int
    nbytes: int
    per_element: float | None            # every runtime flag's work done (sass.py)
    per_element_lean: float | None = None  # every flag branch taken

    def bounds(self, device: dict, lean: bool = False) -> tuple[float, float]:
        per = self.per_element_lean if lean and self.per_element_lean is not None else self.per_element
        return sass.bound_us(self.elements, self.nbytes, per or 0.0, device)


@contextlib.contextmanager
def _sm_count(n: int) -> Iterator[None]:
    saved = os.environ.get("GPU_EMULATOR_SM_COUNT")
    os.environ["GPU_EMULATOR_SM_COUNT"] = str(n)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["GPU_EMULATOR_SM_COUNT"]
        else:
            os.environ["GPU_EMULATOR_SM_COUNT"] = saved


def _inputs(case: Case) -> dict:
    """Untouched inputs: zeros (lazily allocated), ones for the scales and variances."""
    dt, c = case.dtype, (case.channels,)
    vec = np.float64 if dt == np.float64 else np.float32
    make = {"x": lambda: np.zeros(case.shape, dt), "dy": lambda: np.zeros(case.shape, dt),
            "z": lambda: np.zeros(case.shape, dt),
            "target": lambda: np.zeros(case.shape[:-1], np.int64),
            "gamma": lambda: np.ones(c, vec), "beta": lambda: np.zeros(c, vec),
            "running_mean": lambda: np.zeros(c, vec), "running_var": lambda: np.ones(c, vec),
            "mean": lambda: np.zeros(c, vec), "invstd": lambda: np.ones(c, vec)}
    return {name: make[name]() for name in case.op.needs}


def _dtype(name: str):
    from gpu._backend import BFLOAT16
    return BFLOAT16 if name == "bfloat16" else np.dtype(name)


def launches(op: str, shape: tuple[int, ...], layout: str, dtype: str, sms: int = 132,
             figures=None) -> list[Launch]:
    """The launches of one op call, each with its elements, bytes and instructions per element;
    ``figures(label) -> {kernel: {...}}`` gives a module's SASS figures."""
    case = Case(OPS[op], tuple(shape), layout, _dtype(dtype))
    inputs = _inputs(case)
    with _sm_count(sms), gpu.use_backend("emulate"), _kernels.recording_launches(run=False, detail=True) as log:
        case.op.ours(case, inputs)()
    out = []
    for kernel, g, b, args in log.calls:
        # each array once: a pointer argument the launch's flags leave unused may be given another
        # argument's array as its stand-in (batch norm's residual: x), which moves no bytes
        arrays = list({a.__array_interface__["data"][0]: a for a in args if isinstance(a, np.ndarray)}.values())
        elements = max((a.size for a in arrays), default=0)
        nbytes = sum(a.nbytes for a in arrays if a.size == elements)
        defines = dict(kernel.defines)
        dt = {"__half": "float16", "__nv_bfloat16": "bfloat16", "float": "float32",
              "double": "float64"}.get(defines.pop("SCALAR_T", ""), None)
        tuning = {k: v for k, v in defines.items() if k != "ACC_T" and not k.startswith("SCALAR_IS_")}
        lab = module_label(kernel.family, _dtype(dt) if dt else None, tuning)
        fig = (figures(lab) if figures else {}).get(kernel.name, {})
        out.append(Launch(kernel.name, lab, g, b, elements, nbytes, fig.get("per_element"),
                          fig.get("per_element_lean")))
    return out


def figure_source():
    """(figures(label) -> {kernel: {...}}, where from): the live SASS, else the recorded budget."""
    if sass.unavailable_reason() is None:
        by_label = {lab: (f, dt, v) for lab, f, dt, v in sass.matrix()}
        cache: dict[str, dict] = {}

        def live(lab: str) -> dict:
            if lab not in cache:
                cache[lab] = sass.module_figures(*by_label[lab]) if lab in by_label else {}
            return cache[lab]
        return live, f"SASS of NVRTC {sass._nvrtc_version()} at {sass.ARCH}"
    recorded = sass.load_budget()["modules"]
    return (lambda lab: recorded.get(lab, {})), f"recorded {sass.BUDGET.name} ({sass.unavailable_reason()})"


def _span(lo: float | None, hi: float) -> str:
    return f"{hi:.1f}" if lo is None or abs(lo - hi) < 0.05 else f"{lo:.1f}-{hi:.1f}"


def table(cases=CASES, markdown: bool = False) -> str:
    """Both bounds of every launch of ``cases``, per device, and each case's predicted time."""
    figures, source = figure_source()
    devs = list(sass.DEVICES.items())
    head = ["case", "kernel", "E (M)", "MB", "instr/elem"] + [
        f"{name} {what}" for name, _ in devs for what in ("bytes us", "instr us")]
    rows, refused = [], []
    for op, shape, layout, dt in cases:
        name = f"{op} {'x'.join(map(str, shape))}{' ' + layout if layout else ''} {dt}"
        try:
            ls = launches(op, shape, layout, dt, figures=figures)
        except ValueError as e:   # a plan the emulated device refuses (its static shared memory
            # is the whole module's): no launches to show
            refused.append(f"{name}: not planned on the emulated device ({e})")
            rows.append([name, f"not planned (note {len(refused)})", "", "", ""] + [""] * 2 * len(devs))
            continue
        lo, hi = [0.0] * len(devs), [0.0] * len(devs)
        for ln in ls:
            per = "-" if ln.per_element is None else _span(ln.per_element_lean, ln.per_element)
            cells = [name, ln.kernel, f"{ln.elements / 1e6:.2f}", f"{ln.nbytes / 1e6:.1f}", per]
            for i, (_, d) in enumerate(devs):
                tb, ti = ln.bounds(d)
                _, ti_lean = ln.bounds(d, lean=True)
                cells += [f"{tb:.1f}", _span(ti_lean, ti) + (" *" if ti > tb else "")]
                lo[i] += max(tb, ti_lean)
                hi[i] += max(tb, ti)
            rows.append(cells)
            name = ""
        rows.append(["", "predicted: sum of max", "", "", ""] + [
            c for a, b in zip(lo, hi) for c in (_span(a, b), "")])
    notes = [f"instructions per element: {source}; 'a-b': every runtime flag branch taken - every flag's work "
             f"done (gpu/bench/sass.py); * marks a launch whose instruction bound (b) is the larger",
             *(f"{n}: {d['sms']} SMs, {d['clock_ghz']} GHz, copy {d['copy_gbps']:.0f} GB/s ({d['note']})"
               for n, d in devs), *(f"note {i + 1}: {r}" for i, r in enumerate(refused))]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines + [""] + [f"- {n}" for n in notes])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head)] + [fmt(r) for r in rows] + [""] + notes)


def main(argv: Sequence[str] | None = None) -> int:
    markdown = "--markdown" in (argv if argv is not None else sys.argv[1:])
    print(table(markdown=markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
