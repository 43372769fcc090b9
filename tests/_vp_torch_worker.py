"""One rank of tests/test_torch_vocab_parallel.py: gpu.torch's vocabulary-parallel cross-entropy
and fused linear cross-entropy (``process_group=``) on torch.distributed gloo ranks on
127.0.0.1. Usage:

    python tests/_vp_torch_worker.py OUTDIR [nccl]    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)

nccl: CUDA tensors on GPU `rank` over NCCL (the kernels; scripts/gpu_check.sh on a machine with 2
or more GPUs), the numerical cases only.

Every rank builds each case's whole problem from the case's seed, keeps its slice of the classes
(`share`), runs forward and backward through gpu.torch, and writes its loss, z-term and
gradients to OUTDIR/rank{r}.npz; what it observed (collective counts, error messages) goes to
OUTDIR/rank{r}.json. The test file rebuilds the whole problems (`problem`) for the references.
"""
from __future__ import annotations

import datetime
import json
import os
import sys

import numpy as np
import torch

#: name -> (kind, dtype, N, H (fused linear CE) or spatial size (CE, 0: (N, C) logits), class split over
#: the ranks, options); the awkward ones say why
CASES = {
    # unequal shares of 11 classes, every option at once, ignored rows
    "ce_mean_all": ("ce", "float64", 9, 0, (6, 5), dict(reduction="mean", label_smoothing=0.1, weight=True,
                                                         z_loss=1e-3, softcap=5.0, ignore=True)),
    # per-row upstream gradients (replicated), the other way round of unequal shares
    "ce_none": ("ce", "float64", 9, 0, (4, 7), dict(reduction="none", label_smoothing=0.05, z_loss=1e-2,
                                                    ignore=True)),
    # rank 1 holds no class (an empty slice)
    "ce_sum_empty": ("ce", "float64", 6, 0, (5, 0), dict(reduction="sum", softcap=3.0)),
    # every row ignored: 'mean' of nothing is NaN, as torch's
    "ce_all_ignored": ("ce", "float64", 4, 0, (3, 3), dict(reduction="mean", ignore="all")),
    # (N, C, d) logits, the class axis 1; float32
    "ce_spatial_f32": ("ce", "float32", 3, 4, (5, 6), dict(reduction="mean", label_smoothing=0.1, weight=True)),
    # bfloat16 logits (float32 arithmetic)
    "ce_bf16": ("ce", "bfloat16", 8, 0, (7, 9), dict(reduction="mean", z_loss=1e-3)),
    # several chunks of rows (chunk_size 3 of 7), every option, bias and class weights
    "flce_mean_all": ("flce", "float64", 7, 8, (6, 5), dict(reduction="mean", label_smoothing=0.1, weight=True,
                                                            z_loss=1e-3, softcap=5.0, ignore=True, bias=True,
                                                            chunk_size=3)),
    # reduction 'none': the chunked pass again in the backward, with per-row upstream gradients
    "flce_none": ("flce", "float64", 6, 5, (7, 4), dict(reduction="none", z_loss=1e-2, bias=True, ignore=True)),
    # one class per rank; the module form; float32
    "flce_module_f32": ("flce", "float32", 5, 4, (1, 1), dict(reduction="sum", module=True, label_smoothing=0.2)),
    # an empty slice of the head (rank 1 has no rows of W)
    "flce_empty_share": ("flce", "float64", 4, 3, (5, 0), dict(reduction="mean", bias=True)),
    # the kernel path on the emulator (CPU tensors under the emulate backend): the device-side
    # statistics, merge and gradient kernels behind gpu.torch
    "ce_emulated_f32": ("ce", "float32", 6, 0, (7, 4), dict(reduction="mean", label_smoothing=0.1, z_loss=1e-3,
                                                            softcap=5.0, ignore=True, emulate=True)),
    "flce_emulated": ("flce", "float64", 5, 4, (3, 6), dict(reduction="sum", z_loss=1e-3, bias=True, emulate=True,
                                                            chunk_size=2)),
}
#: compiled with torch.compile(fullgraph=True): the same results as eager
COMPILED = ("ce_mean_all", "flce_mean_all")


def share(split, rank: int) -> slice:
    lo = sum(split[:rank])
    return slice(lo, lo + split[rank])


def problem(name: str):
    """The whole problem of a case, float64 NumPy: logits (CE) or (h, W, bias) (fused linear CE),
    targets, class weights or None, the upstream gradient of the loss."""
    kind, dtype, N, H, split, opts = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    V = sum(split)
    if kind == "ce":
        shape = (N, V) if not H else (N, V, H)
        data = {"z": rng.standard_normal(shape) * 2}
        rows = (N,) if not H else (N, H)
    else:
        data = {"h": rng.standard_normal((N, H)), "W": rng.standard_normal((V, H)) * 2 / H ** 0.5,
                "b": rng.standard_normal(V) * 0.5 if opts.get("bias") else None}
        rows = (N,)
    t = rng.integers(0, V, rows)
    if opts.get("ignore") == "all":
        t[...] = -100
    elif opts.get("ignore"):
        t.reshape(-1)[::3] = -100
    data["t"] = t
    data["w"] = rng.random(V) + 0.5 if opts.get("weight") else None
    data["dloss"] = rng.standard_normal(rows) if opts["reduction"] == "none" else 1.0
    return data


def options(name: str) -> dict:
    """The case's keyword arguments of gpu.torch (class weights and the rest come with the data)."""
    opts = dict(CASES[name][5])
    return {k: v for k, v in opts.items() if k not in ("weight", "ignore", "bias", "module", "emulate")}


