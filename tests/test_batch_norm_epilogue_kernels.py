"""Kernel paths of batch norm's fused epilogue (cuda_src/batch_norm.cu built with BN_EPILOGUE=1):
every path forced through ``channels.tuned`` (on-chip, persistent, two-pass forward and two-kernel
backward, inference, vector and scalar modules, the row cache), each against the float64
composition relu(bn(x) + r) and its gradients (tests/test_batch_norm_epilogue.py's check).

Runs on the emulator (``kernel`` marker, strict modes on: shuffled blocks, interleaved threads,
alignment) and on CuPy where a GPU is usable; under ASan in CI (scripts/test_kernels_asan.sh).
Outputs are NaN-poisoned (GPU_POISON=1, conftest), so a dresidual or y the epilogue forgets fails.
"""
from __future__ import annotations

import numpy as np
import pytest

import gpu
from gpu import _kernels
from gpu._engines import channels
from conftest import BFLOAT16, DTYPES, dtype_id
from bn_helpers import registers_from_ptxas
from test_batch_norm_epilogue import check_fused, _check, _rand, ref_forward

@pytest.fixture(autouse=True)
def _registers_from_ptxas():
    """See bn_helpers.registers_from_ptxas."""
    with registers_from_ptxas():
        yield


@pytest.fixture
def launches(monkeypatch):
    """(name, grid, defines, cooperative) of the kernels launched, in order."""
    seen: list[tuple] = []
    real = _kernels.launch

    def spy(kernel, grid, block, args, shared_mem=0, cooperative=False):
        seen.append((kernel.name, tuple(grid) if isinstance(grid, tuple) else (grid,), dict(kernel.defines),
                     cooperative))
        return real(kernel, grid, block, args, shared_mem, cooperative)

    monkeypatch.setattr(_kernels, "launch", spy)
    return seen


# (shape, axis, knobs, the forward and backward kernels that must run with the epilogue)
ONCHIP_F, ONCHIP_B = "batch_norm_forward_onchip", "batch_norm_backward_onchip"
TWOPASS_F, TWOPASS_B = "batch_norm_apply", "batch_norm_backward_apply"
CASES = [
    ((64, 8), 0, {}, ONCHIP_F, ONCHIP_B),                 # on chip, float4 vectors, one block per tile
    ((37, 7), 0, {}, ONCHIP_F, ONCHIP_B),                 # primes: the scalar module, 7 of 8 lanes
    ((64, 8), 0, dict(path="twopass", threads=32, grid_rows=3), TWOPASS_F, TWOPASS_B),  # grid merge, 3 blocks
    ((200, 8), 0, dict(path="persistent", threads=32, grid_rows=3), ONCHIP_F, ONCHIP_B),  # grid.sync, 3 blocks
    ((600, 7), 0, dict(path="persistent", threads=32, grid_rows=3), ONCHIP_F, ONCHIP_B),  # past the register
                                                          # rows: the row cache, scalar module
    ((3000, 4), 0, dict(path="onchip"), ONCHIP_F, ONCHIP_B),  # one block, 12 rows a thread: row cache
    ((3, 4, 8, 8), (0, 2, 3), {}, ONCHIP_F, ONCHIP_B),    # NCHW, inner = 64: 16 vector lanes
    ((2, 3, 5, 7), (0, 2, 3), dict(path="twopass", threads=32, grid_rows=2), TWOPASS_F, TWOPASS_B),  # NCHW
                                                          # inner = 35 prime: scalar, two blocks a channel
    ((40, 3, 8, 8), (0, 2, 3), dict(path="persistent", threads=32, grid_rows=2), ONCHIP_F, ONCHIP_B),  # NCHW
                                                          # 10 planes a thread: the row cache
    ((2, 3, 5, 16), (0, 1, 2), dict(path="persistent", threads=32, grid_rows=3), ONCHIP_F, ONCHIP_B),  # NHWC
    ((2, 1600), 1, dict(path="persistent"), ONCHIP_F, ONCHIP_B),  # 13 chunks of a row on chip, grid.sync:
    # 26 one-warp blocks (~200 registers: 8 an emulated SM)
    ((4, 3, 2, 5), (0, 2), {}, ONCHIP_F, ONCHIP_B),       # kept axes not adjacent: transposed copies
]


