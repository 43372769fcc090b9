"""The NumPy-style API given other libraries' arrays: a torch.Tensor is refused with a TypeError
naming the argument (gpu.torch is the tensors' API); lists and other array-likes are read by
NumPy's rules (np.asarray) and return NumPy arrays. gpu.torch's own calls into the API (NumPy views
of the tensors) are unaffected."""
import array

import numpy as np
import pytest

import gpu

from conftest import TOL


def _f32(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# torch tensors: refused, naming the argument
# ---------------------------------------------------------------------------------------------

def _tensor_cases(torch):
    x, t = _f32((4, 3)), np.array([0, 1, 2, 0])
    T = torch.from_numpy
    return [
        ("z", lambda: gpu.softmax(T(x))),
        ("z", lambda: gpu.log_softmax(T(x), axis=1)),
        ("z", lambda: gpu.hardmax(T(x))),
        ("z", lambda: gpu.softmax(T(x).requires_grad_()[:])),
        ("target", lambda: gpu.softmax_cross_entropy(x, T(t))),
        ("weight", lambda: gpu.softmax_cross_entropy(x, t, weight=T(np.ones(3, np.float32)))),
        ("x", lambda: gpu.batch_norm_forward(T(x), axis=0)),
        ("gamma", lambda: gpu.batch_norm_forward(x, T(np.ones(3, np.float32)), None, axis=0)),
        ("running_var", lambda: gpu.batch_norm_inference(x, None, None, np.zeros(3, np.float32),
                                                         T(np.ones(3, np.float32)), axis=0)),
        ("W", lambda: gpu.fused_linear_cross_entropy(x, T(_f32((5, 3))), t)),
    ]


@pytest.mark.parametrize("backend", ["numpy", pytest.param("emulate", marks=pytest.mark.kernel)])
def test_torch_tensor_refused(backend):
    torch = pytest.importorskip("torch")
    for name, call in _tensor_cases(torch):
        with gpu.use_backend(backend), pytest.raises(TypeError, match=rf"^{name}: got a torch\.Tensor.*gpu\.torch"):
            call()


def test_gpu_torch_still_runs_the_api():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    import gpu.torch as gt
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 0])
    loss = gt.cross_entropy(z, t)
    torch.testing.assert_close(loss, F.cross_entropy(z, t))
    loss.backward()
    x = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(gt.batch_norm(x, None, None, training=True), F.batch_norm(x, None, None, training=True))


# ---------------------------------------------------------------------------------------------
# Lists and array-likes: NumPy's rules
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["numpy", pytest.param("emulate", marks=pytest.mark.kernel)])
def test_lists_follow_numpy(backend):
    z = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    ref = np.exp(np.array(z)) / np.exp(np.array(z)).sum(-1, keepdims=True)
    with gpu.use_backend(backend):
        p = gpu.softmax(z)                                  # a list of Python floats: float64
        assert type(p) is np.ndarray and p.dtype == np.float64
        np.testing.assert_allclose(p, ref, rtol=TOL[np.dtype(np.float64)] * 10)
        loss = gpu.softmax_cross_entropy(z, [2, 0], weight=[1.0, 2.0, 3.0])
        expect = -(3 * np.log(ref[0, 2]) + 1 * np.log(ref[1, 0])) / 4
        np.testing.assert_allclose(loss, expect, rtol=TOL[np.dtype(np.float64)] * 10)
        q = gpu.softmax(array.array("f", [1.0, 2.0, 3.0]))  # the buffer protocol: float32
        assert q.dtype == np.float32
        np.testing.assert_allclose(q, np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum(), rtol=TOL[np.dtype(np.float32)])
        with pytest.raises(TypeError, match="z: dtype int64"):
            gpu.softmax([[1, 2], [3, 4]])                   # a list of ints: int64, not floating
        with pytest.raises(TypeError, match="x: dtype int64"):
            gpu.batch_norm_forward([[1, 2], [3, 4]], axis=0)
