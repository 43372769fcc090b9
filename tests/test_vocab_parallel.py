"""Vocabulary-parallel cross-entropy and fused linear CE (``comm=``) on in-process ranks.

The ranks are threads sharing one `ThreadComm` (a gpu.distributed.Communicator whose allgather
and allreduce meet at a barrier, bounded by a timeout so a mismatch can never hang the suite);
the multi-process engines (gloo, MPI) are tests/test_vocab_parallel_dist.py. Each case compares
every rank's results with the single-process call on the concatenated logits (float64 reference,
per-dtype tolerances from TOL) and checks that the loss has the same bits on every rank.
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import pytest

import gpu
import gpu.distributed as D
from gpu import _backend as B
from gpu._engines import rows

#: relative tolerance against the float64 single-process result, by dtype
TOL = {"float64": 1e-12, "float32": 2e-5, "bfloat16": 2e-2}
DTYPES = ["float64", "float32"] + (["bfloat16"] if B.BFLOAT16 is not None else [])


class ThreadComm(D.Communicator):
    """Ranks as threads of this process: every collective meets at a barrier (timeout: 300 s).
    Between collectives a rank holds the shared lock: the emulator runs one launch at a time per
    process, so the ranks' kernels take turns (as they would on separate devices)."""

    engine = "threads"

    def __init__(self, rank: int, size: int, shared: dict) -> None:
        super().__init__(rank, size)
        self.shared = shared

    def _exchange(self, buf):
        sh = self.shared
        sh["bufs"][self.rank] = np.array(buf, copy=True)
        sh["lock"].release()
        try:
            sh["barrier"].wait()
            out = np.stack(sh["bufs"])
            sh["barrier"].wait()
        finally:
            sh["lock"].acquire()
        return out

    def _allgather(self, buf, out) -> None:
        out[...] = self._exchange(buf)

    def _allreduce(self, buf, out) -> None:
        out[...] = self._exchange(buf).sum(axis=0)


#: rank threads kept for this module, by group size: every call on `size` ranks runs on the same
#: `size` threads, so a rank keeps its workspace between calls, as a process would
_RANK_THREADS: dict[int, list] = {}


def _rank_threads(size: int) -> list:
    if size not in _RANK_THREADS:
        queues = []
        for _ in range(size):
            q: queue.Queue = queue.Queue()

            def serve(q=q):
                while True:
                    item = q.get()
                    if item is None:
                        return
                    job, done = item
                    job()
                    done.set()
            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            queues.append((q, thread))
        _RANK_THREADS[size] = queues
    return [q for q, _ in _RANK_THREADS[size]]


@pytest.fixture(autouse=True, scope="module")
def _stop_rank_threads():
    """The rank threads end with this module: their emulator workspaces (each thread's scratch and
    error records, which gpu.check_errors reads) go with them, so later tests in this process see
    only their own."""
    yield
    for queues in _RANK_THREADS.values():
        for q, thread in queues:
            q.put(None)
        for q, thread in queues:
            thread.join(60)
    _RANK_THREADS.clear()


def run_ranks(size: int, fn, backend: str = "numpy"):
    """fn(comm) on `size` rank threads; (results or exceptions by rank, the communicators)."""
    # generous bounds: a rank may build a kernel module (minutes under ASan) while the others wait
    shared = {"bufs": [None] * size, "barrier": threading.Barrier(size, timeout=300), "lock": threading.Lock()}
    comms = [ThreadComm(r, size, shared) for r in range(size)]
    out: list = [None] * size

    def go(r):
        try:
            with shared["lock"], gpu.use_backend(backend):
                out[r] = fn(comms[r])
        except BaseException as e:       # noqa: BLE001 (reported by the test)
            out[r] = e

    events = []
    for r, q in enumerate(_rank_threads(size)):
        events.append(threading.Event())
        q.put((lambda r=r: go(r), events[-1]))
    assert all(e.wait(600) for e in events), "a rank hung"
    return out, comms


