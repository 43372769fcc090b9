"""gpu-train: train an MLP classifier with the package's batch-norm and cross-entropy kernels.

    gpu-train --dataset digits                      # Adam, 2 x 100 ReLU + BN, on the CPU
    gpu-train --dataset mnist5k --device gpu        # the same on CuPy arrays: the CUDA kernels
    gpu-train --dataset digits --compare-bn         # with vs without BN: plot + JSON summary
    gpu-train --task lm --out lm_out                # a character-level LM with the fused head
    gpu-train --dataset digits --framework torch    # the same MLP as a torch model (gpu.torch modules)
    gpu-train --framework torch --model resnet --fuse   # a small ResNet, fused BN + add + ReLU vs unfused

Everything is checked (dataset, labels, batch size, device, output paths) before the first step;
a problem is reported as ``gpu-train: error: ...`` with exit status 2. A run whose loss blows up
gets a warning (and ``"diverged"`` in the JSON). Exit status 1: an output could not be written
(the others still are).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from .nn import (Sequential, SoftmaxCrossEntropy, Standardize, check_batch_size, device_module,
                 fit, inverse_time_decay, load_dataset, make_optimizer, mlp, save_model,
                 to_module, train_val_split)
from .nn.optim import DEFAULT_LR, OPTIMIZERS
from .nn.layers import ACTIVATIONS, BatchNorm
from .nn.trainer import History, diverged
from . import _backend
from . import _cli
from ._cli import extra_hint, output_dir_problem, output_problem

#: --compare-bn defaults: Ioffe & Szegedy (2015), Fig. 1(a): 3 hidden sigmoid layers of 100 units
#: trained with plain SGD, with and without batch norm.
COMPARE_DEFAULTS = {"layers": "100,100,100", "activation": "sigmoid", "optimizer": "sgd",
                    "lr": 0.5, "batch_size": 60, "epochs": 10, "eval_every": 10,
                    "target": "0.8,0.85,0.9"}
IMAGE_DATASETS = ("digits", "mnist5k")
TRAIN_DEFAULTS = {"layers": "100,100", "activation": "relu", "optimizer": "adam", "lr": None,
                  "batch_size": 64, "epochs": 20, "eval_every": None, "target": None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu-train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults for a plain run: " + _fmt(TRAIN_DEFAULTS) + ".\nWith --compare-bn: "
               + _fmt(COMPARE_DEFAULTS) + " (Ioffe & Szegedy 2015, Fig. 1a).")
    p.add_argument("--dataset", default="digits",
                   help="digits | mnist5k | synthetic | PATH.npz holding X and y (default: digits)")
    p.add_argument("--layers", help="hidden layer sizes, comma-separated, e.g. 100,100,100")
    p.add_argument("--activation", choices=ACTIVATIONS)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS))
    p.add_argument("--lr", type=float, help="learning rate (default per optimizer: "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--lr-decay", type=float, default=0.0,
                   help="inverse-time decay per epoch: lr / (1 + rate * epoch) (default 0)")
    p.add_argument("--standardize", choices=("feature", "global"),
                   help="input scaling fit on the training set: per feature, or one mean and std "
                        "for all (default: global for the image datasets digits and mnist5k, "
                        "feature otherwise)")
    p.add_argument("--no-bn", action="store_true",
                   help="no batch norm (the hidden Linear layers get a bias instead)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: NumPy arrays; gpu: CuPy arrays, the CUDA kernels (default cpu)")
    p.add_argument("--framework", choices=("nn", "torch"), default="nn",
                   help="nn: the package's gpu.nn layers; torch: the same MLP (same initial weights, batches "
                        "and optimizer) as a torch model with gpu.torch.BatchNorm1d and CrossEntropyLoss, "
                        "autograd for the backward (needs the torch extra; default nn)")
    p.add_argument("--model", choices=("mlp", "resnet"), default="mlp",
                   help="mlp: the MLP of --layers (default); resnet: a small ResNet on the images as "
                        "1 x side x side (conv stem, two BasicBlocks, one downsampling), --framework torch")
    p.add_argument("--fuse", action="store_true",
                   help="with --model resnet: train it unfused and, from the same initial weights and batches, "
                        "with gpu.torch.fuse's fused batch norm + add + ReLU; print both times per epoch and "
                        "the loss curves' largest difference")
    p.add_argument("--torch-dtype", choices=("float32", "float64"), default="float32",
                   help="--framework torch: the model's and the inputs' dtype (default float32)")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS threads on the CPU (default 1: a mini-batch's matmuls are too small "
                        "to gain from more, and on a busy machine waiting threads cost 10x)")
    p.add_argument("--seed", type=int, default=0, help="initialization, split and batch order")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--eval-every", type=int, help="validate every N steps (default: each epoch)")
    p.add_argument("--target", help="validation accuracies to report the steps to reach, "
                   "comma-separated, e.g. 0.9 or 0.8,0.85,0.9")
    p.add_argument("--max-steps", type=int, help="stop after this many steps")
    p.add_argument("--compare-bn", action="store_true",
                   help="train with and without batch norm from the same initialization; "
                        "write a plot and a JSON summary to --out")
    p.add_argument("--out", default="train_out",
                   help="directory for --compare-bn outputs, compare_bn_DATASET.png and .json "
                        "(default train_out; made if missing)")
    p.add_argument("--force", action="store_true",
                   help="let --compare-bn overwrite its outputs in --out (by default an existing "
                        "one is an error, checked before training)")
    p.add_argument("--save", metavar="PATH.npz", help="save the trained model")
    p.add_argument("--json", metavar="PATH", help="write the run's summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--distributed", choices=("mpi", "torch"),
                   help="data parallel over the ranks of mpiexec (mpi4py) or torchrun "
                        "(torch.distributed: gloo on the CPU, NCCL with --device gpu); --batch-size "
                        "is the global batch, each rank trains on its share; logs and outputs "
                        "from rank 0")
    p.add_argument("--sync-bn", action="store_true",
                   help="with --distributed: batch-norm statistics over the global batch")
    _add_lm_arguments(p)
    return p


# ---------------------------------------------------------------------------------------------
# --task lm: a character-level language model with the fused linear + cross-entropy head
# ---------------------------------------------------------------------------------------------

#: --task lm defaults (gpu/lm.py): a few seconds on one CPU core
LM_DEFAULTS = {"batch_size": 256, "max_steps": 600, "lr": 3e-3}


def _add_lm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=("classify", "lm"), default="classify",
                   help="classify: the MLP classifier (default); lm: a character-level language model on "
                        "a generated corpus, trained with gpu.fused_linear_cross_entropy as its head; writes "
                        "OUT/lm_loss.png and OUT/lm.json (defaults: " + _fmt(LM_DEFAULTS) + ")")
    g = p.add_argument_group("--task lm")
    g.add_argument("--lm-context", type=int, default=8, help="characters of context (default 8)")
    g.add_argument("--lm-dim", type=int, default=16, help="embedding size per character (default 16)")
    g.add_argument("--lm-hidden", type=int, default=256, help="hidden units (default 256)")
    g.add_argument("--lm-bn", action="store_true", help="batch norm after the hidden Linear")
    g.add_argument("--lm-chars", type=int, default=60000, help="characters of generated text (default 60000)")
    g.add_argument("--lm-memory-batch", type=int, default=4096,
                   help="tokens of the step whose peak memory is measured, fused vs materialized (default 4096)")
    g.add_argument("--lm-dtype", choices=("float32", "float64"), default="float32",
                   help="parameters and arithmetic (default float32)")
    g.add_argument("--tensor-parallel", type=int, metavar="K",
                   help="with --distributed: the head split by vocabulary over the K ranks of the launch "
                        "(K = the number of processes; the vocabulary-parallel fused head)")


def _main_lm(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import lm
    for key, value in LM_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("lm_context", "lm_dim", "lm_hidden", "lm_memory_batch", "batch_size", "max_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.lm_chars < 4 * args.lm_context:
        parser.error(f"--lm-chars: expected at least 4 x --lm-context, got {args.lm_chars}")
    if args.threads < 1:
        parser.error(f"--threads: expected >= 1, got {args.threads}")
    try:
        import matplotlib  # noqa: F401   (the loss curve at the end: fail now, not then)
        xp = device_module(args.device)
    except (ImportError, RuntimeError, ValueError) as e:
        parser.error(str(e))
    problem = output_dir_problem(args.out)
    if problem:
        parser.error(f"--out: {problem}")
    if args.tensor_parallel is not None and not args.distributed:
        parser.error("--tensor-parallel splits the head over the ranks of --distributed; add --distributed")
    if args.distributed and args.tensor_parallel is None:
        parser.error("--task lm with --distributed splits the head by vocabulary: add --tensor-parallel K")

    def body(comm) -> int:
        if comm is not None and comm.size != args.tensor_parallel:
            parser.error(f"--tensor-parallel {args.tensor_parallel}: the launch has {comm.size} processes "
                         "(the head is split over all of them)")
        return lm.main_lm(args, xp, comm)
    return _on_ranks(args, parser, body)


def _on_ranks(args: argparse.Namespace, parser: argparse.ArgumentParser, body) -> int:
    """body(comm) with --distributed's communicator (None without), BLAS threads limited, logs
    from rank 0 only; the process group `init_distributed` started is closed after."""
    try:
        comm = init_distributed(args)
    except (ValueError, ImportError, RuntimeError) as e:
        parser.error(str(e))
    finished = False
    try:
        with _threadpool_limits(args.threads), _quiet_unless_rank0(comm):
            status = body(comm)
        finished = True
        return status
    finally:
        close_distributed(args, comm, finished)


def _quiet_unless_rank0(comm):
    """Logs from rank 0 only: the other ranks' stdout and stderr go to os.devnull."""
    if comm is None or comm.rank == 0:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    null = stack.enter_context(open(os.devnull, "w"))
    stack.enter_context(contextlib.redirect_stdout(null))
    stack.enter_context(contextlib.redirect_stderr(null))
    return stack


