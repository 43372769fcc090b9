"""The training loop: mini-batch steps, periodic validation, and the record of a run.

One step, as in the seed: forward through the model in training mode (batch norm uses the
batch's statistics and updates its running ones), the softmax cross-entropy cost and its
gradient from the fused kernel, backward through every layer, one optimizer update.
Validation runs the model in eval mode (batch norm uses the running statistics).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .data import minibatches
from .device import module_of
from .layers import BatchNorm, Sequential, SoftmaxCrossEntropy
from .optim import Optimizer


@dataclass
class History:
    """What a run did. Steps count optimizer updates from 1; step 0 is the initial model."""

    step_loss: list[float] = field(default_factory=list)  # training loss of each step's batch
    eval_step: list[int] = field(default_factory=list)    # steps at which validation ran
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)  # per-epoch summary
    wall_time: float = 0.0

    def steps_to(self, target: float) -> int | None:
        """The first evaluated step whose validation accuracy is >= target, or None."""
        return next((s for s, a in zip(self.eval_step, self.val_acc) if a >= target), None)


def _tqdm():
    """tqdm's class, or None where it is not installed (the progress is then one line an epoch)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def diverged(hist: History) -> str | None:
    """Why a run looks diverged, or None: a non-finite training loss, or an epoch whose mean
    training loss is over twice the first step's (at initialization, about log(classes))."""
    losses = np.asarray(hist.step_loss, dtype=np.float64)
    if losses.size == 0:
        return None
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        return f"the training loss is {losses[bad[0]]} at step {bad[0] + 1}"
    worst = max(hist.epochs, key=lambda e: e["train_loss"], default=None)
    if worst is not None and worst["train_loss"] > 2 * losses[0]:
        return (f"the mean training loss of epoch {worst['epoch']} is {worst['train_loss']:.3g}, "
                f"against {losses[0]:.3g} at the first step")
    return None


def check_batch_size(model: Sequential, batch_size: int) -> None:
    """ValueError unless batch_size >= 1, and >= 2 when the model has a batch norm."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if batch_size == 1 and any(isinstance(layer, BatchNorm) for layer in model.layers):
        raise ValueError("batch_size: 1 with batch norm in training mode: the statistics of a "
                         "single example are undefined (variance 0); use a batch size >= 2 or "
                         "a model without batch norm (--no-bn)")


def _data_parallel_backward(model: Sequential, head: SoftmaxCrossEntropy, comm, logits, yb,
                            loss: float, rows: int) -> tuple[float, int]:
    """Backward of this rank's shard as its share of the global batch's mean loss, then the
    gradient all-reduce: (global mean loss, global correct count)."""
    n = logits.shape[0]
    dlogits = head.backward() if n else logits[:0]
    model.backward(dlogits * (n / rows) if n else dlogits)
    correct = int((logits.argmax(axis=1) == yb).sum()) if n else 0
    loss_sum, correct = allreduce_gradients(model, comm, loss * n if n else 0.0, correct)
    return loss_sum / rows, correct


def evaluate(model: Sequential, head: SoftmaxCrossEntropy, X, y, *,
             batch_size: int = 1024) -> tuple[float, float]:
    """(mean loss, accuracy) of the model in eval mode on X (n, features), y (n,).

    The model's mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    n = X.shape[0]
    loss_sum, correct = 0.0, 0
    try:
        for start in range(0, n, batch_size):
            xb, yb = X[start:start + batch_size], y[start:start + batch_size]
            logits = model.forward(xb)
            loss_sum += float(head.loss(logits, yb)) * xb.shape[0]
            correct += int((logits.argmax(axis=1) == yb).sum())
    finally:
        model.train(was_training)
    return loss_sum / n, correct / n


def shard(idx, comm):
    """This rank's rows of a global batch `idx`: np.array_split's part `rank` (sizes differ by at
    most one; a rank may get none)."""
    return idx if comm is None else np.array_split(idx, comm.size)[comm.rank]


def allreduce_gradients(model: Sequential, comm, loss_sum: float, correct: int) -> tuple[float, int]:
    """Data parallel: every parameter's gradient summed over the ranks, in ONE all-reduce of one
    buffer holding them all (a single bucket: this package's models are a few MB at most), with
    the batch's loss sum and correct count in two more slots. Gradients are the rank's share of
    the global batch's mean (`fit` scales the head's gradient by rows / global rows), so the sum
    is the global gradient. Returns the global (loss_sum, correct)."""
    params = [p for p in model.parameters().values() if p.grad is not None]
    xp = module_of(params[0].grad) if params else np
    dtype = params[0].grad.dtype if params else np.float32
    sizes = [p.grad.size for p in params]
    buf = xp.empty(sum(sizes) + 2, dtype)
    at = 0
    for p, n in zip(params, sizes):
        buf[at:at + n] = p.grad.reshape(-1)
        at += n
    buf[at:] = xp.asarray([loss_sum, correct], dtype)
    out = comm.allreduce(buf, "gradient all-reduce")
    at = 0
    for p, n in zip(params, sizes):
        p.grad = out[at:at + n].reshape(p.grad.shape)
        at += n
    tail = out[at:] if type(out) is np.ndarray else out[at:].get()
    return float(tail[0]), int(round(float(tail[1])))


