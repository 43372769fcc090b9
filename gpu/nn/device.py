"""Where a model and its data live: one array module (NumPy or CuPy) for everything.

Parameters are always created in NumPy from a seeded generator, then moved, so that a model built
for the CPU and one built for the GPU start from the same bits.
"""
from __future__ import annotations

from types import ModuleType

import numpy as np

from .._backend import is_cupy_array

DEVICES = ("cpu", "gpu")


def device_module(device: str) -> ModuleType:
    """numpy for "cpu", cupy for "gpu" (ImportError/RuntimeError with the reason if unusable)."""
    if device == "cpu":
        return np
    if device != "gpu":
        raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    try:
        import cupy
    except ImportError as e:
        raise ImportError("device 'gpu' needs CuPy: pip install 'gpu[cuda12]'") from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        raise RuntimeError(f"device 'gpu': no usable CUDA device ({e})") from e
    if count == 0:
        raise RuntimeError("device 'gpu': no CUDA device found")
    return cupy


def module_of(a: object) -> ModuleType:
    """The array module an array belongs to."""
    if is_cupy_array(a):
        import cupy
        return cupy
    return np


def to_module(a, xp: ModuleType):
    """`a` as an array of `xp` (a copy only when it has to cross devices)."""
    if xp is np:
        return a.get() if is_cupy_array(a) else np.asarray(a)
    return xp.asarray(a)