def ok(results):
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def cuts(split):
    return np.concatenate([[0], np.cumsum(split)]).astype(int)


def close(got, ref, dtype, what):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    scale = max(1.0, float(np.nanmax(np.abs(ref)))) if ref.size else 1.0
    err = float(np.nanmax(np.abs(got - ref))) / scale if ref.size else 0.0
    assert np.array_equal(np.isnan(got), np.isnan(ref)), what
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g}"


def problem(seed, n_rows, V, dtype, ignore=(), all_ignored=False):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n_rows, V)) * 3).astype(dtype)
    t = rng.integers(0, V, n_rows)
    t[list(ignore)] = -100
    if all_ignored:
        t[:] = -100
    w = rng.uniform(0.5, 2.0, V).astype(np.float64 if dtype == "float64" else np.float32)
    return z, t, w


OPTIONS = [dict(), dict(label_smoothing=0.1), dict(weight=True), dict(z_loss=1e-2, softcap=3.0),
           dict(weight=True, label_smoothing=0.2, z_loss=1e-2, softcap=2.0),
           dict(reduction="sum", z_loss=0.1, weight=True), dict(reduction="none", label_smoothing=0.3, weight=True)]


CE_CASES = ([("numpy", split, dt) for split in ([6, 5], [7, 4], [0, 11], [4, 0, 7], [1, 1, 1]) for dt in DTYPES]
            # the kernel path (the emulator): the statistics and dz kernels, the warp path (a
            # class per lane group) and the block path (forced below for float32)
            # (the kernel mark: the ASan run of the kernel tests takes the float64 case)
            + [pytest.param("emulate", split, dt, marks=[pytest.mark.kernel] if dt == "float64" else [])
               for split, dt in (([6, 5], "float64"), ([0, 4, 7], "float32"), ([1, 1, 1], DTYPES[-1]))])


@pytest.mark.parametrize("backend,split,dtype", CE_CASES, ids=str)
def test_cross_entropy_equals_concatenated(backend, split, dtype):
    """Unequal and empty slices, one class per rank; every option and reduction; targets on every
    rank and ignored rows; the loss bitwise equal on every rank; dz this rank's slice."""
    V = sum(split)
    z, t, w = problem(sum(split) + len(split), 9, V, dtype, ignore=(2, 5))
    c = cuts(split)
    for o in OPTIONS:
        o = dict(o)
        use_w = o.pop("weight", False)
        ref = gpu.softmax_cross_entropy(z.astype(np.float64), t, weight=w if use_w else None, return_grad=True,
                                        return_z_loss=True, **o)

        def call(comm):
            lo, hi = c[comm.rank], c[comm.rank + 1]
            return gpu.softmax_cross_entropy(z[:, lo:hi], t, weight=w[lo:hi] if use_w else None, return_grad=True,
                                             return_z_loss=True, comm=comm, **o)
        with rows.tuned(warp_max_cols=0 if dtype == "float32" else None):
            res, _ = run_ranks(len(split), call, backend)
        ok(res)
        for r in res[1:]:
            assert np.array_equal(r[0], res[0][0], equal_nan=True) and np.array_equal(r[1], res[0][1], equal_nan=True)
        close(res[0][0], ref[0], dtype, f"loss {o}")
        close(res[0][1], ref[1], dtype, f"z term {o}")
        close(np.concatenate([r[2] for r in res], axis=1), ref[2], dtype, f"dz {o}")
        assert res[0][2].dtype == z.dtype


