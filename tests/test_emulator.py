"""The CPU emulator runs CUDA kernels as a GPU would, and catches what a GPU would hide.

Test kernels live in tests/kernels/ (emulator_features.cu: every supported feature;
emulator_bugs.cu: one planted bug per kind the emulator must catch). Run this file in both thread
orders (GPU_EMULATOR_ORDER=forward|reverse) and under ASan (scripts/test_kernels_asan.sh).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from gpu import _emulator, _kernels
from gpu._backend import BFLOAT16
from gpu._emulator import EmulatorError

pytestmark = pytest.mark.kernel

KERNELS = Path(__file__).parent / "kernels"
FEATURES = KERNELS / "emulator_features.cu"
BUGS = KERNELS / "emulator_bugs.cu"
REPO = Path(__file__).resolve().parents[1]

DTYPES = [np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64)]
DTYPES = [d for d in DTYPES if d is not None]
# Storage rounding of the results that pass through SCALAR_T, relative to float64 truth.
RTOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-5, "float64": 1e-12}
UNDER_ASAN = _emulator.build_flavour().startswith("asan")


def feature(name: str, dtype=np.float32):
    return _kernels.get_kernel(FEATURES, name, np, dtype=dtype)


def bug(name: str):
    return _kernels.get_kernel(BUGS, name, np)


def launch(kernel, grid, block, args, shared_mem=0):
    _kernels.launch(kernel, grid, block, args, shared_mem)


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, grid", [
    (1, 1),          # one element: every other thread adds zeros
    (1000, 3),       # grid-stride: 768 threads cover 1000 elements in two passes
    (262144, 64),    # 64 blocks x 256 threads, the emulator's speed reference
])
def test_block_sum(n, grid):
    x = rng(1).standard_normal(n).astype(np.float32)
    partials = np.full(grid, np.nan, np.float32)
    launch(feature("block_sum"), grid, 256, (partials, x, np.int64(n)))
    np.testing.assert_allclose(partials.sum(dtype=np.float64), x.sum(dtype=np.float64), rtol=1e-5, atol=1e-4)


def test_grid_sum_last_block_finalizes_in_fixed_order(monkeypatch):
    """Atomic ticket + __threadfence: the same bits whatever order the blocks run in."""
    x = rng(2).standard_normal(50_000).astype(np.float32)
    grid = 13
    results = []
    for seed in ("", "1", "2"):
        monkeypatch.setenv("GPU_EMULATOR_BLOCK_SEED", seed)
        out = np.full(1, np.nan)
        partials = np.full(grid, np.nan)
        counter = np.zeros(1, np.uint32)
        launch(feature("grid_sum"), grid, 128, (out, partials, counter, x, np.int64(x.size)))
        assert counter[0] == 0  # reset by the last block for the next launch
        results.append(out[0])
    np.testing.assert_allclose(results[0], x.sum(dtype=np.float64), rtol=1e-12)
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_row_moments_welford(dtype):
    x = (rng(3).standard_normal((5, 777)) * 3 + 1e2).astype(dtype)  # offset: Welford must stay stable
    acc = np.float64 if dtype == np.float64 else np.float32
    mean = np.full(5, np.nan, acc)
    var = np.full(5, np.nan, acc)
    launch(feature("row_moments", dtype), 5, 128, (mean, var, x, np.int32(777)))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(1), rtol=1e-6 if acc == np.float32 else 1e-13)
    np.testing.assert_allclose(var, x64.var(1), rtol=1e-4 if acc == np.float32 else 1e-11)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_row_softmax(dtype):
    z = (rng(4).standard_normal((6, 1000)) * 5).astype(dtype)
    y = np.full_like(z, np.nan)
    launch(feature("row_softmax", dtype), 6, 256, (y, z, np.int32(1000)))
    z64 = z.astype(np.float64)
    ref = np.exp(z64 - z64.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=RTOL[dtype.name], atol=1e-7)


def test_softmax_sized_launch_is_fast():
    """(64, 1000) softmax, 64 blocks x 256 threads: well under a second (the issue's target)."""
    z = rng(5).standard_normal((64, 1000)).astype(np.float32)
    y = np.empty_like(z)
    k = feature("row_softmax")
    launch(k, 64, 256, (y, z, np.int32(1000)))  # first launch maps the fiber stacks
    start = time.perf_counter()
    launch(k, 64, 256, (y, z, np.int32(1000)))
    elapsed = time.perf_counter() - start
    print(f"(64, 1000) softmax, 64 x 256 threads: {elapsed * 1e3:.1f} ms")
    assert elapsed < (3.0 if UNDER_ASAN else 0.5)


# ---------------------------------------------------------------------------------------------
# Warp operations, barriers with results, indices
# ---------------------------------------------------------------------------------------------

def test_warp_shuffles_votes_and_barrier_reductions():
    block, grid = 64, 3
    x = rng(6).integers(-100, 101, block * grid).astype(np.int32)
    out = np.full((block * grid, 8), -1, np.int32)
    launch(feature("warp_ops"), grid, block, (out, x))
    w = x.reshape(-1, 32).astype(np.int64)  # one row per warp
    lane = np.arange(32)
    expect = np.zeros((w.shape[0], 32, 8), np.int64)
    expect[:, 0, 0] = w.sum(1)
    expect[:, :, 1] = np.cumsum(w, 1)
    expect[:, :, 2] = w[:, (lane & ~7) + 3]
    expect[:, :, 3] = w[:, lane ^ 1]
    expect[:, :, 4] = ((w > 0) << lane).sum(1, keepdims=True).astype(np.uint32).view(np.int32)
    expect[:, :, 5] = 1
    expect[:, :, 6] = (w > 50).any(1, keepdims=True)
    b = x.reshape(grid, block)
    packed = (b > 0).sum(1) * 4 + 2 + (b > 90).any(1)
    expect[:, :, 7] = np.repeat(packed, block // 32)[:, None]
    np.testing.assert_array_equal(out, expect.reshape(-1, 8))


def test_3d_indices():
    grid, block = (2, 3, 2), (4, 2, 3)
    n = np.prod(grid) * np.prod(block)
    out = np.full((n, 6), -1, np.int32)
    launch(feature("index3d"), grid, block, (out,))
    bz, by, bx, tz, ty, tx = np.indices(grid[::-1] + block[::-1]).reshape(6, -1)
    np.testing.assert_array_equal(out, np.stack([tx, ty, tz, bx, by, bz], 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_dynamic_shared_memory(dtype):
    block, grid = 96, 5
    x = rng(7).standard_normal(block * grid).astype(dtype)
    y = np.full_like(x, np.nan)
    launch(feature("reverse_block", dtype), grid, block, (y, x), shared_mem=block * dtype.itemsize)
    np.testing.assert_array_equal(y.reshape(grid, block), x.reshape(grid, block)[:, ::-1])


def test_atomics():
    n = 300  # 3 blocks of 128: the last one partial, its idle threads return early
    x = rng(8).integers(-100, 101, n).astype(np.int32)
    i32 = np.array([0, np.iinfo(np.int32).min, np.iinfo(np.int32).max, 0, 0, 0], np.int32)
    u32 = np.array([0, 0, 0, 0, 0xFFFFFFFF, 0], np.uint32)
    u64 = np.zeros(1, np.uint64)
    f32 = np.zeros(2, np.float32)
    f64 = np.zeros(1, np.float64)
    launch(feature("atomics"), 3, 128, (i32, u32, u64, f32, f64, x, np.int32(n)))
    s = int(x.sum())
    t = np.arange(n)
    np.testing.assert_array_equal(i32, [s, x.max(), x.min(), s, 7, -s])
    xor = np.bitwise_xor.reduce(t)
    np.testing.assert_array_equal(u32, [(x & 0xFF).sum(), x.max() + 1000, n % 16, 0xFFFFFFFF, 0xFFFF0000, xor])
    assert u64[0] == (x.astype(np.int64) + 1000).sum()
    np.testing.assert_array_equal(f32, [0.5 * n, 2.5])
    assert f64[0] == s


# ---------------------------------------------------------------------------------------------
# Types and math
# ---------------------------------------------------------------------------------------------

def test_half_and_bfloat16_conversions_round_to_nearest_even():
    special = [0.0, -0.0, 1.0, 1 / 3, 65504.0, 65519.0, 65520.0, 1e-8, 6e-8, 2.0**-24, 2.0**-25,
               3e38, -3e38, np.inf, -np.inf, 1.00390625, 1.005859375]
    x = np.concatenate([np.array(special), rng(9).standard_normal(1000) * 10.0 ** rng(10).integers(-8, 8, 1000)])
    x = x.astype(np.float32)
    n = x.size
    h = np.zeros(n, np.float16)
    b = np.zeros(n, BFLOAT16) if BFLOAT16 is not None else None
    back = np.zeros(2 * n, np.float32)
    if b is None:
        pytest.skip("ml_dtypes is not installed")
    with np.errstate(over="ignore"):
        launch(feature("convert"), (n + 127) // 128, 128, (h, b, back, x, np.int32(n)))
        np.testing.assert_array_equal(h.view(np.uint16), x.astype(np.float16).view(np.uint16))
        np.testing.assert_array_equal(b.view(np.uint16), x.astype(BFLOAT16).view(np.uint16))
    np.testing.assert_array_equal(back[0::2], h.astype(np.float32))
    np.testing.assert_array_equal(back[1::2], b.astype(np.float32))


def test_half2_add():
    a = rng(11).standard_normal(200).astype(np.float16)
    b = rng(12).standard_normal(200).astype(np.float16)
    y = np.zeros(200, np.float16)
    launch(feature("half2_add"), 1, 128, (y, a, b, np.int32(100)))
    np.testing.assert_array_equal(y, (a.astype(np.float32) + b.astype(np.float32)).astype(np.float16))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("offset, n", [
    (0, 1003),   # aligned start, tail not a multiple of the vector width
    (1, 1003),   # misaligned start: scalar head up to the first 16-byte boundary
    (3, 5),      # shorter than one vector: head and tail only
])
def test_vector_loads_with_scalar_head_and_tail(dtype, offset, n):
    xs = rng(13).standard_normal(n + offset).astype(dtype)
    ys = np.full(n + offset, np.nan, dtype)
    x, y = xs[offset:], ys[offset:]
    launch(feature("scale2", dtype), 2, 64, (y, x, np.int64(n)))
    np.testing.assert_array_equal(y, (2 * x.astype(np.float64)).astype(dtype))


def test_math_functions():
    x = np.array([0.5, -1.5, 3.0, 10.0, -20.0, 1e-3, np.nan], np.float32)
    y = np.zeros((x.size, 12), np.float32)
    launch(feature("math"), 1, 32, (y, x, np.int32(x.size)))
    v = x.astype(np.float64)
    a = np.abs(v)
    with np.errstate(invalid="ignore"):
        ref = np.stack([np.exp(v), np.exp(v), np.exp2(v), np.log(a), np.log(a), np.log1p(a), 1 / np.sqrt(a),
                        np.fmax(v, 0.5), v / 3, v * v + 1, np.isnan(v), np.where(v > 0, np.inf, -np.inf)], 1)
    np.testing.assert_allclose(y, ref, rtol=2e-6, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Scalar and pointer argument checks
# ---------------------------------------------------------------------------------------------

def test_python_int_for_an_int_parameter_is_an_error():
    h = np.zeros(8, np.float16)
    x = np.ones(8, np.float32)
    with pytest.raises(TypeError, match=r"takes int32, got int 8 \(a Python int is passed as int64\)"):
        launch(feature("convert"), 1, 32, (h, h.astype(BFLOAT16), np.zeros(16, np.float32), x, 8))


def test_argument_checks():
    x = np.ones(8, np.float32)
    k = feature("block_sum")
    with pytest.raises(TypeError, match="takes int64, got float32"):
        launch(k, 1, 32, (x, x, np.float32(8)))
    with pytest.raises(TypeError, match="pointer to float32, got an array of float64"):
        launch(k, 1, 32, (x, x.astype(np.float64), np.int64(8)))
    with pytest.raises(TypeError, match="takes 3 arguments"):
        launch(k, 1, 32, (x, x))
    with pytest.raises(TypeError, match="expected an array"):
        launch(k, 1, 32, (x, np.float32(1), np.int64(8)))


# ---------------------------------------------------------------------------------------------
# Planted bugs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel, exposing_order", [
    ("missing_sync_first", "forward"),
    ("missing_sync_last", "reverse"),
])
def test_missing_syncthreads_shows_as_nan(monkeypatch, kernel, exposing_order):
    """Shared memory starts as NaN; each thread order exposes one of the two mirror bugs."""
    x = rng(14).standard_normal(2 * 256).astype(np.float32)
    truth = x.reshape(2, 256).sum(1)
    for order in ("forward", "reverse"):
        monkeypatch.setenv("GPU_EMULATOR_ORDER", order)
        y = np.zeros(2, np.float32)
        launch(bug(kernel), 2, 256, (y, x))
        if order == exposing_order:
            assert np.isnan(y).all(), f"{kernel} in {order} order should read poisoned shared memory"
        else:
            np.testing.assert_allclose(y, truth, rtol=1e-5)
        y = np.zeros(2, np.float32)
        launch(bug("with_sync"), 2, 256, (y, x))
        np.testing.assert_allclose(y, truth, rtol=1e-5)


def test_divergent_barrier_raises_with_source_lines():
    y = np.zeros(64, np.float32)
    with pytest.raises(EmulatorError) as e:
        launch(bug("divergent_barrier"), 1, 64, (y,))
    msg = str(e.value)
    assert "kernel 'divergent_barrier', block (0,0,0)" in msg
    assert "divergent barrier: threads 0-31 wait at __syncthreads (emulator_bugs.cu:" in msg
    assert "threads 32-63 wait at __syncthreads (emulator_bugs.cu:" in msg


def test_full_mask_shuffle_in_partial_warp_raises():
    x = np.ones(100, np.float32)
    y = np.zeros(100, np.float32)
    with pytest.raises(EmulatorError, match=r"__shfl_xor_sync at emulator_bugs.cu:\d+: mask 0xffffffff names "
                                            r"lanes 4-31, which do not exist \(warp 3 has 4 lanes\)"):
        launch(bug("shuffle_partial_warp"), 1, 100, (y, x))


def test_shuffle_with_exited_lane_raises():
    x = np.ones(64, np.float32)
    y = np.zeros(64, np.float32)
    with pytest.raises(EmulatorError, match=r"__shfl_down_sync at emulator_bugs.cu:\d+ in warp 0 .* lanes 5 have exited"):
        launch(bug("shuffle_after_exit"), 1, 64, (y, x))


@pytest.mark.skipif(UNDER_ASAN, reason="under ASan the overflow aborts the process (ASan poisons the rest)")
def test_dynamic_shared_memory_overflow_raises():
    y = np.zeros(32, np.float32)
    with pytest.raises(EmulatorError, match=r"wrote past the end of its 128 bytes of dynamic shared memory \(at byte 128\)"):
        launch(bug("dynamic_smem_overflow"), 1, 32, (y,), shared_mem=128)


def test_trap_raises_and_module_stays_usable():
    y = np.zeros(32, np.int32)
    with pytest.raises(EmulatorError, match=r"__trap\(\) at emulator_bugs.cu:\d+"):
        launch(bug("trap_in_thread_3"), 1, 32, (y,))
    x = np.ones(256, np.float32)
    out = np.zeros(1, np.float32)
    launch(bug("with_sync"), 1, 256, (out, x))
    assert out[0] == 256


def _libasan() -> str | None:
    cxx = os.environ.get("CXX", "g++").split()[0]
    try:
        path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(_libasan() is None, reason="libasan not found: apt-get install libasan8 (gcc's ASan runtime)")
def test_out_of_bounds_write_fails_under_asan():
    """In a subprocess with ASan preloaded: a correct kernel passes, the off-by-one write aborts."""
    script = textwrap.dedent(f"""
        import numpy as np
        from gpu import _kernels
        bugs = {str(BUGS)!r}
        y = np.zeros(256, np.float32)
        _kernels.launch(_kernels.get_kernel(__import__("pathlib").Path(bugs), "with_sync", np), 1, 256,
                        (np.zeros(1, np.float32), np.ones(256, np.float32)))
        print("correct kernel ok", flush=True)
        y = np.zeros(100, np.float32)
        _kernels.launch(_kernels.get_kernel(__import__("pathlib").Path(bugs), "out_of_bounds", np), 1, 128,
                        (y, np.int32(100)))
        print("out-of-bounds write not caught", flush=True)
    """)
    env = dict(os.environ, LD_PRELOAD=_libasan(), ASAN_OPTIONS="detect_leaks=0", GPU_EMULATOR_ASAN="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert "correct kernel ok" in proc.stdout, proc.stderr[-3000:]
    assert "not caught" not in proc.stdout
    assert proc.returncode != 0
    assert "heap-buffer-overflow" in proc.stderr
    assert "emulator_bugs.cu:" in proc.stderr and "out_of_bounds" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Fiber back ends and the GPU
# ---------------------------------------------------------------------------------------------

def test_ucontext_fibers_match_the_assembly_switch(monkeypatch):
    x = rng(15).integers(-100, 101, 128).astype(np.int32)
    results = []
    for fibers in ("asm", "ucontext"):
        monkeypatch.setenv("GPU_EMULATOR_FIBERS", fibers)
        out = np.zeros((128, 8), np.int32)
        launch(feature("warp_ops"), 2, 64, (out, x))
        results.append(out)
    np.testing.assert_array_equal(results[0], results[1])


def _cupy_with_device():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:
        pass
    return None


@pytest.mark.gpu
def test_gpu_matches_emulator_bitwise():
    """Integer and fixed-order float reductions: the GPU and the emulator agree to the bit."""
    cp = _cupy_with_device()
    if cp is None:
        pytest.skip("needs CuPy and a CUDA device")
    r = rng(16)
    x = r.standard_normal(100_000).astype(np.float32)
    xi = r.integers(-100, 101, 300).astype(np.int32)

    def run(xp):
        k = lambda name, dt=np.float32: _kernels.get_kernel(FEATURES, name, xp, dtype=dt)  # noqa: E731
        results = {}
        partials = xp.zeros(20, xp.float32)
        _kernels.launch(k("block_sum"), 20, 256, (partials, xp.asarray(x), np.int64(x.size)))
        results["block_sum"] = partials
        out, ws, counter = xp.zeros(1), xp.zeros(20), xp.zeros(1, xp.uint32)
        _kernels.launch(k("grid_sum"), 20, 256, (out, ws, counter, xp.asarray(x), np.int64(x.size)))
        results["grid_sum"] = out
        warp = xp.zeros((192, 8), xp.int32)
        _kernels.launch(k("warp_ops"), 3, 64, (warp, xp.asarray(xi[:192])))
        results["warp_ops"] = warp
        i32 = xp.asarray(np.array([0, -2**31, 2**31 - 1, 0, 0, 0], np.int32))
        u32 = xp.asarray(np.array([0, 0, 0, 0, 0xFFFFFFFF, 0], np.uint32))
        u64, f32, f64 = xp.zeros(1, xp.uint64), xp.zeros(2, xp.float32), xp.zeros(1)
        _kernels.launch(k("atomics"), 3, 128, (i32, u32, u64, f32, f64, xp.asarray(xi), np.int32(300)))
        results.update(i32=i32, u32=u32, u64=u64, f32=f32, f64=f64)
        for dt in DTYPES:
            m, v = xp.zeros(7, _acc(dt)), xp.zeros(7, _acc(dt))
            _kernels.launch(k("row_moments", dt), 7, 128, (m, v, xp.asarray(x[:7 * 999].reshape(7, 999).astype(dt)),
                                                             np.int32(999)))
            results[f"moments_{dt.name}"] = (m, v)
            y = xp.zeros(1001, dt)
            _kernels.launch(k("scale2", dt), 2, 64, (y, xp.asarray(x[:1001].astype(dt)), np.int64(1001)))
            results[f"scale2_{dt.name}"] = y
        idx = xp.zeros((12 * 24, 6), xp.int32)
        _kernels.launch(k("index3d"), (2, 3, 2), (4, 2, 3), (idx,))
        results["index3d"] = idx
        return results

    emulated = run(np)
    on_gpu = {key: _to_numpy(cp, val) for key, val in run(cp).items()}
    for key, val in emulated.items():
        for a, b in zip(val if isinstance(val, tuple) else (val,), on_gpu[key] if isinstance(val, tuple) else (on_gpu[key],)):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=key)


def _acc(dtype):
    return np.float64 if dtype == np.float64 else np.float32


def _to_numpy(cp, val):
    return tuple(cp.asnumpy(v) for v in val) if isinstance(val, tuple) else cp.asnumpy(val)
