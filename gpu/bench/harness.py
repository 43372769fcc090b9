"""The harness: one case -> rows. Every peer is checked against the float64 reference, then
timed on rotated input sets; `interop_overhead` times this library through PyTorch against it
on arrays. Generic over the op records of `records.py`."""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .devices import MIN_SAMPLES
from .peers import Peer, Skip, TorchInteropPeer, Unavailable, Wrong
from .records import Case, make_inputs

#: bound on ||out - ref|| / ||ref|| against the float64 reference, by storage dtype. Looser than
#: the unit tests': peers sum in other orders, and float16 outputs carry 2^-11 rounding each.
TOLERANCE = {np.dtype(np.float16): 5e-3, np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}

ROTATE_L2_FACTOR = 3      # rotated input sets span at least this many L2 caches
MAX_INPUT_SETS = 256


def _as_array(a, xp):
    """A peer's output as an array of xp; a torch tensor is viewed, anything else must be xp's."""
    if type(a).__module__.startswith("torch"):
        a = a.detach()
        return a.numpy() if xp is np else xp.from_dlpack(a)
    if xp is np:
        return np.asarray(a)
    if not isinstance(a, xp.ndarray):
        raise Wrong(f"returned {type(a).__module__}.{type(a).__name__} for CuPy inputs")
    return a


def check(outputs: tuple, reference: tuple, case: Case, xp) -> float:
    """The largest relative error over the checked outputs; raises Wrong past the tolerance."""
    names = case.op.outputs
    if not isinstance(outputs, tuple) or len(outputs) != len(names):
        raise Wrong(f"returned {type(outputs).__name__} of {len(outputs) if isinstance(outputs, tuple) else 1}"
                    f" items, expected {len(names)} ({', '.join(names)})")
    if outputs[0] is None:
        raise Wrong(f"no {names[0]}")
    tol, worst = TOLERANCE[case.dtype], 0.0
    for name, out, ref in zip(names, outputs, reference):
        if out is None:
            continue
        out = _as_array(out, xp)
        if out.shape != ref.shape:
            raise Wrong(f"{name}: shape {out.shape}, expected {ref.shape}")
        out = out.astype(np.float64)
        if not bool(xp.isfinite(out).all()):
            raise Wrong(f"{name}: non-finite values")
        den = float(xp.linalg.norm(ref.ravel()))
        err = float(xp.linalg.norm((out - ref).ravel())) / (den or 1.0)
        worst = max(worst, err)
        if not err <= tol:
            raise Wrong(f"{name}: relative error {err:.3g} > {tol:g}")
    return worst


@dataclass
class Row:
    op: str
    title: str
    shape: tuple[int, ...]
    layout: str
    axis: tuple[int, ...]
    dtype: str
    device: str
    peer: str
    status: str = "ok"          # ok | WRONG | error | unavailable | skipped
    detail: str = ""
    max_rel_err: float | None = None
    time_ms: float | None = None
    samples: int = 0
    input_sets: int = 1
    l2_resident: bool = False
    bytes: int = 0
    gbps: float | None = None
    pct_copy: float | None = None
    pct_spec: float | None = None
    speedup: float | None = None
    interop_ms: float | None = None     # ours-torch only: its time minus ours' (the interop overhead)

    def case_label(self) -> str:
        return " ".join(filter(None, ("x".join(map(str, self.shape)), self.layout, self.dtype)))

    def as_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"], d["axis"] = list(self.shape), list(self.axis)
        return d