def _fmt(d: dict[str, Any]) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items() if v is not None)


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill unset flags from the defaults of the mode; check their values."""
    for key, value in (COMPARE_DEFAULTS if args.compare_bn else TRAIN_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:   # every item a size: "100,", "," and "" are mistakes, not fewer layers
        args.hidden = [int(s) for s in args.layers.split(",")]
    except ValueError:
        parser.error(f"--layers: expected comma-separated sizes, e.g. 100,100, got {args.layers!r}")
    if any(h < 1 for h in args.hidden):
        parser.error(f"--layers: sizes must be positive, got {args.layers!r}")
    if args.threads < 1:
        parser.error(f"--threads: expected >= 1, got {args.threads}")
    if args.epochs < 1:
        parser.error(f"--epochs: expected >= 1, got {args.epochs}")
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr: expected > 0, got {args.lr}")
    if args.lr_decay < 0:
        parser.error(f"--lr-decay: expected >= 0, got {args.lr_decay}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps: expected >= 1, got {args.max_steps}")
    if args.eval_every is not None and args.eval_every < 1:
        parser.error(f"--eval-every: expected >= 1, got {args.eval_every}")
    try:
        args.targets = [float(t) for t in (args.target or "").split(",") if t.strip()]
    except ValueError:
        parser.error(f"--target: expected comma-separated accuracies, got {args.target!r}")
    if any(not 0 < t <= 1 for t in args.targets):
        parser.error(f"--target: accuracies must be in (0, 1], got {args.target!r}")
    if args.standardize is None:
        args.standardize = "global" if args.dataset in IMAGE_DATASETS else "feature"
    if args.tensor_parallel is not None:
        parser.error("--tensor-parallel splits a language model's head: it applies to --task lm")
    if args.sync_bn and not args.distributed:
        parser.error("--sync-bn synchronizes batch norm across the ranks of --distributed; add --distributed")
    if args.distributed and args.compare_bn:
        parser.error("--compare-bn runs on one process; drop --distributed")
    if args.framework == "torch" and args.save:
        parser.error("--save writes gpu.nn models: drop it with --framework torch (torch.save the model instead)")
    if args.framework == "torch" and args.distributed:
        parser.error("--distributed trains gpu.nn models: drop --framework torch")
    if args.model == "resnet" and (args.framework != "torch" or args.compare_bn):
        parser.error("--model resnet is a torch model: add --framework torch (and drop --compare-bn)")
    if args.fuse and args.model != "resnet":
        parser.error("--fuse fuses the batch norms of --model resnet: add --model resnet --framework torch")
    if args.torch_dtype != "float32" and args.framework != "torch":
        parser.error("--torch-dtype sets the torch model's dtype: add --framework torch")
    if args.compare_bn and args.no_bn:
        parser.error("--compare-bn trains both with and without batch norm; drop --no-bn")
    for flag, path in (("--json", args.json), ("--save", args.save)):
        problem = path and output_problem(path)
        if problem:
            parser.error(f"{flag} {path}: {problem}")
    problem = args.compare_bn and output_dir_problem(args.out)
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    return args


def build_model(args: argparse.Namespace, X_train: np.ndarray, num_classes: int,
                batch_norm: bool) -> Sequential:
    """Standardize (fit on the training inputs) followed by the MLP; float32 NumPy arrays."""
    body = mlp([X_train.shape[1], *args.hidden, num_classes], activation=args.activation,
               batch_norm=batch_norm, seed=args.seed)
    scale = Standardize(X_train.shape[1]).fit(X_train, per_feature=args.standardize == "feature")
    return Sequential([scale, *body.layers])


def init_distributed(args: argparse.Namespace):
    """--distributed: the communicator of this process's launch (mpiexec or torchrun), or None."""
    if not args.distributed:
        return None
    from . import distributed
    if args.distributed == "mpi":
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise ImportError(f"--distributed mpi needs mpi4py: {extra_hint('distributed')}") from e
        return distributed.wrap(MPI.COMM_WORLD)
    try:
        import torch.distributed as dist
    except ImportError as e:
        raise ImportError(f"--distributed torch needs torch: {extra_hint('torch')}") from e
    if "RANK" not in os.environ:
        raise ValueError("--distributed torch: RANK is not set; launch with torchrun")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device == "gpu" else "gloo")
        args.owns_process_group = True
    return distributed.wrap("torch")


