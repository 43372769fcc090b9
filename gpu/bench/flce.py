"""`gpu-bench --op flce`: fused linear + cross-entropy against the paths that materialize the logits.

One row per peer: the time of a loss + gradients call (median of the timed calls) and the peak
memory it takes above what it started with (its inputs excluded, its gradients included).

Peers:
  ours          gpu.fused_linear_cross_entropy(h, W, target, return_grad=True): chunked
  numpy         the materializing NumPy path: z = h W^T, gpu.softmax_cross_entropy(z, ...,
                return_grad=True), dh = dz W, dW = dz^T h (CPU only)
  torch         F.cross_entropy(F.linear(h, W), target) and autograd, eager (when torch is
                installed; on the GPU when it sees one)
  gpu.torch     ours through torch: gpu.torch.fused_linear_cross_entropy(h, W, target) and
                autograd (the gradients come from the forward's chunked pass)

Peak memory: on the CPU the process's resident high-water mark (VmHWM, reset through
/proc/self/clear_refs before each measured call) above its resident size at the start, so NumPy,
BLAS and PyTorch allocations count alike; on the GPU, torch.cuda.max_memory_allocated for torch
and, for ours, the bytes CuPy allocates through a counting allocator (one untimed call).

Shapes: (tokens, hidden, vocab). The GPU default is (8192, 4096, 128256) in bfloat16 (Llama 3's
head); the CPU default a scaled-down (1024, 256, 32000) in float32. bfloat16 runs through torch
tensors only where CuPy has no bfloat16: on the GPU ours runs float16 for the bfloat16 row.
"""
from __future__ import annotations

import gc
import json
import statistics
import sys
import time

import numpy as np

import gpu

GPU_SHAPE = (8192, 4096, 128256)
CPU_SHAPE = (1024, 256, 32000)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _cpu_peak(fn) -> float:
    """MiB the call's resident set rose above its start (Linux; NaN elsewhere)."""
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                 # reset VmHWM to the current resident size
        start = _rss_kib("VmRSS")
        out = fn()
        peak = _rss_kib("VmHWM")
        del out
        return (peak - start) / 1024
    except OSError:
        return float("nan")


def _time(fn, repeat: int, warmup: int, sync=lambda: None) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _torch():
    try:
        import torch
        import torch.nn.functional as F
        return torch, F
    except ImportError:
        return None, None


def _peers_cpu(h, W, t):
    def ours():
        return gpu.fused_linear_cross_entropy(h, W, t, return_grad=True)

    def numpy():
        z = h @ W.T
        loss, dz = gpu.softmax_cross_entropy(z, t, return_grad=True)
        del z
        return loss, (W.T @ dz.T).T, dz.T @ h

    peers = {"ours": ours, "numpy": numpy}
    torch, F = _torch()
    if torch is not None:
        th, tW, tt = torch.from_numpy(h), torch.from_numpy(W), torch.from_numpy(t)

        def torch_eager():
            hh, WW = th.detach().requires_grad_(), tW.detach().requires_grad_()
            loss = F.cross_entropy(F.linear(hh, WW), tt)
            loss.backward()
            return loss.detach(), hh.grad, WW.grad
        peers["torch"] = torch_eager
        peers["gpu.torch"] = _through_gpu_torch(torch, th, tW, tt)
    return peers


def _through_gpu_torch(torch, th, tW, tt):
    import gpu.torch as gt

    def run():
        hh, WW = th.detach().requires_grad_(), tW.detach().requires_grad_()
        loss = gt.fused_linear_cross_entropy(hh, WW, tt)
        loss.backward()
        return loss.detach(), hh.grad, WW.grad
    return run


