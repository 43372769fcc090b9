"""Optimizers that update a model's parameters in place, and learning-rate schedules.

Every optimizer reads ``p.grad`` and updates ``p.data`` in place (``p.data -= ...``), so the
layers keep their arrays and the update runs on whichever device holds them. ``lr`` is a plain
attribute: a schedule sets it between epochs.

With g = dL/dp and step t = 1, 2, ...:
    SGD       p -= lr * g                                    (the seed's W -= lr * dW)
    Momentum  v = b*v + (1-b)*g;  p -= lr * v                (an average of gradients: the same
                                                              lr scale as SGD)
    RMSprop   s = b*s + (1-b)*g^2;  p -= lr * g / (sqrt(s) + eps)
    Adam      v, s as above (b1, b2);  p -= lr * v_hat / (sqrt(s_hat) + eps),
              v_hat = v / (1 - b1^t), s_hat = s / (1 - b2^t)  (bias correction)
"""
from __future__ import annotations

from typing import Callable, Iterable

from .layers import Parameter


class Optimizer:
    """Base class: holds the parameters, the learning rate and the step count."""

    def __init__(self, params: Iterable[Parameter], lr: float) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("params: the model has no parameters")
        if not lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
        self.lr = float(lr)
        self.t = 0

    def step(self) -> None:
        """Apply one update from the gradients of the last backward pass."""
        self.t += 1
        for i, p in enumerate(self.params):
            if p.grad is None:
                raise RuntimeError(f"parameter {i} has no gradient: run backward before step")
            self._update(i, p)

    def _update(self, i: int, p: Parameter) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """p -= lr * g."""

    def _update(self, i: int, p: Parameter) -> None:
        p.data -= self.lr * p.grad


class Momentum(Optimizer):
    """v = beta * v + (1 - beta) * g; p -= lr * v."""

    def __init__(self, params: Iterable[Parameter], lr: float, beta: float = 0.9) -> None:
        super().__init__(params, lr)
        self.beta = beta
        self.v = [None] * len(self.params)

    def _update(self, i: int, p: Parameter) -> None:
        if self.v[i] is None:
            self.v[i] = p.grad * (1 - self.beta)
        else:
            self.v[i] *= self.beta
            self.v[i] += (1 - self.beta) * p.grad
        p.data -= self.lr * self.v[i]


class RMSprop(Optimizer):
    """s = beta * s + (1 - beta) * g^2; p -= lr * g / (sqrt(s) + eps)."""

    def __init__(self, params: Iterable[Parameter], lr: float, beta: float = 0.9,
                 eps: float = 1e-8) -> None:
        super().__init__(params, lr)
        self.beta, self.eps = beta, eps
        self.s = [None] * len(self.params)

    def _update(self, i: int, p: Parameter) -> None:
        g = p.grad
        if self.s[i] is None:
            self.s[i] = (1 - self.beta) * g * g
        else:
            self.s[i] *= self.beta
            self.s[i] += (1 - self.beta) * g * g
        p.data -= self.lr * g / (self.s[i] ** 0.5 + self.eps)


class Adam(Optimizer):
    """Momentum and RMSprop combined, both moments bias-corrected by 1 / (1 - beta^t)."""

    def __init__(self, params: Iterable[Parameter], lr: float = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(params, lr)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.v = [None] * len(self.params)
        self.s = [None] * len(self.params)

    def _update(self, i: int, p: Parameter) -> None:
        g = p.grad
        if self.v[i] is None:
            self.v[i] = (1 - self.beta1) * g
            self.s[i] = (1 - self.beta2) * g * g
        else:
            self.v[i] *= self.beta1
            self.v[i] += (1 - self.beta1) * g
            self.s[i] *= self.beta2
            self.s[i] += (1 - self.beta2) * g * g
        v_hat = self.v[i] / (1 - self.beta1 ** self.t)
        s_hat = self.s[i] / (1 - self.beta2 ** self.t)
        p.data -= self.lr * v_hat / (s_hat ** 0.5 + self.eps)


OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD, "momentum": Momentum, "rmsprop": RMSprop, "adam": Adam}

#: A learning rate that works for each optimizer on the bundled datasets (the CLI's default).
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.1, "rmsprop": 1e-3, "adam": 1e-3}


def make_optimizer(name: str, params: Iterable[Parameter], lr: float | None = None) -> Optimizer:
    """An optimizer by name ("sgd", "momentum", "rmsprop", "adam"); lr defaults to DEFAULT_LR."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name](params, lr=DEFAULT_LR[name] if lr is None else lr)


def inverse_time_decay(lr0: float, rate: float) -> Callable[[int], float]:
    """epoch -> lr0 / (1 + rate * epoch) (epochs counted from 0)."""
    return lambda epoch: lr0 / (1.0 + rate * epoch)


def exponential_decay(lr0: float, rate: float) -> Callable[[int], float]:
    """epoch -> lr0 * rate ** epoch (rate in (0, 1])."""
    return lambda epoch: lr0 * rate ** epoch
