"""Save a model (architecture, parameters, running statistics) to one .npz file and load it back.

The file holds each array of ``model.state_dict()`` under its name ("0.W", "1.running_mean", ...)
and the architecture as JSON under ``__config__``; nothing is pickled. Loading rebuilds the
layers and copies the arrays in bit for bit, so eval-mode predictions are identical.
"""
from __future__ import annotations

import json
from types import ModuleType

import numpy as np

from .device import to_module
from .layers import Sequential

_CONFIG = "__config__"


def save_model(path: str, model: Sequential) -> None:
    """Write `model` to `path` (.npz; arrays are copied to the host first)."""
    arrays = {name: to_module(a, np) for name, a in model.state_dict().items()}
    np.savez(path, **arrays, **{_CONFIG: np.array(json.dumps(model.config()))})


def load_model(path: str, xp: ModuleType = np) -> Sequential:
    """The model saved at `path`, with its arrays on array module `xp` (numpy or cupy)."""
    with np.load(path, allow_pickle=False) as f:
        if _CONFIG not in f.files:
            raise ValueError(f"{path!r} is not a saved model: no {_CONFIG} entry")
        model = Sequential.from_config(json.loads(str(f[_CONFIG])))
        state = {k: f[k] for k in f.files if k != _CONFIG}
    dtypes = {a.dtype for a in state.values()}
    if len(dtypes) == 1:
        model.to(dtype=dtypes.pop())
    model.load_state_dict(state)
    return model.to(xp)
