"""Forward + backward of relu(batch_norm(x) + r) on the CPU: gpu.torch's fused call against torch
eager and torch.compile (inductor), interleaved in one process.

    python scripts/bench_bn_add_relu.py                        # (32, 64, 56, 56) float32, NCHW and NHWC
    python scripts/bench_bn_add_relu.py --shape 8,16,8,8 --rounds 5 --no-compile

Each round runs every implementation once, in a rotating order, on the same inputs (training
mode, running statistics updated, gradients of x, weight, bias and the residual), so a change in
the machine's load shows in all of them alike; the table gives each one's median and the median
of the per-round ratios to gpu.torch. Each one's error against torch eager in float64 is printed
first (gpu.torch's must be under 1e-5).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gpu.torch as gt  # noqa: E402


def eager(x, r, w, b, rm, rv):
    return torch.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5) + r)


def fused(x, r, w, b, rm, rv):
    return gt.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, residual=r, activation="relu")


def step(f, leaves, rm, rv, dy):
    y = f(*leaves, rm, rv)
    return (y,) + torch.autograd.grad(y, leaves, dy)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="32,64,56,56", help="N,C,H,W (default 32,64,56,56)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2, help="torch's intra-op threads (default 2)")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    impls = {"gpu.torch fused": fused, "torch eager": eager}
    if not args.no_compile:
        impls["torch.compile"] = torch.compile(eager)
    print(f"relu(bn(x) + r) forward+backward, {shape} float32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=g) * 2 + 0.5).contiguous(memory_format=fmt)
        r = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
        dy = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
        C = shape[1]
        w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
        leaves = tuple(t.detach().requires_grad_() for t in (x, r, w, b))
        rm, rv = torch.zeros(C), torch.ones(C)
        wide = tuple(t.detach().double().requires_grad_() for t in leaves)
        truth = step(eager, wide, rm.double(), rv.double(), dy.double())     # float64 torch eager
        for name, f in impls.items():       # warm-up (torch.compile compiles here), then a check
            t0 = time.perf_counter()
            out = step(f, leaves, rm.clone(), rv.clone(), dy)
            worst = max(float((a.detach().double() - e.detach()).norm() / e.detach().norm())
                        for a, e in zip(out, truth))
            print(f"  {fmt_name} {name}: first call {time.perf_counter() - t0:.1f} s, "
                  f"largest relative error (y, dx, dr, dweight, dbias) vs float64 {worst:.2e}")
            if name == "gpu.torch fused":
                assert worst < 1e-5, (name, worst)
        times = {name: [] for name in impls}
        names = list(impls)
        for k in range(args.rounds):
            for name in names[k % len(names):] + names[:k % len(names)]:
                t0 = time.perf_counter()
                step(impls[name], leaves, rm, rv, dy)
                times[name].append(time.perf_counter() - t0)
        base = times["gpu.torch fused"]
        print(f"{fmt_name}:")
        for name, ts in times.items():
            ratio = statistics.median(t / o for t, o in zip(ts, base))
            print(f"  {name:16s} median {statistics.median(ts) * 1e3:8.1f} ms  "
                  f"(min {min(ts) * 1e3:8.1f})  time / gpu.torch fused: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
