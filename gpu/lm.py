"""`gpu-train --task lm`: a tiny character-level language model trained with the fused head.

The corpus is generated (no download): sentences from a small fixed grammar (subjects, verbs,
objects, places, a few clauses), seeded, so the text has structure a model can learn (spelling,
word order, punctuation) and the same seed gives the same text.

The model predicts the next character from the previous `context` characters:

    embedding (chars -> d each, concatenated) -> Linear + ReLU (+ batch norm, --lm-bn)
        -> gpu.fused_linear_cross_entropy(hidden, W_out, next_char, b_out)

The head never holds the (tokens, vocab) logits: its loss and gradients come chunk by chunk
(gpu/ops/linear_cross_entropy.py). Adam updates every parameter. With a communicator
(`--distributed mpi|torch --tensor-parallel k`) the head is split by vocabulary: rank r holds the
rows `vocab_slice(V, r, k)` of W_out and b_out, everything else is replicated (every rank sees the
same batches), and the loss and the hidden states' gradient come from the vocabulary-parallel
fused head (`comm=`): the same loss on every rank, dh already summed over the ranks, so every
replicated parameter takes the same step as in one process and the head's rows take theirs.
The run writes the training and validation loss curve (OUT/lm_loss.png), a JSON summary
(OUT/lm.json) with the peak memory of one training step with and without the fused head
(tracemalloc, NumPy arrays), and prints a sample of generated text.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import tracemalloc

import numpy as np

import gpu

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the small bird", "our teacher", "a farmer",
            "the children", "the king", "a sailor"]
VERBS = ["sees", "likes", "finds", "paints", "follows", "watches", "carries", "remembers"]
OBJECTS = ["the red ball", "a green apple", "the river", "an old book", "the tall tree", "a quiet song",
           "the moon", "a wooden boat"]
PLACES = ["in the garden", "by the sea", "at night", "in the morning", "near the house", "under the bridge"]
CLAUSES = ["and then sleeps", "because it is warm", "while the sun sets", "but says nothing"]


def make_corpus(n_chars: int = 60000, seed: int = 0) -> str:
    """Sentences from the grammar above until `n_chars` characters."""
    rng = np.random.default_rng(seed)
    out, size = [], 0
    while size < n_chars:
        words = [SUBJECTS[rng.integers(len(SUBJECTS))], VERBS[rng.integers(len(VERBS))],
                 OBJECTS[rng.integers(len(OBJECTS))]]
        if rng.random() < 0.6:
            words.append(PLACES[rng.integers(len(PLACES))])
        if rng.random() < 0.3:
            words.append(CLAUSES[rng.integers(len(CLAUSES))])
        s = " ".join(words)
        s = s[0].upper() + s[1:] + ("." if rng.random() < 0.8 else "!") + " "
        out.append(s)
        size += len(s)
    return "".join(out)[:n_chars]


def vocab_slice(vocab: int, rank: int, size: int) -> slice:
    """Rank `rank`'s contiguous share of `vocab` classes over `size` ranks, in rank order (the
    first vocab % size ranks one class more, as np.array_split)."""
    base, extra = divmod(vocab, size)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (rank < extra))


class CharLM:
    """Parameters and one training step of the model in the module docstring (NumPy or CuPy).
    ``comm`` (a gpu.distributed.Communicator): the head split by vocabulary over its ranks."""

    def __init__(self, xp, vocab: int, context: int, dim: int, hidden: int, batch_norm: bool, seed: int,
                 dtype=np.float32, comm=None):
        rng = np.random.default_rng(seed)
        self.xp, self.context, self.batch_norm, self.comm, self.vocab = xp, context, batch_norm, comm, vocab
        f = np.dtype(dtype)
        rows = slice(None) if comm is None else vocab_slice(vocab, comm.rank, comm.size)

        def init(*shape, scale):
            return xp.asarray((rng.standard_normal(shape) * scale).astype(f))
        self.params = {
            "E": init(vocab, dim, scale=1.0),
            "W1": init(hidden, context * dim, scale=1 / math.sqrt(context * dim)),
            "b1": xp.zeros(hidden, f),
            "W2": init(vocab, hidden, scale=1 / math.sqrt(hidden))[rows],   # the same draws as one process
            "b2": xp.zeros(vocab, f)[rows],
        }
        if batch_norm:
            self.params["gamma"], self.params["beta"] = xp.ones(hidden, f), xp.zeros(hidden, f)
        self.m = {k: xp.zeros_like(v) for k, v in self.params.items()}
        self.v = {k: xp.zeros_like(v) for k, v in self.params.items()}
        self.t = 0

    def loss_and_grads(self, X, y, fused: bool = True, chunk_size: int | None = None):
        """(loss, grads) of the mean next-character cross-entropy on a batch."""
        p, xp = self.params, self.xp
        emb = p["E"][X].reshape(len(X), -1)
        pre = emb @ p["W1"].T + p["b1"]
        if self.batch_norm:
            a, mean, invstd = gpu.batch_norm_forward(pre, p["gamma"], p["beta"], axis=0)
        else:
            a = pre
        r = xp.maximum(a, 0)
        g = {}
        if fused:
            loss, dr, g["W2"], g["b2"] = gpu.fused_linear_cross_entropy(r, p["W2"], y, p["b2"], return_grad=True,
                                                                        chunk_size=chunk_size, comm=self.comm)
        else:   # the materializing head, for the memory comparison
            z = r @ p["W2"].T + p["b2"]
            loss, dz = gpu.softmax_cross_entropy(z, y, return_grad=True, comm=self.comm)
            del z
            dr, g["W2"], g["b2"] = dz @ p["W2"], dz.T @ r, dz.sum(0)
            if self.comm is not None:       # each rank's classes' share of dr
                dr = self.comm.allreduce(dr.reshape(-1), "lm head").reshape(dr.shape)
        da = dr * (a > 0)
        if self.batch_norm:
            dpre, g["gamma"], g["beta"] = gpu.batch_norm_backward(da, pre, p["gamma"], mean, invstd, axis=0)
        else:
            dpre = da
        g["W1"], g["b1"] = dpre.T @ emb, dpre.sum(0)
        demb = (dpre @ p["W1"]).reshape(len(X), self.context, -1)
        g["E"] = xp.zeros_like(p["E"])
        if xp is np:
            np.add.at(g["E"], X, demb)
        else:
            xp.add.at(g["E"], X, demb)
        return loss, g

    def adam(self, grads, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.t += 1
        for k, gk in grads.items():
            self.m[k] = b1 * self.m[k] + (1 - b1) * gk
            self.v[k] = b2 * self.v[k] + (1 - b2) * gk * gk
            mh = self.m[k] / (1 - b1 ** self.t)
            vh = self.v[k] / (1 - b2 ** self.t)
            self.params[k] -= lr * mh / (self.xp.sqrt(vh) + eps)

    def evaluate(self, X, y) -> float:
        """Mean cross-entropy in inference mode (batch norm with the batch's own statistics: the
        evaluation batches are large)."""
        p, xp = self.params, self.xp
        emb = p["E"][X].reshape(len(X), -1)
        a = emb @ p["W1"].T + p["b1"]
        if self.batch_norm:
            a = gpu.batch_norm_forward(a, p["gamma"], p["beta"], axis=0)[0]
        return float(gpu.fused_linear_cross_entropy(xp.maximum(a, 0), p["W2"], y, p["b2"], comm=self.comm))

    def head(self):
        """(W_out, b_out) of the whole vocabulary: every rank's rows gathered, in rank order."""
        W, b = self.params["W2"], self.params["b2"]
        if self.comm is None:
            return W, b
        xp, k = self.xp, self.comm.size
        shares = [vocab_slice(self.vocab, r, k) for r in range(k)]
        m = shares[0].stop                          # rank 0's share is the largest
        block = xp.zeros((m, W.shape[1] + 1), W.dtype)
        block[:len(b), :-1], block[:len(b), -1] = W, b
        rows = self.comm.allgather(block.reshape(-1), "lm head").reshape(k, m, -1)
        full = xp.concatenate([rows[r, :s.stop - s.start] for r, s in enumerate(shares)])
        return full[:, :-1], full[:, -1]

    def sample(self, start: np.ndarray, n: int, rng, temperature: float = 0.7) -> list[int]:
        p, xp = self.params, self.xp
        W2, b2 = self.head()
        ctx = list(int(c) for c in start)
        for _ in range(n):
            X = xp.asarray(np.array([ctx[-self.context:]]))
            emb = p["E"][X].reshape(1, -1)
            a = emb @ p["W1"].T + p["b1"]
            if self.batch_norm:   # one row: normalize with the affine part only (no batch statistics)
                a = a * p["gamma"] + p["beta"]
            z = xp.maximum(a, 0) @ W2.T + b2
            prob = np.asarray(gpu.softmax(z / temperature)).reshape(-1).astype(np.float64)
            ctx.append(int(rng.choice(len(prob), p=prob / prob.sum())))
        return ctx[len(start):]


