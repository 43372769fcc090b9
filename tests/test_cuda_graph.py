"""A training step's device work (batch-norm forward and backward, cross-entropy loss and gradient)
captured in a CUDA graph and replayed: possible only with no host sync, no upload and no
allocation that needs the driver inside the step (the persistent workspace, gpu/_workspace.py).
The CPU counterpart, which counts transfers and allocations, is tests/test_device_traffic.py."""
from __future__ import annotations

import numpy as np
import pytest

import gpu

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("n,c,classes", [
    (256, 10, 10),      # BN and CE in one block each
    (8192, 64, 64),     # BN grid merge over many blocks (tickets); CE over many blocks
], ids=["small", "many-blocks"])
def test_training_step_replays_in_a_cuda_graph(n, c, classes):
    import cupy as cp
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((n, c)).astype(np.float32))
    t = cp.asarray(rng.integers(0, classes, n))
    g = cp.asarray(rng.uniform(0.5, 1.5, c).astype(np.float32))
    b = cp.asarray(rng.standard_normal(c).astype(np.float32))
    rm, rv = cp.zeros(c, np.float32), cp.ones(c, np.float32)

    def step():
        y, mean, invstd = gpu.batch_norm_forward(x, g, b, running_mean=rm, running_var=rv)
        loss, dz = gpu.softmax_cross_entropy(y[:, :classes], t, return_grad=True)
        dx, dg, db = gpu.batch_norm_backward(cp.pad(dz, ((0, 0), (0, c - classes))), x, g, mean, invstd) \
            if classes < c else gpu.batch_norm_backward(dz, x, g, mean, invstd)
        return loss, dz, dx, dg, db

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        step()                                   # warm: plans, modules, workspace, constants
        want = [a.copy() for a in step()]
        stream.begin_capture()
        outs = step()
        graph = stream.end_capture()
        for _ in range(3):                       # replays: same results (the counters are reset)
            for a in outs:
                a.fill(np.nan)
            graph.launch(stream)
            stream.synchronize()
            for got, ref in zip(outs, want):
                cp.testing.assert_array_equal(got, ref)
        # new data in the captured input: the replay computes the new step
        x[...] = cp.asarray(rng.standard_normal((n, c)).astype(np.float32))
        graph.launch(stream)
        stream.synchronize()
        captured = [a.copy() for a in outs]
        fresh = step()
        stream.synchronize()
        for got, ref in zip(captured, fresh):
            cp.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    gpu.check_errors()


def test_bad_target_in_a_graph_is_reported_at_the_check():
    import cupy as cp
    rng = np.random.default_rng(1)
    z = cp.asarray(rng.standard_normal((64, 10)).astype(np.float32))
    t = cp.asarray(rng.integers(0, 10, 64))
    stream = cp.cuda.Stream(non_blocking=True)
    gpu.check_errors()
    with stream:
        gpu.softmax_cross_entropy(z, t, return_grad=True)
        stream.begin_capture()
        gpu.softmax_cross_entropy(z, t, return_grad=True)
        graph = stream.end_capture()
        t[5] = 12
        graph.launch(stream)
        stream.synchronize()
    with pytest.raises(ValueError, match="class index 12 at row 5 "):
        gpu.check_errors()
