"""Softmax, log-softmax, hardmax and softmax + cross-entropy on every backend, against gpu/bench/reference.py."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

import gpu
from gpu import _cpu
from gpu.bench import reference as ref
from conftest import DTYPES, TOL, assert_close, dtype_id, random, rel_err, to_numpy

# (shape, class axis): the layouts users have and the awkward sizes, each with its reason.
CASES = [
    ((4, 10), -1),         # (batch, classes)
    ((1, 7), -1),          # one row
    ((5, 1), -1),          # one class: softmax 1, log-softmax 0, loss 0
    ((6, 2), -1),          # two classes
    ((3, 31), -1),         # just under a warp
    ((3, 33), -1),         # just past a warp
    ((2, 1025), -1),       # just past 1024 classes
    ((10, 6), 0),          # the seed's output layer: (classes, m), classes on axis 0
    ((2, 5, 3, 4), 1),     # NCHW-style per-pixel classes on axis 1
    ((3, 4, 37), -1),      # several batch axes, a prime number of classes
    ((13,), 0),            # 1-D: a single row
]
CASE_IDS = [f"{s}-ax{a}" for s, a in CASES]


def _row_shape(shape, axis):
    axis %= len(shape)
    return shape[:axis] + shape[axis + 1:]


# ---------------------------------------------------------------------------------------------
# softmax, log_softmax, hardmax
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_softmax_and_log_softmax(backend, rng, shape, axis, dtype):
    z, z64 = random(rng, shape, dtype, scale=3.0)
    p = backend.call(gpu.softmax, z, axis=axis)
    logp = backend.call(gpu.log_softmax, z, axis=axis)
    assert to_numpy(p).dtype == dtype and to_numpy(logp).dtype == dtype
    assert_close(p, ref.softmax(z64, axis), dtype, "softmax")
    want = ref.log_softmax(z64, axis)
    if np.abs(want).max() > 0:   # one class: log-softmax is exactly 0
        assert_close(logp, want, dtype, "log_softmax", factor=2)
    else:
        assert (to_numpy(logp) == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_hardmax(backend, rng, shape, axis, dtype):
    z, z64 = random(rng, shape, dtype)
    out = backend.call(gpu.hardmax, z, axis=axis)
    assert to_numpy(out).dtype == dtype
    np.testing.assert_array_equal(to_numpy(out).astype(np.float64), ref.hardmax(z64, axis))


def test_hardmax_ties_and_nan(backend):
    z = np.array([[1.0, 3.0, 3.0, 0.0],          # tie: the first maximum wins
                  [2.0, np.nan, 5.0, np.nan],    # NaN counts as the maximum, the first NaN wins
                  [-np.inf] * 4,                 # all -inf: index 0, as argmax
                  [7.0, 7.0, 7.0, 7.0]], np.float32)
    out = to_numpy(backend.call(gpu.hardmax, z))
    np.testing.assert_array_equal(out, np.eye(4, dtype=np.float32)[[1, 1, 0, 0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
def test_extreme_logits(backend, dtype):
    z = np.array([[1e30, 0.0, -1e30],          # far beyond exp's range
                  [1e4, 1e4 - 1, -np.inf],     # large offset, a -inf entry
                  [-np.inf, -np.inf, 0.0],     # only one finite entry
                  [-np.inf, -np.inf, -np.inf]], dtype)  # nothing finite: NaN, as PyTorch
    p = to_numpy(backend.call(gpu.softmax, z)).astype(np.float64)
    logp = to_numpy(backend.call(gpu.log_softmax, z)).astype(np.float64)
    e = 1 / (1 + np.exp(-1.0))
    want_p = np.array([[1, 0, 0], [e, 1 - e, 0], [0, 0, 1], [np.nan] * 3])
    want_logp = np.array([[0, -1e30, -2e30], [np.log(e), np.log(1 - e), -np.inf], [-np.inf, -np.inf, 0],
                          [np.nan] * 3])
    assert rel_err(p, want_p) <= TOL[np.dtype(dtype)]
    assert rel_err(logp, want_logp) <= TOL[np.dtype(dtype)]


def test_float16_large_logits(backend):
    # float16's largest values: exp overflows unless the maximum is subtracted first
    z = np.array([[65000.0, 64990.0, -65000.0]], np.float16)
    p = to_numpy(backend.call(gpu.softmax, z)).astype(np.float64)
    assert_close(p, ref.softmax(z.astype(np.float64), -1), np.float16, "softmax")


# ---------------------------------------------------------------------------------------------
# softmax_cross_entropy and its backward
# ---------------------------------------------------------------------------------------------

CE_CASES = [c for c in CASES if c[0] not in ((2, 1025), (13,))] + [((7,), 0)]
OPTIONS = [
    dict(),                                                    # PyTorch's defaults
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.1),
    dict(weight=True),
    dict(weight=True, label_smoothing=0.25, reduction="none"),
    dict(ignore=True),                                         # some targets set to ignore_index
    dict(ignore=True, weight=True, label_smoothing=0.3),
    dict(probs=True),                                          # class-probability targets
    dict(probs=True, weight=True, label_smoothing=0.2, reduction="sum"),
    dict(probs=True, reduction="none"),
]
OPTION_IDS = ["-".join(f"{k}={v}" if v is not True else k for k, v in o.items()) or "defaults" for o in OPTIONS]


def _ce_inputs(rng, shape, axis, dtype, opts):
    z, z64 = random(rng, shape, dtype, scale=2.0)
    C = shape[axis]
    rows = _row_shape(shape, axis)
    kw = {k: v for k, v in opts.items() if k in ("reduction", "label_smoothing")}
    if opts.get("weight"):
        kw["weight"] = (rng.random(C) + 0.5).astype(np.float32)
    if opts.get("probs"):
        t = rng.random(shape)
        target = (t / t.sum(axis=axis, keepdims=True)).astype(np.float32)
    else:
        target = rng.integers(0, C, rows)
        if opts.get("ignore") and target.size > 1:
            target.reshape(-1)[:: 3] = -100
    return z, z64, target, kw


@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,axis", CE_CASES, ids=[f"{s}-ax{a}" for s, a in CE_CASES])
def test_cross_entropy(backend, rng, shape, axis, dtype, opts):
    z, z64, target, kw = _ce_inputs(rng, shape, axis, dtype, opts)
    want_loss, want_dz = ref.softmax_cross_entropy(z64, target, axis=axis, **kw)
    loss = backend.call(gpu.softmax_cross_entropy, z, target, axis=axis, **kw)
    loss2, dz = backend.call(gpu.softmax_cross_entropy, z, target, axis=axis, return_grad=True, **kw)
    dz_only = backend.call(gpu.softmax_cross_entropy_backward, z, target, axis=axis, **kw)
    assert to_numpy(loss).dtype == dtype and to_numpy(dz).dtype == dtype
    assert to_numpy(loss).shape == np.shape(want_loss)
    np.testing.assert_array_equal(to_numpy(loss), to_numpy(loss2))
    np.testing.assert_array_equal(to_numpy(dz), to_numpy(dz_only))
    if np.linalg.norm(np.atleast_1d(want_loss)) > 0:   # one class: the loss is exactly 0
        assert_close(loss, want_loss, dtype, "loss", factor=2)
    if np.linalg.norm(want_dz) > 0:
        assert_close(dz, want_dz, dtype, "dz", factor=2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_backward_scales_by_dloss(backend, rng, reduction):
    z, z64 = random(rng, (5, 3, 4), np.float64)
    target = rng.integers(0, 3, (5, 4))
    dloss = rng.standard_normal((5, 4)) if reduction == "none" else np.float64(rng.standard_normal())
    dz = backend.call(gpu.softmax_cross_entropy_backward, z, target, dloss, axis=1, reduction=reduction,
                      label_smoothing=0.1)
    _, want = ref.softmax_cross_entropy(z64, target, axis=1, reduction=reduction, label_smoothing=0.1, dloss=dloss)
    assert_close(dz, want, np.float64, "dz")


def test_all_targets_ignored(backend, rng):
    # PyTorch: the mean over no targets is NaN, and its gradient is 0
    z, _ = random(rng, (4, 5), np.float32)
    target = np.full(4, -100)
    loss, dz = backend.call(gpu.softmax_cross_entropy, z, target, return_grad=True)
    assert np.isnan(to_numpy(loss))
    assert (to_numpy(dz) == 0).all()
    assert to_numpy(backend.call(gpu.softmax_cross_entropy, z, target, reduction="sum")) == 0


def test_ignore_index_inside_class_range(backend, rng):
    # ignore_index may name a real class: those rows are skipped
    z, z64 = random(rng, (6, 4), np.float64)
    target = np.array([0, 1, 2, 3, 0, 1])
    loss = backend.call(gpu.softmax_cross_entropy, z, target, ignore_index=0)
    want, _ = ref.softmax_cross_entropy(z64, target, ignore_index=0)
    assert_close(loss, want, np.float64, "loss")


def test_gradient_matches_finite_differences(rng):
    z = rng.standard_normal((3, 5, 2))
    target = np.array([[0, 4], [-100, 2], [1, 1]])
    kw = dict(axis=1, weight=rng.random(5) + 0.5, label_smoothing=0.2)
    _, dz = gpu.softmax_cross_entropy(z, target, return_grad=True, **kw)
    num = np.zeros_like(z)
    h = 1e-6
    for i in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[i] += h
        zm[i] -= h
        num[i] = (gpu.softmax_cross_entropy(zp, target, **kw) - gpu.softmax_cross_entropy(zm, target, **kw)) / (2 * h)
    assert rel_err(dz, num) < 1e-7


@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
def test_matches_torch(backend, rng, opts):
    torch = pytest.importorskip("torch")
    z, z64, target, kw = _ce_inputs(rng, (6, 5, 3), 1, np.float64, opts)
    loss, dz = backend.call(gpu.softmax_cross_entropy, z, target, axis=1, return_grad=True, **kw)
    zt = torch.tensor(z64, requires_grad=True)
    tkw = dict(kw, weight=torch.tensor(kw["weight"], dtype=torch.float64)) if "weight" in kw else kw
    tt = torch.tensor(target if target.dtype.kind in "iu" else target.astype(np.float64))
    lt = torch.nn.functional.cross_entropy(zt, tt, **tkw)
    lt.sum().backward()
    assert rel_err(loss, lt.detach().numpy()) < 1e-12
    assert rel_err(dz, zt.grad.numpy()) < 1e-12


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before anything runs
# ---------------------------------------------------------------------------------------------

Z = np.random.default_rng(3).standard_normal((4, 5)).astype(np.float32)
T = np.array([0, 1, 2, 3])


@pytest.mark.parametrize("call,exc,match", [
    (lambda: gpu.softmax(Z.astype(np.int64)), TypeError, "z: dtype int64"),
    (lambda: gpu.softmax(Z, axis=2), ValueError, "axis: axis 2 is out of bounds"),
    (lambda: gpu.softmax(Z, axis=(0, 1)), TypeError, "axis: expected a single int"),
    (lambda: gpu.hardmax(np.float32(1)), ValueError, "z: expected an array with at least one"),
    (lambda: gpu.softmax_cross_entropy(Z, np.array([0, 1, 5, 3])), ValueError,
     r"target: class index 5 at position \(2,\) is out of range \[0, 5\)"),
    (lambda: gpu.softmax_cross_entropy(Z, np.array([0, -1, 2, 3])), ValueError, "class index -1 at position"),
    (lambda: gpu.softmax_cross_entropy(Z, np.array([0, 1, 2])), ValueError, "target: class indices must have"),
    (lambda: gpu.softmax_cross_entropy(Z, Z[:, :4]), ValueError, "target: class probabilities must have"),
    (lambda: gpu.softmax_cross_entropy(Z, T.astype(bool)), TypeError, "target: dtype bool"),
    (lambda: gpu.softmax_cross_entropy(Z, None), TypeError, "target"),
    (lambda: gpu.softmax_cross_entropy(Z, T, reduction="avg"), ValueError, "reduction: expected one of"),
    (lambda: gpu.softmax_cross_entropy(Z, T, label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda: gpu.softmax_cross_entropy(Z, T, weight=np.ones(4)), ValueError, "weight: expected shape"),
    (lambda: gpu.softmax_cross_entropy(Z, T, weight=np.ones(5, np.int32)), TypeError, "weight: dtype"),
    (lambda: gpu.softmax_cross_entropy(Z, T, ignore_index=1.5), TypeError, "ignore_index"),
    (lambda: gpu.softmax_cross_entropy_backward(Z, T, np.ones(4)), ValueError, "dloss: shape"),
    (lambda: gpu.softmax_cross_entropy_backward(Z, T, np.ones(3), reduction="none"), ValueError, "dloss: shape"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_target_raises_on_every_backend(backend):
    target = np.array([0, 1, 2, 9])
    if backend.name == "numpy":   # the reference path raises in the call
        with pytest.raises(ValueError, match=r"class index 9 at position \(3,\)"):
            backend.call(gpu.softmax_cross_entropy, Z, target)
        return
    # the kernel paths keep the check on the device: the row counts as ignored, and the error
    # comes at the next explicit check (no sync in the call)
    gpu.check_errors()
    loss = backend.call(gpu.softmax_cross_entropy, Z, target)
    want = gpu.softmax_cross_entropy(Z, np.array([0, 1, 2, -100]))
    np.testing.assert_allclose(np.asarray(loss.get() if hasattr(loss, "get") else loss), want, rtol=1e-5)
    with pytest.raises(ValueError, match=r"class index 9 at row 3 \(flat.* out of range \[0, 5\)"):
        gpu.check_errors()
    gpu.check_errors()            # read once: cleared
    # eager checks: the call itself raises, with the position
    previous = gpu.set_eager_checks(True)
    try:
        with pytest.raises(ValueError, match=r"class index 9 at position \(3,\)"):
            backend.call(gpu.softmax_cross_entropy, Z, target)
    finally:
        gpu.set_eager_checks(previous)
    gpu.check_errors()


def test_first_bad_target_sticks_until_checked(dev):
    """Several bad calls before a check: the first one is reported, then nothing is left."""
    gpu.check_errors()
    dev.call(gpu.softmax_cross_entropy, Z, np.array([0, 7, 2, 3]))
    dev.call(gpu.softmax_cross_entropy, Z, T)                        # a good call keeps the record
    dev.call(gpu.softmax_cross_entropy, Z, np.array([0, 1, -4, 3]), return_grad=True)
    with pytest.raises(ValueError, match=r"class index 7 at row 1 "):
        gpu.check_errors()
    gpu.check_errors()


def test_validated_calls_skip_the_checks_backward_included(monkeypatch):
    # a kernel-path call like one that passed the checks (the arrays' signature and the options)
    # skips them, the backward as the forward; dloss, which no signature holds, is checked every call
    z, t = Z.copy(), T.copy()
    with gpu.use_backend("emulate"):
        want = gpu.softmax_cross_entropy_backward(z, t, 2.0, label_smoothing=0.1)
        gpu.softmax_cross_entropy(z, t, return_grad=True, label_smoothing=0.1)

        def checked(*args, **kwargs):
            raise AssertionError("a validated call was checked again")

        monkeypatch.setattr(gpu._backend, "as_float_array", checked)
        np.testing.assert_array_equal(gpu.softmax_cross_entropy_backward(z, t, 2.0, label_smoothing=0.1), want)
        gpu.softmax_cross_entropy(z, t, return_grad=True, label_smoothing=0.1)
        with pytest.raises(ValueError, match="dloss: shape"):
            gpu.softmax_cross_entropy_backward(z, t, np.ones(4), label_smoothing=0.1)
        with pytest.raises(TypeError, match="dloss: expected a real"):
            gpu.softmax_cross_entropy_backward(z, t, "1", label_smoothing=0.1)


def test_repeated_call_converts_a_big_endian_z_again():
    # the checks convert a big-endian z to a native copy; a repeated kernel-path call (a validated
    # signature) must not hand the kernels the caller's big-endian bytes
    z = Z.astype(">f4")
    want = gpu.softmax_cross_entropy(Z, T)
    with gpu.use_backend("emulate"):
        for _ in range(2):
            np.testing.assert_allclose(gpu.softmax_cross_entropy(z, T), want, rtol=1e-6)


def test_no_classes_checks_the_targets_every_call(backend):
    # no classes: every index not ignored is out of range, found from the targets' values, which
    # no signature holds; raised in the call on every backend (nothing is launched)
    z = np.zeros((3, 0), np.float32)
    backend.call(gpu.softmax_cross_entropy, z, np.array([-100, -100, -100]))
    with pytest.raises(ValueError, match=r"class index 0 at position \(1,\) is out of range \[0, 0\)"):
        backend.call(gpu.softmax_cross_entropy, z, np.array([-100, 0, -100]))


@pytest.mark.parametrize("shape,axis", [((23, 7), -1), ((7, 23), 0), ((5, 3, 6), 1), ((6, 4, 9), -1)],
                         ids=["classes-last", "classes-first", "middle",
                              "rows-2d"])   # a block holds 2 x 4 rows: its target offsets skip 4 rows a step
def test_numpy_path_row_blocks(monkeypatch, rng, shape, axis):
    # the NumPy path works on row blocks sized for the cache above DIRECT_BYTES; force blocks of
    # about 2 rows
    sm = importlib.import_module("gpu.ops.softmax.numpy_path")
    monkeypatch.setattr(_cpu, "BLOCK_BYTES", 2 * 4 * shape[axis])
    monkeypatch.setattr(sm, "DIRECT_BYTES", 0)
    z, z64, target, kw = _ce_inputs(rng, shape, axis, np.float32, dict(ignore=True, weight=True,
                                                                         label_smoothing=0.1))
    loss, dz = gpu.softmax_cross_entropy(z, target, axis=axis, return_grad=True, **kw)
    want, want_dz = ref.softmax_cross_entropy(z64, target, axis=axis, **kw)
    assert_close(loss, want, np.float32, "loss")
    assert_close(dz, want_dz, np.float32, "dz")
    assert_close(gpu.softmax(z, axis), ref.softmax(z64, axis), np.float32, "softmax")
    assert_close(gpu.log_softmax(z, axis), ref.log_softmax(z64, axis), np.float32, "log_softmax")
