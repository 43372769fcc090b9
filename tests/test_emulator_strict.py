"""The emulator's strict modes: each catches a bug planted for it (tests/kernels/emulator_bugs.cu)
that a lax emulator lets through.

Every mode is on by default (gpu/_emulator/__init__.py, "Strict by default"); these tests turn
each off with ``gpu._emulator.modes`` to show the bug slip through, where a bug can run at all.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpu import _emulator, _kernels
from gpu._emulator import EmulatorError

pytestmark = pytest.mark.kernel

BUGS = Path(__file__).parent / "kernels" / "emulator_bugs.cu"
UNDER_ASAN = _emulator.build_flavour().startswith("asan")


def bug(name: str):
    return _kernels.get_kernel(BUGS, name, np)


@pytest.fixture(autouse=True)
def default_modes(monkeypatch):
    """The defaults, whatever the caller's environment (the ASan script fixes the thread order)."""
    for var in ("GPU_EMULATOR_ORDER", "GPU_EMULATOR_SEED", "GPU_EMULATOR_BLOCK_SEED", "GPU_EMULATOR_RELAX"):
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------------------------------------
# Shuffled blocks and interleaved threads
# ---------------------------------------------------------------------------------------------

def test_shuffled_blocks_catch_a_missing_ticket():
    """The last block by index finalizes without a ticket: only index order hides it."""
    x = np.random.default_rng(0).standard_normal(16 * 256).astype(np.float32)

    def run():
        y = np.full(1, np.nan, np.float32)
        partials = np.full(16, np.nan, np.float32)
        _kernels.launch(bug("last_block_by_index"), 16, 256, (y, partials, x))
        return y[0]

    assert np.isnan(run()), "blocks in a shuffled order should expose the missing ticket"
    for seed in (2, 3):
        with _emulator.modes(seed=seed):
            assert np.isnan(run())
    with _emulator.modes(block_seed=0):      # index order, the lax emulator: slips through
        np.testing.assert_allclose(run(), x.sum(dtype=np.float64), rtol=1e-5)


@pytest.mark.parametrize("kernel", ["missing_sync_first", "missing_sync_last"])
def test_shuffled_threads_catch_a_missing_barrier_either_way(kernel):
    """One default run catches both mirror bugs; each fixed order hides one of them."""
    x = np.random.default_rng(1).standard_normal(2 * 256).astype(np.float32)
    truth = x.reshape(2, 256).sum(1)

    def run():
        y = np.zeros(2, np.float32)
        _kernels.launch(bug(kernel), 2, 256, (y, x))
        return y

    assert np.isnan(run()).all()
    hiding = "reverse" if kernel == "missing_sync_first" else "forward"
    with _emulator.modes(order=hiding):
        np.testing.assert_allclose(run(), truth, rtol=1e-5)


def test_threads_interleave_differently_at_each_barrier():
    n = 64
    order = np.full(3 * n, -1, np.int32)
    tickets = np.zeros(3, np.uint32)
    _kernels.launch(bug("arrival_order"), 1, n, (order, tickets))
    phases = order.reshape(3, n)
    for p in phases:
        assert sorted(p) == list(range(n))
        assert list(p) not in (list(range(n)), list(range(n))[::-1])
    assert len({tuple(p) for p in phases}) == 3, "each phase between barriers should get its own order"
    # the same seed replays the same orders
    again = np.full(3 * n, -1, np.int32)
    _kernels.launch(bug("arrival_order"), 1, n, (again, np.zeros(3, np.uint32)))
    np.testing.assert_array_equal(again, order)
    with _emulator.modes(order="forward"):
        tickets[:] = 0
        _kernels.launch(bug("arrival_order"), 1, n, (order, tickets))
        assert (order.reshape(3, n) == np.arange(n)).all()


def test_bad_mode_values_are_named():
    for kwargs, var in (({"order": "sideways"}, "GPU_EMULATOR_ORDER"), ({"seed": "x"}, "GPU_EMULATOR_SEED"),
                        ({"relax": ["registers", "bogus"]}, "GPU_EMULATOR_RELAX")):
        with pytest.raises(ValueError, match=var):
            with _emulator.modes(**kwargs):
                pass


