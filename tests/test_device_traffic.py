"""No host sync, no upload and no allocation but the outputs, in a warm call of every op.

On the emulate backend, with the inputs in emulated device memory (``to_emulated_device``, what
``cupy.asarray`` is on a GPU), ``counting_device()`` counts (gpu/_backend.py ``DeviceCounts``):

- d2h: device values read by the host (int/float/bool/index/item/tolist/repr of a device array,
  indexing to a scalar): each is a copy to the host and a sync on a GPU;
- h2d: launch arguments that are host memory: an upload on a GPU;
- allocations: device arrays created (the allocation seam, and every non-view array computed
  from device memory).

A warm call (the second with the same arguments: plans, kernels, workspaces and constants exist)
must read nothing back, upload nothing, and allocate exactly the memory of what it returns (the
distinct owners of the returned arrays). The first call may allocate its workspace.
"""
from __future__ import annotations

import numpy as np
import pytest

import gpu
from gpu import _kernels
from gpu._backend import EmulatedDeviceArray, counting_device, to_emulated_device
from gpu._engines import channels

pytestmark = pytest.mark.kernel

F32 = np.float32


def _owners(out) -> set[int]:
    """ids of the arrays that own the memory of the returned arrays."""
    arrays = out if isinstance(out, tuple) else (out,)
    owners = set()
    for a in arrays:
        if a is None:
            continue
        while a.base is not None and isinstance(a.base, np.ndarray):
            a = a.base
        owners.add(id(a))
    return owners


def _warm(fn, *args, **kwargs):
    """(counts, launches, out) of the second of two identical calls on the emulate backend."""
    with gpu.use_backend("emulate"):
        fn(*args, **kwargs)
        with _kernels.recording_launches(run=True) as log, counting_device() as n:
            out = fn(*args, **kwargs)
    return n, log.count, out


def _assert_quiet(fn, *args, **kwargs):
    n, launches, out = _warm(fn, *args, **kwargs)
    assert launches >= 1
    assert n.d2h == 0, f"{n.d2h} read(s) back to the host (syncs)"
    assert n.h2d == 0, f"{n.h2d} upload(s)"
    assert n.allocations == len(_owners(out)), f"{n.allocations} allocations for {len(_owners(out))} outputs"
    return out


def _dev(rng, shape, dtype=F32):
    return to_emulated_device(rng.standard_normal(shape).astype(dtype))


# sizes: one block, and several blocks whose partials the last block merges (tickets, workspace)
CE_SHAPES = [(6, 40),      # warp path, one block
             (300, 40),    # warp path, many blocks: grid merge of the loss through the ticket
             (9, 2000)]    # block path, one row per block


@pytest.mark.parametrize("shape", CE_SHAPES, ids=str)
def test_softmax_family_warm_calls_are_quiet(rng, shape):
    z = _dev(rng, shape)
    _assert_quiet(gpu.softmax, z)
    _assert_quiet(gpu.log_softmax, z)
    _assert_quiet(gpu.hardmax, z)


@pytest.mark.parametrize("shape", CE_SHAPES, ids=str)
@pytest.mark.parametrize("kw", [
    {},
    {"return_grad": True},
    {"return_grad": True, "reduction": "none"},
    {"return_grad": True, "weight": "w", "label_smoothing": 0.1},   # the weight-sum kernel and its ticket
    {"return_grad": True, "reduction": "sum", "ignore_index": 3},
], ids=lambda kw: ",".join(kw) or "loss")
def test_cross_entropy_warm_calls_are_quiet(rng, shape, kw):
    z = _dev(rng, shape)
    t = to_emulated_device(rng.integers(0, shape[1], shape[0]))
    if kw.get("weight"):
        kw = kw | {"weight": to_emulated_device(rng.uniform(0.5, 2, shape[1]).astype(F32))}
    _assert_quiet(gpu.softmax_cross_entropy, z, t, **kw)


def test_cross_entropy_probability_targets_warm_calls_are_quiet(rng):
    z = _dev(rng, (50, 30))
    p = to_emulated_device(rng.dirichlet(np.ones(30), 50).astype(F32))
    _assert_quiet(gpu.softmax_cross_entropy, z, p, return_grad=True)


def test_cross_entropy_backward_warm_calls_are_quiet(rng):
    z = _dev(rng, (300, 40))
    t = to_emulated_device(rng.integers(0, 40, 300))
    _assert_quiet(gpu.softmax_cross_entropy_backward, z, t)
    _assert_quiet(gpu.softmax_cross_entropy_backward, z, t, 0.5)       # a host scalar: a kept constant
    dl = _dev(rng, (300,))
    _assert_quiet(gpu.softmax_cross_entropy_backward, z, t, dl, reduction="none")   # a device array


# (N, C) with one block per channel tile, and with many blocks per tile (grid merge), and NCHW
BN_SHAPES = [((8, 5), 0), ((3000, 6), 0), ((4, 3, 9, 7), (0, 2, 3))]


