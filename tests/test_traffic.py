"""Memory traffic of every kernel path, traced on the emulator: performance tests that cannot drift.

Every path of every op (gpu.bench.traffic.PATHS, forced with the engines' ``tuned`` knobs) is run
on the trace build (gpu._emulator.trace) and held to its design:

- bytes: what the kernels request from the op's tensors (x, y, dy, dx, z, dz, residual,
  dresidual: the buffers of at least half of E*s bytes) is the path's model in E*s, up to a
  sector per row; the per-channel and per-row vectors come on top and are bounded by the
  tensors' bytes;
- coalescing: the streaming loads and stores (the sites carrying a tenth of a launch's global
  bytes) touch the ideal number of 32-byte sectors per warp request (rows start on sectors);
- bank conflicts: where the design keeps a row cache or a column reduce in shared memory, the
  shared accesses that carry a tenth of the launch's shared bytes are conflict-free.

The planted bugs of tests/kernels/traffic_bugs.cu (a strided load, an input read twice, a 2-way
bank conflict) are each caught by the same checks, and their correct twins pass them. The trace
flavour defines AddressSanitizer's callbacks itself: under the ASan run of the kernel tests
(GPU_EMULATOR_ASAN=1) this file is skipped.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import gpu
from gpu import _kernels
from gpu._emulator import trace
from gpu.bench import cli, traffic

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(os.environ.get("GPU_EMULATOR_ASAN", "") not in ("", "0"),
                                 reason="the trace build and ASan exclude each other")]

BUGS = Path(__file__).parent / "kernels" / "traffic_bugs.cu"

#: the share of a launch's bytes that makes a site one of its main accesses
MAIN = 0.1


# ---------------------------------------------------------------------------------------------
# The checks, shared by the real paths and the planted bugs
# ---------------------------------------------------------------------------------------------

def check_bytes(t: trace.Trace, es: int, model: float, rows: int, what: str) -> None:
    """The tensors' bytes are ``model`` E*s, up to 64 bytes a row (a target logit gathered per row)."""
    got = t.tensor_bytes(es // 2)
    assert model * es <= got <= model * es + 64 * rows, (
        f"{what}: the kernels requested {got} bytes of the op's tensors = {got / es:.3f} E*s, the path's "
        f"model is {model} E*s (+ at most {64 * rows} bytes); launches: {t.kernels()}")
    assert t.bytes - got <= es, f"{what}: {t.bytes - got} bytes of per-channel/per-row vectors, more than E*s"


def check_coalesced(t: trace.Trace, what: str) -> None:
    """The main global loads and stores of every launch touch the ideal sectors per request."""
    for launch in t.launches:
        for s in launch.main(share=MAIN):
            assert s.sectors == s.ideal, (
                f"{what}: {launch.kernel} at {launch.where(s)}: {s.sectors_per_request:.2f} sectors per "
                f"{'store' if s.store else 'load'} request, ideal {s.ideal_per_request:.2f} ({s.width}-byte "
                f"accesses, {s.requests} requests)")


def check_conflict_free(t: trace.Trace, what: str) -> None:
    """The main shared-memory accesses of every launch are conflict-free."""
    for launch in t.launches:
        total = sum(s.bytes for s in launch.sites if s.space == "shared")
        for s in launch.sites:
            if s.space == "shared" and s.bytes >= MAIN * total:
                assert s.ways_max == 1, (
                    f"{what}: {launch.kernel} at {launch.where(s)}: {s.ways_max}-way bank conflict "
                    f"({s.conflict_ways:.2f} ways on average over {s.requests} {s.width}-byte requests)")


# ---------------------------------------------------------------------------------------------
# Every path of every op
# ---------------------------------------------------------------------------------------------

_measured: dict = {}


def measure(p: traffic.Path):
    key = (p.op, p.path, p.shape, p.layout)
    if key not in _measured:
        _measured[key] = traffic.measure(p)
    return _measured[key]


def _id(p: traffic.Path) -> str:
    return f"{p.op}-{p.path}-{p.label().replace(' ', '-')}"


@pytest.mark.parametrize("p", traffic.PATHS, ids=_id)
def test_path_holds_its_model(p):
    row, t = measure(p)
    case = p.case(np.float32)
    es = case.elements * case.itemsize
    what = f"{p.op} {p.path} {p.label()}"
    names = t.kernels()
    at = 0
    for part in p.kernels:                   # the path meant to run did
        at = next((i for i in range(at, len(names)) if part in names[i]), None)
        assert at is not None, f"{what}: expected launches of {p.kernels} in order, got {names}"
    check_bytes(t, es, p.model, case.rows, what)
    if p.aligned_rows:
        check_coalesced(t, what)
    if p.cached_row:
        check_conflict_free(t, what)
    assert row["passes"] == pytest.approx(t.bytes / case.op.min_bytes(case), abs=1e-3)



@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_class_weights_are_read_with_the_logits(dtype):
    """Class weights with smoothing (softmax_cross_entropy_block_w, the row in shared memory): the
    weights are read once a pass (pass 1 and pass 2: 2 C x 4 bytes a row, plus the target's weight
    per warp), in 16-byte loads. float32 logits: a lane's 4 weights are one 16-byte load at a
    16-byte lane stride, the ideal sectors. 16-bit logits: a lane's 8 weights are two 16-byte
    loads at a 32-byte lane stride, each request touching twice its sectors (the pair reads the
    same sectors: L1 requests, not L2 or DRAM bytes): the weight sites and only they."""
    from gpu._backend import BFLOAT16
    from gpu._engines import rows
    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(7)
    R, C = 8, 2048                       # rows on 32-byte sectors, a multiple of every vector
    z = rng.standard_normal((R, C)).astype(dt)
    t = rng.integers(0, C, R)
    w = (rng.random(C) + 0.5).astype(np.float32)
    with gpu.use_backend("emulate"), rows.tuned(warp_max_cols=0, block_threads=128):
        for _ in range(2):               # build and warm up, then the traced call
            with trace.tracing() as tr:
                gpu.softmax_cross_entropy(z, t, weight=w, label_smoothing=0.1, return_grad=True)
                gpu.check_errors()
    launch = next(x for x in tr.launches if x.kernel == "softmax_cross_entropy_block_w")
    loaded, _ = launch.bytes_of(w)
    assert 2 * R * C * 4 <= loaded <= 2 * R * C * 4 + 64 * R, (loaded, 2 * R * C * 4)
    wide = [s for s in launch.main(store=False, share=0.0) if s.sectors != s.ideal]
    if dtype == "float32":
        assert wide == [], [(s.width, s.sectors, s.ideal, launch.where(s)) for s in wide]
    else:
        assert wide and all(s.width == 16 and s.sectors == 2 * s.ideal for s in wide)
        assert sum(s.bytes for s in wide) == 2 * R * C * 4

def test_every_op_has_its_paths():
    # every op of the records is measured, each softmax-engine op on its warp and block paths and
    # each batch-norm op with channels last and first
    from gpu.bench.records import OPS
    ops = {p.op for p in traffic.PATHS}
    assert ops == set(OPS)
    for op in OPS:
        paths = {p.path for p in traffic.PATHS if p.op == op}
        layouts = {p.layout for p in traffic.PATHS if p.op == op}
        if OPS[op].family == "softmax":
            assert {"warp", "block"} <= paths, op
        elif op != "batch_norm_train":
            assert {"nc", "nchw"} <= layouts, op


# ---------------------------------------------------------------------------------------------
# The planted bugs
# ---------------------------------------------------------------------------------------------

N = 4096          # 16 blocks of 256: every warp full, every row of 32 lanes on 4 sectors


def run_bug(name: str, x: np.ndarray) -> trace.Trace:
    y = np.empty(N, np.float32)
    with gpu.use_backend("emulate"), trace.tracing() as t:
        k = _kernels.get_kernel(BUGS, name, np)
        _kernels.launch(k, N // 256, 256, (y, x, np.int32(N)))
    np.testing.assert_array_equal(y, 2 * x[::2] if name == "scale_strided" else 2 * x[:N])
    return t


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal(2 * N).astype(np.float32)


@pytest.mark.parametrize("name", ["scale_coalesced", "scale_shared"])
def test_correct_kernels_pass(name, x):
    t = run_bug(name, x[:N].copy())
    check_bytes(t, 4 * N, 2.0, 0, name)
    check_coalesced(t, name)
    check_conflict_free(t, name)
    launch, = t.launches
    assert launch.load_bytes == launch.store_bytes == 4 * N
    assert launch.sectors_per_request == launch.ideal_sectors_per_request == 4.0


def test_strided_load_is_caught(x):
    t = run_bug("scale_strided", x)
    with pytest.raises(AssertionError, match=r"8\.00 sectors per load request, ideal 4\.00"):
        check_coalesced(t, "scale_strided")
    assert t.launches[0].coalescing_worst == 2.0


def test_input_read_twice_is_caught(x):
    t = run_bug("scale_read_twice", x[:N].copy())
    with pytest.raises(AssertionError, match=r"= 3\.000 E\*s, the path's model is 2\.0 E\*s"):
        check_bytes(t, 4 * N, 2.0, 0, "scale_read_twice")
    check_coalesced(t, "scale_read_twice")     # each read on its own is coalesced


def test_bank_conflict_is_caught(x):
    t = run_bug("scale_bank_conflict", x[:N].copy())
    with pytest.raises(AssertionError, match="2-way bank conflict"):
        check_conflict_free(t, "scale_bank_conflict")
    assert t.launches[0].smem_conflict_ways_max == 2


def test_broadcast_and_vector_shared_accesses_are_free(x):
    # y = 2 x x[0] (x[0] = 1 here): a broadcast is one 4-byte request of one sector, a 16-byte
    # shared access at a 16-byte lane stride is conflict-free (quarter-warp phases)
    xs = x[:N].copy()
    xs[0] = 1.0
    y = np.empty(N, np.float32)
    with gpu.use_backend("emulate"), trace.tracing() as t:
        k = _kernels.get_kernel(BUGS, "scale_broadcast_vec4", np)
        _kernels.launch(k, N // 256, 256, (y, xs, np.int32(N)))
    np.testing.assert_array_equal(y, 2 * xs)
    launch, = t.launches
    loads = sorted((s for s in launch.sites if s.space == "global" and not s.store), key=lambda s: s.bytes)
    assert [(s.bytes // s.requests, s.sectors_per_request) for s in loads] == [(4, 1.0), (128, 4.0)]
    shared = [s for s in launch.sites if s.space == "shared"]
    assert shared and all(s.width == 16 and s.ways_max == 1 for s in shared), shared
    check_bytes(t, 4 * N, 2.0, N, "scale_broadcast_vec4")


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def test_gpu_bench_traffic_json(tmp_path, capsys):
    out = tmp_path / "traffic.json"
    assert cli.main(["--traffic", "--op", "log_softmax", "--shape", "64x256", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "softmax_warp" in text and "sectors/request" in text
    report = json.loads(out.read_text())
    assert report["mode"] == "traffic"
    row, = report["rows"]
    assert {"op", "path", "shape", "dtype", "min_bytes", "load_bytes", "store_bytes", "unique_bytes", "passes",
            "launches"} <= set(row)
    assert (row["op"], row["path"], row["shape"]) == ("log_softmax", "warp", "64x256")
    assert row["passes"] == pytest.approx(1.0)                  # z read once, y written once
    launch, = row["launches"]
    assert {"kernel", "load_bytes", "store_bytes", "unique_bytes", "sectors_per_request",
            "ideal_sectors_per_request", "smem_conflict_ways", "smem_conflict_ways_max"} <= set(launch)


def test_gpu_bench_traffic_rejects_an_unknown_selection(capsys):
    assert cli.main(["--traffic", "--op", "softmax", "--shape", "3x5"]) == 2
    assert "no kernel path matches" in capsys.readouterr().out


def test_trace_and_asan_exclude_each_other(monkeypatch):
    from gpu._emulator import build_flavour
    monkeypatch.setenv("GPU_EMULATOR_TRACE", "1")
    assert build_flavour() == "trace"
    monkeypatch.setenv("GPU_EMULATOR_ASAN", "1")
    with pytest.raises(ValueError, match="exclude each other"):
        build_flavour()
