"""One rank of the vocabulary-parallel cross-entropy tests (tests/test_vocab_parallel_dist.py
launches 3 of these under mpiexec or as torch.distributed gloo ranks on 127.0.0.1). Usage:

    python tests/_vp_worker.py ENGINE OUTDIR

One launch covers both group sizes, as tests/_dist_worker.py (whose `connect` it uses): the
3-rank cases on the world, then the 2-rank cases, the bad input and the timeout on ranks {0, 1}.
Each rank runs every case of `cases(size)` on its slice of the classes and writes its results to
OUTDIR/SIZE/rank{r}.npz, and the collective counts and error messages to OUTDIR/SIZE/rank{r}.json.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import gpu
import gpu.distributed as D
from gpu import _backend as B

from _dist_worker import connect

#: the classes of each rank, by group size: unequal, empty, one per rank
SPLITS = {2: [[6, 5], [7, 4]], 3: [[4, 0, 7], [1, 1, 1]]}
DTYPES = ["float64", "float32"] + (["bfloat16"] if B.BFLOAT16 is not None else [])
#: the options of each case ("weight": class weights, this rank's slice)
OPTIONS = {"plain": dict(), "smooth": dict(label_smoothing=0.1), "weight": dict(weight=True, ignore_index=3),
           "zcap": dict(z_loss=1e-2, softcap=3.0), "all": dict(weight=True, label_smoothing=0.2, z_loss=1e-2, softcap=2.0),
           "sum": dict(reduction="sum", z_loss=0.1, weight=True), "none": dict(reduction="none", label_smoothing=0.3)}
ROWS, HIDDEN = 7, 5


def problem(name: str, V: int, dtype: str, ignore_index: int = -100):
    """The global logits, targets (ignored rows, and every row ignored for '*-ignored'), class
    weights, h, W and bias of a case, seeded by its name."""
    rng = np.random.default_rng(sum(map(ord, name)))
    z = (rng.standard_normal((ROWS, V)) * 3).astype(dtype)
    t = rng.integers(0, V, ROWS)
    t[[1, 4]] = ignore_index
    if name.endswith("ignored"):
        t[:] = ignore_index
    w = rng.uniform(0.5, 2.0, V)
    h = rng.standard_normal((ROWS, HIDDEN)).astype(dtype)
    W = rng.standard_normal((V, HIDDEN)).astype(dtype)
    b = rng.standard_normal(V).astype(dtype)
    return z, t, w, h, W, b


def cases(size: int):
    """(name, split, dtype, option key, backend)."""
    out = []
    for split in SPLITS[size]:
        for dt in DTYPES:
            for key in OPTIONS:
                out.append((f"{'-'.join(map(str, split))}_{dt}_{key}", split, dt, key, "numpy"))
        out.append((f"{'-'.join(map(str, split))}_float64_plain_ignored", split, "float64", "plain", "numpy"))
        # the kernel path (the emulator): statistics and dz from the kernels around the collective
        out.append((f"{'-'.join(map(str, split))}_float32_all_emulate", split, "float32", "all", "emulate"))
    return out


def run_cases(comm, info):
    r = comm.rank
    arrays = {}
    for name, split, dt, key, backend in cases(comm.size):
        V = sum(split)
        z, t, w, h, W, b = problem(name, V, dt, OPTIONS[key].get("ignore_index", -100))
        lo, hi = sum(split[:r]), sum(split[:r + 1])
        o = dict(OPTIONS[key])
        use_w = o.pop("weight", False)
        wl = w[lo:hi] if use_w else None
        with gpu.use_backend(backend):
            n0 = comm.collectives
            loss, zt, dz = gpu.softmax_cross_entropy(z[:, lo:hi], t, weight=wl, return_grad=True, return_z_loss=True,
                                                     comm=comm, **o)
            n1 = comm.collectives
            again = gpu.softmax_cross_entropy(z[:, lo:hi], t, weight=wl, return_grad=True, return_z_loss=True,
                                              comm=comm, **o)
            n2 = comm.collectives
            chunk = 3
            fl = gpu.fused_linear_cross_entropy(h, W[lo:hi], t, b[lo:hi], weight=wl, return_grad=True,
                                                return_z_loss=True, chunk_size=chunk, comm=comm, **o)
            n3 = comm.collectives
        info["counts"][name] = [n1 - n0, n2 - n1, n3 - n2]
        info["same"][name] = bool(np.array_equal(np.asarray(loss), np.asarray(again[0]), equal_nan=True))
        arrays.update({f"{name}/{k}": np.asarray(v, np.float64) for k, v in dict(
            loss=loss, zt=zt, dz=dz, fl_loss=fl[0], fl_zt=fl[1], dh=fl[2], dW=fl[3], db=fl[4]).items()})
    return arrays


def expect_error(info, what, fn):
    try:
        fn()
        info["errors"][what] = None
    except (ValueError, TypeError) as e:
        info["errors"][what] = f"{type(e).__name__}: {e}"


def fault_cases(comm, info) -> None:
    """Bad input on one rank or all (a ValueError on every rank, never a hang), an engine timeout."""
    r = comm.rank
    z = np.random.default_rng(0).standard_normal((4, 6))
    t = np.array([0, 5, 11, 2])
    expect_error(info, "rows", lambda: gpu.softmax_cross_entropy(z[:3 + r], t[:3 + r], comm=comm))
    expect_error(info, "options", lambda: gpu.softmax_cross_entropy(z, t, label_smoothing=0.1 * r, comm=comm))
    expect_error(info, "dtype", lambda: gpu.softmax_cross_entropy(z.astype(["float64", "float32"][r]), t, comm=comm))
    expect_error(info, "target", lambda: gpu.softmax_cross_entropy(z, np.array([0, 5, 12, 2]), comm=comm))
    with gpu.use_backend("emulate"):    # the kernel path records it on the device: check_errors raises
        gpu.softmax_cross_entropy(z, np.array([0, 5, 12, 2]), comm=comm)
        expect_error(info, "target emulate", gpu.check_errors)
    h, W = np.ones((4, 3)), np.ones((3, 3))
    expect_error(info, "bias", lambda: gpu.fused_linear_cross_entropy(h, W, t, np.ones(3 + r), comm=comm))
    expect_error(info, "hidden", lambda: gpu.fused_linear_cross_entropy(np.ones((4, 3 + r)), np.ones((3, 3 + r)), t,
                                                                        comm=comm))
    # an engine timeout names the collective: rank 0 waits 0.5 s for a rank that comes late (a
    # configuration exchanged before, so the late call is one collective)
    gpu.softmax_cross_entropy(z, t, comm=comm)
    comm.timeout = 0.5 if r == 0 else None
    if r != 0:
        time.sleep(2.0)
    try:
        gpu.softmax_cross_entropy(z, t, comm=comm)
        info["errors"]["timeout"] = None
    except D.CollectiveError as e:
        info["errors"]["timeout"] = str(e)
    comm.timeout = None
    comm.drain()
    info["drained"] = len(comm.abandoned)


def main() -> None:
    engine, outdir = sys.argv[1], sys.argv[2]
    world, pair, _ = connect(engine)
    t0 = time.time()
    for size, comm in ((3, world), (2, pair)):
        if comm is None:                       # rank 2 is not in the pair
            continue
        info = {"counts": {}, "same": {}, "errors": {}}
        arrays = run_cases(comm, info)
        if size == 2:
            fault_cases(comm, info)
        info["seconds"] = time.time() - t0
        os.makedirs(os.path.join(outdir, str(size)), exist_ok=True)
        np.savez(os.path.join(outdir, str(size), f"rank{comm.rank}.npz"), **arrays)
        with open(os.path.join(outdir, str(size), f"rank{comm.rank}.json"), "w") as f:
            json.dump(info, f)
    if engine == "mpi":
        world.comm.Barrier()
    else:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