def run_case(name: str, group, rank: int, compiled: bool = False, device: str = "cpu") -> dict:
    import gpu.torch as gt
    kind, dtype, N, H, split, opts = CASES[name]
    dt = getattr(torch, dtype)
    d = problem(name)
    mine = share(split, rank)
    tens = lambda a, grad=False: (None if a is None else  # noqa: E731
                                  torch.tensor(a, dtype=dt, device=device).requires_grad_(grad))
    target = torch.tensor(d["t"], device=device)
    w = None if d["w"] is None else torch.tensor(d["w"][mine], dtype=dt if dtype == "float64" else torch.float32,
                                                 device=device)
    kw = options(name)
    if kind == "ce":
        z = tens(d["z"][:, mine], grad=True)
        f = lambda z: gt.cross_entropy(z, target, w, return_z_loss=True, process_group=group, **kw)  # noqa: E731
        inputs = (z,)
    else:
        h, W, b = tens(d["h"], True), tens(d["W"][mine], True), tens(None if d["b"] is None else d["b"][mine], True)
        if opts.get("module"):
            crit = gt.FusedLinearCrossEntropyLoss(ce_weight=w, return_z_loss=True, process_group=group, **kw)
            f = lambda h, W, b: crit(W, h, target, b)   # noqa: E731
        else:
            def f(h, W, b):
                return gt.fused_linear_cross_entropy(h, W, target, b, ce_weight=w, return_z_loss=True,
                                                     process_group=group, **kw)
        inputs = (h, W, b)
    if compiled:
        torch._dynamo.reset()
        f = torch.compile(f, backend="aot_eager", fullgraph=True)
    import contextlib
    import gpu
    with gpu.use_backend("emulate") if opts.get("emulate") else contextlib.nullcontext():
        loss, z_term = f(*inputs)
        dloss = torch.tensor(d["dloss"], dtype=loss.dtype, device=device)
        leaves = [x for x in inputs if x is not None]
        grads = torch.autograd.grad(loss, leaves, dloss)
    out = {"loss": loss, "z_term": z_term}
    for key, g in zip(("dz",) if kind == "ce" else ("dh", "dW", "db"), grads):
        out[key] = g
    return {k: v.detach().double().cpu().numpy() for k, v in out.items()}


def counted(comm, fn) -> int:
    before = comm.collectives
    fn()
    return comm.collectives - before


def main() -> None:
    import torch.distributed as dist
    import gpu.distributed as D
    outdir, nccl = sys.argv[1], sys.argv[2:] == ["nccl"]
    if nccl:
        torch.cuda.set_device(int(os.environ["RANK"]))
    dist.init_process_group("nccl" if nccl else "gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    group = dist.group.WORLD
    arrays, info = {}, {"errors": {}, "collectives": {}}
    if nccl:
        for name in CASES:
            for k, v in run_case(name, group, rank, device=f"cuda:{rank}").items():
                arrays[f"{name}/{k}"] = v
        torch.cuda.synchronize()
        np.savez(os.path.join(outdir, f"rank{rank}.npz"), **arrays)
        dist.barrier()
        dist.destroy_process_group()
        return
    for name in CASES:
        for k, v in run_case(name, group, rank).items():
            arrays[f"{name}/{k}"] = v
    for name in COMPILED:
        for k, v in run_case(name, group, rank, compiled=True).items():
            arrays[f"{name}/compiled/{k}"] = v
    # collectives of a warm call, forward and backward (the header exchanged by the calls above)
    comm = D.wrap(group)
    info["collectives"]["ce"] = counted(comm, lambda: run_case("ce_mean_all", group, rank))
    info["collectives"]["flce"] = counted(comm, lambda: run_case("flce_mean_all", group, rank))
    # bad input: the same exception on every rank, never a hang
    import gpu.torch as gt
    f64 = dict(dtype=torch.float64)
    rows, zeros = lambda n: torch.randn(n, 3, **f64), lambda n: torch.zeros(n, dtype=torch.long)   # noqa: E731
    bad = {
        # ranks disagree on the number of rows
        "rows": lambda: gt.cross_entropy(rows(4 + rank), zeros(4 + rank), process_group=group),
        # ranks disagree on an option
        "options": lambda: gt.cross_entropy(rows(4), zeros(4), label_smoothing=0.1 * rank, process_group=group),
        # a target outside the global vocabulary of 6 classes
        "target": lambda: gt.cross_entropy(rows(4), torch.tensor([0, 1, 6, 2]), process_group=group),
        # weight and bias of different local sizes
        "bias": lambda: gt.fused_linear_cross_entropy(torch.randn(4, 3), torch.randn(2, 3), zeros(4), torch.randn(3),
                                                      process_group=group),
        # not a process group
        "group": lambda: gt.cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), process_group="world"),
        # class probabilities cannot be split
        "probs": lambda: gt.cross_entropy(torch.randn(4, 3), torch.rand(4, 3), process_group=group),
    }
    for key, fn in bad.items():
        try:
            fn()
            info["errors"][key] = None
        except Exception as e:      # noqa: BLE001 - the test reads the type and message
            builtin = next(c for c in type(e).__mro__ if c.__module__ == "builtins")   # ValueError, ...
            info["errors"][key] = f"{builtin.__name__}: {e}"
    np.savez(os.path.join(outdir, f"rank{rank}.npz"), **arrays)
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
