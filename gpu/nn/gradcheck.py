"""Full-network gradient check: backpropagation against central finite differences, in float64.

Checks dL/dp for every parameter (weights, gamma, beta) and dL/dx for the input, through batch
norm in training mode and the softmax cross-entropy head. The loss is a function of the
parameters alone in training mode (batch statistics, not running ones), so the perturbed
forward passes see the same function; the running statistics they update are restored after.
"""
from __future__ import annotations

import numpy as np

from .layers import Sequential, SoftmaxCrossEntropy


def _rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / (||a|| + ||b||), 0 when both are 0."""
    denom = np.linalg.norm(a) + np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denom) if denom > 0 else 0.0


def gradient_check(model: Sequential, head: SoftmaxCrossEntropy, x: np.ndarray, y: np.ndarray,
                   *, eps: float = 1e-6) -> dict[str, float]:
    """{name: relative error} for every parameter and "input", from one batch x (n, features).

    The model must hold float64 NumPy arrays (``model.to(np, np.float64)``). Every entry of
    every parameter is perturbed, so keep the network small. A correct backward gives errors
    around 1e-9; a wrong one, errors of order 1.
    """
    state = model.state_dict()
    if any(not isinstance(a, np.ndarray) or a.dtype != np.float64 for a in state.values()):
        raise TypeError("model: gradient_check needs float64 NumPy arrays; "
                        "use model.to(numpy, numpy.float64)")
    x = np.array(x, dtype=np.float64)
    saved = {k: v.copy() for k, v in state.items()}
    model.train()

    def loss() -> float:
        return float(head.loss(model.forward(x), y))

    head.forward(model.forward(x), y)
    dx = model.backward(head.backward())
    analytic = {k: p.grad.copy() for k, p in model.parameters().items()}
    targets = {k: p.data for k, p in model.parameters().items()} | {"input": x}
    analytic["input"] = dx
    errors = {}
    for name, arr in targets.items():
        numeric = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            orig = arr[i]
            arr[i] = orig + eps
            plus = loss()
            arr[i] = orig - eps
            minus = loss()
            arr[i] = orig
            numeric[i] = (plus - minus) / (2 * eps)
        errors[name] = _rel_error(analytic[name], numeric)
    model.load_state_dict(saved)
    return errors
