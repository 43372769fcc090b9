"""Alpha-beta cost of the package's collectives, for docs/DISTRIBUTED.md: synchronized batch norm
per layer and training step (gpu's packed collectives against torch.nn.SyncBatchNorm's), and
vocabulary-parallel cross-entropy per call (gpu's one packed allgather against Megatron-LM's
three all-reduces).

    python scripts/distributed_cost.py [--alpha-us 5] [--gbps 25] [--tokens 8192] [--hidden 4096] [--tflops 400]

Model: a collective step costs alpha (latency) plus bytes / bandwidth. Ring algorithms (NCCL's
default for these sizes between nodes): allgather P-1 steps, each receiving one rank's block;
all-reduce 2(P-1) steps of 1/P of the vector. Recursive doubling / trees (MPI for small messages,
NCCL's tree all-reduce): log2 P steps for the allgather, 2 log2 P for the all-reduce; same bytes.

Batch norm:
gpu (float64 buffers, any data dtype):  forward allgather of 7 + 1 + 2C values per rank
                                         backward all-reduce of 6 + 2C values
torch SyncBatchNorm (float32 data):      forward all_gather_into_tensor of mean, invstd, count
                                         (2C + 1 values per rank, the data's dtype)
                                         backward all_reduce of sum_dy, sum_dy_xmu (2C values)

Vocabulary-parallel cross-entropy over N rows (gpu/ops/softmax/vocab_parallel.py):
gpu (float64):       ONE allgather of 11 header values + k N statistics per rank, k = 4 (max, sum
                     of exponentials, target logit, target weight; 5 with label smoothing)
Megatron-LM (float32 logits): three all-reduces of N values each, one after the other (max, then
                     target logit and sum of exponentials)
Both: the head's matmuls (6 N H V / P flops per rank: the logits, dh, dW) and, for the hidden
states' gradient, one all-reduce of N H values (float32 here), the same for both.
"""
from __future__ import annotations

import argparse
import math


def cost(P: int, block_bytes: float, vector_bytes: float, alpha: float, beta: float, reduces: int = 1) -> dict:
    """(bytes received per rank, ring seconds, tree seconds) of one allgather of `block_bytes` per
    rank (none for 0) plus `reduces` all-reduces of `vector_bytes` each."""
    lg = math.ceil(math.log2(P))
    gathers = 1 if block_bytes else 0
    gather_bytes = (P - 1) * block_bytes
    reduce_bytes = reduces * 2 * (P - 1) / P * vector_bytes
    data = (gather_bytes + reduce_bytes) * beta
    return {"bytes": gather_bytes + reduce_bytes,
            "ring": gathers * (P - 1) * alpha + reduces * 2 * (P - 1) * alpha + data,
            "tree": gathers * lg * alpha + reduces * 2 * lg * alpha + data}


def batch_norm_table(alpha: float, beta: float) -> None:
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


def vocab_parallel_table(alpha: float, beta: float, N: int, H: int, flops: float) -> None:
    print("| GPUs | V | classes/rank | gpu bytes/rank | Megatron bytes/rank | gpu ring us | Megatron ring us "
          "| gpu tree us | Megatron tree us | head matmuls us | dh all-reduce ring us |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for P in (8, 64, 512):
        for V in (128 * 1024, 256 * 1024):
            ours = cost(P, (11 + 4 * N) * 8, 0, alpha, beta, reduces=0)
            megatron = cost(P, 0, N * 4, alpha, beta, reduces=3)
            matmuls = 6 * N * H * (V / P) / flops
            dh = cost(P, 0, N * H * 4, alpha, beta)
            print(f"| {P} | {V // 1024}K | {V // P:,} | {ours['bytes'] / 1e6:,.2f} MB "
                  f"| {megatron['bytes'] / 1e6:,.2f} MB | {ours['ring'] * 1e6:,.0f} | {megatron['ring'] * 1e6:,.0f} "
                  f"| {ours['tree'] * 1e6:,.0f} | {megatron['tree'] * 1e6:,.0f} "
                  f"| {matmuls * 1e6:,.0f} | {dh['ring'] * 1e6:,.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alpha-us", type=float, default=5.0, help="latency per step (default 5 us)")
    ap.add_argument("--gbps", type=float, default=25.0, help="bandwidth per rank, GB/s (default 25)")
    ap.add_argument("--tokens", type=int, default=8192, help="rows of the cross-entropy call (default 8192)")
    ap.add_argument("--hidden", type=int, default=4096, help="hidden size of the head (default 4096)")
    ap.add_argument("--tflops", type=float, default=400.0,
                    help="matmul throughput per rank for the head's compute, TFLOP/s (default 400)")
    a = ap.parse_args()
    alpha, beta = a.alpha_us * 1e-6, 1 / (a.gbps * 1e9)
    print(f"alpha = {a.alpha_us:g} us, bandwidth {a.gbps:g} GB/s\n")
    print("Synchronized batch norm, per BN layer, forward + backward:\n")
    batch_norm_table(alpha, beta)
    print(f"\nVocabulary-parallel cross-entropy, one call of {a.tokens} rows (hidden {a.hidden}, "
          f"{a.tflops:g} TFLOP/s for the head's matmuls):\n")
    vocab_parallel_table(alpha, beta, a.tokens, a.hidden, a.tflops * 1e12)


if __name__ == "__main__":
    main()