def close_distributed(args: argparse.Namespace, comm, finished: bool) -> None:
    """Tear down the process group `init_distributed` started, before the interpreter exits: a
    group left to the interpreter's teardown is destroyed while the peers' connections and the
    rank-0 store are closing, which can abort a rank at exit. After a finished run the ranks meet
    at a barrier first, so none closes its connections while another still uses them."""
    if comm is None or not getattr(args, "owns_process_group", False):
        return
    import torch.distributed as dist
    comm.drain()
    if finished:
        dist.barrier()
    dist.destroy_process_group()
    args.owns_process_group = False


def run(args: argparse.Namespace, model: Sequential, xp, train, val, label: str = "",
        comm=None) -> History:
    """Train `model` (moved to xp) on host arrays train/val; returns its History. With `comm`,
    data parallel (and batch norm synchronized with --sync-bn)."""
    if args.framework == "torch":
        from .torch.train import run as run_torch
        return run_torch(args, model, train, val, label)
    model.to(xp)
    if comm is not None and args.sync_bn:
        for layer in model.layers:
            if isinstance(layer, BatchNorm):
                layer.comm = comm
    train_d = (to_module(train[0].astype(np.float32), xp), to_module(train[1], xp))
    val_d = (to_module(val[0].astype(np.float32), xp), to_module(val[1], xp))
    opt = make_optimizer(args.optimizer, model.parameters().values(), args.lr)
    schedule = inverse_time_decay(opt.lr, args.lr_decay) if args.lr_decay else None
    return fit(model, SoftmaxCrossEntropy(), opt, train_d, val_d, epochs=args.epochs,
               batch_size=args.batch_size, seed=args.seed, schedule=schedule,
               eval_every=args.eval_every, max_steps=args.max_steps,
               progress=not args.quiet, desc=label, comm=comm)


