"""The package surface: exports, backend selection, library mixing, info, imports without CuPy."""
from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

import gpu
from gpu import _backend, _cpu

from shell import run_checked

API = ["batch_stats", "batch_norm_forward", "batch_norm_backward", "batch_norm_inference", "batch_norm",
       "softmax", "log_softmax", "hardmax", "softmax_cross_entropy", "softmax_cross_entropy_backward",
       "info", "use_backend", "warmup"]


def test_public_names():
    for name in API:
        assert callable(getattr(gpu, name)), name
        assert name in gpu.__all__


def test_use_backend_is_scoped_and_validated(monkeypatch):
    monkeypatch.delenv("GPU_BACKEND", raising=False)
    assert _backend.current_backend() == "numpy"
    with gpu.use_backend("emulate"):
        assert _backend.current_backend() == "emulate"
        with gpu.use_backend("numpy"):
            assert _backend.current_backend() == "numpy"
        assert _backend.current_backend() == "emulate"
    assert _backend.current_backend() == "numpy"
    with pytest.raises(ValueError, match="backend: expected one of"):
        with gpu.use_backend("cuda-please"):
            pass


def test_environment_selects_backend(monkeypatch):
    monkeypatch.setenv("GPU_BACKEND", "emulate")
    assert _backend.dispatch(x=np.ones(3)) == (np, True)
    monkeypatch.setenv("GPU_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GPU_BACKEND='bogus'"):
        gpu.softmax(np.ones((2, 2)))


@pytest.fixture
def fake_cupy(monkeypatch):
    """A stand-in `cupy` module, so library mixing is tested without a GPU."""
    mod = types.ModuleType("cupy")

    class ndarray(np.ndarray):
        pass

    mod.ndarray = ndarray
    monkeypatch.setitem(sys.modules, "cupy", mod)
    return mod


def test_mixing_numpy_and_cupy_is_a_type_error(fake_cupy):
    z = np.zeros((2, 3), np.float32).view(fake_cupy.ndarray)
    with pytest.raises(TypeError, match="z is a CuPy array but target is not"):
        gpu.softmax_cross_entropy(z, np.array([0, 1]))
    x = np.ones((4, 2), np.float32).view(fake_cupy.ndarray)
    with pytest.raises(TypeError, match="x is a CuPy array but gamma, beta are not"):
        gpu.batch_norm_forward(x, np.ones(2), np.zeros(2))
    assert _backend.array_module(x=x, gamma=None) is fake_cupy


def test_info_reports_paths():
    facts = gpu.info()
    for key in ("gpu", "numpy", "cupy", "GPU", "NumPy arrays", "CuPy arrays", "backend"):
        assert key in facts
    assert facts["NumPy arrays"] == "NumPy reference path"
    assert "NumPy arrays" in str(facts)


def test_python_m_gpu_prints_report():
    out = run_checked([sys.executable, "-m", "gpu"]).stdout
    assert "NumPy arrays" in out and "CuPy arrays" in out


def test_python_m_gpu_with_a_bad_backend_explains_without_a_traceback(monkeypatch):
    monkeypatch.setenv("GPU_BACKEND", "cuda")
    assert gpu.info()["backend"].startswith("INVALID: GPU_BACKEND='cuda'")
    proc = subprocess.run([sys.executable, "-m", "gpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "python -m gpu: error: GPU_BACKEND='cuda': expected one of auto, numpy, emulate" in proc.stderr
    assert "NumPy arrays" in proc.stdout  # the rest of the report is still there


def test_import_without_cupy():
    # `import gpu` and the NumPy path must work where CuPy cannot be imported at all
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import numpy as np, gpu\n"
            "print(gpu.softmax(np.ones((1, 2), np.float32)), gpu.info()['cupy'])")
    out = run_checked([sys.executable, "-c", code]).stdout
    assert "[[0.5 0.5]]" in out and "not importable" in out


def test_numpy_path_is_independent_of_thread_count(monkeypatch):
    # the NumPy path spreads row blocks over threads and combines them in block order: the result
    # must be bitwise the same with one thread and with several
    import importlib
    bn = importlib.import_module("gpu.ops.batch_norm")
    sm = importlib.import_module("gpu.ops.softmax")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 48)).astype(np.float32)
    t = rng.integers(0, 48, 64)
    monkeypatch.setattr(_cpu, "BLOCK_BYTES", 8 * 48 * 4)
    runs = []
    for n in ("1", "3"):
        monkeypatch.setenv("GPU_CPU_THREADS", n)
        y, mean, invstd = gpu.batch_norm_forward(x, axis=0)
        dx = gpu.batch_norm_backward(x, x, None, mean, invstd, axis=0)[0]
        loss, dz = gpu.softmax_cross_entropy(x, t, return_grad=True)
        runs.append([y, mean, invstd, dx, loss, dz])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