# ---------------------------------------------------------------------------------------------
# __launch_bounds__
# ---------------------------------------------------------------------------------------------

def test_launch_past_launch_bounds_fails():
    k = bug("bounded_128")
    assert k.function.max_threads_per_block == 128
    y = np.zeros(256, np.float32)
    _kernels.launch(k, 2, 128, (y,))
    with pytest.raises(EmulatorError, match=r"kernel 'bounded_128': too many resources requested for launch "
                                            r"\(cudaErrorLaunchOutOfResources\): 256 threads per block, but the "
                                            r"kernel is declared __launch_bounds__\(128\)"):
        _kernels.launch(k, 1, 256, (y,))
    with _emulator.modes(relax=["launch_bounds"]):      # the lax emulator: slips through
        _kernels.launch(bug("bounded_128"), 1, 256, (y,))


def test_product_launch_bounds_are_read():
    """Macro-generated kernels and expressions: the bounds as the compiler sees them."""
    consts = _kernels.constants("softmax")
    k = _kernels.get_kernel("softmax", "softmax_block", np, dtype=np.float32)
    assert k.function.launch_bounds == (consts["SM_BLOCK_MAX_THREADS"], 0)
    k = _kernels.get_kernel("softmax", "softmax_cross_entropy_warp_n1", np, dtype=np.float32)
    assert k.function.launch_bounds[0] == consts["SM_WARP_THREADS"] and k.function.launch_bounds[1] >= 1


# ---------------------------------------------------------------------------------------------
# Shared memory: the device's limits and the 48 KiB opt-in
# ---------------------------------------------------------------------------------------------

def test_dynamic_shared_memory_over_48k_needs_the_opt_in():
    k = bug("dynamic_smem_reverse")
    fn = k.function
    n = 16 * 1024                     # 64 KiB of floats: over the 48 KiB default
    x = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    y = np.full(n, np.nan, np.float32)
    default = fn.max_dynamic_shared_size_bytes
    assert default == 48 * 1024 - fn.shared_size_bytes
    try:
        with pytest.raises(EmulatorError, match=r"kernel 'dynamic_smem_reverse': invalid argument "
                                                r"\(cudaErrorInvalidValue\): 65536 bytes of dynamic shared memory "
                                                r"requested, the kernel's limit is \d+ .*opt in above 48 KiB"):
            fn((1, 1, 1), (256, 1, 1), (y, x, np.int32(n)), 4 * n)     # a raw launch, as CuPy's RawKernel
        with _emulator.modes(relax=["shared_memory"]):                 # the lax emulator: slips through
            fn((1, 1, 1), (256, 1, 1), (y, x, np.int32(n)), 4 * n)
        np.testing.assert_array_equal(y, x[::-1])
        # the opt-in, as gpu._kernels.launch sets it (CuPy: kernel.max_dynamic_shared_size_bytes = n)
        fn.max_dynamic_shared_size_bytes = 4 * n
        y[:] = np.nan
        fn((1, 1, 1), (256, 1, 1), (y, x, np.int32(n)), 4 * n)
        np.testing.assert_array_equal(y, x[::-1])
        with pytest.raises(EmulatorError, match="limit is 65536"):
            fn((1, 1, 1), (256, 1, 1), (y, x, np.int32(n)), 4 * n + 4)
        # past the device's opt-in maximum (227 KiB on the emulated sm_90) the attribute is refused
        most = _kernels.device_attributes(np)["max_shared_memory_per_block_optin"] - fn.shared_size_bytes
        with pytest.raises(ValueError, match="max_dynamic_shared_size_bytes=.* is outside"):
            fn.max_dynamic_shared_size_bytes = most + 1
    finally:
        fn.max_dynamic_shared_size_bytes = default
    # gpu._kernels.launch opts in by itself above 48 KiB, and refuses past the opt-in maximum
    _kernels.launch(k, 1, 256, (y, x, np.int32(n)), shared_mem=4 * n)
    with pytest.raises(ValueError, match="exceed the device's"):
        _kernels.launch(k, 1, 256, (y, x, np.int32(n)), shared_mem=most + 4)