def summarize(args: argparse.Namespace, hist: History, batch_norm: bool) -> dict[str, Any]:
    """One run's final numbers and steps to each --target (None: never reached)."""
    out: dict[str, Any] = {
        "batch_norm": batch_norm, "steps": len(hist.step_loss), "epochs": len(hist.epochs),
        "final_train_loss": hist.epochs[-1]["train_loss"],
        "final_val_loss": hist.val_loss[-1], "final_val_acc": hist.val_acc[-1],
        "best_val_acc": max(hist.val_acc), "wall_time_s": round(hist.wall_time, 3)}
    if args.targets:
        out["steps_to_target"] = {f"{t:g}": hist.steps_to(t) for t in args.targets}
    if getattr(hist, "fusion", None):
        out["fusion"] = hist.fusion
    return out


def config_of(args: argparse.Namespace, data) -> dict[str, Any]:
    """The settings of the run, for the JSON summary."""
    return {"dataset": data.name, "examples": int(data.X.shape[0]),
            "features": int(data.X.shape[1]), "classes": data.num_classes,
            "hidden": args.hidden, "activation": args.activation, "optimizer": args.optimizer,
            "lr": args.lr if args.lr is not None else DEFAULT_LR[args.optimizer],
            "lr_decay": args.lr_decay, "standardize": args.standardize,
            "batch_size": args.batch_size, "epochs": args.epochs,
            "val_fraction": args.val_fraction, "seed": args.seed, "device": args.device,
            "framework": args.framework, "model": args.model, "fuse": args.fuse,
            "torch_dtype": args.torch_dtype}


