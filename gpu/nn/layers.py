"""Layers with explicit forward/backward, a Sequential container and the MLP builder.

Layout: a batch is a (batch, features) array; row i is example i. Each layer caches what its
backward needs during ``forward`` and, in ``backward(dy)``, fills its parameters' ``grad`` and
returns the gradient with respect to its input. The batch-norm and cross-entropy math is the
package's public API (``gpu.batch_norm_forward``, ``gpu.softmax_cross_entropy``...), so the same
layer runs the NumPy reference path on NumPy arrays and the CUDA kernels on CuPy arrays.

The seed's recipe, per hidden layer l and mini-batch:
    Z[l] = A[l-1] @ W[l]                         (Linear, no bias: BN subtracts the mean)
    Z_tilde[l] = gamma[l] * Z_norm[l] + beta[l]   (BatchNorm, axis=0: statistics over the batch)
    A[l] = g(Z_tilde[l])                          (ReLU, Sigmoid or Tanh)
and a softmax output layer with the cross-entropy cost (SoftmaxCrossEntropy).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable, Sequence

import numpy as np

from .. import (batch_norm_backward, batch_norm_forward, batch_norm_inference,
                softmax_cross_entropy)
from .device import module_of, to_module

ACTIVATIONS = ("relu", "sigmoid", "tanh")
INITS = ("he", "xavier")


@dataclass(eq=False)
class Parameter:
    """A trainable array and the gradient of the loss with respect to it (same shape)."""

    data: Any
    grad: Any = None


class Layer:
    """Base class: a layer maps x -> y in ``forward`` and dy -> dx in ``backward``."""

    training: bool = True

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def parameters(self) -> dict[str, Parameter]:
        """Trainable parameters by name."""
        return {}

    def buffers(self) -> dict[str, Any]:
        """Non-trainable state saved with the model (running statistics), by name."""
        return {}

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this layer (saved as JSON)."""
        return {}

    def _set_array(self, name: str, value) -> None:
        """Replace a parameter's or buffer's array (used by `to` and `load_state_dict`)."""
        params = self.parameters()
        if name in params:
            params[name].data = value
        else:
            setattr(self, name, value)