@pytest.mark.parametrize("backend", ["numpy", pytest.param("emulate", marks=pytest.mark.kernel)])
def test_cross_entropy_other_axis_probabilities_and_backward(backend):
    """Class axis 1 of a 3-D array, probability targets (each rank's slice), and the backward with
    a per-row dloss for 'none'."""
    rng = np.random.default_rng(3)
    split = [3, 4]
    c = cuts(split)
    z = rng.standard_normal((2, 7, 3))
    y = rng.dirichlet(np.ones(7), size=(2, 3)).transpose(0, 2, 1)
    t = rng.integers(0, 7, (2, 3))
    dl = rng.standard_normal((2, 3))
    for target, sl in ((y, lambda a, lo, hi: a[:, lo:hi]), (t, lambda a, lo, hi: a)):
        ref = gpu.softmax_cross_entropy(z, target, axis=1, label_smoothing=0.1, z_loss=0.01, return_grad=True)
        ref_b = gpu.softmax_cross_entropy_backward(z, target, dl, axis=1, reduction="none", softcap=2.0)

        def call(comm, target=target, sl=sl):
            lo, hi = c[comm.rank], c[comm.rank + 1]
            f = gpu.softmax_cross_entropy(z[:, lo:hi], sl(target, lo, hi), axis=1, label_smoothing=0.1, z_loss=0.01,
                                          return_grad=True, comm=comm)
            b = gpu.softmax_cross_entropy_backward(z[:, lo:hi], sl(target, lo, hi), dl, axis=1, reduction="none",
                                                   softcap=2.0, comm=comm)
            return f, b
        res = ok(run_ranks(2, call, backend)[0])
        close(res[0][0][0], ref[0], "float64", "loss")
        close(np.concatenate([r[0][1] for r in res], axis=1), ref[1], "float64", "dz")
        close(np.concatenate([r[1] for r in res], axis=1), ref_b, "float64", "backward dz")


def test_all_rows_ignored():
    z, t, _ = problem(1, 4, 5, "float64", all_ignored=True)
    for red in ("mean", "sum", "none"):
        ref = gpu.softmax_cross_entropy(z, t, reduction=red, return_grad=True)
        res = ok(run_ranks(2, lambda comm: gpu.softmax_cross_entropy(
            z[:, :2] if comm.rank == 0 else z[:, 2:], t, reduction=red, return_grad=True, comm=comm))[0])
        np.testing.assert_array_equal(res[0][0], ref[0])
        np.testing.assert_array_equal(np.concatenate([r[1] for r in res], axis=1), ref[1])


@pytest.mark.parametrize("backend,dtype", [("numpy", dt) for dt in DTYPES]
                         + [pytest.param("emulate", "float32", marks=pytest.mark.kernel)], ids=str)
def test_fused_linear_equals_concatenated(backend, dtype):
    """Slices of W (and bias, weight) by vocabulary; chunks of rows; dh summed over the ranks."""
    rng = np.random.default_rng(7)
    N, H = 9, 6
    for split in ([6, 5], [0, 4, 7]):
        V = sum(split)
        c = cuts(split)
        h = rng.standard_normal((N, H)).astype(dtype)
        W = rng.standard_normal((V, H)).astype(dtype)
        b = rng.standard_normal(V).astype(dtype)
        t = rng.integers(0, V, N)
        t[3] = -100
        w = rng.uniform(0.5, 2.0, V)
        for o in (dict(chunk_size=4), dict(label_smoothing=0.1, weight=True, bias=True, z_loss=1e-2, chunk_size=2),
                  dict(reduction="sum", softcap=2.0, bias=True), dict(reduction="none", weight=True, z_loss=0.1)):
            o = dict(o)
            use_w, use_b = o.pop("weight", False), o.pop("bias", False)
            ref = gpu.fused_linear_cross_entropy(h.astype(np.float64), W.astype(np.float64), t,
                                                 b.astype(np.float64) if use_b else None, weight=w if use_w else None,
                                                 return_grad=True, return_z_loss=True, **o)

            def call(comm):
                lo, hi = c[comm.rank], c[comm.rank + 1]
                return gpu.fused_linear_cross_entropy(h, W[lo:hi], t, b[lo:hi] if use_b else None,
                                                      weight=w[lo:hi] if use_w else None, return_grad=True,
                                                      return_z_loss=True, comm=comm, **o)
            res = ok(run_ranks(len(split), call, backend)[0])
            for r in res[1:]:
                assert np.array_equal(r[0], res[0][0]) and np.array_equal(r[1], res[0][1])
            close(res[0][0], ref[0], dtype, f"loss {o}")
            close(res[0][1], ref[1], dtype, f"z term {o}")
            for r in res:
                close(r[2], ref[2], dtype, f"dh {o}")
            close(np.concatenate([r[3] for r in res]), ref[3], dtype, f"dW {o}")
            if use_b:
                close(np.concatenate([r[4] for r in res]), ref[4], dtype, f"dbias {o}")