def plot_compare(path: str, title: str, runs: dict[str, History], targets: list[float]) -> None:
    """Training loss and validation accuracy against steps, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    for (label, hist), color in zip(runs.items(), ("tab:blue", "tab:red")):
        steps = np.arange(1, len(hist.step_loss) + 1)
        ax_loss.plot(steps, hist.step_loss, color=color, alpha=0.25, lw=0.6)
        window = max(1, len(steps) // 50)
        smooth = np.convolve(hist.step_loss, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps[window - 1:], smooth, color=color, lw=1.4, label=label)
        ax_acc.plot(hist.eval_step, hist.val_acc, color=color, lw=1.4, label=label)
    ax_loss.set(xlabel="step", ylabel="training loss (batch)", yscale="log")
    ax_acc.set(xlabel="step", ylabel="validation accuracy")
    names = "target accuracy " + ", ".join(f"{t:g}" for t in targets)   # one legend entry for all
    for i, target in enumerate(targets):
        ax_acc.axhline(target, color="gray", ls="--", lw=0.6, label=None if i else names)
    ax_acc.set_ylim(max(0.0, min(min(h.val_acc) for h in runs.values()) - 0.02), 1.0)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _threadpool_limits(threads: int):
    """threadpoolctl's limit on BLAS threads; without threadpoolctl, no limit and a warning."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print(f"gpu-train: warning: threadpoolctl is not installed, so --threads {threads} cannot "
              f"limit BLAS threads ({extra_hint('train')})", file=sys.stderr)
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def compare_stem(args: argparse.Namespace, data) -> str:
    """--compare-bn's output path without its suffix: OUT/compare_bn_DATASET."""
    return os.path.join(args.out, f"compare_bn_{os.path.splitext(data.name)[0]}")


def _write(what: str, write) -> bool:
    return _cli.write_output("gpu-train", what, write)