@pytest.mark.parametrize("shape,axis", BN_SHAPES, ids=str)
def test_batch_norm_warm_calls_are_quiet(rng, shape, axis):
    x = _dev(rng, shape)
    c = shape[1]
    g, b = _dev(rng, (c,)), _dev(rng, (c,))
    rm, rv = to_emulated_device(np.zeros(c, F32)), to_emulated_device(np.ones(c, F32))
    kept = (1, c) + (1,) * (len(shape) - 2) if len(shape) > 2 else (c,)
    g, b = g.reshape(kept) if len(shape) > 2 else g, b.reshape(kept) if len(shape) > 2 else b
    _assert_quiet(gpu.batch_stats, x, axis=axis)
    y, mean, invstd = _assert_quiet(gpu.batch_norm_forward, x, g, b, running_mean=rm.reshape(kept),
                                    running_var=rv.reshape(kept), axis=axis)
    nbt = to_emulated_device(np.zeros(1, np.int64))                    # momentum None: cumulative
    _assert_quiet(gpu.batch_norm_forward, x, g, b, running_mean=rm.reshape(kept), running_var=rv.reshape(kept),
                  momentum=None, num_batches_tracked=nbt, axis=axis)
    _assert_quiet(gpu.batch_norm_inference, x, g, b, rm.reshape(kept), rv.reshape(kept), axis=axis)
    _assert_quiet(gpu.batch_norm_backward, _dev(rng, shape), x, g, mean, invstd, axis=axis)


def test_batch_norm_two_kernel_paths_are_quiet(rng):
    """The forward's two-pass and the backward's two kernels (what runs where x, or dy and x, do
    not fit on chip) with a grid merge: the same, warm."""
    x, dy, g = _dev(rng, (3000, 6)), _dev(rng, (3000, 6)), _dev(rng, (6,))
    with channels.tuned(path="twopass", threads=32, grid_rows=3):
        y, mean, invstd = _assert_quiet(gpu.batch_norm_forward, x, g)
        _assert_quiet(gpu.batch_norm_backward, dy, x, g, mean, invstd)


def test_a_training_step_is_quiet(rng):
    """BN forward, CE loss + gradient, BN backward: the device work of a step, warm."""
    x, t = _dev(rng, (256, 10)), to_emulated_device(rng.integers(0, 10, 256))
    g, b = _dev(rng, (10,)), _dev(rng, (10,))
    rm, rv = to_emulated_device(np.zeros(10, F32)), to_emulated_device(np.ones(10, F32))

    def step():
        y, mean, invstd = gpu.batch_norm_forward(x, g, b, running_mean=rm, running_var=rv)
        loss, dz = gpu.softmax_cross_entropy(y, t, return_grad=True)
        dx, dg, db = gpu.batch_norm_backward(dz, x, g, mean, invstd)
        return loss, y, mean, invstd, dz, dx, dg, db

    n, launches, out = _warm(step)
    assert launches >= 4
    assert (n.d2h, n.h2d) == (0, 0), n
    assert n.allocations == len(_owners(out)), n


def test_the_counters_count(rng):
    """The counting itself: a read back, an upload and a temporary are each seen."""
    z = _dev(rng, (4, 8))
    t = to_emulated_device(rng.integers(0, 8, 4))
    with gpu.use_backend("emulate"):
        with counting_device() as n:
            loss = gpu.softmax_cross_entropy(z, t)
            assert isinstance(loss, EmulatedDeviceArray)
            float(loss)
            _ = z[0, 0]
            _ = z * 2
            _ = z.astype(np.float64)
            _ = z[1:].reshape(-1)                # a view: nothing
        assert n.d2h == 2, n
        assert n.allocations >= 3, n             # the loss, the product, the cast
        with counting_device() as n:
            gpu.softmax(rng.standard_normal((4, 8)).astype(F32))   # host memory handed to the kernel
        assert n.h2d == 1, n


def test_a_bad_target_costs_no_sync(rng):
    z = _dev(rng, (300, 40))
    t = rng.integers(0, 40, 300)
    t[7] = 40
    t = to_emulated_device(t)
    gpu.check_errors()
    n, _, _ = _warm(gpu.softmax_cross_entropy, z, t, return_grad=True)
    assert (n.d2h, n.h2d) == (0, 0), n
    # the explicit sync: one read of each workspace's record. Other threads of this process hold
    # workspaces with records too where their tests interleave with these (test_vocab_parallel's
    # rank threads live as long as its module, and xdist may run this test in between): count
    # them rather than assume none.
    from gpu import _workspace
    with _workspace._lock:
        records = sum(1 for ws in _workspace._every for _ in ws._errors)
    with counting_device() as n:
        with pytest.raises(ValueError, match="class index 40 at row 7 "):
            gpu.check_errors()
    assert n.d2h == records >= 1


@pytest.mark.parametrize("n", [256, 512], ids=["8-steps", "16-steps"])
def test_training_epoch_reads_back_per_log_point_not_per_step(rng, n):
    """gpu.nn.fit on the emulate backend: the host reads the device at log points only (the
    epoch's end here: the steps' losses and correct counts in one read, and gpu.check_errors()),
    whatever the number of steps."""
    from gpu.nn import SGD, SoftmaxCrossEntropy, fit, mlp
    X = to_emulated_device(rng.standard_normal((n, 8)).astype(F32))
    y = to_emulated_device(rng.integers(0, 4, n))
    model = mlp([8, 16, 4], seed=0)
    for name, value in model.state_dict().items():              # parameters in device memory too
        i, key = name.split(".", 1)
        model.layers[int(i)]._set_array(key, to_emulated_device(value))
    opt = SGD(model.parameters().values(), lr=0.1)
    gpu.check_errors()
    with gpu.use_backend("emulate"), counting_device() as c:
        hist = fit(model, SoftmaxCrossEntropy(), opt, (X, y), epochs=1, batch_size=32, progress=False)
    assert len(hist.step_loss) == n // 32 and np.isfinite(hist.step_loss).all()
    assert c.d2h == 2, c                   # one read of the epoch's statistics, one of the error record
    assert c.h2d == 0, c
    ep = hist.epochs[0]
    assert ep["train_loss"] == pytest.approx(np.mean(hist.step_loss))   # equal batches
    assert 0 <= ep["train_acc"] <= 1
