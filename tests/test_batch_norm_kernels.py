"""Kernel-path tests for cuda_src/batch_norm.cu: every launch path and awkward shape, against float64.

The API suite (tests/test_batch_norm.py) runs the public cases on every backend; this file drives
the kernels' own switches through the launch knobs of gpu/_engines/channels.py (``channels.tuned``): on-chip (one
block per tile, or persistent across a cooperative grid) vs two-pass forward, vector vs scalar module, one block per tile vs the grid merge through the
workspace and the last-block counter, channels-last vs channels-first, partial tiles and warps.
It runs on the CPU emulator (NumPy arrays, ``kernel`` marker) and on CuPy when a GPU is usable
(``gpu`` marker). The emulated device has 4 SMs, so small inputs already take multi-block grids;
sizes stay small because every CUDA thread is a fiber.

Outputs are NaN-poisoned before launch (GPU_POISON=1, set by conftest), so an element a kernel
forgets to write fails the comparison. Run: ``pytest tests/test_batch_norm_kernels.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

import gpu
from gpu import _kernels
from gpu._engines import channels
from conftest import BFLOAT16, DTYPES, TOL, dtype_id, rel_err, to_numpy
from bn_helpers import axes as _axes, keep as _keep, kept as _kept, registers_from_ptxas

@pytest.fixture(autouse=True)
def _registers_from_ptxas():
    """See bn_helpers.registers_from_ptxas."""
    with registers_from_ptxas():
        yield


@pytest.fixture
def launches(monkeypatch):
    """(name, grid, BN_VECTOR, cooperative, shared_mem) of the kernels launched, in order (which
    path ran)."""
    names: list[tuple] = []
    real = _kernels.launch

    def spy(kernel, grid, block, args, shared_mem=0, cooperative=False):
        names.append((kernel.name, tuple(grid) if isinstance(grid, tuple) else (grid,),
                      dict(kernel.defines).get("BN_VECTOR"), cooperative, shared_mem))
        return real(kernel, grid, block, args, shared_mem, cooperative)

    monkeypatch.setattr(_kernels, "launch", spy)
    return names


def _ref_forward(x64, g64, b64, axis, eps):
    """float64 truth: (y, mean, invstd, var) from the (rounded) inputs."""
    ax = _axes(axis, x64.ndim)
    mean = x64.mean(axis=ax, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=ax, keepdims=True)
    invstd = 1 / np.sqrt(var + eps)
    keep = mean.shape
    y = (x64 - mean) * invstd
    if g64 is not None:
        y = y * g64.reshape(keep)
    if b64 is not None:
        y = y + b64.reshape(keep)
    kept = _kept(x64.shape, axis)
    return y, mean.reshape(kept), invstd.reshape(kept), var.reshape(kept)


def _ref_backward(dy64, x64, g64, axis, eps):
    ax = _axes(axis, x64.ndim)
    mean = x64.mean(axis=ax, keepdims=True)
    invstd = 1 / np.sqrt(((x64 - mean) ** 2).mean(axis=ax, keepdims=True) + eps)
    xhat = (x64 - mean) * invstd
    m = x64.size // mean.size
    dbeta = dy64.sum(axis=ax, keepdims=True)
    dgamma = (dy64 * xhat).sum(axis=ax, keepdims=True)
    k = invstd if g64 is None else invstd * g64.reshape(mean.shape)
    dx = k * (dy64 - dbeta / m - xhat * dgamma / m)
    kept = _kept(x64.shape, axis)
    return dx, dgamma.reshape(kept), dbeta.reshape(kept)


def _rand(rng, shape, dtype, scale=1.0, offset=0.0):
    x = (rng.standard_normal(shape) * scale + offset).astype(dtype)
    return x, x.astype(np.float64)


def _check(out, ref, dtype, what, factor=1.0):
    err = rel_err(out, ref)
    tol = TOL[np.dtype(dtype)] * factor
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} ({np.dtype(dtype).name})"


def _run_all(dev, rng, shape, axis, dtype, eps=1e-5, offset=0.5):
    """Every public op on `dev` for one shape, each against float64 truth."""
    kept = _kept(shape, axis)
    x, x64 = _rand(rng, shape, dtype, 2.0, offset)
    dy, dy64 = _rand(rng, shape, dtype)
    g, g64 = _rand(rng, kept, dtype, 0.5, 1.0)
    b, b64 = _rand(rng, kept, dtype)
    rm, rm64 = _rand(rng, kept, np.float32)
    rv = (rng.random(kept) + 0.5).astype(np.float32)
    y_ref, mean_ref, invstd_ref, var_ref = _ref_forward(x64, g64, b64, axis, eps)

    mean, var = dev.call(gpu.batch_stats, x, axis=axis)
    _check(mean, mean_ref, dtype, "batch_stats mean")
    _check(var, var_ref, dtype, "batch_stats var")

    y, mean, invstd = dev.call(gpu.batch_norm_forward, x, g, b, axis=axis, eps=eps)
    acc = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    assert to_numpy(mean).dtype == acc and to_numpy(invstd).dtype == acc
    assert to_numpy(y).dtype == np.dtype(dtype) and y.shape == shape
    _check(y, y_ref, dtype, "forward y")
    _check(mean, mean_ref, dtype, "forward mean")
    _check(invstd, invstd_ref, dtype, "forward invstd")

    dx_ref, dgamma_ref, dbeta_ref = _ref_backward(dy64, x64, g64, axis, eps)
    dx, dgamma, dbeta = dev.call(gpu.batch_norm_backward, dy, x, g, to_numpy(mean), to_numpy(invstd),
                                 axis=axis)
    assert to_numpy(dgamma).dtype == np.dtype(dtype)
    # dx = k*dy minus its projections: with few rows it nearly cancels (M = 2: dx ~ 1e-4 * k*dy),
    # so its error is measured against the size of the terms, ||k*dy||
    scale = np.linalg.norm(dy64 * invstd_ref.reshape(_keep(shape, axis)) * g64.reshape(_keep(shape, axis)))
    err = np.linalg.norm(to_numpy(dx).astype(np.float64) - dx_ref) / max(scale, 1e-300)
    assert err <= 4 * TOL[np.dtype(dtype)], f"backward dx: error {err:.3g} relative to ||k*dy||"
    _check(dgamma, dgamma_ref, dtype, "backward dgamma", factor=2)
    _check(dbeta, dbeta_ref, dtype, "backward dbeta", factor=2)

    yi = dev.call(gpu.batch_norm_inference, x, g, b, rm, rv, axis=axis, eps=eps)
    keep = _keep(shape, axis)
    yi_ref = (x64 - rm64.reshape(keep)) / np.sqrt(rv.astype(np.float64).reshape(keep) + eps) \
        * g64.reshape(keep) + b64.reshape(keep)
    _check(yi, yi_ref, dtype, "inference y")


# ---------------------------------------------------------------------------------------------
# Shapes x layouts x paths
# ---------------------------------------------------------------------------------------------

# (shape, axis, knobs): each with why it is there. Knobs force paths the default plan would not
# take at test sizes; a forced grid_rows is checked to have reached the launch. E.g. (64, 8) with
# threads=32: 2 lanes x 16 rows per block; grid_rows=3 gives blocks rows {0-15, 48-63}, {16-31},
# {32-47} (ragged), so three partials per tile go through the workspace and the counter.
CASES = [
    # (N, C) axis=0: channels-last
    ((1, 8), 0, {}),                                      # one row: M = 1, var = 0
    ((2, 8), 0, {}),                                      # two rows
    ((64, 8), 0, {}),                                     # on chip, vectors of 4 floats, 2 lanes per row
    ((64, 8), 0, dict(path="twopass", threads=32, grid_rows=3)),  # grid merge across 3 blocks
    ((272, 8), 0, dict(path="twopass", threads=32, grid_rows=17)),  # 17 partials, 16 threads a column:
                                                          # the last block's thread 0 merges two
    ((37, 7), 0, {}),                                     # primes: scalar module, 7 of 8 lanes
    ((33, 40), 0, dict(path="twopass", grid_rows=2)),     # 10 vectors in a 16-lane tile: 6 idle
    ((5, 300), 0, dict(path="twopass", threads=32, grid_rows=2)),  # 3 tiles of 128 channels, last partial
    ((131, 3), 0, {}),                                    # few channels: a warp spans 8 rows
    ((200, 1), 0, {}),                                    # one channel: a single row of 200 (1, 1, M)
    ((1, 1), 0, {}),                                      # one element
    ((200, 8), 0, dict(path="persistent", threads=32, grid_rows=3)),  # x on chip in 3 blocks, grid.sync
    ((37, 7), 0, dict(path="persistent", threads=32, grid_rows=2)),   # persistent, scalar module
    ((600, 8), 0, dict(path="persistent", threads=32, grid_rows=3)),  # 12-13 rows a thread: past the
                                                          # 8 register rows, the rest in the row cache
                                                          # (5: a partial unroll)
    ((600, 7), 0, dict(path="persistent", threads=32, grid_rows=3)),  # the row cache, scalar module
    ((3000, 4), 0, dict(path="onchip")),                  # one block of 256 holds 12 rows a thread:
                                                          # an ordinary launch with a row cache
    # NCHW axis=(0, 2, 3): channels-first
    ((2, 3, 5, 7), (0, 2, 3), {}),                        # inner = 35, prime: scalar, 64 lanes per plane
    ((3, 4, 8, 8), (0, 2, 3), {}),                        # inner = 64: 16 vector lanes, 2 rows per warp
    ((2, 2, 40, 40), (0, 2, 3), {}),                      # inner = 1600: 13 chunks of 32 vectors, persistent
    ((4, 5, 3, 3), (0, 2, 3), dict(path="twopass", threads=32, grid_rows=2)),  # one-warp blocks
    ((2, 3, 1, 1), (0, 2, 3), {}),                        # 1x1 spatial: inner = 1, channels-last
    ((4, 3, 8, 8), (0, 2, 3), dict(path="persistent", threads=32, grid_rows=2)),  # 2 blocks per channel
    ((40, 3, 8, 8), (0, 2, 3), dict(path="persistent", threads=32, grid_rows=2)),  # 10 planes a thread:
                                                          # the row cache, channels-first
    ((37, 2, 9, 9), (0, 2, 3), dict(path="twopass", threads=32, grid_rows=9)),  # scalar, 3 chunks x 9 rows:
                                                          # 27 partials a channel
    # NHWC axis=(0, 1, 2): channels-last over N*H*W rows
    ((2, 3, 5, 16), (0, 1, 2), {}),                       # 30 rows x 16 channels
    ((2, 3, 5, 16), (0, 1, 2), dict(path="twopass", threads=32, grid_rows=4)),  # 4 blocks merge
    ((2, 3, 5, 16), (0, 1, 2), dict(path="persistent", threads=32, grid_rows=3)),  # 30 rows in 3 blocks
    # the seed's (n, m) axis=1: one row of m per channel
    ((5, 33), 1, {}),                                     # outer = 1, inner = 33: scalar
    ((4, 128), 1, {}),                                    # inner = 128: vectors, one chunk
    ((3, 1600), 1, dict(grid_rows=1)),                    # 400 vectors: 13 chunks of 32, merged
    ((2, 1600), 1, dict(path="persistent")),              # the 13 chunks of a row on chip, grid.sync: 26
                                                          # one-warp blocks (~200 registers: 8 an emulated SM)
    # kept axes not adjacent: a transposed contiguous copy
    ((3, 4, 5), 1, {}),
    ((4, 3, 2, 5), (0, 2), {}),
]


@pytest.mark.parametrize("shape,axis,knobs", CASES, ids=[f"{s}-{a}-{'-'.join(f'{k}{v}' for k, v in kn.items())}"
                                                        for s, a, kn in CASES])
def test_paths_float32(dev, rng, launches, shape, axis, knobs):
    with channels.tuned(**knobs):
        _run_all(dev, rng, shape, axis, np.float32)
    _check_grid(launches, knobs)


def _check_grid(launches, knobs):
    """A forced grid_rows must not have been clamped away (else the case tests less than it says),
    and a forced persistent path must have been a cooperative launch of several blocks per tile."""
    if "grid_rows" in knobs:
        assert any(g[1:] == (knobs["grid_rows"],) for name, g, *_ in launches if name != "batch_norm_inference_params")
    if knobs.get("path") == "persistent":
        assert any(name == "batch_norm_forward_onchip" and coop for name, _, _, coop, _ in launches)
        assert any(name == "batch_norm_backward_onchip" and coop for name, _, _, coop, _ in launches)


# a few shapes for every dtype: vector and scalar module, both layouts, multi-block
DTYPE_CASES = [
    ((64, 16), 0, {}),                                   # 16 channels: 2 halves-vectors or 4 float4
    ((64, 16), 0, dict(path="twopass", threads=32, grid_rows=3)),
    ((13, 6), 0, {}),                                    # 6 channels: scalar for halves (6 % 8)
    ((3, 2, 4, 8), (0, 2, 3), {}),                       # inner = 32: one vector chunk
    ((2, 3, 5, 7), (0, 2, 3), dict(threads=32, grid_rows=2)),  # scalar, two blocks per channel
    ((64, 16), 0, dict(path="persistent", threads=32, grid_rows=3)),  # vectors on chip in 3 blocks
    ((2, 3, 5, 7), (0, 2, 3), dict(path="persistent", threads=32, grid_rows=2)),  # scalar, persistent
    ((400, 16), 0, dict(path="persistent", threads=32, grid_rows=2)),  # 12-13 rows a thread: the row cache
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,axis,knobs", DTYPE_CASES,
                         ids=[f"{s}-{a}-{kn.get('path', 'auto')}{len(kn)}" for s, a, kn in DTYPE_CASES])
def test_paths_dtypes(dev, rng, launches, shape, axis, knobs, dtype):
    if dev.name == "cuda" and BFLOAT16 is not None and np.dtype(dtype) == BFLOAT16:
        pytest.skip("CuPy has no bfloat16 arrays")
    with channels.tuned(**knobs):
        _run_all(dev, rng, shape, axis, dtype)
    _check_grid(launches, knobs)


# ---------------------------------------------------------------------------------------------
# Which path runs
# ---------------------------------------------------------------------------------------------

@pytest.mark.kernel
def test_path_selection(launches, rng):
    x = rng.standard_normal((64, 8)).astype(np.float32)
    with gpu.use_backend("emulate"):
        gpu.batch_norm_forward(x)                                  # fits one block: on chip
        with channels.tuned(path="twopass", threads=32, grid_rows=3):
            gpu.batch_norm_forward(x)                              # stats over 3 blocks, then apply
        gpu.batch_norm_forward(x[:, :7])                           # strided: copied; C = 7: scalar
    assert launches[0][:4] == ("batch_norm_forward_onchip", (1, 1), "1", False)
    assert launches[1][:4] == ("batch_norm_stats", (1, 3), "1", False)
    assert launches[2][:4] == ("batch_norm_apply", (1, 3), "1", False)
    assert all(v == "0" for _, _, v, *_ in launches[3:])


@pytest.mark.kernel
def test_unaligned_view_takes_scalar_module(launches, rng):
    """A view starting 4 bytes into its buffer cannot use 16-byte vectors, even with C % 4 == 0."""
    buf = rng.standard_normal(65 * 8).astype(np.float32)
    x = buf[1:513].reshape(64, 8)                   # C-contiguous, misaligned by one float
    assert x.flags.c_contiguous and x.ctypes.data % 16 != 0
    with gpu.use_backend("emulate"):
        y, mean, invstd = gpu.batch_norm_forward(x)
    assert launches[0][2] == "0"
    y_ref, mean_ref, invstd_ref, _ = _ref_forward(x.astype(np.float64), None, None, 0, 1e-5)
    _check(y, y_ref, np.float32, "y")


# ---------------------------------------------------------------------------------------------
# Strided inputs, running stats with mixed dtypes, NaN isolation, determinism, stability
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda a: a.T,                       # transposed (C, N) storage: made contiguous first
    lambda a: a[::2],                    # every other row
    lambda a: a[:, 1:],                  # column slice
], ids=["transposed", "row-stride", "col-slice"])
def test_strided_inputs(dev, rng, make):
    base = rng.standard_normal((24, 24)).astype(np.float32)
    x = make(base)
    assert not x.flags.c_contiguous
    x64 = np.ascontiguousarray(x).astype(np.float64)
    y, mean, invstd = dev.call(gpu.batch_norm_forward, x, axis=0)
    y_ref, mean_ref, invstd_ref, _ = _ref_forward(x64, None, None, 0, 1e-5)
    _check(y, y_ref, np.float32, "y")
    _check(invstd, invstd_ref, np.float32, "invstd")
    dx, dg, db = dev.call(gpu.batch_norm_backward, x, x, None, to_numpy(mean), to_numpy(invstd), axis=0)
    dx_ref, dg_ref, db_ref = _ref_backward(x64, x64, None, 0, 1e-5)
    _check(dg, dg_ref, np.float32, "dgamma")


@pytest.mark.parametrize("x_dtype,p_dtype", [(np.float16, np.float32), (np.float32, np.float64),
                                             (np.float64, np.float32)], ids=["f16-f32", "f32-f64", "f64-f32"])
@pytest.mark.parametrize("shape,axis,knobs", [((40, 8), 0, {}), ((40, 8), 0, dict(path="twopass", threads=32, grid_rows=2)),
                                              ((40, 8), 0, dict(path="persistent", threads=32, grid_rows=2)),
                                              ((3, 8, 4, 4), (0, 2, 3), {})], ids=["cl", "cl-grid", "cl-persistent", "cf"])
def test_running_stats_mixed_dtypes(dev, rng, shape, axis, knobs, x_dtype, p_dtype):
    """Parameters in another dtype than x: updated in place in their own dtype, like the reference."""
    kept = _kept(shape, axis)
    x, x64 = _rand(rng, shape, x_dtype, 2.0, 1.0)
    g = (rng.random(kept) + 0.5).astype(p_dtype)
    rm0, rv0 = rng.standard_normal(kept).astype(p_dtype), (rng.random(kept) + 0.5).astype(p_dtype)
    rm, rv = dev.array(rm0.copy()), dev.array(rv0.copy())
    with channels.tuned(**knobs):
        y, mean, invstd = dev.call(gpu.batch_norm_forward, x, g, None, axis=axis, running_mean=rm,
                                   running_var=rv, momentum=0.25)
    m = x.size // np.prod(kept)
    _, mean_ref, _, var_ref = _ref_forward(x64, None, None, axis, 1e-5)
    rm, rv = to_numpy(rm), to_numpy(rv)
    assert rm.dtype == np.dtype(p_dtype) and rv.dtype == np.dtype(p_dtype)
    coarser = max(np.dtype(x_dtype), np.dtype(p_dtype), key=lambda d: TOL[d])
    _check(rm, 0.75 * rm0 + 0.25 * mean_ref, coarser, "running_mean")
    _check(rv, 0.75 * rv0 + 0.25 * var_ref * m / (m - 1), coarser, "running_var")
    # mixed gamma dtype: dgamma/dbeta come back in gamma's dtype
    dx, dg, db = dev.call(gpu.batch_norm_backward, x, x, g, to_numpy(mean), to_numpy(invstd), axis=axis)
    assert to_numpy(dg).dtype == np.dtype(p_dtype) and to_numpy(db).dtype == np.dtype(p_dtype)


@pytest.mark.parametrize("shape,axis,knobs", [
    ((48, 8), 0, {}),                                          # on chip, channels-last
    ((48, 8), 0, dict(path="twopass", threads=32, grid_rows=3)),  # grid merge: NaN partial in one lane
    ((4, 8, 5, 5), (0, 2, 3), dict(path="twopass", threads=32, grid_rows=2)),  # channels-first
    ((48, 8), 0, dict(path="persistent", threads=32, grid_rows=3)),  # persistent: NaN partial merged by all
], ids=["cl-onchip", "cl-grid", "cf-grid", "cl-persistent"])
def test_nan_stays_in_its_channel(dev, rng, shape, axis, knobs):
    x, _ = _rand(rng, shape, np.float32)
    ch = 3
    idx = [0] * len(shape)
    idx[1] = ch                                 # the channel axis is 1 in both layouts
    x[tuple(idx)] = np.nan
    x64 = x.astype(np.float64)
    with channels.tuned(**knobs):
        y, mean, invstd = dev.call(gpu.batch_norm_forward, x, axis=axis)
        dx, dg, db = dev.call(gpu.batch_norm_backward, np.ones_like(x), x, None,
                              to_numpy(mean), to_numpy(invstd), axis=axis)
    y, mean, dx, dg = (to_numpy(a) for a in (y, mean, dx, dg))
    others = [c for c in range(shape[1]) if c != ch]
    assert np.isnan(mean[ch]) and np.all(np.isfinite(mean[others]))
    assert np.all(np.isnan(np.take(y, ch, axis=1)))
    assert np.all(np.isfinite(np.take(y, others, axis=1)))
    assert np.all(np.isfinite(np.take(dx, others, axis=1))) and np.all(np.isfinite(dg[others]))
    clean = np.take(x64, others, axis=1)
    y_ref, _, _, _ = _ref_forward(clean, None, None, axis, 1e-5)
    _check(np.take(y, others, axis=1), y_ref, np.float32, "y of the other channels")


@pytest.mark.kernel
@pytest.mark.parametrize("knobs", [{}, dict(path="twopass", threads=32, grid_rows=5),
                                   dict(path="twopass", threads=32, grid_rows=20),  # more partials than
                                                                                    # threads a column
                                   dict(path="persistent", threads=32, grid_rows=5)],
                         ids=["onchip", "grid", "grid-many", "persistent"])
def test_bitwise_deterministic_across_block_orders(monkeypatch, rng, knobs):
    """The last block to arrive finalizes (two-pass), or every block merges the partials after the
    grid barrier (persistent); block order must not change a bit."""
    x, _ = _rand(rng, (400, 12), np.float32, 3.0, 10.0)
    dy, _ = _rand(rng, (400, 12), np.float32)
    runs = []
    for seed in ("0", "7", "12345"):
        monkeypatch.setenv("GPU_EMULATOR_BLOCK_SEED", seed)
        with gpu.use_backend("emulate"), channels.tuned(**knobs):
            y, mean, invstd = gpu.batch_norm_forward(x)
            runs.append((y, mean, invstd) + gpu.batch_norm_backward(dy, x, None, mean, invstd))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert a.tobytes() == b.tobytes()


def test_large_offset_variance(dev, rng):
    """Welford + Chan: data at 1e4 with unit variance keeps its variance to 1e-3 in float32."""
    x = (rng.standard_normal((4000, 3)) + 1e4).astype(np.float32)
    with channels.tuned(path="twopass", grid_rows=4):
        mean, var = dev.call(gpu.batch_stats, x, axis=0)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(to_numpy(var), x64.var(axis=0), rtol=1e-3)


@pytest.mark.kernel
def test_no_channels_launches_nothing(launches):
    x = np.ones((4, 0), np.float32)
    with gpu.use_backend("emulate"):
        y, mean, invstd = gpu.batch_norm_forward(x, axis=0)
        m, v = gpu.batch_stats(x, axis=0)
        dx, dg, db = gpu.batch_norm_backward(x, x, None, mean, invstd, axis=0)
        yi = gpu.batch_norm_inference(x, None, None, mean, invstd, axis=0)
    assert launches == []
    assert y.shape == dx.shape == yi.shape == (4, 0) and mean.shape == m.shape == dg.shape == (0,)


_BN = _kernels.constants("batch_norm")


def _cache_capacity(threads: int, limit: int, static: int) -> int:
    """Rows of one float4 column a block of `threads` holds on chip in the forward: BN_ONCHIP_ROWS
    in registers plus the row cache in what `limit` bytes of shared memory leave after the static
    coefficients and the reduction's area (a BnWelford<4>, 13 floats, per thread)."""
    return threads * (_BN["BN_ONCHIP_ROWS"] + (limit - static - threads * 13 * 4) // (threads * 16))


def _forward_kernel():
    return _kernels.get_kernel("batch_norm", "batch_norm_forward_onchip", np, np.float32, {"BN_VECTOR": 1})


@pytest.mark.kernel
def test_onchip_refuses_what_does_not_fit(launches, rng):
    """One block per tile (an ordinary launch) holds 256 threads x (8 register rows + the row cache
    in the default 48 KiB of shared memory); one row more cannot be forced on chip."""
    k = _forward_kernel()
    most = _cache_capacity(_BN["BN_ONCHIP_THREADS"], _kernels.device_attributes(np)["max_shared_memory_per_block"],
                           k.static_smem)
    x, x64 = _rand(rng, (most, 4), np.float32, 2.0, 3.0)   # one float4 per row: a 1-lane tile
    with gpu.use_backend("emulate"), channels.tuned(path="onchip"):
        y, _, invstd = gpu.batch_norm_forward(x)
        assert launches[0][:4] == ("batch_norm_forward_onchip", (1, 1), "1", False)
        _check(y, _ref_forward(x64, None, None, 0, 1e-5)[0], np.float32, f"y ({most} rows)")
        with pytest.raises(ValueError, match="onchip"):
            gpu.batch_norm_forward(np.concatenate([x, x[:1]]))


@pytest.mark.kernel
def test_persistent_switch_boundary(monkeypatch, launches, rng):
    """x stays on chip across the grid while a cooperative grid holding it fits the device at once.
    Two emulated SMs (one tile: fewer tiles than SMs, so not one block per tile); 32-thread blocks
    of one float4 column hold 32 x 8 rows each in registers, and the device holds `most` such
    blocks: `most` blocks' worth of rows runs from registers alone (no row cache); one row more
    takes a wave of at most 2 blocks per SM with the rest in the row cache; past what the SMs'
    shared memory holds, the two-pass path (and persistent cannot be forced)."""
    monkeypatch.setenv("GPU_EMULATOR_SM_COUNT", "2")
    k = _forward_kernel()
    reduce_smem = 32 * (1 + 3 * 4) * 4                   # the reductions' area: T * (1 + 3*VEC) floats
    most = _kernels.max_cooperative_grid(k, 32, reduce_smem)
    rows = most * 32 * _BN["BN_ONCHIP_ROWS"]
    dev = _kernels.device_attributes(np)
    beyond = 3 * _cache_capacity(32, dev["max_shared_memory_per_block_optin"], k.static_smem)
    for n in (rows, rows + 1, beyond):
        x, x64 = _rand(rng, (n, 4), np.float32, 2.0, 3.0)
        launches.clear()
        with gpu.use_backend("emulate"), channels.tuned(threads=32):
            y, mean, invstd = gpu.batch_norm_forward(x)
        name, grid, _, coop, smem = launches[0]
        if n == rows:
            assert (name, grid, coop, smem) == ("batch_norm_forward_onchip", (1, most), True, reduce_smem)
        elif n == rows + 1:
            assert name == "batch_norm_forward_onchip" and coop and grid[1] <= 4 and smem > reduce_smem
        else:
            assert name == "batch_norm_stats"
        y_ref, mean_ref, invstd_ref, _ = _ref_forward(x64, None, None, 0, 1e-5)
        _check(y, y_ref, np.float32, f"y ({n} rows)")
        _check(invstd, invstd_ref, np.float32, f"invstd ({n} rows)")
    with gpu.use_backend("emulate"), channels.tuned(threads=32, path="persistent"):
        with pytest.raises(ValueError, match="persistent"):
            gpu.batch_norm_forward(x)


# (shape, axis, knobs, forward smem, backward smem): the row cache's cases of CASES reach it. With
# float4 vectors, the reductions' area is T x 13 floats (forward) and T x 8 (backward), and each
# cached row T x 16 bytes per tensor (backward: dy and x); 8 register rows either way (float32).
# (600, 8) in 3 blocks of 32 threads, 16 rows a pass, gives 13 rows a thread: 8 + 5 cached.
ROW_CACHE_CASES = [
    ((600, 8), 0, dict(path="persistent", threads=32, grid_rows=3), 32 * 52 + 5 * 512, 32 * 32 + 5 * 1024),
    ((3000, 4), 0, dict(path="onchip"), 256 * 52 + 4 * 4096, 256 * 32 + 4 * 8192),    # 12 rows: 8 + 4
    ((40, 3, 8, 8), (0, 2, 3), dict(path="persistent", threads=32, grid_rows=2), 32 * 52 + 2 * 512,
     32 * 32 + 2 * 1024),                                                  # 10 planes a thread: 8 + 2
]


@pytest.mark.kernel
@pytest.mark.parametrize("shape,axis,knobs,fwd_smem,bwd_smem", ROW_CACHE_CASES,
                         ids=[f"{s}-{kn['path']}" for s, _, kn, *_ in ROW_CACHE_CASES])
def test_row_cache_is_reached(launches, rng, shape, axis, knobs, fwd_smem, bwd_smem):
    x = rng.standard_normal(shape).astype(np.float32)
    with gpu.use_backend("emulate"), channels.tuned(**knobs):
        y, mean, invstd = gpu.batch_norm_forward(x, axis=axis)
        gpu.batch_norm_backward(x, x, None, mean, invstd, axis=axis)
    assert launches[0][0] == "batch_norm_forward_onchip" and launches[0][4] == fwd_smem
    assert launches[1][0] == "batch_norm_backward_onchip" and launches[1][4] == bwd_smem


@pytest.mark.kernel
def test_streaming_grid_is_one_wave_of_the_reductions_occupancy(launches, rng):
    """grid.y (the partials per tile) is one wave of the blocks the reduction kernels can keep
    resident, from the occupancy calculator (registers included on a GPU), not from threads alone:
    a resident count of 2 per SM gives half the partials of 4."""
    dev = _kernels.device_attributes(np)
    acc = np.dtype(np.float32)
    # (8192, 64) float32: 16 vectors a row, bx = 16, 16 rows a block of 256: one tile, 512 row blocks
    plans = {n: channels.plan(dev, 8192, 64, 1, 4, acc, True, channels.DEFAULT, resident=lambda v, T, smem, n=n: n)
             for n in (1, 2, 4)}
    assert [plans[n].grid_rows for n in (1, 2, 4)] == [dev["sm_count"], 2 * dev["sm_count"], 4 * dev["sm_count"]]
    # the default: the emulator's occupancy calculator for both reductions (threads, blocks and
    # shared memory per SM; the same call as cudaOccupancyMaxActiveBlocksPerMultiprocessor on a GPU)
    p = plans[1]
    want = min(_kernels.max_cooperative_grid(_kernels.get_kernel("batch_norm", k, np, np.float32, {"BN_VECTOR": 1}),
                                             p.threads, p.smem) for k in channels.REDUCTIONS) // dev["sm_count"]
    assert channels.resident(np, np.dtype(np.float32), True, p.threads, p.smem) == want
    x, x64 = _rand(rng, (8192, 64), np.float32, 2.0, 3.0)
    with gpu.use_backend("emulate"), channels.tuned(path="twopass"):
        mean, var = gpu.batch_stats(x)
    assert launches[0][1] == (1, min(dev["sm_count"] * want, 8192 // 16))
    _check(mean, x64.mean(0), np.float32, "mean")
