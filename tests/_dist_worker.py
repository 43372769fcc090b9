"""One rank of the multi-process tests (tests/test_distributed.py launches 2-3 of these under
mpiexec or as torch.distributed gloo ranks on 127.0.0.1). Usage:

    python tests/_dist_worker.py ENGINE OUTDIR [backend]

ENGINE: mpi | gloo (gloo reads RANK, WORLD_SIZE, MASTER_PORT). Every rank runs the same cases
(`cases(size)`), slicing its rows of each case's global batch, and writes its outputs to
OUTDIR/rank{r}.npz and what it observed (collective counts, error messages) to OUTDIR/rank{r}.json.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time

import numpy as np

import gpu
import gpu.distributed as D

#: (name, rows per rank, feature shape after the batch axis, axis, dtype); the test file computes
#: the references from `global_batch`
SPLITS = {2: [[5, 3], [8, 0], [4, 4]], 3: [[1, 1, 1], [4, 0, 3]]}
SHAPES = [((6,), 0), ((3, 2, 5), (0, 2, 3))]       # dense (N, C) and NCHW (N, C, H, W)
DTYPES = ["float64", "float32", "float16"]


def cases(size: int):
    out = []
    for split in SPLITS[size]:
        for feat, axis in SHAPES:
            for dt in DTYPES:
                out.append((f"{'-'.join(map(str, split))}_{len(feat)}d_{dt}", split, feat, axis, dt))
    return out


def global_batch(name: str, split, feat, dtype):
    """The concatenated batch of a case and its upstream gradient (seeded by the case name)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    n = sum(split)
    x = (rng.standard_normal((n, *feat)) * 2 + 3).astype(dtype)
    dy = rng.standard_normal((n, *feat)).astype(dtype)
    return x, dy


def connect(engine: str):
    if engine == "mpi":
        from mpi4py import MPI
        return D.wrap(MPI.COMM_WORLD)
    import torch.distributed as dist
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                            rank=rank, world_size=size, timeout=datetime.timedelta(seconds=30))
    return D.wrap("torch")


def main() -> None:
    engine, outdir = sys.argv[1], sys.argv[2]
    backend = sys.argv[3] if len(sys.argv) > 3 else "numpy"
    comm = connect(engine)
    r, P = comm.rank, comm.size
    arrays, info = {}, {"counts": {}, "errors": {}}
    with gpu.use_backend(backend):
        for name, split, feat, axis, dt in cases(P):
            x, dy = global_batch(name, split, feat, dt)
            lo = sum(split[:r])
            xs, dys = x[lo:lo + split[r]], dy[lo:lo + split[r]]
            C = feat[0]
            gamma = np.linspace(0.5, 1.5, C).astype(dt)
            beta = np.linspace(-1, 1, C).astype(dt)
            acc = np.float64 if dt == "float64" else np.float32
            rm, rv = np.zeros(C, acc), np.ones(C, acc)
            fresh = C not in comm.verified
            n0 = comm.collectives
            y, mean, invstd = gpu.batch_norm_forward(xs, gamma, beta, axis=axis, running_mean=rm,
                                                     running_var=rv, momentum=0.1, comm=comm)
            n1 = comm.collectives
            dx, dgamma, dbeta = gpu.batch_norm_backward(dys, xs, gamma, mean, invstd, axis=axis, comm=comm)
            n2 = comm.collectives
            info["counts"][name] = [n1 - n0 - fresh, n2 - n1]
            arrays.update({f"{name}/{k}": v for k, v in dict(
                y=y, mean=mean, invstd=invstd, rm=rm, rv=rv, dx=dx, dgamma=dgamma, dbeta=dbeta).items()})

        # a rank with another channel count, then another dtype: a ValueError on every rank
        for what, C, dt in (("channels", 7 + r, "float32"), ("dtype", 6, ("float32", "float64")[r % 2])):
            try:
                gpu.batch_norm_forward((np.ones((3, C)) + np.arange(3)[:, None]).astype(dt), comm=comm)
                info["errors"][what] = None
            except ValueError as e:
                info["errors"][what] = str(e)
        # backward with another dtype after the forward agreed: the all-reduce's check slots
        x = np.arange(12.0).reshape(4, 3).astype(("float32", "float64")[r % 2])
        try:
            gpu.batch_norm_backward(x, x, None, np.zeros(3), np.ones(3), comm=comm)
            info["errors"]["backward dtype"] = None
        except ValueError as e:
            info["errors"]["backward dtype"] = str(e)

    # an engine timeout names the collective: rank 0 waits 0.5 s for a rank that comes late
    late = D.wrap(comm.comm) if engine == "mpi" else comm
    late.timeout = 0.5 if r == 0 else None
    if r != 0:
        time.sleep(2.0)
    try:
        gpu.batch_norm_forward(np.ones((2, 6)) + np.arange(2)[:, None], comm=late)
        info["errors"]["timeout"] = None
    except D.CollectiveError as e:
        info["errors"]["timeout"] = str(e)
    late.timeout = None
    if engine == "mpi" and late.abandoned:      # completed once the late rank joined
        from mpi4py import MPI
        MPI.Request.Waitall(late.abandoned)
        late.abandoned.clear()
    np.savez(os.path.join(outdir, f"rank{r}.npz"), **arrays)
    with open(os.path.join(outdir, f"rank{r}.json"), "w") as f:
        json.dump(info, f)
    if engine == "mpi":
        comm.comm.Barrier()
    else:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
