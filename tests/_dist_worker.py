"""One rank of the multi-process tests (tests/test_distributed.py launches 3 of these under
mpiexec or as torch.distributed gloo ranks on 127.0.0.1). Usage:

    python tests/_dist_worker.py ENGINE OUTDIR [backend]

ENGINE: mpi | gloo (gloo reads RANK, WORLD_SIZE, MASTER_PORT). One launch covers both group
sizes: the 3-rank cases on the world, then the 2-rank cases (and the faults) on a group of ranks
{0, 1} (an MPI split, a torch.distributed new_group: also the process_group= of a subgroup). Each
rank runs the same cases (`cases(size)`; with gloo also `sbn_cases`, gpu.torch.SyncBatchNorm),
slicing its rows of each case's global batch, and writes its outputs to OUTDIR/SIZE/rank{r}.npz
and what it observed (collective counts, error messages) to OUTDIR/SIZE/rank{r}.json.
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


#: batch norm's fused epilogue, synchronized (2 ranks): y = relu(bn(x) + residual) and every
#: gradient; (name, split, feature shape, axis, dtype)
EPILOGUE_CASES = [("fused-5-3_4d_float64", [5, 3], (3, 2, 5), (0, 2, 3), "float64"),
                  ("fused-8-0_2d_float32", [8, 0], (6,), 0, "float32")]


def global_batch(name: str, split, feat, dtype):
    """The concatenated batch of a case and its upstream gradient (seeded by the case name)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    n = sum(split)
    x = (rng.standard_normal((n, *feat)) * 2 + 3).astype(dtype)
    dy = rng.standard_normal((n, *feat)).astype(dtype)
    return x, dy


def connect(engine: str):
    """(the world's adapter, the adapter of ranks {0, 1} or None on rank 2, the torch group of
    ranks {0, 1} or None)."""
    if engine == "mpi":
        from mpi4py import MPI
        world = MPI.COMM_WORLD
        pair = world.Split(0 if world.Get_rank() < 2 else MPI.UNDEFINED, world.Get_rank())
        return D.wrap(world), (D.wrap(pair) if pair != MPI.COMM_NULL else None), None
    import torch.distributed as dist
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                            rank=rank, world_size=size, timeout=datetime.timedelta(seconds=30))
    group = dist.new_group([0, 1])                 # every rank calls new_group, members or not
    return D.wrap("torch"), (D.wrap(group) if rank < 2 else None), group


def stats_cases(comm, backend: str):
    """The cases of `cases(comm.size)` on `comm`: (arrays, info)."""
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
        for name, split, feat, axis, dt in (EPILOGUE_CASES if P == 2 else []):
            x, dy = global_batch(name, split, feat, dt)
            res = global_batch(name + "/residual", split, feat, dt)[1]
            lo = sum(split[:r])
            xs, dys, rs = (a[lo:lo + split[r]] for a in (x, dy, res))
            C = feat[0]
            gamma, beta = np.linspace(0.5, 1.5, C).astype(dt), np.linspace(-1, 1, C).astype(dt)
            acc = np.float64 if dt == "float64" else np.float32
            rm, rv = np.zeros(C, acc), np.ones(C, acc)
            fresh = C not in comm.verified
            n0 = comm.collectives
            y, mean, invstd = gpu.batch_norm_forward(xs, gamma, beta, axis=axis, running_mean=rm, running_var=rv,
                                                     momentum=0.1, comm=comm, residual=rs, activation="relu")
            n1 = comm.collectives
            dx, dgamma, dbeta, dres = gpu.batch_norm_backward(dys, xs, gamma, mean, invstd, axis=axis, comm=comm,
                                                              activation="relu", y=y, residual_grad=True)
            n2 = comm.collectives
            info["counts"][name] = [n1 - n0 - fresh, n2 - n1]
            arrays.update({f"{name}/{k}": v for k, v in dict(
                y=y, mean=mean, rm=rm, rv=rv, dx=dx, dgamma=dgamma, dbeta=dbeta, dres=dres).items()})
    return arrays, info


def fault_cases(comm, engine: str, info) -> None:
    """Mismatched channels and dtypes (a ValueError on every rank), an engine timeout."""
    r = comm.rank
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
    comm.timeout = 0.5 if r == 0 else None
    if r != 0:
        time.sleep(2.0)
    try:
        gpu.batch_norm_forward(np.ones((2, 6)) + np.arange(2)[:, None], comm=comm)
        info["errors"]["timeout"] = None
    except D.CollectiveError as e:
        info["errors"]["timeout"] = str(e)
    comm.timeout = None
    info["abandoned"] = len(comm.abandoned)     # rank 0's timed-out collective, kept in flight
    comm.drain()                                # completed once the late rank joined
    info["drained"] = len(comm.abandoned)


#: gpu.torch.SyncBatchNorm cases (gloo): (name, split, feature shape, dtype, channels_last)
SBN_CASES = {2: [("sbn-5-3_2d_float64", [5, 3], (3, 2, 5), "float64", False),
                 ("sbn-5-3_2d_float32_cl", [5, 3], (3, 2, 5), "float32", True),    # channels_last
                 ("sbn-8-0_1d_float64", [8, 0], (6,), "float64", False)],          # a rank with no rows
             3: [("sbn-1-1-1_2d_float64", [1, 1, 1], (3, 2, 5), "float64", False)]}  # one row per rank


