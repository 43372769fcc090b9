"""`gpu-bench --distributed`: synchronized batch norm, forward + backward, per step, across ranks.

Launch it as ranks of an engine, or let it launch local gloo ranks itself:

    gpu-bench --distributed --ranks 2                       # 2 local gloo ranks on 127.0.0.1
    torchrun --nproc-per-node 4 -m gpu.bench --distributed  # torch.distributed (NCCL on GPUs)
    mpiexec -n 4 gpu-bench --distributed                    # mpi4py

`--shape` is each rank's batch (N, C, ...), the channels on axis 1. Peers, each checked against
the first one's y and dx on every rank before it is timed:

  ours           gpu.batch_norm_forward / batch_norm_backward with comm=: one packed allgather
                 forward, one packed all-reduce backward (NumPy arrays on the CPU, CuPy on GPUs)
  ours-torch     gpu.torch.SyncBatchNorm on tensors (torch.distributed ranks only)
  torch          torch.nn.SyncBatchNorm (CUDA tensors: its training forward runs on GPUs only)
  torch-algo     on the CPU, in place of torch: torch's SyncBatchNorm algorithm written with
                 torch ops and torch.distributed (an all_gather of each rank's mean, invstd and
                 count, the count-weighted merge, then an all_reduce of sum dy and sum dy*(x-mean)
                 backward), as its CUDA path runs, over gloo

Each timed step starts after a barrier; the time is rank 0's median. `coll ms` is the time spent
inside the collectives of a step (rank 0's median), `share` that over the step's time: on one
machine it includes waiting for the slowest rank.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np

import gpu
import gpu.distributed

CPU_SHAPE = (32, 64, 8, 8)
GPU_SHAPE = (32, 256, 28, 28)


# ---------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------

def launch_local(ranks: int, argv: list[str], timeout: float) -> int:
    """Run this benchmark as `ranks` local gloo ranks (127.0.0.1); rank 0's output is shown."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = _without_ranks(argv)
    procs = []
    for r in range(ranks):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_RANK=str(r),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        procs.append(subprocess.Popen([sys.executable, "-m", "gpu.bench", *argv], env=env, start_new_session=True,
                                      stdout=None if r == 0 else subprocess.DEVNULL, stderr=None))
    status = 0
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            status |= p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        print(f"gpu-bench: --distributed: the ranks did not finish in {timeout:g} s", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        status = 1
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return 1 if status else 0


def _without_ranks(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--ranks":
            skip = True
        elif not a.startswith("--ranks="):
            out.append(a)
    return out


def _engine(choice: str) -> str:
    if choice != "auto":
        return choice
    if "WORLD_SIZE" in os.environ and "MASTER_PORT" in os.environ:
        return "torch"
    if any(k in os.environ for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")):
        return "mpi"
    return "none"


# ---------------------------------------------------------------------------------------------
# Timing with the collectives' share
# ---------------------------------------------------------------------------------------------

class _Clock:
    """Seconds spent inside collectives since the last reset."""

    def __init__(self):
        self.spent = 0.0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.spent += time.perf_counter() - t0
        return timed


def _time_steps(step, barrier, clock: _Clock, sync, repeat: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        step()
    sync()
    total, coll = [], []
    for _ in range(repeat):
        barrier()
        clock.spent = 0.0
        t0 = time.perf_counter()
        step()
        sync()
        total.append(time.perf_counter() - t0)
        coll.append(clock.spent)
    return statistics.median(total), statistics.median(coll)


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------

def _ours_arrays(comm, x, dy, gamma, beta, axis):
    """gpu's synchronized batch norm on arrays."""
    acc = np.float64 if x.dtype == np.float64 else np.float32
    rm, rv = np.zeros(x.shape[1], acc), np.ones(x.shape[1], acc)
    if type(x) is not np.ndarray:
        import cupy
        rm, rv = cupy.asarray(rm), cupy.asarray(rv)

    def step():
        y, mean, invstd = gpu.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv,
                                                 comm=comm)
        dx, dgamma, dbeta = gpu.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis, comm=comm)
        return y, dx
    return step


def _module_step(bn, x, dy):
    def step():
        xx = x.detach().requires_grad_(True)
        y = bn(xx)
        y.backward(dy)
        bn.weight.grad = bn.bias.grad = None
        return y.detach(), xx.grad
    return step


def _torch_algo(torch, dist, group, clock: _Clock, x, dy, w, b, eps=1e-5, momentum=0.1):
    """torch's SyncBatchNorm (torch/nn/modules/_functions.py) with torch ops: its CUDA-only
    primitives (batch_norm_stats, batch_norm_gather_stats_with_counts, batch_norm_elemt,
    batch_norm_backward_reduce / _elemt) written out, its collectives as it issues them on gloo."""
    P = dist.get_world_size(group)
    C = x.shape[1]
    red = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    rm, rv = torch.zeros(C, dtype=x.dtype), torch.ones(C, dtype=x.dtype)
    all_gather, all_reduce = clock.wrap(dist.all_gather), clock.wrap(dist.all_reduce)

    def step():
        n = x.numel() // C
        var, mean = torch.var_mean(x, dim=red, unbiased=False)
        combined = torch.cat([mean, torch.rsqrt(var + eps), torch.full((1,), float(n), dtype=x.dtype)])
        parts = [torch.empty_like(combined) for _ in range(P)]
        all_gather(parts, combined, group)
        allp = torch.stack(parts)
        means, invstds, counts = allp[:, :C], allp[:, C:2 * C], allp[:, 2 * C:]
        N = counts.sum()
        g_mean = (means * counts).sum(0) / N
        vars_ = 1 / invstds ** 2 - eps
        g_var = ((vars_ + (means - g_mean) ** 2) * counts).sum(0) / N
        invstd = torch.rsqrt(g_var + eps)
        rm.mul_(1 - momentum).add_(g_mean, alpha=momentum)
        rv.mul_(1 - momentum).add_(g_var * N / (N - 1), alpha=momentum)
        xmu = x - g_mean.view(shape)
        y = xmu * (invstd * w).view(shape) + b.view(shape)
        sum_dy = dy.sum(red)
        sum_dy_xmu = (dy * xmu).sum(red)
        both = torch.cat([sum_dy, sum_dy_xmu])
        all_reduce(both, group=group)
        sum_dy, sum_dy_xmu = both[:C] / N, both[C:] / N
        dx = (dy - sum_dy.view(shape) - xmu * (invstd ** 2 * sum_dy_xmu).view(shape)) * (invstd * w).view(shape)
        return y, dx
    return step


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def run(shapes, dtype: str | None, device: str, engine: str, repeat: int | None, warmup: int | None,
        seed: int, json_path: str | None, argv: list[str]) -> int:
    engine = _engine(engine)
    if engine == "none":
        print("gpu-bench: --distributed runs as ranks: use --ranks P (local gloo ranks), or launch under "
              "torchrun --nproc-per-node P -m gpu.bench --distributed, or mpiexec -n P gpu-bench --distributed",
              file=sys.stderr)
        return 2
    from .devices import gpu_unavailable
    on_gpu = device != "cpu" and not gpu_unavailable()
    if device == "gpu" and not on_gpu:
        print("gpu-bench: --device gpu, but no GPU is usable", file=sys.stderr)
        return 2
    torch = dist = group = None
    if engine == "torch":
        import torch
        import torch.distributed as dist
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if on_gpu:
            torch.cuda.set_device(local)
        owner = not dist.is_initialized()           # else the caller's ranks (the tests')
        if owner:
            dist.init_process_group("nccl" if on_gpu else "gloo")
        group = dist.group.WORLD
        torch.set_num_threads(1)
        comm = gpu.distributed.wrap(group)
        barrier = dist.barrier
    else:
        from mpi4py import MPI
        if on_gpu:
            import cupy
            cupy.cuda.Device(int(os.environ.get("LOCAL_RANK", MPI.COMM_WORLD.Get_rank()))).use()
        comm = gpu.distributed.wrap(MPI.COMM_WORLD)
        barrier = MPI.COMM_WORLD.Barrier
        try:
            import torch
        except ImportError:
            torch = None
    r, P = comm.rank, comm.size
    dtype = dtype or "float32"
    repeat = repeat or (50 if on_gpu else 20)
    warmup = 3 if warmup is None else warmup
    shapes = shapes or [GPU_SHAPE if on_gpu else CPU_SHAPE]
    xp = np
    sync = lambda: None                                     # noqa: E731
    if on_gpu:
        import cupy as xp
        sync = xp.cuda.get_current_stream().synchronize
    say = print if r == 0 else (lambda *a, **k: None)
    say(f"gpu-bench {gpu.__version__} --distributed: {P} ranks on {engine}"
        f"{'/' + dist.get_backend(group) if engine == 'torch' else ''}, {'gpu' if on_gpu else 'cpu'}, {dtype}; "
        f"per rank shapes, median of {repeat} steps (forward + backward) after a barrier each", flush=True)
    if not on_gpu and torch is not None and engine == "torch":
        say("  torch-algo: torch's SyncBatchNorm algorithm in torch ops over gloo (torch.nn.SyncBatchNorm's "
            "training forward runs on CUDA only)")
    clock = _Clock()        # the adapter's two collectives, timed (ours and ours-torch share it)
    comm._allgather, comm._allreduce = clock.wrap(comm._allgather), clock.wrap(comm._allreduce)
    if engine == "mpi":
        say("  (torch's peers need torch.distributed ranks: --ranks P or torchrun)")
    rows = []
    for shape in shapes:
        C = shape[1]
        axis = (0,) + tuple(range(2, len(shape)))
        rng = np.random.default_rng(seed + r)
        x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        gamma = np.linspace(0.5, 1.5, C).astype(dtype)
        beta = np.linspace(-1, 1, C).astype(dtype)
        X, DY, G, B = (xp.asarray(a) for a in (x, dy, gamma, beta))
        peers: dict[str, tuple] = {"ours": (_ours_arrays(comm, X, DY, G, B, axis), clock)}
        if torch is not None and engine == "torch":
            import gpu.torch as gt
            dev = "cuda" if on_gpu else "cpu"
            tx, tdy = torch.from_numpy(x).to(dev), torch.from_numpy(dy).to(dev)
            tw, tb = torch.from_numpy(gamma).to(dev), torch.from_numpy(beta).to(dev)
            for name, cls in (("ours-torch", gt.SyncBatchNorm),) + ((("torch", torch.nn.SyncBatchNorm),) if on_gpu else ()):
                bn = cls(C, dtype=tx.dtype, device=dev)
                with torch.no_grad():
                    bn.weight.copy_(tw)
                    bn.bias.copy_(tb)
                # ours-torch's adapter is `comm` (the same group): its clock; torch's is not timed
                peers[name] = (_module_step(bn, tx, tdy), clock if name == "ours-torch" else _Clock())
            if not on_gpu:
                c3 = _Clock()
                peers["torch-algo"] = (_torch_algo(torch, dist, group, c3, tx, tdy, tw, tb), c3)
        first = None
        for name, (step, clk) in peers.items():
            y, dx = step()
            y, dx = (np.asarray(a.cpu() if hasattr(a, "cpu") else (a.get() if hasattr(a, "get") else a), np.float64)
                     for a in (y, dx))
            if first is None:
                first, err = (y, dx), 0.0
            else:
                err = max(float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip((y, dx), first))
            errs = comm.allgather(xp.asarray(np.array([err])), "gpu-bench check")
            err = float(np.max(errs.get() if hasattr(errs, "get") else errs))
            tol = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2}[dtype]
            if err > tol:
                say(f"  {'x'.join(map(str, shape)):>14s}  {name:11s} WRONG (rel. err. {err:.1e} against {list(peers)[0]})")
                rows.append({"shape": list(shape), "peer": name, "status": "WRONG", "rel_err": err})
                continue
            sec, coll = _time_steps(step, barrier, clk, sync, repeat, warmup)
            rows.append({"shape": list(shape), "peer": name, "status": "ok", "ms": sec * 1e3,
                         "collective_ms": coll * 1e3, "share": coll / sec if sec else float("nan"), "rel_err": err})
            if len(rows) == 1 or rows[-2]["shape"] != list(shape):
                say(f"  {'shape/rank':>14s}  {'peer':11s} {'ms/step':>9s} {'coll ms':>9s} {'share':>6s}  rel.err")
            say(f"  {'x'.join(map(str, shape)):>14s}  {name:11s} {sec * 1e3:9.3f} {coll * 1e3:9.3f} "
                f"{coll / sec:6.0%}  {err:.0e}", flush=True)
    ok = all(row["status"] == "ok" for row in rows)
    if json_path and r == 0:
        with open(json_path, "w") as f:
            json.dump({"mode": "distributed", "ranks": P, "engine": engine, "gpu": on_gpu, "dtype": dtype,
                       "repeat": repeat, "argv": argv, "rows": rows}, f, indent=1)
    for name in ("_allgather", "_allreduce"):      # the adapter's own methods again
        comm.__dict__.pop(name, None)
    barrier()
    if engine == "torch" and owner:
        dist.destroy_process_group()
    return 0 if ok else 1
