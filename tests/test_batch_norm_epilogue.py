"""Batch norm with the fused epilogue, y = act(bn(x) + residual): the public API on every backend
and every NumPy-path strategy, against the unfused composition relu(bn(x) + r) in float64.

Parity: y, the running statistics, and every gradient (dx, dgamma, dbeta, dresidual) of the
backward with ``activation="relu"`` (the mask y > 0 taken from the forward's own y, as a caller
passes it) against the float64 chain rule through relu, the add and batch norm. The kernel paths
forced one by one (on-chip, persistent, two-pass, scalar module) are in
tests/test_batch_norm_epilogue_kernels.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import gpu
from gpu import _cpu
from gpu.ops.batch_norm import numpy_path
from conftest import BFLOAT16, DTYPES, TOL, dtype_id, rel_err, to_numpy
from bn_helpers import axes as _axes, keep as _keep, kept as _kept

# (shape, axis): every layout batch norm has, with the awkward sizes, each with its reason
CASES = [
    ((64, 10), 0),               # 1-d batch norm (N, C): channels-last rows
    ((2, 3), 0),                 # two rows: the smallest batch with running stats
    ((13,), 0),                  # 1-d input: a single feature
    ((6, 5, 7), (0, 2)),         # 1-d batch norm over (N, C, L): channels-first, L prime
    ((4, 6, 5, 3), (0, 2, 3)),   # 2-d NCHW
    ((4, 5, 3, 6), (0, 1, 2)),   # 2-d NHWC (channels_last): C contiguous
    ((3, 1, 7, 1), (0, 2, 3)),   # one channel, width 1
    ((2, 3, 2, 3, 4), (0, 2, 3, 4)),  # 3-d NCDHW
    ((2, 2, 3, 4, 3), (0, 1, 2, 3)),  # 3-d NDHWC
    ((5, 4, 3), 1),              # kept axes not adjacent: the kernels' transposed copy
]
IDS = [f"{s}-ax{a}" for s, a in CASES]
EPS = 1e-5


def _rand(rng, shape, dtype, scale=1.0, offset=0.0):
    x = (rng.standard_normal(shape) * scale + offset).astype(dtype)
    return x, x.astype(np.float64)


def _check(out, ref, dtype, what, factor=1.0):
    err = rel_err(out, ref)
    tol = TOL[np.dtype(dtype)] * factor
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} ({np.dtype(dtype).name})"


def ref_forward(x64, g64, b64, r64, axis, relu, eps=EPS):
    """The unfused composition in float64: (act(bn(x) + r), mean, invstd, var)."""
    ax = _axes(axis, x64.ndim)
    mean = x64.mean(axis=ax, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=ax, keepdims=True)
    invstd = 1 / np.sqrt(var + eps)
    y = (x64 - mean) * invstd * g64.reshape(mean.shape) + b64.reshape(mean.shape)
    if r64 is not None:
        y = y + r64
    if relu:
        y = np.maximum(y, 0)
    kept = _kept(x64.shape, axis)
    return y, mean.reshape(kept), invstd.reshape(kept), var.reshape(kept)


def ref_backward(dy64, x64, g64, y, axis, relu, eps=EPS):
    """Chain rule through relu (mask y > 0 of the given y), the add and batch norm, float64:
    (dx, dgamma, dbeta, dresidual)."""
    dz = dy64 * (to_numpy(y).astype(np.float64) > 0) if relu else dy64
    ax = _axes(axis, x64.ndim)
    mean = x64.mean(axis=ax, keepdims=True)
    invstd = 1 / np.sqrt(((x64 - mean) ** 2).mean(axis=ax, keepdims=True) + eps)
    xhat = (x64 - mean) * invstd
    m = x64.size // mean.size
    dbeta = dz.sum(axis=ax, keepdims=True)
    dgamma = (dz * xhat).sum(axis=ax, keepdims=True)
    k = invstd * g64.reshape(mean.shape)
    dx = k * (dz - dbeta / m - xhat * dgamma / m)
    kept = _kept(x64.shape, axis)
    return dx, dgamma.reshape(kept), dbeta.reshape(kept), dz, k


def check_fused(call, rng, shape, axis, dtype, relu=True, residual=True, running=True, knobs_note=""):
    """Forward (with running statistics), backward (every gradient) and inference of the fused op
    through ``call(fn, *args, **kw)``, each against the float64 composition."""
    kept = _kept(shape, axis)
    x, x64 = _rand(rng, shape, dtype, 2.0, 0.5)
    r, r64 = _rand(rng, shape, dtype) if residual else (None, None)
    dy, dy64 = _rand(rng, shape, dtype)
    g, g64 = _rand(rng, kept, dtype, 0.5, 1.0)
    b, b64 = _rand(rng, kept, dtype)
    act = "relu" if relu else None
    acc = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    rm0, rv0 = np.asarray(rng.standard_normal(kept), acc), np.asarray(rng.random(kept) + 0.5, acc)
    rm, rv = (rm0.copy(), rv0.copy()) if running else (None, None)
    momentum = 0.3

    y, mean, invstd = call(gpu.batch_norm_forward, x, g, b, axis=axis, eps=EPS, running_mean=rm,
                           running_var=rv, momentum=momentum, residual=r, activation=act)
    y_ref, mean_ref, invstd_ref, var_ref = ref_forward(x64, g64, b64, r64, axis, relu)
    assert to_numpy(y).dtype == np.dtype(dtype) and y.shape == shape
    _check(y, y_ref, dtype, f"forward y{knobs_note}")
    _check(mean, mean_ref, dtype, "forward mean")
    _check(invstd, invstd_ref, dtype, "forward invstd")
    if running:
        # the running statistics are batch norm's alone: the same update as without the epilogue
        m = x.size // max(1, int(np.prod(kept)))
        _check(rm, (1 - momentum) * rm0 + momentum * mean_ref, dtype, "running_mean")
        _check(rv, (1 - momentum) * rv0 + momentum * var_ref * m / (m - 1), dtype, "running_var")

    out = call(gpu.batch_norm_backward, dy, x, g, to_numpy(mean), to_numpy(invstd), axis=axis, activation=act,
               y=to_numpy(y), residual_grad=True)
    assert len(out) == 4
    dx, dgamma, dbeta, dres = out
    dx_ref, dgamma_ref, dbeta_ref, dres_ref, k = ref_backward(dy64, x64, g64, y, axis, relu)
    assert to_numpy(dres).dtype == np.dtype(dtype) and dres.shape == shape
    assert to_numpy(dx).dtype == np.dtype(dtype) and to_numpy(dgamma).dtype == np.dtype(dtype)
    # dx nearly cancels with few rows: its error is measured against ||k * dz||
    scale = max(np.linalg.norm(k * dres_ref), 1e-300)
    err = np.linalg.norm(to_numpy(dx).astype(np.float64) - dx_ref) / scale
    assert err <= 4 * TOL[np.dtype(dtype)], f"backward dx: error {err:.3g} relative to ||k*dz||"
    _check(dgamma, dgamma_ref, dtype, "backward dgamma", factor=2)
    _check(dbeta, dbeta_ref, dtype, "backward dbeta", factor=2)
    assert np.array_equal(to_numpy(dres).astype(np.float64), dres_ref), "dresidual is the masked dy, exactly"

    rmi, rvi = rm0.astype(dtype), rv0.astype(dtype)
    yi = call(gpu.batch_norm_inference, x, g, b, rmi, rvi, axis=axis, eps=EPS, residual=r, activation=act)
    keep = _keep(shape, axis)
    yi_ref = ((x64 - rmi.astype(np.float64).reshape(keep)) / np.sqrt(rvi.astype(np.float64).reshape(keep) + EPS)
              * g64.reshape(keep) + b64.reshape(keep))
    if residual:
        yi_ref = yi_ref + r64
    if relu:
        yi_ref = np.maximum(yi_ref, 0)
    _check(yi, yi_ref, dtype, "inference y")
    return y


# ---------------------------------------------------------------------------------------------
# Every layout and dtype, NumPy path and emulated kernels (their default plans)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
def test_fused_matches_composition(backend, rng, shape, axis, dtype):
    if backend.name == "cuda" and BFLOAT16 is not None and np.dtype(dtype) == BFLOAT16:
        pytest.skip("CuPy has no bfloat16 arrays")
    check_fused(backend.call, rng, shape, axis, dtype)


@pytest.mark.parametrize("relu,residual", [(True, False), (False, True)], ids=["relu-only", "add-only"])
@pytest.mark.parametrize("shape,axis", [((64, 10), 0), ((4, 6, 5, 3), (0, 2, 3))], ids=["NC", "NCHW"])
def test_one_half_of_the_epilogue(backend, rng, shape, axis, relu, residual):
    """Each half alone: relu(bn(x)) (no residual) and bn(x) + r (no activation: dresidual = dy)."""
    check_fused(backend.call, rng, shape, axis, np.float32, relu=relu, residual=residual, running=False)


# every strategy of the NumPy path, forced (numpy_path's table): the epilogue in each output step
STRATEGIES = {
    "small-jit": dict(jit="1"),
    "small": dict(jit="0"),
    "jit": dict(jit="1", small=0),
    "direct": dict(jit="0", small=0, block=1 << 30),
    "blocks": dict(jit="0", small=0, block=256),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
@pytest.mark.parametrize("shape,axis", [((48, 24), 0), ((4, 6, 5, 7), (0, 2, 3)), ((4, 5, 7, 6), (0, 1, 2))],
                         ids=["NC", "NCHW", "NHWC"])
def test_numpy_strategies(monkeypatch, rng, strategy, shape, axis, dtype):
    s = STRATEGIES[strategy]
    if s["jit"] == "1":
        pytest.importorskip("numba")
    monkeypatch.setenv("GPU_CPU_JIT", s["jit"])
    if "small" in s:
        monkeypatch.setattr(numpy_path, "SMALL_ELEMENTS", s["small"])
    if "block" in s:
        monkeypatch.setattr(_cpu, "BLOCK_BYTES", s["block"])
    x = np.zeros(shape, dtype)
    assert numpy_path.strategy("forward", x, axis) == strategy or strategy == "jit" and \
        numpy_path.strategy("backward", x, axis, x) == "jit"
    check_fused(lambda fn, *a, **k: fn(*a, **k), rng, shape, axis, dtype)


# ---------------------------------------------------------------------------------------------
# Residual layouts and aliasing
# ---------------------------------------------------------------------------------------------

def test_residual_is_x(backend, rng):
    """relu(bn(x) + x): the residual may be x itself (read only, y is a new array)."""
    x, x64 = _rand(rng, (32, 8), np.float32, 2.0)
    y, _, _ = backend.call(gpu.batch_norm_forward, x, residual=x, activation="relu")
    ref = ref_forward(x64, np.ones(8), np.zeros(8), x64, 0, True)[0]
    _check(y, ref, np.float32, "y")


@pytest.mark.parametrize("make", ["transposed", "strided", "channels_last"])
def test_residual_of_another_layout(backend, rng, make):
    """A residual whose strides differ from x's (any layout x may have)."""
    shape, axis = (4, 6, 5, 3), (0, 2, 3)
    x, x64 = _rand(rng, shape, np.float32, 2.0)
    base = rng.standard_normal((4, 5, 3, 6)).astype(np.float32)
    r = {"transposed": np.ascontiguousarray(base.transpose(0, 3, 1, 2).transpose(3, 2, 1, 0)).transpose(3, 2, 1, 0),
         "strided": np.repeat(rng.standard_normal(shape).astype(np.float32), 2, axis=3)[..., ::2],
         "channels_last": base.transpose(0, 3, 1, 2)}[make]
    assert r.shape == shape and not r.flags.c_contiguous
    y, _, _ = backend.call(gpu.batch_norm_forward, x, axis=axis, residual=r, activation="relu")
    ref = ref_forward(x64, np.ones(6), np.zeros(6), r.astype(np.float64), axis, True)[0]
    _check(y, ref, np.float32, "y")