@dataclass
class Settings:
    repeat: int
    warmup: int
    budget: float
    deadline: float     # time.perf_counter() after which the remaining rows are skipped
    seed: int = 0


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def run_case(case: Case, peers: Sequence[Peer], device, settings: Settings,
             tick: Callable[[], None] = lambda: None) -> list[Row]:
    """Check, then time, every peer on one case; rows in `peers` order."""
    rows = [Row(case.op.name, case.op.title, case.shape, case.layout, case.axes, case.dtype.name,
                device.kind, p.name, bytes=case.op.min_bytes(case)) for p in peers]
    if time.perf_counter() > settings.deadline:
        for row in rows:
            row.status, row.detail = "skipped", "time limit (--time-limit)"
            tick()
        return rows
    xp = device.xp
    try:
        rng = device.rng(settings.seed)
        sets = [make_inputs(xp, rng, case)]
        set_bytes = sum(a.nbytes for a in sets[0].values())
        n_sets = 1
        if device.l2_bytes:
            n_sets = min(MAX_INPUT_SETS, max(1, -(-ROTATE_L2_FACTOR * device.l2_bytes // set_bytes)))
        sets += [make_inputs(xp, rng, case) for _ in range(n_sets - 1)]
        reference = case.op.reference(case, sets[0], np.float64)
    except Exception as e:  # out of memory for a --shape, typically
        for row in rows:
            row.status, row.detail = "error", f"inputs/reference: {_one_line(e)}"
            tick()
        device.release()
        return rows

    for peer, row in zip(peers, rows):
        row.input_sets, row.l2_resident = n_sets, n_sets * set_bytes < 2 * device.l2_bytes
        if time.perf_counter() > settings.deadline:
            row.status, row.detail = "skipped", "time limit (--time-limit)"
            tick()
            continue
        try:
            with peer.context():
                runs = peer.build(case, sets)
                row.max_rel_err = check(runs[0](), reference, case, xp)
                cycle = itertools.cycle(runs)
                times = device.time(lambda: next(cycle)(), settings.repeat, settings.warmup, settings.budget)
            row.time_ms = float(np.median(times)) * 1e3
            row.samples = len(times)
            row.gbps = row.bytes / (row.time_ms * 1e-3) / 1e9
            if device.copy_gbps:
                row.pct_copy = 100 * row.gbps / device.copy_gbps
            if device.spec_gbps:
                row.pct_spec = 100 * row.gbps / device.spec_gbps
        except Wrong as e:
            row.status, row.detail = "WRONG", str(e)
        except (Unavailable, NotImplementedError) as e:
            row.status, row.detail = "unavailable", str(e) or type(e).__name__
        except Skip as e:
            row.status, row.detail = "skipped", str(e)
        except Exception as e:
            row.status, row.detail = "error", _one_line(e)
            device.release()
        finally:
            runs = cycle = None  # the peer's closures hold its tensors and graphs: drop them now
        tick()
    done = [r for r in rows if r.status == "ok"]
    ours = next((r for r in done if r.peer == "ours"), None)
    for peer, r in zip(peers, rows):
        if isinstance(peer, TorchInteropPeer) and r.status == "ok" and ours is not None:
            try:
                r.interop_ms = interop_overhead(case, sets, next(p for p in peers if p.name == "ours"), peer,
                                                device, settings)
            except Exception as e:
                r.detail = f"interop: {_one_line(e)}"
                device.release()
    del sets, reference
    device.release()

    for r in done:
        others = [o.time_ms for o in done if o is not r]
        r.speedup = min(others) / r.time_ms if others else None
    return rows


def interop_overhead(case: Case, sets: list[dict], ours: Peer, through: Peer, device, settings: Settings) -> float:
    """ms that calling this library through PyTorch adds: the median of paired differences, each
    sample two pairs back to back on the same inputs, `through` then `ours`, then `ours` then
    `through`, so that both see the same machine state (warm caches, the same load) and the order
    cancels: the second call of a pair pays for what the first left behind (at 1 GB a call, the
    first touch of memory the allocator just returned to the system: +-200 ms of order bias seen
    on a CPU with one order only). Two medians measured minutes apart on a shared machine differ
    by more than the overhead itself."""
    with ours.context(), through.context():
        a, b = itertools.cycle(ours.build(case, sets)), itertools.cycle(through.build(case, sets))
        for _ in range(max(1, settings.warmup)):
            next(a)()
            next(b)()
        diffs, start = [], time.perf_counter()
        while len(diffs) < settings.repeat:
            tb = device.time(lambda: next(b)(), 1, 0, math.inf)[0]
            ta = device.time(lambda: next(a)(), 1, 0, math.inf)[0]
            ta2 = device.time(lambda: next(a)(), 1, 0, math.inf)[0]
            tb2 = device.time(lambda: next(b)(), 1, 0, math.inf)[0]
            diffs.append((tb - ta + tb2 - ta2) / 2)
            if time.perf_counter() - start > settings.budget and len(diffs) >= MIN_SAMPLES:
                break
        a = b = None
    return float(np.median(diffs)) * 1e3