def _ids(cases):
    return [f"{s}-{a}-{kn.get('path', 'auto')}{len(kn)}" for s, a, kn, *_ in cases]


def _check_launches(launches, fwd, bwd):
    """The forward, backward and inference launches came from the BN_EPILOGUE=1 modules."""
    ep = {name for name, _, d, _ in launches if d.get("BN_EPILOGUE") == "1"}
    assert {fwd, bwd, "batch_norm_apply"} <= ep, sorted(ep)
    if bwd == TWOPASS_B:
        assert "batch_norm_backward_reduce" in ep


@pytest.mark.parametrize("shape,axis,knobs,fwd,bwd", CASES, ids=_ids(CASES))
def test_fused_float32(dev, rng, launches, shape, axis, knobs, fwd, bwd):
    with channels.tuned(**knobs):
        check_fused(dev.call, rng, shape, axis, np.float32)
    _check_launches(launches, fwd, bwd)
    if knobs.get("path") == "persistent":
        assert any(n == fwd and coop for n, _, _, coop in launches)


DTYPE_CASES = [
    ((64, 16), 0, {}, ONCHIP_F, ONCHIP_B),                # 16 channels: 2 half-vectors or 4 float4
    ((13, 6), 0, dict(path="twopass"), TWOPASS_F, TWOPASS_B),  # 6 channels: scalar for halves
    ((2, 3, 5, 7), (0, 2, 3), dict(path="persistent", threads=32, grid_rows=2), ONCHIP_F, ONCHIP_B),
                                                          # NCHW, scalar, persistent
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,axis,knobs,fwd,bwd", DTYPE_CASES, ids=_ids(DTYPE_CASES))
def test_fused_dtypes(dev, rng, launches, shape, axis, knobs, fwd, bwd, dtype):
    if dev.name == "cuda" and BFLOAT16 is not None and np.dtype(dtype) == BFLOAT16:
        pytest.skip("CuPy has no bfloat16 arrays")
    with channels.tuned(**knobs):
        check_fused(dev.call, rng, shape, axis, dtype)
    _check_launches(launches, fwd, bwd)


@pytest.mark.kernel
def test_plain_calls_keep_the_plain_modules(launches, rng):
    """Without residual or activation every launch is of the BN_EPILOGUE=0 module (its old bytes)."""
    x = rng.standard_normal((64, 8)).astype(np.float32)
    with gpu.use_backend("emulate"):
        y, mean, invstd = gpu.batch_norm_forward(x)
        gpu.batch_norm_backward(x, x, None, mean, invstd)
        gpu.batch_norm_inference(x, None, None, mean, invstd)
    assert launches and all("BN_EPILOGUE" not in d for _, _, d, _ in launches)


@pytest.mark.kernel
def test_unaligned_residual_takes_the_scalar_module(launches, rng):
    """x aligned, the residual one element into its buffer: the vector loads of the residual would
    be misaligned, so the scalar module runs (the alignment mode would stop a misaligned load)."""
    x, x64 = _rand(rng, (32, 8), np.float32, 2.0)
    buf = rng.standard_normal(32 * 8 + 1).astype(np.float32)
    r = buf[1:].reshape(32, 8)
    with gpu.use_backend("emulate"):
        y, _, _ = gpu.batch_norm_forward(x, residual=r, activation="relu")
    _check(y, ref_forward(x64, np.ones(8), np.zeros(8), r.astype(np.float64), 0, True)[0], np.float32, "y")
    assert all(d.get("BN_VECTOR") == "0" for n, _, d, _ in launches if n == ONCHIP_F)


@pytest.mark.kernel
def test_residual_is_x_on_the_kernels(rng):
    x, x64 = _rand(rng, (4, 3, 8, 8), np.float32, 2.0)
    with gpu.use_backend("emulate"):
        y, _, _ = gpu.batch_norm_forward(x, axis=(0, 2, 3), residual=x, activation="relu")
    _check(y, ref_forward(x64, np.ones(3), np.zeros(3), x64, (0, 2, 3), True)[0], np.float32, "y")