def windows(codes: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """(X, y): every `context`-character window and the character after it."""
    idx = np.arange(len(codes) - context)[:, None] + np.arange(context)
    return codes[idx], codes[context:]


def step_peak_bytes(model: CharLM, X, y, fused: bool) -> int:
    """tracemalloc's peak over one training step's loss and gradients (NumPy arrays)."""
    model.loss_and_grads(X, y, fused)   # warm caches and scratch outside the measurement
    tracemalloc.start()
    try:
        out = model.loss_and_grads(X, y, fused)
        del out
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def plot(path: str, steps, train_loss, eval_steps, val_loss, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=90)
    ax.plot(steps, train_loss, color="tab:blue", alpha=0.3, lw=0.6)
    window = max(1, len(train_loss) // 50)
    smooth = np.convolve(train_loss, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], smooth, color="tab:blue", lw=1.4, label="training (batch)")
    ax.plot(eval_steps, val_loss, "o-", color="tab:red", lw=1.4, ms=3, label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats / char)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main_lm(args, xp, comm=None) -> int:
    """Train, report, write OUT/lm_loss.png and OUT/lm.json; returns the exit status. ``comm``:
    the head split by vocabulary over its ranks (every rank runs this; rank 0 writes)."""
    text = make_corpus(args.lm_chars, seed=args.seed)
    chars = sorted(set(text))
    codes = np.array([chars.index(c) for c in text], np.int64)
    X, y = windows(codes, args.lm_context)
    n_val = max(args.lm_context, int(len(y) * args.val_fraction))
    Xtr, ytr, Xva, yva = X[:-n_val], y[:-n_val], X[-n_val:], y[-n_val:]
    model = CharLM(xp, len(chars), args.lm_context, args.lm_dim, args.lm_hidden, args.lm_bn, args.seed,
                   dtype=args.lm_dtype, comm=comm)
    split = "" if comm is None else f"; head split by vocabulary over {comm.size} ranks ({comm.engine})"
    print(f"gpu-train: lm: generated corpus of {len(text)} characters, vocabulary {len(chars)}, "
          f"context {args.lm_context}; {len(ytr)} train / {len(yva)} validation windows; device {args.device}, "
          f"{args.lm_dtype}{split}", file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    lr = args.lr or 3e-3
    steps, train_loss, eval_steps, val_loss = [], [], [], []
    batch = args.batch_size
    total = args.max_steps
    eval_every = args.eval_every or max(1, total // 20)
    Xv, yv = xp.asarray(Xva), xp.asarray(yva)
    started = time.perf_counter()
    for step in range(1, total + 1):
        idx = rng.integers(0, len(ytr), batch)
        loss, grads = model.loss_and_grads(xp.asarray(Xtr[idx]), xp.asarray(ytr[idx]))
        model.adam(grads, lr)
        steps.append(step)
        train_loss.append(float(loss))
        if step % eval_every == 0 or step == total:
            eval_steps.append(step)
            val_loss.append(model.evaluate(Xv, yv))
    wall = time.perf_counter() - started
    start = codes[:args.lm_context]
    sample = "".join(chars[i] for i in model.sample(start, 120, np.random.default_rng(args.seed)))
    print(f"lm: validation loss {val_loss[0]:.3f} -> {val_loss[-1]:.3f} nats/char "
          f"(uniform: {math.log(len(chars)):.3f}), {total} steps, {wall:.1f} s")
    print(f"lm: sample after {text[:args.lm_context]!r}: {sample!r}")

    # Peak memory of one training step, fused head against the materializing one (NumPy arrays)
    if xp is np:
        Xm, ym = Xtr[:args.lm_memory_batch], ytr[:args.lm_memory_batch]
        peaks = {"fused": step_peak_bytes(model, Xm, ym, True), "materialized": step_peak_bytes(model, Xm, ym, False)}
        print(f"lm: peak memory of a training step on {len(ym)} tokens (tracemalloc): fused head "
              f"{peaks['fused'] / 2**20:.2f} MiB, materialized logits {peaks['materialized'] / 2**20:.2f} MiB")
    else:
        peaks = None
    if comm is not None and comm.rank != 0:
        return 0                                    # outputs from rank 0
    summary = {"task": "lm", "dtype": args.lm_dtype, "tensor_parallel": 1 if comm is None else comm.size,
               "chars": len(text), "vocab": len(chars), "context": args.lm_context,
               "dim": args.lm_dim, "hidden": args.lm_hidden, "batch_norm": args.lm_bn, "batch": batch, "lr": lr,
               "steps": total, "wall_time_s": wall, "val_loss_first": val_loss[0], "val_loss_final": val_loss[-1],
               "uniform_loss": math.log(len(chars)), "sample": sample,
               "peak_step_bytes": peaks, "memory_batch": args.lm_memory_batch if peaks else None,
               "curves": {"step_loss": train_loss, "eval_step": eval_steps, "val_loss": val_loss}}
    os.makedirs(args.out, exist_ok=True)
    png, js = os.path.join(args.out, "lm_loss.png"), os.path.join(args.out, "lm.json")
    with open(js, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {js}")
    title = (f"char LM: context {args.lm_context}, {args.lm_hidden} hidden{' + BN' if args.lm_bn else ''}, "
             f"fused head, vocab {len(chars)}")
    plot(png, np.array(steps), np.array(train_loss), eval_steps, val_loss, title)
    print(f"wrote {png}")
    return 0