# ---------------------------------------------------------------------------------------------
# Misaligned vector accesses
# ---------------------------------------------------------------------------------------------

def test_misaligned_float4_load_faults():
    k = bug("float4_load_at")
    x = np.random.default_rng(3).standard_normal(4 * 32 + 4).astype(np.float32)
    assert x.ctypes.data % 16 == 0
    y = np.full(32, np.nan, np.float32)
    _kernels.launch(k, 1, 32, (y, x, np.int32(4)))            # 16 bytes in: aligned
    np.testing.assert_allclose(y, x[4:].reshape(32, 4).sum(1), rtol=1e-6)
    with pytest.raises(EmulatorError, match=r"kernel 'float4_load_at', block \(0,0,0\): misaligned address: "
                                            r"[a-z ]+ address 0x[0-9a-f]+ for type 'const (struct )?float4', which "
                                            r"needs 16-byte alignment at emulator_bugs.cu:\d+ \(thread \(\d+,0,0\)\)"):
        _kernels.launch(k, 1, 32, (y, x, np.int32(1)))
    with _emulator.modes(relax=["alignment"]):                # the lax emulator: slips through
        _kernels.launch(bug("float4_load_at"), 1, 32, (y, x, np.int32(1)))
        np.testing.assert_allclose(y, x[1:129].reshape(32, 4).sum(1), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Registers in the cooperative-grid fit
# ---------------------------------------------------------------------------------------------

def test_cooperative_fit_counts_registers():
    k = bug("register_heavy")
    fn = k.function
    regs, source = fn.registers()
    assert regs >= 96, (regs, source)   # ptxas: ~128; without NVRTC: 255, the per-thread maximum
    dev = _kernels.device_attributes(np)
    by_threads = dev["max_threads_per_sm"] // 256 * dev["sm_count"]
    most = _kernels.max_cooperative_grid(k, 256)
    assert most < by_threads
    x = np.random.default_rng(4).standard_normal(96 * 256).astype(np.float32)
    grid = by_threads                   # fits by threads and shared memory, not by registers
    y = np.full(grid * 256, np.nan, np.float32)
    with pytest.raises(ValueError, match=rf"cooperative grid of {grid} blocks .* exceeds the {most}"):
        _kernels.launch(k, grid, 256, (y, x), cooperative=True)
    with pytest.raises(EmulatorError, match=rf"cooperative launch too large \(cudaErrorCooperativeLaunchTooLarge\)"
                                            rf": {grid} blocks of 256 threads .* {regs} registers per thread"):
        fn((grid, 1, 1), (256, 1, 1), (y, x), 0, cooperative=True)
    _kernels.launch(k, most, 256, (y, x), cooperative=True)
    with _emulator.modes(relax=["registers"]):                # the lax emulator: slips through
        k = bug("register_heavy")
        assert _kernels.max_cooperative_grid(k, 256) == by_threads
        _kernels.launch(k, grid, 256, (y, x), cooperative=True)
    assert not np.isnan(y).any()


def test_register_estimate_without_nvrtc(monkeypatch):
    """Without ptxas's count: the most registers the kernel's __launch_bounds__ allow, else 255."""
    fn = bug("register_heavy").function
    monkeypatch.setattr(fn.module, "_ptxas", {})             # as if NVRTC were not installed
    assert fn.registers() == (255, "no NVRTC and no __launch_bounds__: the per-thread maximum")
    # __launch_bounds__(256, 4): 4 blocks of 8 warps share 64K registers, 64 each
    fn = _kernels.get_kernel("softmax", "softmax_cross_entropy_strided", np, dtype=np.float32).function
    assert fn.launch_bounds == (256, 4)
    monkeypatch.setattr(fn.module, "_ptxas", {})
    assert fn.registers() == (64, "__launch_bounds__(256, 4)")
