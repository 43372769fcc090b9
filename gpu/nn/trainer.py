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

from .._workspace import check_errors
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

    def validate(self, step: int, evaluate: Callable[[], tuple[float, float]] | None) -> None:
        """Record ``evaluate()``'s (loss, accuracy) at `step`, once per step; nothing without one."""
        if evaluate is not None and (not self.eval_step or self.eval_step[-1] != step):
            loss, acc = evaluate()
            self.eval_step.append(step)
            self.val_loss.append(loss)
            self.val_acc.append(acc)


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
                            loss, rows: int):
    """Backward of this rank's shard as its share of the global batch's mean loss, then the
    gradient all-reduce: (global mean loss, global correct count), both left on the device."""
    n = logits.shape[0]
    dlogits = head.backward() if n else logits[:0]
    model.backward(dlogits * (n / rows) if n else dlogits)
    correct = (logits.argmax(axis=1) == yb).sum() if n else 0
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
    loss_sum, correct = 0.0, 0   # device scalars after the first batch: summed there, read once
    try:
        for start in range(0, n, batch_size):
            xb, yb = X[start:start + batch_size], y[start:start + batch_size]
            logits = model.forward(xb)
            loss_sum = head.loss(logits, yb).astype(np.float64) * xb.shape[0] + loss_sum
            correct = (logits.argmax(axis=1) == yb).sum() + correct
    finally:
        model.train(was_training)
    loss_sum, correct = _to_host([loss_sum, correct]) if n else (0.0, 0)
    return loss_sum / n, correct / n


def shard(idx, comm):
    """This rank's rows of a global batch `idx` (a NumPy or device array): np.array_split's part
    `rank` (sizes differ by at most one; a rank may get none), as a slice."""
    if comm is None:
        return idx
    base, extra = divmod(len(idx), comm.size)
    start = comm.rank * base + min(comm.rank, extra)
    return idx[start:start + base + (comm.rank < extra)]


def allreduce_gradients(model: Sequential, comm, loss_sum, correct):
    """Data parallel: every parameter's gradient summed over the ranks, in ONE all-reduce of one
    buffer holding them all (a single bucket: this package's models are a few MB at most), with
    the batch's loss sum and correct count in two more slots. Gradients are the rank's share of
    the global batch's mean (`fit` scales the head's gradient by rows / global rows), so the sum
    is the global gradient. `loss_sum` and `correct` may be device scalars; the global
    (loss_sum, correct) come back as one-element device arrays, with no read back."""
    params = [p for p in model.parameters().values() if p.grad is not None]
    xp = module_of(params[0].grad) if params else np
    dtype = params[0].grad.dtype if params else np.float32
    sizes = [p.grad.size for p in params]
    buf = xp.empty(sum(sizes) + 2, dtype)
    at = 0
    for p, n in zip(params, sizes):
        buf[at:at + n] = p.grad.reshape(-1)
        at += n
    # slices, not elements: an element assignment of a device scalar would read it back
    buf[at:at + 1] = loss_sum
    buf[at + 1:at + 2] = correct
    out = comm.allreduce(buf, "gradient all-reduce")
    at = 0
    for p, n in zip(params, sizes):
        p.grad = out[at:at + n].reshape(p.grad.shape)
        at += n
    return out[at:at + 1], out[at + 1:at + 2]


def _to_host(values) -> list:
    """Device scalars (0-d arrays) as Python numbers, in one read back: the sync of a log point."""
    first = values[0]
    xp = module_of(first)
    stacked = xp.stack([xp.asarray(v, dtype=np.float64).reshape(()) for v in values])
    return (stacked if isinstance(stacked, np.ndarray) else stacked.get()).tolist()


def end_epoch(hist: History, epoch: int, epochs: int, step: int, lr: float, loss_sum: float, correct: int,
              seen: int, t0: float, *, bar=None, progress: bool = True, desc: str = "", tag: str = "") -> dict:
    """The epoch's summary (train loss and accuracy over `seen` examples, the last validation),
    appended to ``hist.epochs`` and shown: on the tqdm `bar`, which is closed, else one line on
    stderr when `progress`. Shared by `fit` and gpu.torch's training loop."""
    summary = {"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": loss_sum / seen,
               "train_acc": correct / seen, "seconds": time.perf_counter() - t0}
    if hist.eval_step:
        summary |= {"val_loss": hist.val_loss[-1], "val_acc": hist.val_acc[-1]}
    hist.epochs.append(summary)
    if bar is not None:
        if hist.eval_step:
            bar.set_postfix(loss=f"{summary['train_loss']:.4f}", acc=f"{summary['train_acc']:.3f}",
                            val_acc=f"{summary['val_acc']:.3f}")
        bar.close()
    elif progress:
        line = f"{desc}epoch {epoch + 1}/{epochs}: loss={summary['train_loss']:.4f} acc={summary['train_acc']:.3f}"
        if hist.eval_step:
            line += f" val_acc={summary['val_acc']:.3f}"
        print(f"{line} ({summary['seconds']:.1f} s){tag}", file=sys.stderr, flush=True)
    return summary