class Linear(Layer):
    """y = x @ W + b, with x (batch, in_features), W (in_features, out_features), b (out_features,).

    ``init="he"`` draws W ~ N(0, 2/in_features) (for ReLU); ``"xavier"`` (Glorot) draws
    W ~ N(0, 2/(in_features + out_features)) (for sigmoid and tanh). The bias starts at zero;
    leave it out (``bias=False``) before a batch norm, which subtracts the mean anyway.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 init: str = "he", rng: np.random.Generator | None = None,
                 dtype: Any = np.float32) -> None:
        if init not in INITS:
            raise ValueError(f"init: expected one of {', '.join(INITS)}, got {init!r}")
        rng = rng if rng is not None else np.random.default_rng()
        fan = in_features if init == "he" else (in_features + out_features) / 2
        w = rng.standard_normal((in_features, out_features)) * np.sqrt(2.0 / fan)
        self.in_features, self.out_features, self.init = in_features, out_features, init
        self.W = Parameter(w.astype(dtype))
        self.b = Parameter(np.zeros(out_features, dtype)) if bias else None
        self._x = None

    def forward(self, x):
        self._x = x
        y = x @ self.W.data
        return y + self.b.data if self.b is not None else y

    def backward(self, dy):
        self.W.grad = self._x.T @ dy
        if self.b is not None:
            self.b.grad = dy.sum(axis=0)
        return dy @ self.W.data.T

    def parameters(self) -> dict[str, Parameter]:
        return {"W": self.W} | ({"b": self.b} if self.b is not None else {})

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.b is not None, "init": self.init}


class BatchNorm(Layer):
    """Batch normalization over `axis` (the reduced axes; the kept axes are the features).

    Training mode normalizes with the batch's statistics and updates the running mean and
    (unbiased) variance in place: r = (1 - momentum) * r + momentum * batch_stat. Eval mode uses
    the running statistics. gamma (starts at 1), beta (starts at 0) and the running statistics
    have shape `num_features` (the shape of the kept axes).

    >>> bn = BatchNorm(100)            # x (batch, 100): statistics over the batch, axis=0
    >>> bn = BatchNorm(16, axis=(0, 2, 3))  # x (N, 16, H, W): per-channel statistics

    ``comm`` (a `gpu.distributed` communicator or what `gpu.distributed.wrap` accepts): the
    statistics are synchronized over the ranks, one collective per forward and one per backward;
    gamma's and beta's gradients are this rank's share (data-parallel training sums them).
    """

    def __init__(self, num_features: int | Sequence[int], *, axis: int | Sequence[int] = 0,
                 eps: float = 1e-5, momentum: float = 0.1, dtype: Any = np.float32,
                 comm: Any = None) -> None:
        shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
        self.num_features, self.eps, self.momentum = shape, eps, momentum
        self.axis = axis if isinstance(axis, int) else tuple(axis)
        self.gamma = Parameter(np.ones(shape, dtype))
        self.beta = Parameter(np.zeros(shape, dtype))
        self.running_mean = np.zeros(shape, dtype)
        self.running_var = np.ones(shape, dtype)
        self.comm = comm
        self._cache = None

    def forward(self, x):
        if not self.training:
            return batch_norm_inference(x, self.gamma.data, self.beta.data, self.running_mean,
                                        self.running_var, axis=self.axis, eps=self.eps)
        y, mean, invstd = batch_norm_forward(
            x, self.gamma.data, self.beta.data, axis=self.axis, eps=self.eps,
            running_mean=self.running_mean, running_var=self.running_var, momentum=self.momentum,
            comm=self.comm)
        self._cache = (x, mean, invstd)
        return y

    def backward(self, dy):
        x, mean, invstd = self._cache
        dx, self.gamma.grad, self.beta.grad = batch_norm_backward(
            dy, x, self.gamma.data, mean, invstd, axis=self.axis, comm=self.comm)
        return dx

    def parameters(self) -> dict[str, Parameter]:
        return {"gamma": self.gamma, "beta": self.beta}

    def buffers(self) -> dict[str, Any]:
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def config(self) -> dict[str, Any]:
        axis = self.axis if isinstance(self.axis, int) else list(self.axis)
        return {"num_features": list(self.num_features), "axis": axis, "eps": self.eps,
                "momentum": self.momentum}


class ReLU(Layer):
    """y = max(x, 0), elementwise."""

    def forward(self, x):
        self._mask = x > 0
        return x * self._mask

    def backward(self, dy):
        return dy * self._mask


class Sigmoid(Layer):
    """y = 1 / (1 + exp(-x)), elementwise, computed as (1 + tanh(x/2)) / 2: no overflow."""

    def forward(self, x):
        xp = module_of(x)
        self._y = 0.5 * (1 + xp.tanh(0.5 * x))
        return self._y

    def backward(self, dy):
        return dy * self._y * (1 - self._y)


class Tanh(Layer):
    """y = tanh(x), elementwise."""

    def forward(self, x):
        self._y = module_of(x).tanh(x)
        return self._y

    def backward(self, dy):
        return dy * (1 - self._y * self._y)


class Standardize(Layer):
    """y = (x - mean) / std per input feature, x (batch, num_features); no parameters.

    Kept inside the model so that a saved model maps raw inputs to logits. ``fit`` sets the
    statistics from the training set.
    """

    def __init__(self, num_features: int, *, dtype: Any = np.float32) -> None:
        self.mean = np.zeros(num_features, dtype)
        self.std = np.ones(num_features, dtype)

    def fit(self, x, *, per_feature: bool = True) -> "Standardize":
        """Set mean and std from x (n, num_features), computed in float64 on the host.

        ``per_feature=False`` uses one mean and std over all features: right for pixels, which
        share a scale, where per-pixel statistics would blow up the rarely-inked border pixels.
        Features with no spread get std = 1.
        """
        x = np.asarray(to_module(x, np), np.float64)
        axis = 0 if per_feature else None
        mean = np.broadcast_to(x.mean(axis=axis), self.mean.shape)
        std = np.broadcast_to(x.std(axis=axis), self.std.shape)
        xp = module_of(self.mean)
        self.mean = xp.asarray(mean.astype(self.mean.dtype))
        self.std = xp.asarray(np.where(std > 0, std, 1.0).astype(self.std.dtype))
        return self

    def forward(self, x):
        return (x - self.mean) / self.std

    def backward(self, dy):
        return dy / self.std

    def buffers(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std}

    def config(self) -> dict[str, Any]:
        return {"num_features": int(self.mean.size)}


class SoftmaxCrossEntropy:
    """The output head: softmax over the classes and the mean cross-entropy cost.

    ``forward(logits (batch, C), target (batch,) int)`` returns the scalar loss and keeps
    dL/dlogits from the fused kernel (``gpu.softmax_cross_entropy(..., return_grad=True)``): the
    backward pass costs nothing more. ``backward()`` returns that gradient, (batch, C).
    """

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing
        self._dz = None

    def forward(self, logits, target):
        loss, self._dz = softmax_cross_entropy(logits, target, axis=-1,
                                               label_smoothing=self.label_smoothing,
                                               return_grad=True)
        return loss

    def loss(self, logits, target):
        """The loss alone (no gradient kept), for evaluation."""
        return softmax_cross_entropy(logits, target, axis=-1,
                                     label_smoothing=self.label_smoothing)

    def backward(self):
        return self._dz


LAYER_TYPES: dict[str, type[Layer]] = {
    cls.__name__: cls for cls in (Linear, BatchNorm, ReLU, Sigmoid, Tanh, Standardize)}
_ACTIVATION_LAYERS: dict[str, type[Layer]] = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh}


class Sequential:
    """Layers applied in order; backward runs them in reverse.

    Parameters and buffers are named ``"<index>.<name>"`` (``"1.gamma"``, ``"1.running_mean"``),
    which is also how they are stored in a saved ``.npz``.
    """

    def __init__(self, layers: Iterable[Layer]) -> None:
        self.layers = list(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    __call__ = forward

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def train(self, mode: bool = True) -> "Sequential":
        for layer in self.layers:
            layer.training = mode
        return self

    def eval(self) -> "Sequential":
        return self.train(False)

    @property
    def training(self) -> bool:
        return all(layer.training for layer in self.layers)

    def parameters(self) -> dict[str, Parameter]:
        return {f"{i}.{k}": p for i, layer in enumerate(self.layers)
                for k, p in layer.parameters().items()}

    def state_dict(self) -> dict[str, Any]:
        """Every parameter and buffer array by name (the arrays themselves, not copies)."""
        state = {k: p.data for k, p in self.parameters().items()}
        state.update({f"{i}.{k}": b for i, layer in enumerate(self.layers)
                      for k, b in layer.buffers().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy arrays into this model (same names and shapes; moved to this model's device)."""
        own = self.state_dict()
        if set(own) != set(state):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ValueError(f"state: missing {missing}, unexpected {extra}")
        xp = self.array_module
        for name, value in state.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise ValueError(f"state[{name!r}]: shape {tuple(value.shape)}, "
                                 f"expected {tuple(own[name].shape)}")
            i, key = name.split(".", 1)
            self.layers[int(i)]._set_array(key, to_module(value, xp).astype(own[name].dtype))

    @property
    def array_module(self) -> ModuleType:
        """numpy or cupy: where this model's arrays live."""
        state = self.state_dict()
        return module_of(next(iter(state.values()))) if state else np

    def to(self, xp: ModuleType | None = None, dtype: Any = None) -> "Sequential":
        """Move every parameter and buffer to array module `xp` and/or cast them to `dtype`."""
        xp = xp or self.array_module
        for name, value in self.state_dict().items():
            i, key = name.split(".", 1)
            value = to_module(value, xp)
            self.layers[int(i)]._set_array(key, value.astype(dtype) if dtype else value)
        return self

    def config(self) -> list[dict[str, Any]]:
        """[{"type": "Linear", ...constructor arguments}, ...]: rebuilds the architecture."""
        return [{"type": type(layer).__name__, **layer.config()} for layer in self.layers]

    @classmethod
    def from_config(cls, config: list[dict[str, Any]]) -> "Sequential":
        layers = []
        for entry in config:
            entry = dict(entry)
            kind = entry.pop("type")
            if kind not in LAYER_TYPES:
                raise ValueError(f"config: unknown layer type {kind!r}")
            layers.append(LAYER_TYPES[kind](**entry))
        return cls(layers)

    def __repr__(self) -> str:
        lines = [f"  ({i}) {entry.pop('type')}({', '.join(f'{k}={v}' for k, v in entry.items())})"
                 for i, entry in enumerate(self.config())]
        return "Sequential(\n" + "\n".join(lines) + "\n)"


