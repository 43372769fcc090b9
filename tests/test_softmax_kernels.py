"""Kernel-specific cases of cuda_src/softmax.cu, run through the CPU emulator (marker `kernel`).

tests/test_softmax.py runs the API cases on every backend; this file covers what only the kernels
have: every path switch (lane group per row / block per row with the row in shared memory / online
two-read block path / strided (outer, C, inner) tiles), forced at small sizes through
gpu._engines.rows.tuned, the sizes around each switch, special values, kernel-detected bad targets,
poisoned outputs and the determinism of the loss reduction. Sizes stay small: the emulator runs
each CUDA thread as a fiber (about 35 ns a switch).

Run: GPU_BACKEND is not needed (the tests select the emulator themselves):
    .venv/bin/python -m pytest tests/test_softmax_kernels.py -q
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import gpu
from gpu._engines import rows
from gpu.bench import reference as ref
from conftest import DTYPES, assert_close, dtype_id, random, to_numpy

pytestmark = pytest.mark.kernel

F32 = np.dtype(np.float32)

# Paths forced with rows.tuned: the emulated device has H100 shared memory, so small rows would all
# take the warp path; these make the same small rows take each block path.
PATHS = {
    "warp": {},                                                 # C <= 1024: a lane group per row
    "block_cached": {"warp_max_cols": 0},                       # a block per row, row in shared memory
    "block_online": {"warp_max_cols": 0, "smem_bytes": 0},      # a block per row, row read twice
    # a block of 32 threads per row, its first (96 // 16 - 2) * pack columns in shared memory (16
    # float32s, 8 float64s), the rest read twice
    "block_partial": {"warp_max_cols": 0, "smem_bytes": 96, "block_threads": 32},
    # a block of 32 threads per row, the row in shared memory: long rows run the unrolled pass 1
    "block_cached_32": {"warp_max_cols": 0, "block_threads": 32},
}


def emu(fn, *args, path="warp", **kwargs):
    with gpu.use_backend("emulate"), rows.tuned(**PATHS[path]):
        return fn(*args, **kwargs)


def test_outputs_are_poisoned():
    # the suite's premise: kernel outputs start as NaN, so an unwritten element fails a comparison
    assert os.environ.get("GPU_POISON") == "1"


# ---------------------------------------------------------------------------------------------
# Softmax and log-softmax: every path, the sizes around each switch
# ---------------------------------------------------------------------------------------------

ROW_CASES = [
    # (rows, C, path)
    (3, 1, "warp"),          # one class: softmax 1, log-softmax 0
    (5, 2, "warp"),          # two classes: 16 rows share a warp (lanes = 2)
    (4, 7, "warp"),          # prime, lanes = 8
    (3, 31, "warp"),         # just under a warp
    (3, 32, "warp"),         # exactly a warp, one value per lane
    (3, 33, "warp"),         # just past a warp: two values per lane
    (2, 127, "warp"),        # prime, not a multiple of any vector width: scalar loads
    (2, 128, "warp"),        # vector loads (16 bytes) for every dtype
    (1, 1023, "warp"),       # one row, just under the warp path's limit
    (1, 1024, "warp"),       # the warp path's limit: 32 values per lane
    (1, 1025, "block_cached"),  # just past it: the natural switch to the block path
    (9, 1, "block_cached"),  # block path, one class (head covers the row)
    (5, 37, "block_cached"),  # prime: misaligned rows, scalar head and tail around vectors
    (3, 64, "block_cached"),  # aligned rows, vectors only
    (3, 37, "block_online"),  # online path: statistics in one read, outputs in a second
    (2, 300, "block_online"),  # several vectors per thread in the online path
    (3, 37, "block_partial"),  # prime: misaligned rows, the cached prefix ends inside the vectors
    (2, 300, "block_partial"),  # several vectors per thread, most of them read twice
    (2, 2053, "block_partial"),  # prime, past 4 vectors x 32 threads: unrolled pass 1 + remainder
    (2, 2053, "block_cached_32"),  # the same rows wholly cached: unrolled pass 1 with its stores
    (3, 7, "block_partial"),  # shorter than the cached prefix: the whole row cached
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rows,C,path", ROW_CASES, ids=[f"{r}x{c}-{p}" for r, c, p in ROW_CASES])
def test_softmax_paths(rng, rows, C, path, dtype):
    z, z64 = random(rng, (rows, C), dtype, scale=3.0)
    p = emu(gpu.softmax, z, path=path)
    logp = emu(gpu.log_softmax, z, path=path)
    assert p.dtype == dtype and logp.dtype == dtype
    assert_close(p, ref.softmax(z64, -1), dtype, "softmax")
    want = ref.log_softmax(z64, -1)
    if C == 1:
        assert (to_numpy(logp) == 0).all()
    else:
        assert_close(logp, want, dtype, "log_softmax", factor=2)


def test_natural_switches():
    """The default thresholds: which path each shape takes on the emulated device."""
    dev_rows = lambda C, inner=1: rows.plan(np, "softmax", rows.layout(np, np.empty((2, C, inner), np.float32), 1),
                                            4, True, True)
    assert dev_rows(1024).path == "warp" and dev_rows(1024).n == 32
    assert dev_rows(33).n == 2 and dev_rows(32).lanes == 32 and dev_rows(5).lanes == 8
    assert dev_rows(1025).path == "block" and dev_rows(1025).cached
    # the shared-memory limit (227 KiB opt-in less scratch): float32 rows past ~57K classes keep
    # their first 57080 columns there (a multiple of the 4-float vector) and read the rest twice
    assert dev_rows(50257).cached == 50257
    assert dev_rows(131072).cached == 57080 and dev_rows(131072).smem <= 227 * 1024 - 4096
    assert dev_rows(57080).cached == 57080 and dev_rows(57081).cached == 57080   # the switch
    assert dev_rows(10, inner=3).path == "strided"


def _observed_launches(monkeypatch):
    """(kernel name, its tuning defines, grid) of every emulated launch from here on."""
    from gpu import _kernels
    seen, previous = [], _kernels.launch_observer

    def observe(kernel, grid, block, shared_mem, args):
        seen.append((kernel.name, {k: v for k, v in kernel.defines if k.startswith("CE_")}, grid))
        if previous is not None:
            previous(kernel, grid, block, shared_mem, args)

    monkeypatch.setattr(_kernels, "launch_observer", observe)
    return seen


# Which module and kernel a cross-entropy launch takes: integer targets without soft-cap on the
# warp and block paths run softmax.cu's CE_PLAIN module, or CE_SMOOTH with label smoothing (those
# options fixed at compile time); probability targets, soft-cap and the strided path the module
# with every option. Class weights in the per-element sums (smoothing or probabilities) on the
# block path: softmax_cross_entropy_block_w, from the module of the other options.
PLAIN, SMOOTH = {"CE_PLAIN": "1"}, {"CE_SMOOTH": "1"}
MODULE_CASES = [
    ("block_cached", {}, PLAIN, "block"),
    ("block_online", {"weight": True, "ignore_index": 2}, PLAIN, "block"),   # a weight is read per row only
    ("block_cached", {"label_smoothing": 0.1}, SMOOTH, "block"),
    ("block_online", {"label_smoothing": 0.1, "weight": True}, SMOOTH, "block_w"),
    ("block_cached", {"softcap": 3.0}, {}, "block"),
    ("block_cached", {"softcap": 3.0, "label_smoothing": 0.1}, {}, "block"),
    ("block_cached", {"probs": True}, {}, "block"),
    ("block_cached", {"probs": True, "weight": True}, {}, "block_w"),
    ("warp", {}, PLAIN, "warp_n2"),
    ("warp", {"weight": True, "ignore_index": 2}, PLAIN, "warp_n2"),
    ("warp", {"label_smoothing": 0.1}, SMOOTH, "warp_n2"),
    ("warp", {"label_smoothing": 0.1, "weight": True}, SMOOTH, "warp_n2"),
    ("warp", {"probs": True}, {}, "warp_n2"),
]


@pytest.mark.parametrize("path,opts,module,kernel", MODULE_CASES,
                         ids=[f"{p}-{'-'.join(o) or 'index'}" for p, o, _, _ in MODULE_CASES])
def test_ce_module_and_kernel(rng, monkeypatch, path, opts, module, kernel):
    z, z64 = random(rng, (5, 37), F32, scale=2.0)
    opts = dict(opts)
    t = _targets(rng, (5,), 37, "probs" if opts.pop("probs", False) else "index")
    if opts.get("weight"):
        opts["weight"] = (rng.random(37) + 0.5).astype(F32)
    seen = _observed_launches(monkeypatch)
    loss, dz = emu(gpu.softmax_cross_entropy, z, t, return_grad=True, path=path, **opts)
    fused = [(name, d) for name, d, _ in seen if name.startswith("softmax_cross_entropy_") and "weight_sum" not in name]
    assert fused == [("softmax_cross_entropy_" + kernel, module)]
    want_loss, want_dz = gpu.softmax_cross_entropy(z64, t, return_grad=True, **opts)   # the NumPy path
    assert_close(loss, want_loss, F32, "loss")
    assert_close(dz, want_dz, F32, "dz")



# Class weights in the per-element sums (smoothing or probability targets) on the block path run
# softmax_cross_entropy_block_w, which reads the weights a vector at a time with the logits (two
# 16-byte loads per vector of 16-bit logits, one for float32 and float64), or one at a time where
# the row's vectors leave the weights misaligned; at most SM_CE_BLOCK_W_THREADS (512) threads, a
# larger tuned block size included. Every other option keeps softmax_cross_entropy_block.
BLOCK_W_CASES = [
    (5, 256, "block_cached"),      # aligned rows, a multiple of every pack: every weight vector 16-byte loads
    (4, 203, "block_cached"),      # prime: rows start misaligned, their weights read one at a time
    (3, 203, "block_online"),      # misaligned, row read twice: pass 2 reads the weights again
    (3, 300, "block_partial"),     # 32 threads: several vectors a thread (pass 1 unrolled), a cached prefix
    (2, 1100, "block_1024"),       # a tuned 1024-thread block: capped at 512 for this kernel
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rows_,C,path", BLOCK_W_CASES, ids=[f"{r}x{c}-{p}" for r, c, p in BLOCK_W_CASES])
@pytest.mark.parametrize("kind,ls", [("ignore", 0.2), ("probs", 0.0), ("probs", 0.3)])
def test_ce_block_w(rng, monkeypatch, dtype, rows_, C, path, kind, ls):
    z, _ = random(rng, (rows_, C), dtype, scale=2.0)
    weight = (rng.random(C) + 0.5).astype(dtype)
    t = _targets(rng, (rows_,), C, kind)
    from gpu import _kernels
    seen = []
    monkeypatch.setattr(_kernels, "launch_observer", lambda k, grid, block, smem, args: seen.append((k.name, block)))
    tuned = {"warp_max_cols": 0, "block_threads": 1024} if path == "block_1024" else PATHS[path]
    with rows.tuned(**tuned):
        _check_ce(z, t, dtype, path="warp", weight=weight, label_smoothing=ls)
    fused = {(name, int(np.prod(block))) for name, block in seen if name.startswith("softmax_cross_entropy_b")}
    assert {name for name, _ in fused} == {"softmax_cross_entropy_block_w"}
    assert max(n for _, n in fused) <= 512
    if path == "block_1024":
        assert {n for _, n in fused} == {512}


def test_grid_counts_registers(rng, monkeypatch):
    """One wave by the launched kernel's occupancy, registers included: 1024-thread blocks of the
    cross-entropy kernel (about 61 registers, 64 at most under its __launch_bounds__(1024, 1)) fit
    one per SM, though threads alone would allow two; the grid-stride loop takes the other rows."""
    z, z64 = random(rng, (12, 40), F32)
    t = rng.integers(0, 40, 12)
    seen = _observed_launches(monkeypatch)
    with gpu.use_backend("emulate"), rows.tuned(warp_max_cols=0, block_threads=1024):
        plan = rows.plan(np, "softmax", rows.layout(np, z, 1), 4, True, True)
        loss = gpu.softmax_cross_entropy(z, t)
    sms = plan.kernel(np, "softmax", F32).device["sm_count"]
    assert plan.grid == min(12, 2 * sms)            # threads and shared memory alone: two per SM
    assert [g for name, _, g in seen if name == "softmax_cross_entropy_block"] == [(sms, 1, 1)]
    assert_close(loss, ref.softmax_cross_entropy(z64, t)[0], F32, "loss")


# Classes not on the last axis: the strided (outer, C, inner) mapping, no transpose copy.
STRIDED_CASES = [
    ((10, 6), 0, {}),                     # the seed's (classes, m) layout: outer 1, inner 6
    ((2, 5, 3, 4), 1, {}),                # NCHW: inner 12 < 32, a partial tile
    ((2, 3, 40), 1, {}),                  # inner 40: two tiles per outer, the second partial
    ((3, 17, 33), 1, {"strided_cache_bytes": 0}),   # the uncached tile: classes read twice
    ((1, 1, 5), 1, {}),                   # one class, strided
    ((2, 20, 3), 1, {}),                  # C > TY: each thread row takes several classes
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,axis,tune", STRIDED_CASES, ids=[f"{s}-ax{a}{'-nocache' if t else ''}"
                                                                for s, a, t in STRIDED_CASES])
def test_softmax_strided(rng, shape, axis, tune, dtype):
    z, z64 = random(rng, shape, dtype, scale=3.0)
    with gpu.use_backend("emulate"), rows.tuned(**tune):
        p, logp, h = gpu.softmax(z, axis=axis), gpu.log_softmax(z, axis=axis), gpu.hardmax(z, axis=axis)
    assert_close(p, ref.softmax(z64, axis), dtype, "softmax")
    if shape[axis] > 1:
        assert_close(logp, ref.log_softmax(z64, axis), dtype, "log_softmax", factor=2)
    np.testing.assert_array_equal(h.astype(np.float64), ref.hardmax(z64, axis))


def test_fortran_order_and_views(rng):
    # a transposed (Fortran-ordered) input runs as its C-ordered transpose; a strided view is copied
    z, z64 = random(rng, (7, 50), F32)
    assert_close(emu(gpu.softmax, z.T, axis=0), ref.softmax(z64.T, 0), F32, "F-order")
    assert_close(emu(gpu.softmax, z[:, ::2]), ref.softmax(z64[:, ::2], -1), F32, "strided view")
    assert_close(emu(gpu.log_softmax, np.asfortranarray(z), axis=1), ref.log_softmax(z64, 1), F32, "F")


def test_empty_rows_do_not_launch():
    for fn in (gpu.softmax, gpu.log_softmax, gpu.hardmax):
        assert emu(fn, np.empty((0, 5), np.float32)).shape == (0, 5)


@pytest.mark.parametrize("path", list(PATHS))
def test_extreme_logits(path):
    # 1e4 and 1e30 logits (no overflow), -inf entries (probability 0), an all -inf row (NaN, as
    # PyTorch and the reference), +inf and NaN entries (NaN rows)
    z = np.array([[1e4, 0.0, -1e4, 1e4 - 1.0],
                  [1e30, -1e30, 0.0, 1e30],
                  [-np.inf, 0.0, -np.inf, 1.0],
                  [-np.inf] * 4,
                  [np.inf, 0.0, 1.0, 2.0],
                  [0.0, np.nan, 1.0, 2.0]], np.float32)
    with np.errstate(invalid="ignore"):
        for fn, rfn in ((gpu.softmax, ref.softmax), (gpu.log_softmax, ref.log_softmax)):
            got, want = emu(fn, z, path=path), rfn(z.astype(np.float64), -1)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=fn.__name__)
            ok = ~np.isnan(want)
            np.testing.assert_allclose(got[ok], want[ok], rtol=1e-6, atol=1e-6, err_msg=fn.__name__)


# ---------------------------------------------------------------------------------------------
# Hardmax
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["warp", "block_cached"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_hardmax_ties_and_nan(path, dtype):
    z = np.array([[1.0, 3.0, 3.0, 0.0, 3.0],        # ties: the first index
                  [np.nan, 1.0, np.nan, 5.0, 0.0],  # NaN counts as the maximum, first NaN wins
                  [1.0, 2.0, 0.0, 9.0, np.nan],     # NaN last still wins
                  [-np.inf] * 5,                    # all -inf: index 0, as argmax
                  [0.0, 0.0, 0.0, 0.0, 0.0]], np.float64).astype(dtype)
    with np.errstate(invalid="ignore"):
        want = ref.hardmax(z.astype(np.float64), -1)
    np.testing.assert_array_equal(emu(gpu.hardmax, z, path=path).astype(np.float64), want)


@pytest.mark.parametrize("rows,C", [(3, 1), (4, 33), (2, 1025), (3, 131)])
def test_hardmax_sizes(rng, rows, C):
    # the tie is planted past the first vector and across lanes
    z, z64 = random(rng, (rows, C), F32)
    z[:, C // 2] = z[:, -1] = 50.0
    np.testing.assert_array_equal(emu(gpu.hardmax, z).astype(np.float64),
                                  ref.hardmax(z.astype(np.float64), -1))


# ---------------------------------------------------------------------------------------------
# Fused cross-entropy
# ---------------------------------------------------------------------------------------------

def _targets(rng, shape, C, kind, ignore_index=-100):
    if kind == "probs":
        t = rng.random(shape + (C,)) + 0.1
        return t / t.sum(-1, keepdims=True)
    t = rng.integers(0, C, shape)
    if kind == "ignore" and t.size:
        t.flat[:: 3] = ignore_index
    return t


def _check_ce(z, t, dtype, axis=-1, path="warp", probs_axis=None, **opts):
    z64 = z.astype(np.float64)
    if t.dtype.kind == "f" and axis != -1:
        pass
    for red in ("mean", "sum", "none"):
        loss, dz = emu(gpu.softmax_cross_entropy, z, t, axis=axis, reduction=red, return_grad=True,
                       path=path, **opts)
        loss_only = emu(gpu.softmax_cross_entropy, z, t, axis=axis, reduction=red, path=path, **opts)
        w = opts.get("weight")
        want_loss, want_dz = ref.softmax_cross_entropy(z64, t, axis=axis, reduction=red,
                                               ignore_index=opts.get("ignore_index", -100),
                                               label_smoothing=opts.get("label_smoothing", 0.0),
                                               weight=None if w is None else w.astype(np.float64))
        assert loss.dtype == dtype and dz.dtype == dtype and dz.shape == z.shape
        assert_close(loss, want_loss, dtype, f"loss {red}", factor=2)
        assert_close(loss_only, want_loss, dtype, f"loss-only {red}", factor=2)
        assert_close(dz, want_dz, dtype, f"dz {red}", factor=2)


CE_SHAPES = [
    # (shape, axis, path)
    ((6, 10), -1, "warp"),            # (batch, classes), lanes = 16
    ((1, 2), -1, "warp"),             # one row, two classes
    ((5, 1), -1, "warp"),             # one class: loss 0 (ls aside), dz 0
    ((3, 33), -1, "warp"),            # just past a warp
    ((2, 128), -1, "warp"),           # vector loads
    ((3, 37), -1, "block_cached"),    # prime: misaligned rows in the cached block path
    ((2, 64), -1, "block_online"),    # online path, aligned
    ((3, 29), -1, "block_online"),    # online path, scalar head/tail
    ((3, 37), -1, "block_partial"),   # prime: a cached prefix, the misaligned rest read twice
    ((2, 300), -1, "block_partial"),  # several vectors per thread, unrolled pass 1 (float64)
    ((10, 6), 0, "warp"),             # the seed's (classes, m): strided, inner 6
    ((2, 5, 3), 1, "warp"),           # NCHW-style: classes on axis 1, strided
]
CE_IDS = [f"{s}-ax{a}-{p}" for s, a, p in CE_SHAPES]


# ls: integer targets without smoothing (the CE_PLAIN module on the warp and block paths) and with
# it (CE_SMOOTH); the strided path runs the module with every option either way
@pytest.mark.parametrize("ls", [0.0, 0.1], ids=["plain", "smooth"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,axis,path", CE_SHAPES, ids=CE_IDS)
def test_ce_paths(rng, shape, axis, path, dtype, ls):
    z, _ = random(rng, shape, dtype, scale=2.0)
    row_shape = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    C = shape[axis]
    _check_ce(z, _targets(rng, row_shape, C, "ignore"), dtype, axis=axis, path=path, label_smoothing=ls)


OPTIONS = [
    ("index", {}),
    ("ignore", {}),                                          # every third row ignored
    ("ignore", {"label_smoothing": 0.1}),                    # smoothing skips ignored rows
    ("index", {"weight": True}),
    ("ignore", {"weight": True, "label_smoothing": 0.2}),
    ("index", {"ignore_index": 3}),                          # a valid class used as ignore_index
    ("probs", {}),
    ("probs", {"weight": True, "label_smoothing": 0.3}),
]


@pytest.mark.parametrize("path", list(PATHS) + ["strided"])
@pytest.mark.parametrize("kind,opts", OPTIONS, ids=[f"{k}-{'-'.join(o) or 'plain'}" for k, o in OPTIONS])
def test_ce_options(rng, kind, opts, path):
    dtype = F32
    C = 11
    shape, axis, p = ((7, C), -1, path) if path != "strided" else ((2, C, 5), 1, "warp")
    z, _ = random(rng, shape, dtype, scale=2.0)
    opts = dict(opts)
    if opts.get("weight"):
        opts["weight"] = (rng.random(C) + 0.5).astype(dtype)
    row_shape = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    t = _targets(rng, row_shape, C, kind, opts.get("ignore_index", -100))
    if kind == "probs":
        t = np.moveaxis(t, -1, axis)
    _check_ce(z, t, dtype, axis=axis, path=p, **opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_ce_probs_dtypes(rng, dtype):
    # probability targets of another dtype are rounded to z's dtype; dense targets ride in registers
    z, _ = random(rng, (4, 40), dtype)
    _check_ce(z, _targets(rng, (4,), 40, "probs").astype(np.float32), dtype, label_smoothing=0.1)


def test_ce_all_ignored_and_empty():
    z = np.ones((3, 4), np.float32)
    t = np.full(3, -100)
    loss, dz = emu(gpu.softmax_cross_entropy, z, t, return_grad=True)
    assert np.isnan(loss) and (dz == 0).all()            # mean over nothing: NaN, gradient 0
    assert emu(gpu.softmax_cross_entropy, z, t, reduction="sum") == 0
    empty = np.empty((0, 4), np.float32)
    assert np.isnan(emu(gpu.softmax_cross_entropy, empty, np.empty(0, np.int64)))
    assert emu(gpu.softmax_cross_entropy, empty, np.empty(0, np.int64), reduction="none").shape == (0,)


@pytest.mark.parametrize("path", list(PATHS))
def test_ce_extreme_logits(path):
    z = np.array([[1e4, 0.0, -1e4], [1e30, -1e30, 0.0], [-np.inf, 0.0, 1.0], [-np.inf] * 3],
                 np.float32)
    t = np.array([0, 2, 1, 0])
    with np.errstate(invalid="ignore", over="ignore"):
        for ls in (0.0, 0.1):
            loss, dz = emu(gpu.softmax_cross_entropy, z, t, reduction="none", return_grad=True,
                           label_smoothing=ls, path=path)
            # oracle: the NumPy path (PyTorch's values: a -inf logit off the target is a finite
            # loss; the reference's -(Y log p) would give 0 * -inf = NaN there)
            want_loss, want_dz = gpu.softmax_cross_entropy(z.astype(np.float64), t, reduction="none",
                                                           return_grad=True, label_smoothing=ls)
            np.testing.assert_array_equal(np.isnan(loss), np.isnan(want_loss))
            np.testing.assert_allclose(loss[:3], want_loss[:3], rtol=1e-6)
            np.testing.assert_allclose(dz[:3], want_dz[:3], rtol=1e-6, atol=1e-7)
            assert np.isnan(dz[3]).all()    # the all -inf row: NaN, as PyTorch


@pytest.mark.parametrize("path", list(PATHS) + ["strided"])
def test_ce_bad_target_records_first_position(rng, path):
    shape, axis = ((6, 5), -1) if path != "strided" else ((2, 5, 3), 1)
    z, _ = random(rng, shape, F32)
    t = rng.integers(0, 5, (6,) if path != "strided" else (2, 3))
    flat = t.reshape(-1)
    flat[1], flat[4] = -100, 5        # ignore_index is fine; 5 is out of range
    flat[5] = -3
    pos = np.unravel_index(4, t.shape)
    msg = f"class index 5 at position {tuple(int(i) for i in pos)}"
    # the kernel's row order: the strided path's rows are (outer, inner), here t's own order
    deferred = "class index 5 at row 4 "
    gpu.check_errors()
    for grad in (False, True):
        with gpu.use_backend("emulate"), rows.tuned(**PATHS["warp" if path == "strided" else path]):
            gpu.softmax_cross_entropy(z, t, axis=axis, return_grad=grad)     # recorded, not raised
            with pytest.raises(ValueError, match=deferred):
                gpu.check_errors()
            previous = gpu.set_eager_checks(True)
            try:
                with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
                    gpu.softmax_cross_entropy(z, t, axis=axis, return_grad=grad)
            finally:
                gpu.set_eager_checks(previous)


def test_ce_inplace(rng):
    z, z64 = random(rng, (5, 40), F32)
    t = rng.integers(0, 40, 5)
    want_loss, want_dz = ref.softmax_cross_entropy(z64, t)
    for path in PATHS:
        zz = z.copy()
        loss, dz = emu(gpu.softmax_cross_entropy, zz, t, return_grad=True, inplace=True, path=path)
        assert dz is zz or np.shares_memory(dz, zz)
        assert_close(dz, want_dz, F32, f"in place {path}")
        assert_close(loss, want_loss, F32, f"in place loss {path}")
    # a non-contiguous z: computed on a copy, written back
    big = np.zeros((5, 80), np.float32)
    big[:, ::2] = z
    loss, dz = emu(gpu.softmax_cross_entropy, big[:, ::2], t, return_grad=True, inplace=True)
    assert_close(big[:, ::2], want_dz, F32, "in place, strided view")
    with pytest.raises(ValueError, match="return_grad"):
        emu(gpu.softmax_cross_entropy, z.copy(), t, inplace=True)


def test_ce_backward_dloss_per_row(rng):
    z, z64 = random(rng, (2, 3, 9), F32)
    t = rng.integers(0, 9, (2, 3))
    dl = rng.standard_normal((2, 3)).astype(np.float32)
    for path in ("warp", "block_online"):
        dz = emu(gpu.softmax_cross_entropy_backward, z, t, dl, reduction="none", path=path)
        _, want = ref.softmax_cross_entropy(z64, t, reduction="none", dloss=dl.astype(np.float64))
        assert_close(dz, want, F32, f"dloss per row {path}")
    dz = emu(gpu.softmax_cross_entropy_backward, z, t, 2.5, reduction="mean", weight=np.arange(1, 10.0))
    _, want = ref.softmax_cross_entropy(z64, t, weight=np.arange(1, 10.0), dloss=2.5)
    assert_close(dz, want, F32, "dloss scalar, mean, weight")


def test_ce_loss_is_deterministic(rng):
    # many blocks (grid-stride with 4 emulated SMs) and a fixed-order reduction: bitwise equal runs,
    # with and without the gradient, whatever order the emulator runs the blocks in
    z, z64 = random(rng, (700, 5), F32)
    t = rng.integers(0, 5, 700)
    runs = [emu(gpu.softmax_cross_entropy, z, t) for _ in range(2)]
    runs.append(emu(gpu.softmax_cross_entropy, z, t, return_grad=True)[0])
    assert len({r.tobytes() for r in runs}) == 1
    assert_close(runs[0], ref.softmax_cross_entropy(z64, t)[0], F32, "loss")
