"""Persistent scratch memory for the kernel path, one workspace per device and stream, and the
device-side error records it holds.

A kernel that merges across blocks needs partials, an arrival counter per merge (the last-block
ticket of ``cuda_src/common.cuh``) and, for cross-entropy, a place to record a bad target. None of
them is allocated or zeroed per call: a workspace keeps them for its (device, stream), so that a
warm call allocates only its outputs, uploads nothing, reads nothing back, and can be captured in a
CUDA graph.

- ``buffer(name, dtype, n)``: n elements of scratch, grown (never shrunk) when a call needs more;
  contents unspecified. Kernels on one stream run in order, so one stream's calls can share it.
- ``counters(name, n)``: n ``unsigned int`` counters, zeroed once when allocated. Every kernel that
  takes a ticket leaves its counter at zero again (the last block resets it), so the next launch
  finds it zero with no memset.
- ``error_record(name)``: four ``int64`` slots, slot 0 = -1 while no error is recorded. A kernel
  that meets bad input writes the first such record and leaves later ones alone (sticky); the
  host reads records only in ``check_errors()`` (or right after the launch with eager checks).

The emulator's "stream" is the calling thread: its launches run synchronously on that thread, so
two threads must not share scratch. On CuPy the key is (device, current stream): streams that run
concurrently never share scratch; a CUDA graph captured on a stream uses that stream's workspace
(make one warm call on the stream before capturing, so nothing is allocated during capture).

Errors
------
``check_errors()`` (``gpu.check_errors``) reads every workspace's records, clears them, and raises
the first recorded error (a ``ValueError`` for a bad cross-entropy target). It is the explicit sync
point, like the next synchronizing call after a device-side assert in PyTorch. With eager checks
(``gpu.set_eager_checks(True)`` or ``GPU_EAGER_CHECKS=1`` in the environment) each op reads its
record right after its launch and raises there, naming the exact position: one sync per call, for
debugging.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Callable

import numpy as np

from gpu import _backend as B

__all__ = ["Workspace", "get", "check_errors", "set_eager_checks", "eager_checks", "register_error", "discard"]


class Workspace:
    """The scratch of one (device, stream); see the module docstring."""

    def __init__(self, xp):
        self.xp = xp
        self._buffers: dict[tuple, object] = {}
        self._counters: dict[str, object] = {}
        self._errors: dict[str, object] = {}

    def buffer(self, name: str, dtype, n: int):
        """``n`` elements of ``dtype`` scratch, kept under ``name`` (contents unspecified)."""
        key = (name, dtype)
        a = self._buffers.get(key)
        if a is None or a.size < n:
            a = self._buffers[key] = B.device_array(self.xp, max(n, 1), dtype)
        return a[:n]

    def counters(self, name: str, n: int):
        """``n`` arrival counters kept under ``name``, zero between launches."""
        a = self._counters.get(name)
        if a is None or a.size < n:
            a = self._counters[name] = B.device_array(self.xp, max(n, 1), np.uint32, fill=0)
        return a[:n]

    def error_record(self, name: str):
        """The sticky error record ``name``: int64[4], slot 0 = -1 while nothing is recorded."""
        a = self._errors.get(name)
        if a is None:
            a = self._errors[name] = B.device_array(self.xp, 4, np.int64, fill=-1)
        return a

    def read_error(self, name: str) -> list[int] | None:
        """The record ``name`` (a device-to-host read: a sync on a GPU), cleared; None if unset."""
        a = self._errors.get(name)
        if a is None:
            return None
        values = [int(v) for v in (a if isinstance(a, np.ndarray) else a.get()).tolist()]
        if values[0] < 0:
            return None
        a.fill(-1)
        return values


_cuda_workspaces: dict[tuple, Workspace] = {}
_local = threading.local()
_every: "weakref.WeakSet[Workspace]" = weakref.WeakSet()
_lock = threading.Lock()


def get(xp) -> Workspace:
    """The workspace of the current device and stream (the calling thread on the emulator)."""
    if xp is np:
        ws = getattr(_local, "ws", None)
        if ws is None:
            ws = _local.ws = Workspace(np)
            with _lock:
                _every.add(ws)
        return ws
    key = (xp.cuda.runtime.getDevice(), xp.cuda.get_current_stream().ptr)
    ws = _cuda_workspaces.get(key)
    if ws is None:
        with _lock:
            ws = _cuda_workspaces.setdefault(key, Workspace(xp))
            _every.add(ws)
    return ws


def discard(xp) -> None:
    """Forget the emulator workspace of this thread (after a launch that failed part way, whose
    counters may not be zero); the next call allocates a fresh one. Recorded errors are kept."""
    if xp is np:
        ws = getattr(_local, "ws", None)
        if ws is not None:
            fresh = Workspace(np)
            fresh._errors = ws._errors
            _local.ws = fresh
            with _lock:
                _every.discard(ws)
                _every.add(fresh)


# ---------------------------------------------------------------------------------------------
# Device-side errors
# ---------------------------------------------------------------------------------------------

_describers: dict[str, Callable[[list[int]], Exception]] = {}


def register_error(name: str, describe: Callable[[list[int]], Exception]) -> None:
    """How the record ``name`` becomes an exception (the op that writes it registers this)."""
    _describers[name] = describe


def check_errors() -> None:
    """Raise the first error a kernel recorded since the last check, on any device and stream
    (a ``ValueError`` for an out-of-range cross-entropy target), and clear the records.

    It reads each record back to the host: the explicit synchronization point. Call it where a
    sync is cheap (once per log interval or epoch, before trusting a loss); ``gpu-train`` does.

    >>> import gpu
    >>> gpu.check_errors()          # nothing recorded: returns None
    """
    with _lock:
        spaces = list(_every)
    first = None
    for ws in spaces:
        for name in list(ws._errors):
            values = ws.read_error(name)
            if values is not None and first is None:
                first = _describers[name](values)
    if first is not None:
        raise first


_eager = os.environ.get("GPU_EAGER_CHECKS", "0") not in ("", "0")


def eager_checks() -> bool:
    """Whether ops check their device-side errors right after each launch (one sync per call)."""
    return _eager


def set_eager_checks(enabled: bool) -> bool:
    """Check device-side errors after every launch (True: one sync per call, the error raised by
    the call itself with the exact position) or only at ``check_errors()`` (False, the default;
    ``GPU_EAGER_CHECKS=1`` makes True the default). Returns the previous setting.

    >>> import gpu
    >>> previous = gpu.set_eager_checks(True)
    >>> _ = gpu.set_eager_checks(previous)
    """
    global _eager
    previous, _eager = _eager, bool(enabled)
    return previous