def test_collective_counts():
    """A header exchange on the first call of a configuration, then ONE allgather per call
    (softmax_cross_entropy) or per chunk of rows, plus ONE all-reduce for dh (fused linear CE)."""
    z, t, _ = problem(2, 10, 8, "float64")
    h = np.random.default_rng(0).standard_normal((10, 3))
    W = np.random.default_rng(1).standard_normal((8, 3))

    def calls(comm):
        lo, hi = (0, 5) if comm.rank == 0 else (5, 8)
        counts = []
        for _ in range(3):
            gpu.softmax_cross_entropy(z[:, lo:hi], t, return_grad=True, comm=comm)
            counts.append(comm.collectives)
        gpu.softmax_cross_entropy_backward(z[:, lo:hi], t, comm=comm)
        counts.append(comm.collectives)
        for _ in range(2):
            gpu.fused_linear_cross_entropy(h, W[lo:hi], t, chunk_size=4, return_grad=True, comm=comm)
            counts.append(comm.collectives)
        gpu.fused_linear_cross_entropy(h, W[lo:hi], t, chunk_size=4, comm=comm)
        counts.append(comm.collectives)
        return counts
    res = ok(run_ranks(2, calls)[0])
    # CE: 1 + 1, then 1 each; backward: 1 + 1; FLCE with gradient: 1 + 3 chunks + 1, then 3 + 1;
    # without: 1 + 3
    assert res[0] == res[1] == [2, 3, 4, 6, 11, 15, 19]