def sbn_model():
    """A small model with torch's batch norms (the test builds the same one): seeded."""
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 2, 5),
                               torch.nn.BatchNorm1d(5, momentum=None)).double()


def sbn_cases(group, size: int):
    """gpu.torch.SyncBatchNorm over the torch group `group` (None: the world): forward, backward,
    running statistics, collective counts; convert_sync_batchnorm on `sbn_model` (2 ranks)."""
    import torch
    import gpu.torch as gt
    import torch.distributed as dist
    comm = D.wrap(group if group is not None else dist.group.WORLD)
    r = comm.rank
    arrays, info = {}, {"counts": {}}
    for name, split, feat, dt, last in SBN_CASES[size]:
        x, dy = global_batch(name, split, feat, dt)
        lo = sum(split[:r])
        xs = torch.from_numpy(x[lo:lo + split[r]].copy())
        dys = torch.from_numpy(dy[lo:lo + split[r]].copy())
        if last:
            xs, dys = xs.contiguous(memory_format=torch.channels_last), dys.contiguous(memory_format=torch.channels_last)
        xs.requires_grad_(True)
        C = feat[0]
        bn = gt.SyncBatchNorm(C, momentum=0.1, process_group=group, dtype=getattr(torch, dt))
        with torch.no_grad():
            bn.weight.copy_(torch.from_numpy(np.linspace(0.5, 1.5, C)))
            bn.bias.copy_(torch.from_numpy(np.linspace(-1, 1, C)))
        fresh = C not in comm.verified
        n0 = comm.collectives
        y = bn(xs)
        n1 = comm.collectives
        y.backward(dys)
        n2 = comm.collectives
        info["counts"][name] = [n1 - n0 - fresh, n2 - n1]
        arrays.update({f"{name}/{k}": v.detach().numpy() for k, v in dict(
            y=y, dx=xs.grad, dgamma=bn.weight.grad, dbeta=bn.bias.grad, rm=bn.running_mean,
            rv=bn.running_var, nbt=bn.num_batches_tracked).items()})
        info[f"{name}/channels_last"] = y.is_contiguous(memory_format=torch.channels_last) and last
    if size == 2:
        # convert_sync_batchnorm on a model: two steps of forward and backward on each rank's rows
        model = gt.SyncBatchNorm.convert_sync_batchnorm(sbn_model(), group)
        info["converted"] = [type(m).__module__ + "." + type(m).__name__ for m in model
                             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        x, _ = global_batch("sbn-model", [5, 3], (2, 3, 2), "float64")
        xs = torch.from_numpy(x[[0, 5][r]:[5, 8][r]].copy())
        for step in range(2):
            out = model(xs)
            (out * torch.arange(1.0, 6.0, dtype=torch.float64)).sum().backward()
        arrays["model/out"] = out.detach().numpy()
        arrays.update({f"model/{k}": v.detach().numpy() for k, v in model.state_dict().items()})
        arrays.update({f"model/grad/{k}": p.grad.numpy() for k, p in model.named_parameters()})
        # the same model with its batch norm + ReLU fused (gpu.torch.fuse): the synchronized fused op
        fused = gt.fuse(gt.SyncBatchNorm.convert_sync_batchnorm(sbn_model(), group))
        info["fused"] = [type(m).__name__ for m in fused.modules() if "BatchNorm" in type(m).__name__]
        for step in range(2):
            out = fused(xs)
            (out * torch.arange(1.0, 6.0, dtype=torch.float64)).sum().backward()
        arrays["fused/out"] = out.detach().numpy()
        arrays.update({f"fused/{k}": v.detach().numpy() for k, v in fused.state_dict().items()})
        arrays.update({f"fused/grad/{k}": p.grad.numpy() for k, p in fused.named_parameters()})
    return arrays, info


def main() -> None:
    engine, outdir = sys.argv[1], sys.argv[2]
    backend = sys.argv[3] if len(sys.argv) > 3 else "numpy"
    world, pair, group = connect(engine)
    r = world.rank
    for size, comm in ((3, world), (2, pair)):
        if comm is None:                       # rank 2 is not in the pair
            continue
        arrays, info = stats_cases(comm, backend)
        if size == 2:
            fault_cases(comm, engine, info)
        if engine != "mpi":
            more, sbn = sbn_cases(group if size == 2 else None, size)
            arrays.update(more)
            info["sbn"] = sbn
        os.makedirs(os.path.join(outdir, str(size)), exist_ok=True)
        np.savez(os.path.join(outdir, str(size), f"rank{comm.rank}.npz"), **arrays)
        with open(os.path.join(outdir, str(size), f"rank{comm.rank}.json"), "w") as f:
            json.dump(info, f)
    if engine != "mpi":             # gpu-bench --distributed on these ranks: checked, then timed
        from gpu.bench import distributed as bench
        bench.run([(4, 3, 2, 2)], None, "cpu", "torch", 2, 0, 0, os.path.join(outdir, "bench.json"), [])
    assert r == world.rank
    if engine == "mpi":
        world.comm.Barrier()
    else:
        import gc
        import torch.distributed as dist
        # no reference of ours to a group, an adapter or a finished collective outlives
        # destroy_process_group into the interpreter's teardown, where gloo's threads can abort
        # the process at exit ("terminate called without an active exception")
        for comm in (world, pair):
            if comm is not None:
                comm.drain()
        del world, pair, group, comm
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
