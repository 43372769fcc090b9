"""The host path: this library's Python dispatch per public call under the emulate backend, the
kernel launch recorded and made a no-op (`gpu-bench --host`), beside PyTorch CPU's time."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

import gpu

from .harness import _one_line
from .records import OPS, Case, make_inputs

#: `--host`: the goal for this library's Python dispatch per public call, and how it is timed
#: (the median over batches of calls; `--repeat` sets the calls per batch)
HOST = {"goal_us": 25.0, "batches": 7, "calls": 300, "warmup": 5}


@dataclass
class HostRow:
    """One op's host-path figures: microseconds and kernel launches per public call, PyTorch
    CPU's own time per call on the same inputs as the anchor."""
    op: str
    title: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    status: str = "ok"          # ok | error
    detail: str = ""
    us_per_call: float | None = None
    launches_per_call: float | None = None
    calls: int = 0
    torch_us_per_call: float | None = None
    torch_status: str = "unavailable"   # ok | unavailable | error: ...
    goal_us: float = HOST["goal_us"]

    @property
    def meets_goal(self) -> bool | None:
        return None if self.us_per_call is None else self.us_per_call <= self.goal_us

    def as_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"], d["meets_goal"] = list(self.shape), self.meets_goal
        return d


def _per_call_us(fn: Callable[[], Any], calls: int, batches: int, warmup: int) -> float:
    """The median over `batches` of the mean time of `calls` back-to-back calls, in microseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return float(np.median(times)) * 1e6


def host_cases(names: Sequence[str] | None = None) -> list[Case]:
    """The `--host` cases: every op (of `names`) with a `host_shape`, float32, NumPy arrays."""
    ops = [OPS[n] for n in (names or OPS) if OPS[n].host_shape is not None]
    return [Case(op, op.host_shape, "nc" if op.family == "batch_norm" else "", np.dtype(np.float32)) for op in ops]


def measure_host(cases: Sequence[Case], calls: int = HOST["calls"], batches: int = HOST["batches"],
                 warmup: int = HOST["warmup"], seed: int = 0,
                 tick: Callable[[], None] = lambda: None) -> list[HostRow]:
    """This library's host path per public call under the emulate backend, with every kernel
    launch recorded and skipped (`gpu._kernels.recording_launches(run=False)`); beside it PyTorch
    CPU's time per call for the same op. Needs no GPU and no CuPy; the first call builds the
    emulated kernels (g++, seconds), untimed."""
    from gpu._kernels import recording_launches

    try:
        import torch
        torch_missing = None
    except ImportError as e:
        torch, torch_missing = None, f"unavailable: {e}"
    rows = []
    for case in cases:
        op = case.op
        row = HostRow(op.name, op.title, case.shape, case.dtype.name, calls=calls * batches)
        inp = make_inputs(np, np.random.default_rng(seed), case)
        try:
            run = op.ours(case, inp)
            with gpu.use_backend("emulate"), recording_launches(run=False) as log:
                for _ in range(warmup):
                    run()
                before = log.count
                row.us_per_call = _per_call_us(run, calls, batches, warmup=0)
                row.launches_per_call = (log.count - before) / (calls * batches)
        except Exception as e:
            row.status, row.detail = "error", _one_line(e)
        if torch is None:
            row.torch_status = torch_missing
        elif op.torch is None:
            row.torch_status = "unavailable: no PyTorch call for this op"
        else:
            try:
                trun = op.torch(case, {k: torch.from_numpy(v) for k, v in inp.items()}, lambda f: f)
                row.torch_us_per_call = _per_call_us(trun, calls, batches, warmup)
                row.torch_status = "ok"
            except Exception as e:
                row.torch_status = f"error: {_one_line(e)}"
        rows.append(row)
        tick()
    return rows