BAD = {
    "rows": (lambda r: dict(z=np.zeros((3 + r, 4)), target=np.arange(3 + r) % 4), r"z: the number of rows differs across ranks: rank 0 has 3, rank 1 has 4"),
    "reduction": (lambda r: dict(reduction=["mean", "sum"][r]), r"reduction differs across ranks: rank 0 has 'mean', rank 1 has 'sum'"),
    "label_smoothing": (lambda r: dict(label_smoothing=0.1 * r), r"label_smoothing differs across ranks"),
    "dtype": (lambda r: dict(z=np.zeros((3, 4), ["float64", "float32"][r])), r"z: the dtype differs across ranks: rank 0 has float64, rank 1 has float32"),
    "weight": (lambda r: dict(weight=None if r else np.ones(4)), r"weight: given on some ranks only"),
    "target": (lambda r: dict(target=np.array([0, 8, 1])), r"target: class index 8 at row 1 .* out of range \[0, 8\)"),
    # a rank whose own checks fail (a weight of another size): it raises its error, the others
    # that it rejected its arguments
    "local": (lambda r: dict(weight=np.ones(4 + r)), r"weight: expected shape \(4,\)|rank 1 rejected its arguments"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_on_every_rank(case):
    make, msg = BAD[case]

    def call(comm):
        kw = dict(z=np.zeros((3, 4)), target=np.array([0, 1, 2])) | make(comm.rank)
        z, target = kw.pop("z"), kw.pop("target")
        return gpu.softmax_cross_entropy(z, target, comm=comm, **kw)
    res, _ = run_ranks(2, call)
    for r in res:
        assert isinstance(r, ValueError), r
        assert pytest.raises(ValueError, lambda: (_ for _ in ()).throw(r)).match(msg)


@pytest.mark.kernel
def test_bad_target_on_the_kernel_path():
    """Recorded on the device for gpu.check_errors() (no sync), or raised by the call on every
    rank with eager checks."""
    z, _, _ = problem(4, 3, 8, "float64")
    t = np.array([0, 9, 1])

    def call(comm):
        gpu.softmax_cross_entropy(z[:, :5] if comm.rank == 0 else z[:, 5:], t, comm=comm)
        if comm.rank == 0:      # reads (and clears) every thread's workspace: one rank checks
            gpu.check_errors()
    res = run_ranks(2, call, "emulate")[0]
    assert isinstance(res[0], ValueError) and "target: class index 9 at row 1" in str(res[0]), res[0]
    assert res[1] is None
    previous = gpu.set_eager_checks(True)
    try:
        res = run_ranks(2, call, "emulate")[0]
    finally:
        gpu.set_eager_checks(previous)
    for r in res:
        assert isinstance(r, ValueError) and "target: class index 9 at row 1" in str(r) and "[0, 8)" in str(r), r


def test_fused_linear_bad_input_raises_on_every_rank():
    h = np.zeros((4, 3))

    def call(comm):
        W = np.zeros((2 + comm.rank, 3))
        return gpu.fused_linear_cross_entropy(h if comm.rank == 0 else np.zeros((4, 5)), W if comm.rank == 0 else
                                              np.zeros((3, 5)), np.zeros(4, np.int64), comm=comm)
    for r in run_ranks(2, call)[0]:
        assert isinstance(r, ValueError) and "h: the hidden size differs across ranks" in str(r), r

    def bias_size(comm):   # W and bias of different local sizes on rank 1 only
        return gpu.fused_linear_cross_entropy(h, np.zeros((2, 3)), np.zeros(4, np.int64), np.zeros(2 + comm.rank),
                                              comm=comm)
    res = run_ranks(2, bias_size)[0]
    assert isinstance(res[0], ValueError) and "rank 1 rejected its arguments" in str(res[0]), res[0]
    assert isinstance(res[1], ValueError) and "bias: expected shape (2,)" in str(res[1]), res[1]


@pytest.mark.parametrize("red", ["mean", "sum", "none"])
def test_no_rows(red):
    """No rows at all (every rank agrees): the single-process results, empty gradients."""
    h, W, t = np.zeros((0, 3)), np.ones((5, 3)), np.zeros(0, np.int64)
    ref = gpu.fused_linear_cross_entropy(h, W, t, reduction=red, return_grad=True)
    refc = gpu.softmax_cross_entropy(np.zeros((0, 5)), t, reduction=red, return_grad=True)
    res = ok(run_ranks(2, lambda c: (
        gpu.fused_linear_cross_entropy(h, W[:2] if c.rank == 0 else W[2:], t, reduction=red, return_grad=True,
                                       comm=c),
        gpu.softmax_cross_entropy(np.zeros((0, 2 + c.rank)), t, reduction=red, return_grad=True, comm=c)))[0])
    for r, (fl, ce) in enumerate(res):
        np.testing.assert_array_equal(fl[0], ref[0])
        np.testing.assert_array_equal(ce[0], refc[0])
        assert fl[1].shape == (0, 3) and ce[1].shape == (0, 2 + r)


@pytest.mark.parametrize("backend", ["numpy", "emulate"])
def test_inplace_writes_this_ranks_slice(backend):
    z, t, _ = problem(6, 5, 9, "float32")
    ref = gpu.softmax_cross_entropy(z, t, return_grad=True, label_smoothing=0.1)

    def call(comm):
        mine = z[:, :4].copy() if comm.rank == 0 else z[:, 4:].copy()
        loss, dz = gpu.softmax_cross_entropy(mine, t, return_grad=True, label_smoothing=0.1, inplace=True, comm=comm)
        return loss, dz, dz is mine
    res = ok(run_ranks(2, call, backend)[0])
    assert all(r[2] for r in res)
    close(np.concatenate([r[1] for r in res], axis=1), ref[1], "float32", "dz in place")