def test_nan_passes_relu(rng):
    """relu keeps a NaN (torch's clamp_min), and its gradient there is 0 (y > 0 is false)."""
    x, _ = _rand(rng, (16, 4), np.float32)
    r = np.zeros_like(x)
    r[3, 1] = np.nan
    y, mean, invstd = gpu.batch_norm_forward(x, residual=r, activation="relu")
    assert np.isnan(y[3, 1]) and np.isfinite(np.delete(y.reshape(-1), 3 * 4 + 1)).all()
    dx, _, _, dres = gpu.batch_norm_backward(np.ones_like(x), x, None, mean, invstd, activation="relu", y=y,
                                             residual_grad=True)
    assert dres[3, 1] == 0


def test_without_residual_grad_three_results(rng):
    x, _ = _rand(rng, (16, 4), np.float32)
    y, mean, invstd = gpu.batch_norm_forward(x, activation="relu")
    assert len(gpu.batch_norm_backward(np.ones_like(x), x, None, mean, invstd, activation="relu", y=y)) == 3


def test_dresidual_without_activation_is_a_copy_of_dy(rng):
    x, _ = _rand(rng, (16, 4), np.float32)
    dy, _ = _rand(rng, (16, 4), np.float32)
    _, mean, invstd = gpu.batch_norm_forward(x, residual=x)
    dres = gpu.batch_norm_backward(dy, x, None, mean, invstd, residual_grad=True)[3]
    assert np.array_equal(dres, dy) and not np.shares_memory(dres, dy)