def mlp(sizes: Sequence[int], *, activation: str = "relu", batch_norm: bool = True,
        init: str | None = None, bn_momentum: float = 0.1, bn_eps: float = 1e-5,
        seed: int = 0, dtype: Any = np.float32) -> Sequential:
    """A multilayer perceptron producing logits: sizes = [inputs, hidden..., classes].

    Each hidden layer is Linear -> BatchNorm -> activation (Linear with a bias and no BatchNorm
    when ``batch_norm=False``); the last layer is a Linear with a bias. `init` defaults to He for
    ReLU and Xavier for sigmoid/tanh. The weights come from ``default_rng(seed)`` in layer order
    and nothing else draws from it, so the networks with and without batch norm built from one
    seed start from identical weights.

    >>> model = mlp([64, 100, 100, 10], activation="sigmoid")   # digits: 8x8 inputs, 10 classes
    >>> logits = model(np.zeros((32, 64), np.float32))          # (32, 10)
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {', '.join(ACTIVATIONS)}, "
                         f"got {activation!r}")
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError("sizes: expected [inputs, hidden..., classes] of positive ints, "
                         f"got {sizes!r}")
    init = init or ("he" if activation == "relu" else "xavier")
    rng = np.random.default_rng(seed)
    layers: list[Layer] = []
    for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
        layers.append(Linear(n_in, n_out, bias=not batch_norm, init=init, rng=rng, dtype=dtype))
        if batch_norm:
            layers.append(BatchNorm(n_out, momentum=bn_momentum, eps=bn_eps, dtype=dtype))
        layers.append(_ACTIVATION_LAYERS[activation]())
    layers.append(Linear(sizes[-2], sizes[-1], init=init, rng=rng, dtype=dtype))
    return Sequential(layers)
