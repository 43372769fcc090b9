"""Cooperative launches on the CPU emulator: grid.sync() over every block, per-block shared memory.

Test kernels: tests/kernels/emulator_grid.cu. A cooperative launch runs all blocks' threads as
fibers of one scheduler; the blocks take turns in the one shared-memory region, so these tests
check that each block's shared memory (static and dynamic) survives the interleaving, in both
thread orders and shuffled block orders, and that every misuse of grid.sync raises naming the
kernel and the line. Run also under ASan (scripts/test_kernels_asan.sh).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpu import _kernels
from gpu._emulator import EmulatorError

pytestmark = pytest.mark.kernel

GRID = Path(__file__).parent / "kernels" / "emulator_grid.cu"


def kernel(name: str):
    return _kernels.get_kernel(GRID, name, np)


@pytest.fixture(params=["forward", "reverse"])
def order(request, monkeypatch):
    """Both thread orders: each exposes a different half of ordering bugs."""
    monkeypatch.setenv("GPU_EMULATOR_ORDER", request.param)
    return request.param


def _scale_by_sum(nb: int, threads: int, seed: int = 0):
    x = np.random.default_rng(seed).standard_normal(nb * threads).astype(np.float32)
    y = np.full_like(x, np.nan)
    block_out = np.full((nb, 3), np.nan, np.float32)
    partials = np.full(nb, np.nan, np.float32)
    _kernels.launch(kernel("grid_scale_by_sum"), nb, threads, (y, block_out, partials, x),
                    shared_mem=threads * 4, cooperative=True)
    return x, y, block_out, partials


@pytest.mark.parametrize("nb, threads", [
    (1, 32),     # one block: grid.sync is a block barrier
    (5, 64),     # two warps per block, an odd number of blocks
    (12, 96),    # three warps, more blocks than the emulated SMs
])
def test_grid_sync_two_phase_reduction(order, nb, threads):
    x, y, block_out, partials = _scale_by_sum(nb, threads)
    sums = x.reshape(nb, threads).astype(np.float64).sum(1)
    np.testing.assert_allclose(partials, sums, rtol=1e-5, atol=1e-5)
    total = np.float32(0)
    for p in partials:                       # the kernel's order: block 0, 1, ...
        total = np.float32(total + p)
    # shared memory after grid.sync is still the block's own: its id, its sum, its threads' x
    np.testing.assert_array_equal(block_out[:, 0], np.arange(nb))
    np.testing.assert_array_equal(block_out[:, 1], partials)
    np.testing.assert_array_equal(block_out[:, 2], np.full(nb, total))
    np.testing.assert_array_equal(y, x * total)


def test_grid_sync_bitwise_across_block_orders(monkeypatch):
    """Every block merges the partials in the same fixed order: no dependence on scheduling."""
    results = []
    for seed in ("", "3", "99"):
        monkeypatch.setenv("GPU_EMULATOR_BLOCK_SEED", seed)
        results.append(_scale_by_sum(7, 64, seed=1)[1])
    assert results[0].tobytes() == results[1].tobytes() == results[2].tobytes()


def test_repeated_grid_syncs(order):
    nb, rounds = 6, 4
    start = np.arange(nb, dtype=np.int32) * 10
    ring = start.copy()
    scratch = np.full(nb, -1, np.int32)
    _kernels.launch(kernel("grid_ring"), nb, 64, (ring, scratch, np.int32(rounds)), cooperative=True)
    np.testing.assert_array_equal(ring, np.roll(start, rounds) + rounds)


def test_block_skipping_grid_sync_raises(order):
    with pytest.raises(EmulatorError, match=r"kernel 'grid_sync_skipped_by_block', block \(1,0,0\): grid.sync at "
                                            r"emulator_grid.cu:\d+ cannot complete: threads 0-63 of this block "
                                            r"have exited"):
        _kernels.launch(kernel("grid_sync_skipped_by_block"), 3, 64, (np.zeros(3, np.int32),), cooperative=True)


def test_thread_exiting_before_grid_sync_raises(order):
    with pytest.raises(EmulatorError, match=r"kernel 'grid_sync_after_thread_exit', block \(0,0,0\): grid.sync at "
                                            r"emulator_grid.cu:\d+ cannot complete: threads 5 of this block"):
        _kernels.launch(kernel("grid_sync_after_thread_exit"), 2, 64, (np.zeros(128, np.int32),),
                        cooperative=True)


def test_syncthreads_against_grid_sync_raises(order):
    with pytest.raises(EmulatorError, match=r"kernel 'grid_sync_divergent', block \(0,0,0\): divergent barrier: "
                                            r"threads 0-31 wait at __syncthreads \(emulator_grid.cu:\d+\) while "
                                            r"threads 32-63 wait at grid.sync \(emulator_grid.cu:\d+\)"):
        _kernels.launch(kernel("grid_sync_divergent"), 2, 64, (np.zeros(128, np.int32),), cooperative=True)


def test_two_grid_sync_call_sites_raise(order):
    with pytest.raises(EmulatorError, match=r"kernel 'grid_sync_two_call_sites', block \([12],0,0\): divergent grid "
                                            r"barrier: threads 0-31 wait at grid.sync \(emulator_grid.cu:\d+\) "
                                            r"while block \(0,0,0\) waits at grid.sync"):
        _kernels.launch(kernel("grid_sync_two_call_sites"), 3, 32, (np.zeros(3, np.int32),), cooperative=True)


def test_grid_sync_needs_a_cooperative_launch():
    with pytest.raises(EmulatorError, match=r"grid.sync\(\) at emulator_grid.cu:\d+ in a launch that is not "
                                            r"cooperative"):
        _kernels.launch(kernel("grid_ring"), 2, 32, (np.zeros(2, np.int32), np.zeros(2, np.int32), np.int32(1)))
    # the module stays usable
    _kernels.launch(kernel("grid_ring"), 2, 32, (np.zeros(2, np.int32), np.zeros(2, np.int32), np.int32(1)),
                    cooperative=True)


def test_cooperative_grid_limit(monkeypatch):
    """The emulated device holds sm_count x min(threads, blocks, shared memory per SM) blocks."""
    monkeypatch.setenv("GPU_EMULATOR_SM_COUNT", "2")
    k = kernel("grid_ring")
    dev = _kernels.device_attributes(np)
    assert _kernels.max_cooperative_grid(k, 1024) == 2 * dev["max_threads_per_sm"] // 1024
    assert _kernels.max_cooperative_grid(k, 32) == 2 * dev["max_blocks_per_sm"]
    big = 100 * 1024                          # two such blocks fill an SM's shared memory
    assert _kernels.max_cooperative_grid(k, 32, big) == 2 * 2
    most = _kernels.max_cooperative_grid(k, 1024)
    ring, scratch = np.zeros(most + 1, np.int32), np.zeros(most + 1, np.int32)
    _kernels.launch(k, most, 1024, (ring, scratch, np.int32(0)), cooperative=True)
    with pytest.raises(ValueError, match=rf"cooperative grid of {most + 1} blocks .* exceeds the {most}"):
        _kernels.launch(k, most + 1, 1024, (ring, scratch, np.int32(0)), cooperative=True)