def test_convenience_form_passes_the_epilogue(rng):
    x, x64 = _rand(rng, (16, 4), np.float32)
    r, r64 = _rand(rng, (16, 4), np.float32)
    y = gpu.batch_norm(x, residual=r, activation="relu")
    _check(y, ref_forward(x64, np.ones(4), np.zeros(4), r64, 0, True)[0], np.float32, "training")
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    yi = gpu.batch_norm(x, training=False, running_mean=rm, running_var=rv, residual=r, activation="relu")
    _check(yi, np.maximum(x64 / np.sqrt(1 + EPS) + r64, 0), np.float32, "inference")


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError or TypeError naming the argument, before any work
# ---------------------------------------------------------------------------------------------

def _bad_forward(rng):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    return x


@pytest.mark.parametrize("fn", ["forward", "inference", "batch_norm"])
@pytest.mark.parametrize("residual,exc,match", [
    (np.zeros((8, 5), np.float32), ValueError, "residual: shape"),       # another shape
    (np.zeros((4, 8), np.float32).T, None, None),                        # another layout: fine
    (np.zeros((8, 4), np.float64), TypeError, "residual: dtype"),        # another dtype
    ([[0.0] * 4] * 8, TypeError, "residual: expected an array"),         # not an array
], ids=["shape", "layout-ok", "dtype", "list"])
def test_bad_residual(backend, rng, fn, residual, exc, match):
    x = _bad_forward(rng)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    call = {"forward": lambda: backend.call(gpu.batch_norm_forward, x, residual=residual),
            "inference": lambda: backend.call(gpu.batch_norm_inference, x, None, None, rm, rv, residual=residual),
            "batch_norm": lambda: backend.call(gpu.batch_norm, x, residual=residual)}[fn]
    if exc is None:
        call()
        return
    with pytest.raises(exc, match=match):
        call()


