"""``gpu-bench --traffic``: the memory traffic of every kernel path of every op, measured on the
emulator's trace build (``gpu._emulator.trace``), against the op's minimum-bytes formula.

Each path is forced at a size the traced emulator runs in about a second (``PATHS``: the engine's
``tuned`` knobs, as the kernel tests force them) and run once to build and warm up, then once
traced. A row reports the bytes the kernels requested from global memory (loads, stores), the
distinct bytes they touched, and ``passes``: requested bytes / ``Op.min_bytes`` (1.0: every
input read once and every output written once); per launch, the sectors per warp request against
the ideal and the shared-memory bank-conflict ways.

``model`` is what the path's design says it moves, in units of E*s (elements x itemsize): the
tests (tests/test_traffic.py) hold every path to it, up to the per-channel and per-row terms.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

import gpu
from gpu._emulator import trace
from gpu._engines import channels, rows

from .records import OPS, Case, make_inputs


@dataclass(frozen=True)
class Path:
    """One kernel path of one op, forced at an emulator-sized shape."""

    op: str
    path: str
    shape: tuple[int, ...]
    layout: str = ""
    knobs: dict = field(default_factory=dict)   # the engine's tuned(...) knobs
    kernels: tuple[str, ...] = ()               # launched kernels' names contain these, in order
    model: float = 2.0                          # bytes requested / (E*s), up to O(C + rows)
    axis: int | None = None                     # softmax family: the class axis (None: last)
    aligned_rows: bool = True                   # rows start on 32-byte sectors: ideal coalescing
    cached_row: bool = False                    # a row cache or a column reduce in shared memory
                                                # that the kernel's design calls conflict-free

    @property
    def engine(self):
        return rows if OPS[self.op].family == "softmax" else channels

    def case(self, dtype) -> Case:
        """The records' case: classes last for the softmax family (the strided path's transposed
        array moves the same bytes)."""
        shape = self.shape
        if self.axis is not None and self.axis != len(shape) - 1:
            shape = tuple(n for i, n in enumerate(shape) if i != self.axis) + (shape[self.axis],)
        return Case(OPS[self.op], shape, self.layout, np.dtype(dtype))

    def label(self) -> str:
        shape = "x".join(map(str, self.shape))
        return f"{shape} {self.layout}" if self.layout else shape


_BLOCK = {"warp_max_cols": 0}                            # long rows: a block per row, row cached
_NOCACHE = {"warp_max_cols": 0, "smem_bytes": 0}         # a block per row, the row read twice
_PART = {"warp_max_cols": 0, "smem_bytes": 2048}         # the row's head cached, the tail read twice
_ROWS2 = {"grid_rows": 2}    # channels last: 2 blocks down the rows, 16 rows a thread, as at real sizes
                             # (one row a thread would make the per-channel loads the traffic)

#: Every kernel path of every op. BN layouts: "nc" is (rows, C) reduced over rows (channels
#: last: the engine's column tiles), "nchw" reduces N, H, W (channels first: inner = H*W).
#: Models in E*s: a forward reads x and writes y (2); the two-pass forward reads x twice (3); the
#: backward reads dy and x and writes dx (3), twice over for the two-kernel path (5);
#: the epilogue's ops (residual add + ReLU) add a residual read to the forward and the
#: inference, a read of y (the ReLU mask) and a dresidual write to the backward: below.
PATHS: tuple[Path, ...] = (
    Path("batch_stats", "stream", (512, 64), "nc", _ROWS2, ("batch_norm_stats",), 1.0),
    Path("batch_stats", "stream", (8, 16, 8, 8), "nchw", {}, ("batch_norm_stats",), 1.0),
    Path("batch_norm_inference", "apply", (512, 64), "nc", _ROWS2, ("params", "batch_norm_apply"), 2.0),
    Path("batch_norm_inference", "apply", (8, 16, 8, 8), "nchw", {}, ("params", "batch_norm_apply"), 2.0),
    Path("batch_norm_forward", "onchip", (256, 32), "nc", {"path": "onchip"}, ("forward_onchip",), 2.0,
         cached_row=True),
    Path("batch_norm_forward", "onchip", (8, 16, 8, 8), "nchw", {"path": "onchip"}, ("forward_onchip",), 2.0,
         cached_row=True),
    Path("batch_norm_forward", "persistent", (600, 64), "nc", {"path": "persistent", "threads": 32, "grid_rows": 3},
         ("forward_onchip",), 2.0, cached_row=True),
    Path("batch_norm_forward", "onchip-scalar", (256, 32), "nc", {"path": "onchip", "vector": False},
         ("forward_onchip",), 2.0, cached_row=True),
    Path("batch_norm_forward", "twopass", (512, 64), "nc", {"path": "twopass", **_ROWS2}, ("stats", "apply"), 3.0),
    Path("batch_norm_forward", "twopass", (8, 16, 8, 8), "nchw", {"path": "twopass"}, ("stats", "apply"), 3.0),
    Path("batch_norm_backward", "onchip", (256, 32), "nc", {"path": "onchip"}, ("backward_onchip",), 3.0,
         cached_row=True),
    Path("batch_norm_backward", "onchip", (8, 16, 8, 8), "nchw", {"path": "onchip"}, ("backward_onchip",), 3.0,
         cached_row=True),
    Path("batch_norm_backward", "persistent", (600, 64), "nc", {"path": "persistent", "threads": 32,
                                                                 "grid_rows": 3}, ("backward_onchip",), 3.0,
         cached_row=True),
    Path("batch_norm_backward", "twopass-scalar", (512, 64), "nc", {"path": "twopass", "vector": False, **_ROWS2},
         ("backward_reduce", "backward_apply"), 5.0),
    Path("batch_norm_backward", "twopass", (512, 64), "nc", {"path": "twopass", **_ROWS2},
         ("backward_reduce", "backward_apply"), 5.0),
    Path("batch_norm_backward", "twopass", (8, 16, 8, 8), "nchw", {"path": "twopass"},
         ("backward_reduce", "backward_apply"), 5.0),
    Path("batch_norm_train", "onchip", (256, 32), "nc", {"path": "onchip"}, ("forward_onchip", "backward_onchip"),
         5.0, cached_row=True),
    Path("batch_norm_train", "twopass", (512, 64), "nc", {"path": "twopass", **_ROWS2},
         ("stats", "apply", "backward_reduce", "backward_apply"), 8.0),
    # the epilogue (residual add + ReLU, the BN_EPILOGUE modules): the forward also reads the
    # residual (on chip 3, two-pass 4); the backward also reads y (the mask) and writes dresidual
    # (on chip 5; two kernels 8: dy, y, x read by the reduce and again by the apply)
    Path("batch_norm_add_relu_inference", "apply", (512, 64), "nc", _ROWS2, ("params", "batch_norm_apply"), 3.0),
    Path("batch_norm_add_relu_inference", "apply", (8, 16, 8, 8), "nchw", {}, ("params", "batch_norm_apply"),
         3.0),
    Path("batch_norm_add_relu_train", "onchip", (256, 32), "nc", {"path": "onchip"},
         ("forward_onchip", "backward_onchip"), 8.0, cached_row=True),
    Path("batch_norm_add_relu_train", "onchip", (8, 16, 8, 8), "nchw", {"path": "onchip"},
         ("forward_onchip", "backward_onchip"), 8.0, cached_row=True),
    Path("batch_norm_add_relu_train", "persistent", (600, 64), "nc", {"path": "persistent", "threads": 32,
                                                                       "grid_rows": 3},
         ("forward_onchip", "backward_onchip"), 8.0, cached_row=True),
    # the scalar module's backward keeps 128 rows a tile on chip (256 do not fit one block)
    Path("batch_norm_add_relu_train", "onchip-scalar", (128, 32), "nc", {"path": "onchip", "vector": False},
         ("forward_onchip", "backward_onchip"), 8.0, cached_row=True),
    Path("batch_norm_add_relu_train", "twopass", (512, 64), "nc", {"path": "twopass", **_ROWS2},
         ("stats", "apply", "backward_reduce", "backward_apply"), 12.0),
    Path("batch_norm_add_relu_train", "twopass", (8, 16, 8, 8), "nchw", {"path": "twopass"},
         ("stats", "apply", "backward_reduce", "backward_apply"), 12.0),
    Path("softmax", "warp", (64, 256), "", {}, ("softmax_warp",), 2.0),
    # rows of 99 floats (396 bytes, not a multiple of 16): 4-byte accesses, rows off the sectors
    Path("softmax", "warp-scalar", (64, 99), "", {}, ("softmax_warp",), 2.0, aligned_rows=False),
    Path("softmax", "block", (8, 2048), "", _BLOCK, ("softmax_block",), 2.0, cached_row=True),
    Path("softmax", "block-uncached", (8, 2048), "", _NOCACHE, ("softmax_block",), 3.0),
    Path("softmax", "block-partial", (8, 2048), "", _PART, ("softmax_block",), 2.75, cached_row=True),
    Path("softmax", "strided", (256, 64), "", {}, ("softmax_strided",), 2.0, axis=0, cached_row=True),
    Path("log_softmax", "warp", (64, 256), "", {}, ("softmax_warp",), 2.0),
    Path("log_softmax", "block", (8, 2048), "", _BLOCK, ("softmax_block",), 2.0, cached_row=True),
    Path("softmax_cross_entropy", "warp", (64, 256), "", {}, ("cross_entropy_warp",), 1.0),
    Path("softmax_cross_entropy", "block", (8, 2048), "", _BLOCK, ("cross_entropy_block",), 1.0),
    Path("softmax_cross_entropy", "strided", (256, 64), "", {}, ("cross_entropy_strided",), 1.0, axis=0),
    Path("softmax_cross_entropy_train", "warp", (64, 256), "", {}, ("cross_entropy_warp",), 2.0),
    Path("softmax_cross_entropy_train", "block", (8, 2048), "", _BLOCK, ("cross_entropy_block",), 2.0,
         cached_row=True),
    Path("softmax_cross_entropy_train", "block-uncached", (8, 2048), "", _NOCACHE, ("cross_entropy_block",), 3.0),
    # (its column reduce merges 20-byte states: 2-way bank conflicts in the trace, the host
    # compiler's copy; conflict-free in the SASS, see docs/BENCHMARKS.md)
    Path("softmax_cross_entropy_train", "strided", (256, 64), "", {}, ("cross_entropy_strided",), 2.0, axis=0),
)


def _call(p: Path, case: Case, inputs: dict):
    """One call of the op on this path."""
    if p.axis is None:
        return case.op.ours(case, inputs)
    z = np.ascontiguousarray(np.moveaxis(inputs["z"], -1, p.axis))
    if p.op in ("softmax", "log_softmax"):
        fn = gpu.softmax if p.op == "softmax" else gpu.log_softmax
        return lambda: fn(z, axis=p.axis)
    t = np.ascontiguousarray(inputs["target"])
    grad = p.op.endswith("_train")
    return lambda: gpu.softmax_cross_entropy(z, t, axis=p.axis, return_grad=grad)


def measure(p: Path, dtype=np.float32, seed: int = 0) -> tuple[dict, trace.Trace]:
    """Run the path once to build and warm up, once traced: (the report's row, the trace)."""
    case = p.case(dtype)
    inputs = make_inputs(np, np.random.default_rng(seed), case)
    run = _call(p, case, inputs)
    with gpu.use_backend("emulate"), p.engine.tuned(**p.knobs):
        with trace.tracing():
            run()
            gpu.check_errors()
        with trace.tracing() as t:
            run()
            gpu.check_errors()
    es = case.elements * case.itemsize
    row = {"op": p.op, "path": p.path, "shape": p.label(), "dtype": case.dtype.name,
           "min_bytes": case.op.min_bytes(case), "model_passes": p.model,
           "load_bytes": t.load_bytes, "store_bytes": t.store_bytes, "unique_bytes": t.unique_bytes,
           "passes": round(t.bytes / case.op.min_bytes(case), 3), "es_passes": round(t.bytes / es, 3),
           "tensor_passes": round(t.tensor_bytes(es // 2) / es, 3),
           "launches": [launch.summary() for launch in t.launches]}
    return row, t


def select(ops: Sequence[str] | None = None, shapes: Sequence[tuple] | None = None) -> list[Path]:
    """The paths of these ops (all by default), at these shapes only if given."""
    out = [p for p in PATHS if not ops or p.op in ops]
    if shapes:
        out = [p for p in out if any(p.shape == tuple(s) and (not lay or lay == p.layout) for s, lay in shapes)]
    return out


def table(rows_: Sequence[dict]) -> str:
    """The report as text: one line per op and path, one indented line per launch."""
    head = (f"{'op':28} {'path':15} {'shape':14} {'passes':>6} {'E*s':>5} {'tensors':>7} {'model':>5} {'loaded':>9} "
            f"{'stored':>9} {'unique':>9}")
    lines = [head, "-" * len(head)]
    for r in rows_:
        lines.append(f"{r['op']:28} {r['path']:15} {r['shape']:14} {r['passes']:6.2f} {r['es_passes']:5.2f} "
                     f"{r['tensor_passes']:7.2f} {r['model_passes']:5.2f} {r['load_bytes']:9d} "
                     f"{r['store_bytes']:9d} {r['unique_bytes']:9d}")
        for launch in r["launches"]:
            lines.append(f"    {launch['kernel']:40} sectors/request {launch['sectors_per_request']:5.2f} "
                         f"(ideal {launch['ideal_sectors_per_request']:5.2f}, worst x{launch['coalescing_worst']:.2f})"
                         f"  smem ways {launch['smem_conflict_ways']:.2f} (max {launch['smem_conflict_ways_max']})")
    lines.append("passes: bytes requested / the op's min_bytes; E*s: the same bytes / (elements x itemsize); "
                 "tensors: the bytes of the op's tensors alone / E*s, against the path's model; unique: distinct "
                 "bytes touched. sectors/request: 32-byte sectors per warp request (ideal: the request's bytes "
                 "/ 32); smem ways: bank-conflict degree (1: conflict-free)")
    return "\n".join(lines)


def run(ops: Sequence[str] | None = None, shapes: Sequence[tuple] | None = None, dtype: str = "float32",
        json_path: str | None = None, out=print) -> int:
    """``gpu-bench --traffic``: measure the selected paths, print the table, write the JSON."""
    paths = select(ops, shapes)
    if not paths:
        out("gpu-bench --traffic: no kernel path matches the --op/--shape selection; the paths are:\n"
            + "\n".join(f"  {p.op} {p.path} {p.label()}" for p in PATHS))
        return 2
    rows_ = []
    for p in paths:
        row, _ = measure(p, np.dtype(dtype))
        rows_.append(row)
    out(table(rows_))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"mode": "traffic", "rows": rows_}, f, indent=1)
    return 0


def ideal(n: float) -> float:
    """Sectors of a perfectly coalesced request of n bytes."""
    return float(math.ceil(n / 32))
