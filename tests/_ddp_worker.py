"""One rank of DistributedDataParallel over gloo (CPU tensors) with gpu.torch.SyncBatchNorm, for
tests/test_ddp.py: `python tests/_ddp_worker.py OUTDIR` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set (torchrun's variables). Rank r trains its rows of the global batch for STEPS SGD
steps; the test replays the unconverted model on the whole batch in one process.

Writes OUTDIR/rank{r}.npz (each step's loss sum and outputs, the final state_dict) and
OUTDIR/rank{r}.json (the converted module types, isinstance answers).
"""
from __future__ import annotations

import datetime
import gc
import json
import sys
from pathlib import Path

import numpy as np

#: the global batch and its split over 2 ranks: unequal, so the loss is scaled to the global count
N, SPLIT, STEPS = 8, [5, 3], 3


def model():
    """Conv2d -> BatchNorm2d -> ReLU -> Linear -> BatchNorm1d(momentum=None) -> ReLU -> Linear, float64,
    seeded (the test builds the same one)."""
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 8),
                               torch.nn.BatchNorm1d(8, momentum=None), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3)).double()


def batch(step: int):
    """The global batch of `step`: (x (N, 3, 6, 6) float64, labels (N,) int64), seeded."""
    rng = np.random.default_rng(100 + step)
    return rng.normal(1.0, 2.0, (N, 3, 6, 6)), rng.integers(0, 3, N)


def optimizer(params):
    import torch
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def main() -> None:
    import torch
    import torch.distributed as dist
    import gpu.torch as gt
    out = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    r, P = dist.get_rank(), dist.get_world_size()
    assert P == len(SPLIT), P
    net = gt.SyncBatchNorm.convert_sync_batchnorm(model())
    ddp = torch.nn.parallel.DistributedDataParallel(net)    # CPU module: torch's SyncBatchNorm is refused here
    opt = optimizer(ddp.parameters())
    lo, hi = sum(SPLIT[:r]), sum(SPLIT[:r + 1])
    arrays = {}
    for step in range(STEPS):
        x, t = batch(step)
        y = ddp(torch.from_numpy(x[lo:hi]))
        # this rank's share of the global mean: DDP averages the P ranks' gradients
        loss = torch.nn.functional.cross_entropy(y, torch.from_numpy(t[lo:hi]), reduction="sum") * (P / N)
        opt.zero_grad()
        loss.backward()
        opt.step()
        arrays[f"loss/{step}"] = loss.detach().numpy() / P
        arrays[f"out/{step}"] = y.detach().numpy()
    arrays.update({f"state/{k}": v.detach().numpy() for k, v in net.state_dict().items()})
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    info = {"types": [type(m).__module__ + "." + type(m).__name__ for m in bns],
            "isinstance_torch_sync": [isinstance(m, torch.nn.SyncBatchNorm) for m in bns],
            "isinstance_ours": [isinstance(m, gt.SyncBatchNorm) for m in bns]}
    np.savez(out / f"rank{r}.npz", **arrays)
    (out / f"rank{r}.json").write_text(json.dumps(info))
    del ddp, opt                   # DDP holds the group: none of it outlives destroy_process_group
    gc.collect()
    dist.barrier()                 # none closes its connections while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
