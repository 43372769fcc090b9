"""Reporting: the terminal table, the JSON report, the plot, the CPU speed check, the host table."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from typing import Any, Sequence

import numpy as np

import gpu

from .harness import Row
from .host import HostRow
from .suites import CPU_CHECK
from .records import OPS


#: printed under the table of a CPU run (`gpu-bench --quick` without a GPU): what its rows are
CPU_NOTE = ("note: on the CPU, `ours` is this library's NumPy path (the CUDA kernels need a GPU; the tests run\n"
            "them on the CPU emulator), `seed` the seed's direct NumPy formulas, `torch-cpu` PyTorch on the CPU.\n"
            "%copy is against the copy bandwidth measured above; %spec is empty: a CPU has no datasheet bandwidth.\n"
            "The --quick shapes are tiny (8K-16K elements): a call takes tens of microseconds, mostly per-call cost;\n"
            "ours runs them on one thread with no block machinery; with the cpu-jit extra (Numba) installed, batch\n"
            "norm's statistics, forward and inference as one compiled call each, larger batch norms as compiled loops.")


def _fmt(v, spec: str, width: int) -> str:
    return (format(v, spec) if v is not None else "").rjust(width)


def format_table(rows: Sequence[Row]) -> str:
    interop = any(r.interop_ms is not None for r in rows)   # `--framework torch`: the overhead column
    head = (f"{'op':<28} {'shape':<20} {'dtype':<7} {'peer':<13} {'ms':>9} {'GB/s':>8} "
            f"{'%copy':>6} {'%spec':>6} {'vs best':>8}" + (f" {'interop ms':>10}" if interop else "") + "  status")
    lines, prev = [head, "-" * len(head)], None
    for r in rows:
        key = (r.op, r.shape, r.layout, r.dtype)
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        shape = " ".join(filter(None, ("x".join(map(str, r.shape)), r.layout)))
        status = "" if r.status == "ok" else f"{r.status}: {r.detail}"
        lines.append(f"{r.op:<28} {shape:<20} {r.dtype:<7} {r.peer:<13} {_fmt(r.time_ms, '.4g', 9)}"
                     f" {_fmt(r.gbps, '.1f', 8)} {_fmt(r.pct_copy, '.0f', 6)} {_fmt(r.pct_spec, '.0f', 6)}"
                     f" {_fmt(r.speedup, '.2f', 7)}{'x' if r.speedup is not None else ' '}"
                     + (f" {_fmt(r.interop_ms, '+.3f', 10)}" if interop else "") + f"  {status}")
    return "\n".join(lines)


def cpu_check_report(rows: Sequence[Row]) -> tuple[str, list[dict]]:
    """The NumPy path against the seed's formulas and PyTorch CPU, with the targets."""
    lo, his = CPU_CHECK["min_speedup_vs_seed"], CPU_CHECK["max_slowdown_vs_torch"]
    out, lines = [], [f"{'workload':<42} {'ours ms':>8} {'seed ms':>8} {'torch ms':>8}"
                      f"   seed/ours (>= {lo:g})   ours/torch (<= target)"]
    for op, shape, layout in CPU_CHECK["cases"]:
        hi = his[op]
        t = {r.peer: r.time_ms for r in rows if r.op == op and r.shape == shape and r.status == "ok"}
        ours, seed, torch = t.get("ours"), t.get("seed"), t.get("torch-cpu")
        vs_seed = seed / ours if ours and seed else None
        vs_torch = ours / torch if ours and torch else None
        verdict = lambda v, good: "n/a" if v is None else f"{v:.2f}x {'ok' if good(v) else 'MISSED'}"
        name = f"{OPS[op].title} {'x'.join(map(str, shape))}"
        lines.append(f"{name:<42} {_fmt(ours, '.2f', 8)} {_fmt(seed, '.2f', 8)} {_fmt(torch, '.2f', 8)}"
                     f"   {verdict(vs_seed, lambda v: v >= lo):<20}   {verdict(vs_torch, lambda v: v <= hi)} (<= {hi:g})")
        out.append({"op": op, "shape": list(shape), "ours_ms": ours, "seed_ms": seed, "torch_ms": torch,
                    "seed_over_ours": vs_seed, "ours_over_torch": vs_torch})
    return "\n".join(lines), out


def plot(rows: Sequence[Row], device, path: str) -> None:
    """GB/s per case and peer, one panel per op, with the measured copy bandwidth as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r.op for r in rows))
    ncol = min(3, len(ops))
    nrow = -(-len(ops) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6 * ncol, 4.2 * nrow), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        mine = [r for r in rows if r.op == op]
        labels = list(dict.fromkeys(r.case_label() for r in mine))
        for peer in dict.fromkeys(r.peer for r in mine):
            pts = [(labels.index(r.case_label()), r.gbps) for r in mine if r.peer == peer and r.gbps is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", lw=1, label=peer)
        if device.copy_gbps:
            ax.axhline(device.copy_gbps, color="k", lw=1, ls="--", label="copy (measured)")
        if device.spec_gbps:
            ax.axhline(device.spec_gbps, color="gray", lw=1, ls=":", label="spec")
        ax.set_title(OPS[op].title)
        ax.set_ylabel("GB/s (minimum bytes)")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    fig.suptitle(f"gpu-bench on {device.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(v: float) -> float | None:
    """JSON has no infinity: an unlimited setting is written as null."""
    return v if math.isfinite(v) else None


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    out = {"gpu": gpu.__version__, "python": platform.python_version(), "numpy": np.__version__}
    for name in ("cupy", "torch"):
        mod = sys.modules.get(name)
        out[name] = getattr(mod, "__version__", None) if mod else None
    return out


def format_host_table(rows: Sequence[HostRow]) -> str:
    """Per op: us and launches per public call, PyTorch CPU's us per call, and the goal."""
    goal = rows[0].goal_us if rows else 0.0
    head = (f"{'op':<28} {'shape':<9} {'us/call':>9} {'launches/call':>13} {'torch-cpu us/call':>17}"
            f"   goal <= {goal:g} us")
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(map(str, r.shape))
        if r.status != "ok":
            verdict = f"{r.status}: {r.detail}"
        else:
            verdict = "met" if r.meets_goal else f"MISSED ({r.us_per_call / r.goal_us:.1f}x the goal)"
        torch = _fmt(r.torch_us_per_call, ".1f", 17) if r.torch_status == "ok" else r.torch_status[:17].rjust(17)
        lines.append(f"{r.op:<28} {shape:<9} {_fmt(r.us_per_call, '.1f', 9)} {_fmt(r.launches_per_call, '.2f', 13)}"
                     f" {torch}   {verdict}")
    return "\n".join(lines)


def context(argv: Sequence[str] | None) -> dict[str, Any]:
    """What every JSON report starts with: date, commit, host, argv, versions."""
    return {"schema": 1, "tool": "gpu-bench",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(), "host": platform.node(),
            "argv": list(sys.argv[1:] if argv is None else argv), "versions": _versions()}


def append_jsonl(record: dict, path: str, fresh: bool = False) -> None:
    """One JSON object on one line at the end of `path` (the whole file when `fresh`), flushed to
    the OS at once: a run killed at any moment leaves every record written before it whole."""
    with open(path, "w" if fresh else "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
