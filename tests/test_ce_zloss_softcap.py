"""softmax_cross_entropy's z-loss (PaLM) and logit soft-cap (Gemma 2), on the NumPy path and the
kernels (the emulator; marker `kernel`), against the float64 reference gpu.bench.reference.

The reference applies the soft-cap and the z-loss in their textbook form (tanh, logsumexp, its
square); the ops fuse both into the pass over the logits. Every option combines with them:
ignore_index (ignored rows add no z-loss), label_smoothing, weight (it does not scale the
z-loss; 'mean' averages the z-loss over non-ignored rows, Liger-Kernel's convention), reduction,
probability targets, return_grad, softmax_cross_entropy_backward, and every kernel path.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import gpu
from gpu._engines import rows
from gpu.bench import reference as ref
from conftest import DTYPES, assert_close, dtype_id, random


F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

#: kernel paths forced at small sizes (tests/test_softmax_kernels.py has the same table)
PATHS = {
    "warp": {},                                                 # C <= 1024: a lane group per row
    "block_cached": {"warp_max_cols": 0},                       # a block per row, row in shared memory
    "block_online": {"warp_max_cols": 0, "smem_bytes": 0},      # a block per row, row read twice
    # a block of 32 threads per row, its first (96 // 16 - 2) * pack columns in shared memory (half
    # that with probability targets), the rest read twice
    "block_partial": {"warp_max_cols": 0, "smem_bytes": 96, "block_threads": 32},
}

EXTRA = {
    "zloss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.5},                                # |z| up to ~7: the cap bites
    "both": {"z_loss": 0.3, "softcap": 4.0},                    # a large z_loss: its gradient matters
}


def _targets(rng, row_shape, C, kind, ignore_index=-100):
    if kind == "probs":
        t = rng.random(row_shape + (C,)) + 0.1
        return t / t.sum(-1, keepdims=True)
    t = rng.integers(0, C, row_shape)
    if kind == "ignore" and t.size:
        t.flat[::3] = ignore_index
    return t


def _reference(z, t, axis=-1, **opts):
    w = opts.pop("weight", None)
    return ref.softmax_cross_entropy(z.astype(np.float64), t, axis=axis, return_z_loss=True,
                                     weight=None if w is None else w.astype(np.float64), **opts)


def _run(backend, fn, *args, path="warp", **kwargs):
    with rows.tuned(**PATHS[path]):
        return backend.call(fn, *args, **kwargs)


def _check(backend, z, t, dtype, axis=-1, path="warp", reductions=("mean", "sum", "none"), factor=2, **opts):
    for red in reductions:
        loss, zt, dz = _run(backend, gpu.softmax_cross_entropy, z, t, axis=axis, reduction=red, return_grad=True,
                            return_z_loss=True, path=path, **opts)
        loss_only = _run(backend, gpu.softmax_cross_entropy, z, t, axis=axis, reduction=red, path=path, **opts)
        want_loss, want_z, want_dz = _reference(z, t, axis=axis, reduction=red, **opts)
        assert loss.dtype == dtype and zt.dtype == dtype and dz.dtype == dtype
        assert zt.shape == np.shape(want_z) and dz.shape == z.shape
        assert_close(loss, want_loss, dtype, f"loss {red}", factor=factor)
        assert_close(loss_only, want_loss, dtype, f"loss-only {red}", factor=factor)
        assert_close(zt, want_z, dtype, f"z-loss term {red}", factor=factor)
        assert_close(dz, want_dz, dtype, f"dz {red}", factor=factor)


# ---------------------------------------------------------------------------------------------
# Every option combination, on the NumPy path and the emulated kernels
# ---------------------------------------------------------------------------------------------

OPTIONS = [
    ("index", {}),
    ("ignore", {}),                                             # every third row ignored: no z-loss there
    ("ignore", {"label_smoothing": 0.1}),
    ("index", {"weight": True}),                                # the weight does not scale the z-loss
    ("ignore", {"weight": True, "label_smoothing": 0.2}),       # two 'mean' denominators: sum w_t and rows
    ("index", {"ignore_index": 3}),                             # a valid class used as ignore_index
    ("probs", {}),
    ("probs", {"weight": True, "label_smoothing": 0.3}),
]


@pytest.mark.parametrize("extra", list(EXTRA))
@pytest.mark.parametrize("kind,opts", OPTIONS, ids=[f"{k}-{'-'.join(o) or 'plain'}" for k, o in OPTIONS])
def test_options(backend, rng, kind, opts, extra):
    C = 11
    z, _ = random(rng, (7, C), F32, scale=3.0)
    opts = dict(opts) | EXTRA[extra]
    if opts.get("weight"):
        opts["weight"] = (rng.random(C) + 0.5).astype(F32)
    _check(backend, z, _targets(rng, (7,), C, kind, opts.get("ignore_index", -100)), F32, **opts)


# ---------------------------------------------------------------------------------------------
# Kernel paths, shapes and dtypes (emulator)
# ---------------------------------------------------------------------------------------------

SHAPES = [
    # (shape, axis, path)
    ((5, 1), -1, "warp"),             # vocab 1: the loss is the z-loss alone (lse = z'), dz from it
    ((6, 7), -1, "warp"),             # vocab 7: prime, lanes = 8
    ((3, 33), -1, "warp"),            # just past a warp: two values per lane
    ((2, 128), -1, "warp"),           # vector loads
    ((3, 1), -1, "block_cached"),     # vocab 1 on the block path
    ((3, 37), -1, "block_cached"),    # prime: misaligned rows, scalar head and tail
    ((3, 7), -1, "block_online"),     # vocab 7, online path (row read twice: the cap taken twice)
    ((2, 64), -1, "block_online"),    # online path, aligned vectors
    ((3, 37), -1, "block_partial"),   # a cached prefix, the rest read twice (the cap taken twice there)
    ((2, 300), -1, "block_partial"),  # several vectors per thread, unrolled pass 1 (float64)
    ((7, 6), 0, "warp"),              # the seed's (classes, m): strided, inner 6
    ((2, 5, 3), 1, "warp"),           # NCHW-style, strided
]


@pytest.mark.kernel
@pytest.mark.parametrize("kind", ["ignore", "probs"])
@pytest.mark.parametrize("shape,axis,path", SHAPES, ids=[f"{s}-ax{a}-{p}" for s, a, p in SHAPES])
def test_kernel_paths(rng, shape, axis, path, kind):
    from conftest import Backend
    C = shape[axis]
    z, _ = random(rng, shape, F32, scale=3.0)
    row_shape = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    t = _targets(rng, row_shape, C, kind)
    if kind == "probs":
        t = np.moveaxis(t, -1, axis)
    w = (rng.random(C) + 0.5).astype(F32)
    _check(Backend("emulate"), z, t, F32, axis=axis, path=path, z_loss=0.2, softcap=3.0, weight=w,
           label_smoothing=0.1)


@pytest.mark.kernel
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_kernel_dtypes(rng, dtype, path):
    # float16/bfloat16 compute in float32; float64 has its own inline tanh (rows.cuh): its small-
    # argument series and its exp branch are both taken (|z / cap| from 0 to ~3)
    from conftest import Backend
    z, _ = random(rng, (4, 40), dtype, scale=3.0)
    t = _targets(rng, (4,), 40, "ignore")
    _check(Backend("emulate"), z, t, dtype, path=path, reductions=("mean", "none"), z_loss=0.05, softcap=2.0)


@pytest.mark.kernel
def test_kernel_natural_block_switch(rng):
    # 1025 classes: the warp path's limit passed without forcing, the block path picks it up
    from conftest import Backend
    z, _ = random(rng, (2, 1025), F32, scale=3.0)
    _check(Backend("emulate"), z, _targets(rng, (2,), 1025, "index"), F32, reductions=("mean",),
           z_loss=1e-3, softcap=5.0)


# ---------------------------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------------------------

def test_fused_gradient_matches_finite_differences(rng):
    # the NumPy path's gradient of loss(z) in float64, through the cap, z-loss, weight, smoothing
    z = rng.standard_normal((3, 5)) * 3
    t = np.array([1, -100, 4])
    w = rng.random(5) + 0.5
    opts = dict(z_loss=0.3, softcap=2.0, weight=w, label_smoothing=0.1)
    _, dz = gpu.softmax_cross_entropy(z, t, return_grad=True, **opts)
    eps, fd = 1e-6, np.empty_like(z)
    for i in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[i] += eps
        zm[i] -= eps
        fd[i] = (gpu.softmax_cross_entropy(zp, t, **opts) - gpu.softmax_cross_entropy(zm, t, **opts)) / (2 * eps)
    np.testing.assert_allclose(dz, fd, rtol=1e-6, atol=1e-9)


def test_zero_options_change_nothing(backend, rng):
    # z_loss=0 and softcap=None are the plain cross-entropy, bit for bit
    z, _ = random(rng, (5, 9), F32)
    t = _targets(rng, (5,), 9, "ignore")
    a = backend.call(gpu.softmax_cross_entropy, z, t, return_grad=True)
    b = backend.call(gpu.softmax_cross_entropy, z, t, return_grad=True, z_loss=0.0, softcap=None)
    for x, y in zip(a, b):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    loss, zt = backend.call(gpu.softmax_cross_entropy, z, t, return_z_loss=True)
    assert zt == 0 and loss == a[0]


def test_return_order_and_zloss_is_in_the_loss(backend, rng):
    z, _ = random(rng, (6, 9), F32)
    t = _targets(rng, (6,), 9, "index")
    plain = backend.call(gpu.softmax_cross_entropy, z, t, reduction="none")
    loss, zt = backend.call(gpu.softmax_cross_entropy, z, t, reduction="none", z_loss=0.1, return_z_loss=True)
    np.testing.assert_allclose(loss, plain + zt, rtol=1e-5)
    out = backend.call(gpu.softmax_cross_entropy, z, t, z_loss=0.1, return_z_loss=True, return_grad=True)
    assert len(out) == 3 and out[2].shape == z.shape and np.ndim(out[1]) == 0


def test_ignored_rows_add_no_zloss(backend):
    # ignored rows (this one's z-loss would be 0.5 * 300^2) add no z-loss and get a zero gradient;
    # 'mean' of the z-loss over the two live rows, not over the weight sum
    z = np.array([[1.0, 2.0, 3.0], [100.0, 200.0, 300.0], [0.5, -1.0, 2.0]], np.float32)
    t = np.array([0, -100, 2])
    w = np.array([2.0, 1.0, 4.0], np.float32)
    loss, zt, dz = backend.call(gpu.softmax_cross_entropy, z, t, weight=w, z_loss=0.5, return_z_loss=True,
                                return_grad=True)
    lse = np.log(np.exp(z[[0, 2]].astype(np.float64)).sum(-1))
    np.testing.assert_allclose(zt, 0.5 * (lse ** 2).mean(), rtol=1e-6)
    assert np.isfinite(loss) and (dz[1] == 0).all()
    rows = backend.call(gpu.softmax_cross_entropy, z, t, reduction="none", z_loss=0.5, return_z_loss=True)[1]
    assert rows[1] == 0


def test_all_ignored_and_no_rows(backend):
    z = np.ones((3, 4), np.float32)
    t = np.full(3, -100)
    loss, zt, dz = backend.call(gpu.softmax_cross_entropy, z, t, z_loss=0.1, softcap=2.0, return_z_loss=True,
                                return_grad=True)
    assert np.isnan(loss) and np.isnan(zt) and (dz == 0).all()       # a mean over nothing: NaN
    assert backend.call(gpu.softmax_cross_entropy, z, t, reduction="sum", z_loss=0.1, return_z_loss=True)[1] == 0
    empty = np.empty((0, 4), np.float32)
    loss, zt = backend.call(gpu.softmax_cross_entropy, empty, np.empty(0, np.int64), reduction="none", z_loss=0.1,
                            return_z_loss=True)
    assert loss.shape == zt.shape == (0,)


def test_softcap_bounds_extreme_logits(backend):
    # the cap maps +-inf and 1e30 to +-cap: every loss and gradient is finite (NaN stays NaN)
    z = np.array([[1e30, -1e30, 0.0], [-np.inf, 0.0, np.inf], [-np.inf] * 3], np.float32)
    t = np.array([1, 0, 2])
    with np.errstate(invalid="ignore", over="ignore"):
        loss, dz = backend.call(gpu.softmax_cross_entropy, z, t, reduction="none", softcap=5.0, z_loss=1e-3,
                                return_grad=True)
    want_loss, want_dz = ref.softmax_cross_entropy(np.clip(z.astype(np.float64), -1e300, 1e300), t,
                                                   reduction="none", softcap=5.0, z_loss=1e-3)
    assert np.isfinite(loss).all() and np.isfinite(dz).all()
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(dz, want_dz, atol=1e-6)


def test_backward(backend, rng):
    z, z64 = random(rng, (2, 3, 9), F32, scale=3.0)
    t = _targets(rng, (2, 3), 9, "ignore")
    dl = rng.standard_normal((2, 3)).astype(F32)
    opts = dict(z_loss=0.2, softcap=3.0)
    dz = backend.call(gpu.softmax_cross_entropy_backward, z, t, dl, reduction="none", **opts)
    want = ref.softmax_cross_entropy(z64, t, reduction="none", dloss=dl.astype(np.float64), **opts)[1]
    assert_close(dz, want, F32, "dloss per row")
    dz = backend.call(gpu.softmax_cross_entropy_backward, z, t, 2.5, weight=np.arange(1, 10.0), **opts)
    want = ref.softmax_cross_entropy(z64, t, weight=np.arange(1, 10.0), dloss=2.5, **opts)[1]
    assert_close(dz, want, F32, "dloss scalar, mean, weight")


def test_inplace(backend, rng):
    z, z64 = random(rng, (5, 40), F32, scale=3.0)
    t = _targets(rng, (5,), 40, "index")
    want_loss, want_dz = ref.softmax_cross_entropy(z64, t, z_loss=0.1, softcap=2.0)
    zz = z.copy()
    loss, dz = backend.call(gpu.softmax_cross_entropy, zz, t, z_loss=0.1, softcap=2.0, return_grad=True,
                            inplace=True)
    assert np.shares_memory(dz, zz)
    assert_close(dz, want_dz, F32, "in place dz")
    assert_close(loss, want_loss, F32, "in place loss")


@pytest.mark.kernel
def test_kernel_loss_is_deterministic(rng):
    # many blocks, fixed-order reductions of both terms: bitwise equal runs
    from conftest import Backend
    z, _ = random(rng, (700, 5), F32)
    t = _targets(rng, (700,), 5, "ignore")
    runs = [Backend("emulate").call(gpu.softmax_cross_entropy, z, t, z_loss=0.1, softcap=3.0, weight=np.arange(1, 6.0),
                                    return_z_loss=True) for _ in range(2)]
    assert runs[0][0].tobytes() == runs[1][0].tobytes() and runs[0][1].tobytes() == runs[1][1].tobytes()


BAD = [
    ({"z_loss": -1e-4}, ValueError, "z_loss"),
    ({"z_loss": float("nan")}, ValueError, "z_loss"),
    ({"z_loss": float("inf")}, ValueError, "z_loss"),
    ({"z_loss": "big"}, TypeError, "z_loss"),
    ({"softcap": 0.0}, ValueError, "softcap"),
    ({"softcap": -30.0}, ValueError, "softcap"),
    ({"softcap": float("inf")}, ValueError, "softcap"),
    ({"softcap": [30.0]}, TypeError, "softcap"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD, ids=[f"{k}={v}" for kw, _, _ in BAD for k, v in kw.items()])
def test_bad_arguments(backend, kwargs, exc, name):
    z = np.ones((2, 3), np.float32)
    t = np.array([0, 1])
    for fn in (gpu.softmax_cross_entropy, gpu.softmax_cross_entropy_backward):
        with pytest.raises(exc, match=name):
            backend.call(fn, z, t, **kwargs)