def fit(model: Sequential, head: SoftmaxCrossEntropy, optimizer: Optimizer,
        train: tuple[Any, Any], val: tuple[Any, Any] | None = None, *, epochs: int,
        batch_size: int, seed: int = 0, schedule: Callable[[int], float] | None = None,
        eval_every: int | None = None, max_steps: int | None = None, progress: bool = True,
        desc: str = "", log_every: int = 50, comm: Any = None) -> History:
    """Train `model` on train = (X (n, features), y (n,)), arrays on the model's device.

    Mini-batches come from ``default_rng(seed)`` (the same batches on CPU and GPU). `schedule`
    maps the epoch (from 0) to the learning rate. Validation runs at step 0, every `eval_every`
    steps and at the end of each epoch. `max_steps` stops early (tests, quick comparisons).
    `progress` shows the running loss and accuracy on stderr: a tqdm bar per epoch on a terminal
    (when tqdm is installed), else one line per epoch (piped output stays one line an epoch).

    No step waits for the device: the epoch's batch order is uploaded once, and each step's loss
    and correct count stay on the device until a log point (every `log_every` steps for the bar,
    validation, the end of the epoch), which reads them all back at once and fills
    ``History.step_loss``. The end of each epoch also runs ``gpu.check_errors()`` (a bad label
    found by the kernel raises there).

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
        hist.validate(step, None if val is None else lambda: evaluate(model, head, *val))

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
        # the epoch's order, uploaded once; each step's (loss, correct) stays on the device
        order = np.concatenate(batches) if batches else np.zeros(0, np.int64)
        order = order if xp is np else xp.asarray(order)
        ends = np.cumsum([len(b) for b in batches])
        stats = xp.zeros_like(X, dtype=np.float64, shape=(2, len(batches)))   # on X's device
        loss_sum, correct, seen, logged = 0.0, 0, 0, 0

        def log_point(done: int) -> None:
            """Read the steps since the last log point back (one transfer) and record them."""
            nonlocal loss_sum, correct, seen, logged
            if done == logged:
                return
            chunk = stats[:, logged:done]
            losses, hits = (chunk if isinstance(chunk, np.ndarray) else chunk.get()).tolist()
            hist.step_loss.extend(losses)
            sizes = np.diff(ends[logged:done], prepend=ends[logged - 1] if logged else 0)
            loss_sum += float(np.dot(losses, sizes))
            correct += int(sum(hits))
            seen += int(sizes.sum())
            logged = done
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)

        for i, end in enumerate(ends):
            idx = order[end - len(batches[i]):end]
            if comm is not None:
                rows, idx = len(idx), shard(idx, comm)
            xb, yb = X[idx], y[idx]
            logits = model.forward(xb)
            loss = head.forward(logits, yb)
            if comm is None:
                # device to device (slices: an element assignment would convert on the host)
                stats[0, i:i + 1] = loss
                stats[1, i:i + 1] = (logits.argmax(axis=1) == yb).sum()
                model.backward(head.backward())
            else:
                loss, hits = _data_parallel_backward(model, head, comm, logits, yb, loss, rows)
                stats[0, i:i + 1] = loss
                stats[1, i:i + 1] = hits
            optimizer.step()
            step += 1
            if bar is not None:
                if (i + 1) % log_every == 0:
                    log_point(i + 1)
                bar.update()
            if eval_every and step % eval_every == 0:
                log_point(i + 1)
                validate(step)
            if max_steps is not None and step >= max_steps:
                break
        log_point(i + 1 if len(ends) else 0)
        check_errors()
        validate(step)
        end_epoch(hist, epoch, epochs, step, optimizer.lr, loss_sum, correct, seen, t0,
                  bar=bar, progress=progress, desc=desc)
        if max_steps is not None and step >= max_steps:
            break
    hist.wall_time = time.perf_counter() - start
    return hist