def fit(model: Sequential, head: SoftmaxCrossEntropy, optimizer: Optimizer,
        train: tuple[Any, Any], val: tuple[Any, Any] | None = None, *, epochs: int,
        batch_size: int, seed: int = 0, schedule: Callable[[int], float] | None = None,
        eval_every: int | None = None, max_steps: int | None = None, progress: bool = True,
        desc: str = "", comm: Any = None) -> History:
    """Train `model` on train = (X (n, features), y (n,)), arrays on the model's device.

    Mini-batches come from ``default_rng(seed)`` (the same batches on CPU and GPU). `schedule`
    maps the epoch (from 0) to the learning rate. Validation runs at step 0, every `eval_every`
    steps and at the end of each epoch. `max_steps` stops early (tests, quick comparisons).
    `progress` shows the running loss and accuracy on stderr: a tqdm bar per epoch on a terminal
    (when tqdm is installed), else one line per epoch (piped output stays one line an epoch).

    ``comm`` (a `gpu.distributed.Communicator`): data parallel. Every rank draws the same global
    batches of `batch_size` rows and trains on its `shard`; gradients are summed by
    `allreduce_gradients` (one collective per step), so every rank takes the same step. The
    History records the global batch's loss and accuracy on every rank.
    """
    check_batch_size(model, batch_size)
    X, y = train
    n = X.shape[0]
    if n < 2:
        raise ValueError(f"train: {n} example(s); need at least 2")
    xp = module_of(X)
    tqdm = _tqdm() if progress and sys.stderr.isatty() else None
    rng = np.random.default_rng(seed)
    hist = History()
    model.train()

    def validate(step: int) -> None:
        if val is not None and (not hist.eval_step or hist.eval_step[-1] != step):
            loss, acc = evaluate(model, head, *val)
            hist.eval_step.append(step)
            hist.val_loss.append(loss)
            hist.val_acc.append(acc)

    start = time.perf_counter()
    validate(0)
    step = 0
    for epoch in range(epochs):
        if schedule is not None:
            optimizer.lr = schedule(epoch)
        t0 = time.perf_counter()
        batches = list(minibatches(n, batch_size, rng))
        # Updated by hand, not wrapped around the loop: an exhausted tqdm iterator closes its
        # bar before the epoch's validation accuracy can be shown on it.
        bar = tqdm(total=len(batches), desc=f"{desc}epoch {epoch + 1}/{epochs}",
                   unit="batch") if tqdm is not None else None
        loss_sum, correct, seen = 0.0, 0, 0
        for idx in batches:
            if comm is not None:
                rows, idx = len(idx), shard(idx, comm)
            idx = idx if xp is np else xp.asarray(idx)
            xb, yb = X[idx], y[idx]
            logits = model.forward(xb)
            loss = float(head.forward(logits, yb))  # one sync per step: the curve is the product
            if comm is None:
                model.backward(head.backward())
            else:
                loss, batch_correct = _data_parallel_backward(model, head, comm, logits, yb, loss, rows)
            optimizer.step()
            step += 1
            hist.step_loss.append(loss)
            loss_sum += loss * (len(idx) if comm is None else rows)
            correct += int((logits.argmax(axis=1) == yb).sum()) if comm is None else batch_correct
            seen += len(idx) if comm is None else rows
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}",
                                refresh=False)
                bar.update()
            if eval_every and step % eval_every == 0:
                validate(step)
            if max_steps is not None and step >= max_steps:
                break
        validate(step)
        summary = {"epoch": epoch + 1, "step": step, "lr": optimizer.lr,
                   "train_loss": loss_sum / seen, "train_acc": correct / seen,
                   "seconds": time.perf_counter() - t0}
        if val is not None:
            summary |= {"val_loss": hist.val_loss[-1], "val_acc": hist.val_acc[-1]}
        hist.epochs.append(summary)
        if bar is not None:
            if val is not None:
                bar.set_postfix(loss=f"{summary['train_loss']:.4f}",
                                acc=f"{summary['train_acc']:.3f}",
                                val_acc=f"{summary['val_acc']:.3f}")
            bar.close()
        elif progress:
            line = (f"{desc}epoch {epoch + 1}/{epochs}: loss={summary['train_loss']:.4f} "
                    f"acc={summary['train_acc']:.3f}")
            if val is not None:
                line += f" val_acc={summary['val_acc']:.3f}"
            print(f"{line} ({summary['seconds']:.1f} s)", file=sys.stderr, flush=True)
        if max_steps is not None and step >= max_steps:
            break
    hist.wall_time = time.perf_counter() - start
    return hist