def main(argv: Sequence[str] | None = None) -> int:
    """The gpu-train command; returns the exit status (errors exit 2 through argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.task == "lm":
        return _main_lm(args, parser)
    args = _resolve(args, parser)
    # Everything that can be wrong with the inputs is found here, before the first step.
    try:
        _backend.current_backend()   # a bad GPU_BACKEND would fail the first step
        xp = device_module(args.device)
        if args.framework == "torch":
            try:
                import gpu.torch  # noqa: F401
            except ImportError as e:
                raise ImportError(f"--framework torch: {e}") from e
        data = load_dataset(args.dataset, seed=args.seed)
        train, val = train_val_split(data, args.val_fraction, seed=args.seed)
        variants = (True, False) if args.compare_bn else (not args.no_bn,)
        models = {bn: build_model(args, train[0], data.num_classes, bn) for bn in variants}
        for model in models.values():
            check_batch_size(model, args.batch_size)
        if args.compare_bn:
            try:   # needed for the plot at the end: fail now, not then
                import matplotlib  # noqa: F401
            except ImportError as e:
                raise ImportError(f"--compare-bn plots with matplotlib: {extra_hint('train')}") from e
            existing = [p for p in (compare_stem(args, data) + ext for ext in (".png", ".json"))
                        if os.path.exists(p)]
            if existing and not args.force:
                raise ValueError(f"--out {args.out}: {' and '.join(existing)} already "
                                 f"exist{'s' if len(existing) == 1 else ''}; pass --force to "
                                 "overwrite, or choose another --out")
    except (ValueError, ImportError, RuntimeError, OSError) as e:
        parser.error(str(e))


    def body(comm) -> int:
        if comm is not None and comm.rank != 0:      # logs and outputs from rank 0 only
            args.quiet, args.json, args.save, args.compare_bn = True, None, None, False
        return _train(args, data, train, val, models, xp, comm)
    return _on_ranks(args, parser, body)


def _train(args: argparse.Namespace, data, train, val, models: dict[bool, Sequential], xp, comm=None) -> int:
    """Train the checked models, print the summary, write the outputs."""
    config = config_of(args, data)
    if comm is not None:
        config |= {"distributed": args.distributed, "ranks": comm.size, "sync_bn": args.sync_bn}
    print(f"gpu-train: {data.name}: {len(train[1])} train / {len(val[1])} validation examples, "
          f"{data.X.shape[1]} features, {data.num_classes} classes; device {args.device}",
          file=sys.stderr)
    results = {}
    histories = {}
    for bn, model in models.items():
        label = "with BN" if bn else "without BN"
        hist = run(args, model, xp, train, val, f"[{label}] " if args.compare_bn else "", comm)
        histories[label] = hist
        results[label] = summarize(args, hist, bn)
        why = diverged(hist)
        results[label]["diverged"] = why is not None
        if why:
            lr = config["lr"]
            print(f"gpu-train: warning: {label}: training diverged: {why}. The learning rate "
                  f"{lr:g} is likely too large (--lr; {args.optimizer}'s default is "
                  f"{DEFAULT_LR[args.optimizer]:g})", file=sys.stderr)

    for label, r in results.items():
        line = (f"{label}: val acc {r['final_val_acc']:.4f} (best {r['best_val_acc']:.4f}), "
                f"val loss {r['final_val_loss']:.4f}, {r['steps']} steps, "
                f"wall time {r['wall_time_s']:.2f} s")
        if "steps_to_target" in r:
            steps = ", ".join(f"{t}: {'never' if n is None else n}"
                              for t, n in r["steps_to_target"].items())
            line += f"; steps to reach val acc {steps}"
        print(line)

    # The numbers first, the picture last: an output that fails does not lose the others.
    summary: dict[str, Any] = {"config": config, "runs": results}
    written = True

    def dump(path: str, obj) -> None:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
        print(f"wrote {path}")
    if args.json:
        written &= _write(args.json, lambda: dump(args.json, summary))
    if args.save:
        written &= _write(args.save, lambda: (save_model(args.save, models[not args.no_bn]),
                                              print(f"saved the model to {args.save}")))
    if args.compare_bn:
        stem = compare_stem(args, data)
        curves = {label: {"step_loss": h.step_loss, "eval_step": h.eval_step,
                          "val_acc": h.val_acc, "val_loss": h.val_loss}
                  for label, h in histories.items()}
        title = (f"{data.name}: {len(args.hidden)} x {args.hidden[0]} {args.activation}, "
                 f"{args.optimizer} lr {config['lr']:g}, batch {args.batch_size}")
        written &= _write(args.out, lambda: os.makedirs(args.out, exist_ok=True))
        written &= _write(stem + ".json", lambda: dump(stem + ".json", summary | {"curves": curves}))
        written &= _write(stem + ".png", lambda: (plot_compare(stem + ".png", title, histories,
                                                               args.targets), print(f"wrote {stem}.png")))
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
