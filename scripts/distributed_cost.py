"""Alpha-beta cost of synchronized batch norm per layer and training step: gpu's packed
collectives against torch.nn.SyncBatchNorm's, for docs/DISTRIBUTED.md.

    python scripts/distributed_cost.py [--alpha-us 5] [--gbps 25]

Model: a collective step costs alpha (latency) plus bytes / bandwidth. Ring algorithms (NCCL's
default for these sizes between nodes): allgather P-1 steps, each receiving one rank's block;
all-reduce 2(P-1) steps of 1/P of the vector. Recursive doubling / trees (MPI for small messages,
NCCL's tree all-reduce): log2 P steps for the allgather, 2 log2 P for the all-reduce; same bytes.

gpu (float64 buffers, any data dtype):  forward allgather of 7 + 1 + 2C values per rank
                                         backward all-reduce of 6 + 2C values
torch SyncBatchNorm (float32 data):      forward all_gather_into_tensor of mean, invstd, count
                                         (2C + 1 values per rank, the data's dtype)
                                         backward all_reduce of sum_dy, sum_dy_xmu (2C values)
"""
from __future__ import annotations

import argparse
import math


def cost(P: int, block_bytes: float, vector_bytes: float, alpha: float, beta: float) -> dict:
    """(bytes received per rank, ring seconds, tree seconds) of one allgather of `block_bytes` per
    rank plus one all-reduce of `vector_bytes`."""
    lg = math.ceil(math.log2(P))
    gather_bytes = (P - 1) * block_bytes
    reduce_bytes = 2 * (P - 1) / P * vector_bytes
    data = (gather_bytes + reduce_bytes) * beta
    return {"bytes": gather_bytes + reduce_bytes,
            "ring": (P - 1) * alpha + 2 * (P - 1) * alpha + data,
            "tree": lg * alpha + 2 * lg * alpha + data}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alpha-us", type=float, default=5.0, help="latency per step (default 5 us)")
    ap.add_argument("--gbps", type=float, default=25.0, help="bandwidth per rank, GB/s (default 25)")
    a = ap.parse_args()
    alpha, beta = a.alpha_us * 1e-6, 1 / (a.gbps * 1e9)
    print(f"alpha = {a.alpha_us:g} us, bandwidth {a.gbps:g} GB/s; per BN layer, forward + backward\n")
    print("| GPUs | C | gpu bytes/rank | torch bytes/rank | gpu ring us | torch ring us "
          "| gpu tree us | torch tree us |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for P in (8, 64, 512):
        for C in (64, 256, 1024, 2048):
            ours = cost(P, (8 + 2 * C) * 8, (6 + 2 * C) * 8, alpha, beta)
            torch = cost(P, (2 * C + 1) * 4, 2 * C * 4, alpha, beta)
            print(f"| {P} | {C} | {ours['bytes'] / 1e3:,.1f} kB | {torch['bytes'] / 1e3:,.1f} kB "
                  f"| {ours['ring'] * 1e6:,.0f} | {torch['ring'] * 1e6:,.0f} "
                  f"| {ours['tree'] * 1e6:,.0f} | {torch['tree'] * 1e6:,.0f} |")


if __name__ == "__main__":
    main()
