"""Shared test fixtures: the dtype tolerance table, error metric, and the backend runner.

Every API test runs on each backend through the `backend` fixture:
- "numpy":   NumPy arrays, NumPy reference path;
- "emulate": NumPy arrays through the kernel launch path on the CPU kernel emulator (marker
             `kernel`; skipped while an op has no kernel yet);
- "cuda":    CuPy arrays on a GPU (marker `gpu`; skipped without one).
Kernel outputs are poisoned with NaN before every launch (GPU_POISON=1), so an element a kernel
forgets to write fails the comparison.
"""
from __future__ import annotations

import os
import zlib

os.environ.setdefault("GPU_POISON", "1")

import numpy as np
import pytest

import gpu
from gpu._backend import BFLOAT16

#: storage dtypes under test; float16 and bfloat16 compute in float32
DTYPES = [np.dtype(np.float16)] + ([BFLOAT16] if BFLOAT16 is not None else []) + [
    np.dtype(np.float32), np.dtype(np.float64)]

#: the one tolerance table: bound on ||out - ref|| / ||ref|| against a float64 reference computed
#: from the same (rounded) inputs. Storage rounding dominates for the narrow types (float16: 2^-11,
#: bfloat16: 2^-8 per element); float32 leaves room for accumulation over a few thousand terms.
TOL = {np.dtype(np.float16): 4e-3, np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}
if BFLOAT16 is not None:
    TOL[BFLOAT16] = 3e-2


def dtype_id(dt) -> str:
    return np.dtype(dt).name


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out (or where ref is finite) gives inf."""
    out = np.asarray(to_numpy(out), dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference shape {ref.shape}"
    same_nonfinite = (np.isnan(out) & np.isnan(ref)) | (np.isinf(ref) & (out == ref))
    if np.any(~np.isfinite(out) & ~same_nonfinite):
        return float("inf")
    mask = ~same_nonfinite
    num = np.linalg.norm(out[mask] - ref[mask])
    den = np.linalg.norm(ref[mask])
    return float(num / den) if den > 0 else float(num)


def assert_close(out, ref, dtype, what: str = "", factor: float = 1.0):
    err = rel_err(out, ref)
    tol = TOL[np.dtype(dtype)] * factor
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} ({np.dtype(dtype).name})"


def to_numpy(a):
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def cuda_available() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def random(rng, shape, dtype, scale=1.0, offset=0.0):
    """Fresh normal data rounded to `dtype` (never zeros), and the same values in float64."""
    x = (rng.standard_normal(shape) * scale + offset).astype(dtype)
    return x, x.astype(np.float64)


class Backend:
    """Runs API calls on one backend and moves arrays to and from it."""

    def __init__(self, name: str):
        self.name = name
        if name == "cuda":
            import cupy
            self.xp = cupy
        else:
            self.xp = np

    def __repr__(self) -> str:
        return self.name

    def array(self, a):
        """`a` (NumPy) on this backend's device; None stays None."""
        if a is None or self.name != "cuda":
            return a
        return self.xp.asarray(a)

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on this backend; NumPy arguments are moved to the device."""
        args = [self.array(a) if isinstance(a, np.ndarray) else a for a in args]
        kwargs = {k: self.array(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
        with gpu.use_backend("emulate" if self.name == "emulate" else "auto"):
            try:
                return fn(*args, **kwargs)
            except NotImplementedError as e:
                if self.name == "emulate":
                    pytest.skip(f"no kernel yet: {e}")
                raise


BACKEND_PARAMS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("emulate", id="emulate", marks=pytest.mark.kernel),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request) -> Backend:
    return Backend(request.param)


@pytest.fixture(params=BACKEND_PARAMS[1:])
def dev(request) -> Backend:
    """The kernel backends only: the emulator and, where there is one, the GPU."""
    return Backend(request.param)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's id: fresh data per test, the same on every run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy (none usable here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    # pytest-xdist (`-n auto`): idle workers take queued tests from busy ones. Under plain load
    # scheduling the NVRTC compile checks (tests/test_nvrtc.py, up to two minutes each, collected
    # last) queued up on one worker while the other sat idle for ten minutes of a CI run.
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "worksteal"


# ---------------------------------------------------------------------------------------------
# The launch-hash recorder (GPU_LAUNCH_HASH=FILE): a hash of every emulated launch of each test
# (kernel, defines, grid, block, shared memory, scalar arguments, every array argument's bytes
# after the launch; workspace scratch, error records and pointer stand-ins by shape only, since
# their contents are left from earlier calls), written to FILE.<worker>.<pid>.json as {test id: [launch hashes]}. Two runs of the suite,
# before and after a change that must not change any launch, are compared with
# scripts/launch_hash_diff.py.
# ---------------------------------------------------------------------------------------------

_LAUNCH_HASH = os.environ.get("GPU_LAUNCH_HASH")
if _LAUNCH_HASH:
    import hashlib
    import json

    from gpu import _kernels as _K
    from gpu import _launch as _L
    from gpu import _workspace as _W

    _hashes: dict[str, list[str]] = {}
    _current: list[str] | None = None

    def _scratch_ids() -> set[int]:
        # workspace scratch (unused tails left by earlier calls), sticky error records, and the
        # one-element stand-ins for pointers a kernel does not touch (never initialized)
        ws = getattr(_W._local, "ws", None)
        held = [*ws._buffers.values(), *ws._counters.values(), *ws._errors.values()] if ws is not None else []
        return {id(a) for a in [*held, *_L._dummies.values()]}

    def _observe(kernel, grid, block, shared_mem, args) -> None:
        if _current is None:
            return
        h = hashlib.sha256(repr((kernel.family, kernel.name, kernel.defines, grid, block,
                                 int(shared_mem))).encode())
        scratch = _scratch_ids()
        for a in args:
            if isinstance(a, np.ndarray):
                h.update(repr((a.dtype.str, a.shape)).encode())
                if id(a) not in scratch and id(a.base) not in scratch:
                    h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
            else:
                h.update(repr((np.asarray(a).dtype.str, np.asarray(a).tobytes())).encode())
        _current.append(h.hexdigest()[:16])

    _K.launch_observer = _observe

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item):
        global _current
        _current = []
        try:
            yield
        finally:
            if _current:
                _hashes[item.nodeid] = _current
            _current = None

    def pytest_sessionfinish(session):
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        # the pid too: a nested pytest (tests/test_gpu_check.py) inherits the variable and the worker name
        with open(f"{_LAUNCH_HASH}.{worker}.{os.getpid()}.json", "w") as f:
            json.dump(_hashes, f, indent=0, sort_keys=True)
