"""Launch planning shared by the op modules: grid and block arithmetic, one wave of resident
blocks, 16-byte alignment, and the cache that keeps a plan per (shape, dtype, layout, device,
knobs) so that a warm call computes nothing twice.

A plan is the op's own frozen dataclass (which kernel path, grid, block, shared memory); this
module holds what every op's planning uses. Nothing here launches: ``gpu._kernels`` does.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Hashable

import numpy as np

from gpu import _backend as B
from gpu import _kernels

__all__ = ["ceil_div", "pow2_ceil", "device", "resident_blocks", "data_ptr", "aligned", "signature", "ValidCalls", "dummy", "constant", "PlanCache"]

#: Shared memory the CUDA driver reserves per resident block (sm_80 and later).
RESERVED_SHARED_MEM = _kernels.RESERVED_SHARED_MEM_PER_BLOCK


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pow2_ceil(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def device(xp) -> dict[str, Any]:
    """The attributes of the device that runs ``xp``'s kernels (read once; do not modify)."""
    return _kernels.device_attributes(xp)


def resident_blocks(dev, threads: int, smem: int = 0) -> int:
    """One wave: how many blocks of ``threads`` threads and ``smem`` bytes of dynamic shared memory
    the device holds at once (registers aside), at least one per SM."""
    per_sm = min(dev["max_blocks_per_sm"], dev["max_threads_per_sm"] // threads)
    if smem:
        per_sm = min(per_sm, dev["max_shared_memory_per_sm"] // (smem + RESERVED_SHARED_MEM))
    return dev["sm_count"] * max(1, per_sm)


def data_ptr(a) -> int:
    """The address of an array's first element (NumPy or CuPy)."""
    return a.__array_interface__["data"][0] if isinstance(a, np.ndarray) else a.data.ptr


def aligned(*arrays, to: int = 16) -> bool:
    """Whether every array starts on a ``to``-byte boundary (16: one vector load). A NumPy array
    that owns its data came from NumPy's allocator (malloc: 16-byte aligned on 64-bit platforms),
    so only views need their address read (``__array_interface__`` costs a microsecond)."""
    for a in arrays:
        if not (to <= 16 and type(a) is np.ndarray and a.base is None) and data_ptr(a) % to:
            return False
    return True


def signature(*arrays) -> tuple | None:
    """What the argument checks of an op depend on, per array: (type, shape, strides, dtype), or
    None for an absent one; None if an argument is not an array. Ops keep the signatures of calls
    that passed their checks (``ValidCalls``) and skip the checks for the next call like them."""
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        try:
            out.append((type(a), a.shape, a.strides, a.dtype))
        except AttributeError:
            return None
    return tuple(out)


class ValidCalls:
    """Signatures of kernel-path calls whose argument checks passed, with what the checks
    produced (the layout): a call with the same signature passes them too, so it skips them.
    Value checks (eps, momentum) and writeability are not in a signature: ops still make them."""

    def __init__(self, maxsize: int = 4096):
        self._calls: dict[Hashable, Any] = {}
        self._maxsize = maxsize

    def get(self, key: Hashable | None) -> Any:
        return None if key is None else self._calls.get(key)

    def put(self, key: Hashable | None, value: Any) -> None:
        if key is None:
            return
        if len(self._calls) >= self._maxsize:
            self._calls.clear()
        self._calls[key] = value


_dummies: dict[tuple, Any] = {}
_constants: dict[tuple, Any] = {}


def _device_id(xp):
    return None if xp is np else xp.cuda.runtime.getDevice()


def dummy(xp, dtype):
    """A one-element array of ``dtype`` that stands in for a pointer argument the kernel does not
    touch (its flags say so): one per device and dtype, allocated once."""
    key = (_device_id(xp), dtype)
    a = _dummies.get(key)
    if a is None:
        a = _dummies[key] = B.device_array(xp, 1, dtype)
    return a


def constant(xp, dtype, value: float):
    """A one-element device array holding ``value``, kept per (device, dtype, value): a scalar a
    kernel reads through a pointer (an upstream gradient of 1.0, say) is uploaded once, not on
    every call. Kernels only read it."""
    key = (_device_id(xp), dtype, value)
    a = _constants.get(key)
    if a is None:
        if len(_constants) >= 256:
            _constants.clear()
        a = _constants[key] = B.device_array(xp, 1, dtype, fill=value)
    return a


class PlanCache:
    """Plans kept by key. The key must hold everything the plan depends on: shapes, dtype,
    alignment, the device (``id`` of its attribute dict, which lives as long as the process) and
    the op's tuning knobs (a frozen dataclass). Bounded: cleared when full."""

    def __init__(self, maxsize: int = 4096):
        self._plans: dict[Hashable, Any] = {}
        self._maxsize = maxsize
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        plan = self._plans.get(key)
        if plan is None:
            plan = make()
            with self._lock:
                if len(self._plans) >= self._maxsize:
                    self._plans.clear()
                self._plans[key] = plan
        return plan

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