def test_bad_residual_library(rng):
    torch = pytest.importorskip("torch")
    x = _bad_forward(rng)
    with pytest.raises(TypeError, match="residual"):
        gpu.batch_norm_forward(x, residual=torch.zeros(8, 4))


@pytest.mark.parametrize("activation", ["gelu", "ReLU", 1, True])
def test_bad_activation(rng, activation):
    x = _bad_forward(rng)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    for call in (lambda: gpu.batch_norm_forward(x, activation=activation),
                 lambda: gpu.batch_norm_inference(x, None, None, rm, rv, activation=activation),
                 lambda: gpu.batch_norm_backward(x, x, None, rm, rv, activation=activation, y=x)):
        with pytest.raises(ValueError, match="activation"):
            call()


def test_bad_backward_y(backend, rng):
    x = _bad_forward(rng)
    y, mean, invstd = gpu.batch_norm_forward(x, activation="relu")

    def bwd(**kw):
        return backend.call(gpu.batch_norm_backward, x, x, None, mean, invstd, **kw)

    with pytest.raises(ValueError, match="y: required"):
        bwd(activation="relu")
    with pytest.raises(ValueError, match="y: shape"):
        bwd(activation="relu", y=y[:4])
    with pytest.raises(TypeError, match="y: dtype"):
        bwd(activation="relu", y=y.astype(np.float64))
    with pytest.raises(TypeError, match="residual_grad"):
        bwd(activation="relu", y=y, residual_grad=1)


def test_checks_survive_the_validated_call_cache(rng):
    """A call that passed the checks is remembered by its signature: the epilogue's arrays and
    the activation are part of it, so a bad residual after a good call still fails."""
    x = _bad_forward(rng)
    r = np.zeros_like(x)
    for _ in range(2):
        gpu.batch_norm_forward(x, residual=r, activation="relu")
    with pytest.raises(ValueError, match="residual: shape"):
        gpu.batch_norm_forward(x, residual=np.zeros((8, 5), np.float32), activation="relu")
    with pytest.raises(ValueError, match="activation"):
        gpu.batch_norm_forward(x, residual=r, activation="tanh")
    y, mean, invstd = gpu.batch_norm_forward(x, activation="relu")
    for _ in range(2):
        gpu.batch_norm_backward(x, x, None, mean, invstd, activation="relu", y=y)
    with pytest.raises(ValueError, match="y: required"):
        gpu.batch_norm_backward(x, x, None, mean, invstd, activation="relu")