def run(shape=None, dtype: str | None = None, device: str = "auto", repeat: int | None = None,
        warmup: int | None = None, seed: int = 0, json_path: str | None = None) -> int:
    """Time and peak memory per peer on one shape; prints a table, returns the exit status."""
    from .devices import gpu_unavailable
    on_gpu = device != "cpu" and not gpu_unavailable()
    if device == "gpu" and not on_gpu:
        print("gpu-bench: --device gpu, but no GPU is usable", file=sys.stderr)
        return 2
    N, H, V = shape or (GPU_SHAPE if on_gpu else CPU_SHAPE)
    dtype = dtype or ("bfloat16" if on_gpu else "float32")
    repeat = repeat or (20 if on_gpu else 3)
    warmup = 1 if warmup is None else warmup
    rng = np.random.default_rng(seed)
    rows = []
    print(f"gpu-bench {gpu.__version__} --op flce on {'gpu' if on_gpu else 'cpu'}: tokens {N}, hidden {H}, "
          f"vocab {V}, {dtype}; logits alone would be {N * V * 4 / 2**20:.0f} MiB in float32", flush=True)
    if on_gpu:
        rows = _run_gpu(rng, N, H, V, dtype, repeat, warmup)
    else:
        h = (rng.standard_normal((N, H)) * 0.5).astype(dtype)
        W = (rng.standard_normal((V, H)) / np.sqrt(H)).astype(dtype)
        t = rng.integers(0, V, N)
        peers = _peers_cpu(h, W, t)
        want = peers["numpy"]()
        for name, fn in peers.items():
            out = fn()
            err = max(float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                            / np.linalg.norm(np.asarray(b, np.float64))) for a, b in zip(out[:3], want))
            del out
            peak = _cpu_peak(fn)
            sec = _time(fn, repeat, warmup)
            rows.append({"peer": name, "ms": sec * 1e3, "peak_mib": peak, "max_rel_err": err})
            print(f"  {name:9s} {sec * 1e3:10.1f} ms   peak {peak:8.1f} MiB   rel. err. vs numpy {err:.1e}",
                  flush=True)
    base = next((r for r in rows if r["peer"] == "torch"), None)
    ours = next((r for r in rows if r["peer"] == "ours"), None)
    if base and ours and ours["peak_mib"] > 0:
        print(f"  ours: {base['peak_mib'] / ours['peak_mib']:.1f}x less peak memory than torch, "
              f"{base['ms'] / ours['ms']:.2f}x its speed")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"op": "flce", "shape": [N, H, V], "dtype": dtype, "gpu": on_gpu, "rows": rows}, f, indent=1)
    return 0


def _run_gpu(rng, N, H, V, dtype, repeat, warmup) -> list[dict]:
    """ours (CuPy; float16 for a bfloat16 row) and torch eager on the GPU."""
    import cupy as cp
    rows = []
    ours_dt = "float16" if dtype == "bfloat16" else dtype
    h = cp.asarray((rng.standard_normal((N, H)) * 0.5).astype(np.float32)).astype(ours_dt)
    W = cp.asarray((rng.standard_normal((V, H)) / np.sqrt(H)).astype(np.float32)).astype(ours_dt)
    t = cp.asarray(rng.integers(0, V, N))
    sync = cp.cuda.Device().synchronize

    def ours():
        return gpu.fused_linear_cross_entropy(h, W, t, return_grad=True)

    live = {"now": 0, "peak": 0}
    sizes = {}

    def malloc(size, dev):
        mem = cp.cuda.runtime.malloc(size)
        sizes[mem] = size
        live["now"] += size
        live["peak"] = max(live["peak"], live["now"])
        return mem

    def free(mem, dev):
        live["now"] -= sizes.pop(mem, 0)
        cp.cuda.runtime.free(mem)

    out = ours()
    del out
    cp.get_default_memory_pool().free_all_blocks()
    cp.cuda.set_allocator(cp.cuda.memory.PythonFunctionAllocator(malloc, free).malloc)
    try:
        out = ours()
        sync()
        del out
    finally:
        cp.cuda.set_allocator(cp.get_default_memory_pool().malloc)
    sec = _time(ours, repeat, warmup, sync)
    rows.append({"peer": "ours", "dtype": ours_dt, "ms": sec * 1e3, "peak_mib": live["peak"] / 2**20})
    print(f"  ours   {sec * 1e3:10.2f} ms   peak {live['peak'] / 2**20:8.1f} MiB ({ours_dt})", flush=True)
    del h, W
    cp.get_default_memory_pool().free_all_blocks()

    torch, F = _torch()
    if torch is None or not torch.cuda.is_available():
        print("  torch: unavailable")
        return rows
    tdt = getattr(torch, dtype)
    th = (torch.randn(N, H, device="cuda") * 0.5).to(tdt)
    tW = (torch.randn(V, H, device="cuda") / H ** 0.5).to(tdt)
    tt = torch.randint(0, V, (N,), device="cuda")

    def torch_eager():
        hh, WW = th.detach().requires_grad_(), tW.detach().requires_grad_()
        loss = F.cross_entropy(F.linear(hh, WW), tt)
        loss.backward()
        return loss.detach(), hh.grad, WW.grad

    for name, fn in (("torch", torch_eager), ("gpu.torch", _through_gpu_torch(torch, th, tW, tt))):
        out = fn()
        del out
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - start) / 2**20
        del out
        sec = _time(fn, repeat, warmup, torch.cuda.synchronize)
        rows.append({"peer": name, "dtype": dtype, "ms": sec * 1e3, "peak_mib": peak})
        print(f"  {name:9s} {sec * 1e3:10.2f} ms   peak {peak:8.1f} MiB ({dtype})", flush=True)
    return rows
