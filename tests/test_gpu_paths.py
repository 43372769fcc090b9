"""Every kernel path forced at the sizes where a GPU takes it, against the float64 reference.

The same cases run twice: on the emulator at small sizes (marker `kernel`, in CI: the test code and
the forcing itself are checked) and on a GPU at real sizes (marker `gpu`: shared memory above the
48 KiB opt-in, thousands of blocks meeting at one ticket, the cooperative grid of the persistent
batch norm, an index past 2^31 elements). Each case asserts the kernel it meant to reach ran.
`scripts/gpu_check.sh` runs this file on a lent GPU, and again under compute-sanitizer's memcheck
with GPU_PATHS_SMALL=1: the same forced paths at the emulator's sizes, which memcheck covers in
seconds.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import gpu
from gpu import _kernels
from gpu._engines import channels, rows
from gpu.bench import reference as ref
from conftest import assert_close, to_numpy

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)

#: GPU sizes on a GPU, unless GPU_PATHS_SMALL=1 (the memcheck run)
BIG = os.environ.get("GPU_PATHS_SMALL", "0") in ("", "0")

BACKENDS = [pytest.param("emulate", marks=pytest.mark.kernel),
            pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def where(request):
    return request.param


def _xp(where):
    if where == "cuda":
        import cupy
        return cupy
    return np


def _run(where, fn, *args, **kwargs):
    xp = _xp(where)
    args = [xp.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
    with gpu.use_backend("emulate" if where == "emulate" else "auto"), _kernels.recording_launches(run=True) as log:
        out = fn(*args, **kwargs)
        gpu.check_errors()
    return out, [name for name, *_ in log.launches]


def _ran(names, part):
    assert any(part in n for n in names), f"expected a launch of *{part}*, got {names}"


# (emulator shape, GPU shape, rows.tuned knobs, the kernel that must run): each forces one path of the
# softmax engine (cuda_src/rows.cuh); the GPU shapes are where it matters
SOFTMAX_CASES = [
    # a lane group per row: the default for C <= 1024
    ((7, 100), (8192, 1000), {}, "softmax_warp"),
    # a block per row, the row cached in shared memory: 32000 float32s = 125 KiB, above the 48 KiB
    # opt-in (the emulator's rows fit its default limit)
    ((3, 1500), (4096, 32000), {"warp_max_cols": 0}, "softmax_block"),
    # a block per row, no cache: the row read twice
    ((3, 1500), (1024, 32000), {"warp_max_cols": 0, "smem_bytes": 0}, "softmax_block"),
    # the vocabulary of a large language model: the row's head cached, its tail read twice
    ((2, 3000), (264, 128256), {"warp_max_cols": 0, "smem_bytes": 4096}, "softmax_block"),
]


@pytest.mark.parametrize("small,big,tune,kernel", SOFTMAX_CASES, ids=[f"{b[0]}x{b[1]}-{k}" for _, b, _, k in SOFTMAX_CASES])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["float32", "float16"])
def test_softmax_and_cross_entropy_paths(where, rng, small, big, tune, kernel, dtype):
    shape = big if where == "cuda" and BIG else small
    if shape is big and tune.get("smem_bytes") == 4096:
        tune = {}          # on a GPU the planner itself keeps the head of a 128256-long row
    z = (rng.standard_normal(shape) * 3).astype(dtype)
    t = rng.integers(0, shape[1], shape[0])
    t[::7] = -100
    with rows.tuned(**tune):
        p, names = _run(where, gpu.softmax, z)
        _ran(names, kernel)
        (loss, dz), names = _run(where, gpu.softmax_cross_entropy, z, t, return_grad=True)
        _ran(names, "cross_entropy")
    z64 = z.astype(np.float64)
    assert_close(p, ref.softmax(z64, -1), dtype, "softmax")
    want_loss, want_dz = ref.softmax_cross_entropy(z64, t)
    assert_close(np.reshape(to_numpy(loss), ()), np.asarray(want_loss), dtype, "loss")
    assert_close(dz, want_dz, dtype, "dz")


# (emulator shape, GPU shape, axis, channels.tuned knobs, forward kernel, backward kernel): the batch-norm
# engine's paths
BN_CASES = [
    # the streaming two-pass path with a grid merge: (262144, 256) float32 on a GPU is thousands of
    # blocks arriving at one ticket per tile; the backward's two kernels likewise
    ((300, 8), (262144, 256), 0, dict(path="twopass"), "batch_norm_stats", "batch_norm_backward_reduce"),
    # the persistent cooperative path: x (forward), dy and x (backward) kept on chip across
    # grid.sync(); on an H200, 16 blocks of 256 a tile, 32 rows a thread: 8 in registers, 24 in the
    # row cache (forward 96 KiB, backward 192 KiB of shared memory: past the 48 KiB opt-in)
    ((200, 8), (4096, 1024), 0, dict(path="persistent"), "batch_norm_forward_onchip", "batch_norm_backward_onchip"),
    # the row cache at small sizes too (3 blocks of 32 threads, 13 rows a thread)
    ((600, 8), (600, 8), 0, dict(path="persistent", threads=32, grid_rows=3), "batch_norm_forward_onchip",
     "batch_norm_backward_onchip"),
    # channels-first NCHW, the per-channel strided tiles
    ((4, 5, 6, 6), (32, 64, 56, 56), (0, 2, 3), {}, "batch_norm", "batch_norm_backward"),
    # channels-last NHWC
    ((4, 6, 6, 5), (32, 56, 56, 64), (0, 1, 2), {}, "batch_norm", "batch_norm_backward"),
]


@pytest.mark.parametrize("small,big,axis,knobs,kernel,backward", BN_CASES,
                         ids=[f"{'x'.join(map(str, b))}-{k.get('path', 'auto')}" for _, b, _, k, *_ in BN_CASES])
def test_batch_norm_paths(where, rng, small, big, axis, knobs, kernel, backward):
    shape = big if where == "cuda" and BIG else small
    dtype = F32
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    kept = tuple(i for i in range(x.ndim) if i not in (axis if isinstance(axis, tuple) else (axis,)))
    C = int(np.prod([shape[i] for i in kept]))
    g = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    with channels.tuned(**knobs):
        (y, mean, invstd), names = _run(where, gpu.batch_norm_forward, x, g, b, axis=axis)
        _ran(names, kernel)
        (dx, dg, db), names = _run(where, gpu.batch_norm_backward, dy, x, g, mean, invstd, axis=axis)
        _ran(names, backward)
    axes = axis if isinstance(axis, tuple) else (axis,)
    bshape = [shape[i] if i in kept else 1 for i in range(x.ndim)]
    g64, b64 = g.astype(np.float64).reshape(bshape), b.astype(np.float64).reshape(bshape)
    want = ref.batch_norm_forward(x.astype(np.float64), g64, b64, axes, 1e-5)
    assert_close(y, want[0], dtype, "y")
    assert_close(np.reshape(to_numpy(mean), -1), np.reshape(want[1], -1), dtype, "mean")
    wdx, wdg, wdb = ref.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64), g64, want[1], want[2], axes)
    assert_close(dx, wdx, dtype, "dx", factor=4)
    assert_close(np.reshape(to_numpy(dg), -1), np.reshape(wdg, -1), dtype, "dgamma", factor=4)
    assert_close(np.reshape(to_numpy(db), -1), np.reshape(wdb, -1), dtype, "dbeta", factor=4)


@pytest.mark.parametrize("small,big,axis,knobs,kernel,backward", BN_CASES,
                         ids=[f"{'x'.join(map(str, b))}-{k.get('path', 'auto')}" for _, b, _, k, *_ in BN_CASES])
def test_batch_norm_paths_fused(where, rng, small, big, axis, knobs, kernel, backward):
    """The same paths with the epilogue, y = relu(bn(x) + residual), and its backward (relu's mask,
    dresidual), against the float64 composition."""
    shape = big if where == "cuda" and BIG else small
    dtype = F32
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    axes = axis if isinstance(axis, tuple) else (axis,)
    kept = tuple(i for i in range(x.ndim) if i not in axes)
    C = int(np.prod([shape[i] for i in kept]))
    g = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    with channels.tuned(**knobs):
        (y, mean, invstd), names = _run(where, gpu.batch_norm_forward, x, g, b, axis=axis, residual=r,
                                        activation="relu")
        _ran(names, kernel)
        (dx, dg, db, dr), names = _run(where, gpu.batch_norm_backward, dy, x, g, mean, invstd, axis=axis,
                                       activation="relu", y=y, residual_grad=True)
        _ran(names, backward)
    bshape = [shape[i] if i in kept else 1 for i in range(x.ndim)]
    g64, b64 = g.astype(np.float64).reshape(bshape), b.astype(np.float64).reshape(bshape)
    want = ref.batch_norm_forward(x.astype(np.float64), g64, b64, axes, 1e-5)
    assert_close(y, np.maximum(want[0] + r, 0), dtype, "y")
    dz = dy.astype(np.float64) * (to_numpy(y) > 0)         # relu's mask from the y returned
    wdx, wdg, wdb = ref.batch_norm_backward(dz, x.astype(np.float64), g64, want[1], want[2], axes)
    assert_close(dr, dz, dtype, "dresidual")
    assert_close(dx, wdx, dtype, "dx", factor=4)
    assert_close(np.reshape(to_numpy(dg), -1), np.reshape(wdg, -1), dtype, "dgamma", factor=4)
    assert_close(np.reshape(to_numpy(db), -1), np.reshape(wdb, -1), dtype, "dbeta", factor=4)


def _free_bytes() -> int:
    import cupy
    return int(cupy.cuda.runtime.memGetInfo()[0])


@pytest.mark.gpu
def test_index_past_2_31_elements(rng):
    """softmax, cross-entropy and batch statistics over arrays of more than 2^31 elements (float16,
    4 GiB each): the rows and channels at the end are addressed with 64-bit offsets."""
    import cupy
    if not BIG:
        pytest.skip("GPU_PATHS_SMALL=1: the small sizes only")
    C = 1024
    rows = (1 << 31) // C + 3
    if _free_bytes() < 4 * rows * C * 2 + (1 << 30):
        pytest.skip("needs about 18 GiB of free GPU memory")
    z = cupy.empty((rows, C), F16)
    z[...] = cupy.asarray((rng.standard_normal((256, C)) * 3).astype(F16))[cupy.arange(rows) % 256]
    t = cupy.asarray(rng.integers(0, C, 256))[cupy.arange(rows) % 256]
    p = gpu.softmax(z)
    loss_rows, dz = gpu.softmax_cross_entropy(z, t, reduction="none", return_grad=True)
    gpu.check_errors()
    for lo, hi in ((0, 4), (rows - 4, rows)):        # past element 2^31 in the second range
        z64 = z[lo:hi].get().astype(np.float64)
        tt = t[lo:hi].get()
        assert_close(p[lo:hi], ref.softmax(z64, -1), F16, f"softmax rows {lo}:{hi}")
        want_loss, want_dz = ref.softmax_cross_entropy(z64, tt, reduction="none")
        assert_close(loss_rows[lo:hi], want_loss, F16, f"loss rows {lo}:{hi}")
        assert_close(dz[lo:hi], want_dz, F16, f"dz rows {lo}:{hi}")
    del p, dz, loss_rows
    x = z.reshape(-1, 64)                            # (2^31 / 64 + 48, 64): channels past 2^31 elements
    mean, var = gpu.batch_stats(x)
    block = z[:256].get().astype(np.float64).reshape(-1, 64)   # x repeats z's 256 distinct rows
    reps, tail = divmod(x.shape[0], block.shape[0])
    n = x.shape[0]
    s1 = reps * block.sum(0) + block[:tail].sum(0)
    want_mean = s1 / n
    s2 = reps * ((block - want_mean) ** 2).sum(0) + ((block[:tail] - want_mean) ** 2).sum(0)
    assert_close(mean, want_mean, F16, "mean")
    assert_close(var, s2 / n, F16, "var")
