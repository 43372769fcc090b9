"""The NumPy path's engine: row blocks of a cache-friendly size, spread over the cores.

NumPy releases the GIL inside its loops, so row blocks processed on several threads use several
cores. Results are combined in block order, so they do not depend on the number of threads or
their timing. Each op module cuts its arrays into blocks with ``block_rows``, runs them through
``map_ordered``, and computes into per-thread ``scratch`` buffers reused across blocks and calls
(a fresh temporary per block would cost page faults that outweigh the arithmetic).
"""
from __future__ import annotations

import contextvars
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")

#: Row blocks of about this many bytes (in the accumulation dtype) keep a block and its
#: temporaries in the CPU caches (1 MiB: L2 or L3): each NumPy operation on a block then reads it
#: from cache, and an array crosses memory once however many operations a row takes.
BLOCK_BYTES = 1 << 20

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_local = threading.local()


def threads() -> int:
    """Worker threads: ``GPU_CPU_THREADS`` if set, else the cores this process may run on."""
    env = os.environ.get("GPU_CPU_THREADS")
    if env:
        return max(1, int(env))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def block_rows(xp, rows: int, row_bytes: int) -> int:
    """Rows per block: about BLOCK_BYTES of rows of ``row_bytes`` each; all rows on CuPy."""
    if xp is not np:
        return max(1, rows)
    return max(1, BLOCK_BYTES // max(1, row_bytes))


def row_blocks(xp, rows: int, row_bytes: int) -> list[slice]:
    """Slices of about BLOCK_BYTES along the first axis (one slice, everything, on CuPy)."""
    step = block_rows(xp, rows, row_bytes)
    return [slice(i, i + step) for i in range(0, rows, step)] or [slice(0, 0)]


def map_ordered(fn: Callable[[T], R], items: Iterable[T], xp=np) -> list[R]:
    """[fn(item) for item in items], spread over the pool for NumPy; runs inline for CuPy, one
    item, one thread, or when called from a pool worker (no nested waiting on the same pool).

    The calling thread takes items too, and every thread takes the next item not yet taken until
    none is left: a pool worker woken late (hundreds of microseconds on a VM, often after the
    caller has finished) takes fewer items or none, and the call waits only for items taken.
    Results are in item order whoever computed them; the first error is raised once every taken
    item has finished (they share the outputs)."""
    items = list(items)
    if xp is not np:
        return [fn(item) for item in items]
    workers = threads()
    n = min(workers, len(items))
    if n < 2 or getattr(_local, "worker", False):
        return [fn(item) for item in items]
    results: list = [None] * len(items)
    errors: list[BaseException] = []
    taken = itertools.count()          # next() is atomic under the GIL: each index taken once
    finished = [0]
    lock, all_done = threading.Lock(), threading.Event()

    def drain():
        for i in iter(taken.__next__, None):
            if i >= len(items):
                return
            try:
                results[i] = fn(items[i])
            except BaseException as e:  # noqa: B036  (raised by the caller below)
                errors.append(e)
            with lock:
                finished[0] += 1
                if finished[0] == len(items):
                    all_done.set()

    # helpers run in a copy of the caller's context: NumPy's errstate (a context variable) holds
    ctx = contextvars.copy_context()
    pool = _get_pool(workers - 1)     # one size per thread count: a pool is not rebuilt per call
    for _ in range(n - 1):
        pool.submit(ctx.copy().run, _as_worker, drain)
    _as_worker(drain)
    all_done.wait()
    if errors:
        raise errors[0]
    return results


def _as_worker(fn, *args):
    saved, _local.worker = getattr(_local, "worker", False), True
    try:
        return fn(*args)
    finally:
        _local.worker = saved


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers != n:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="gpu-numpy")
        return _pool


def scratch(xp, shape, dtype, slot: int = 0):
    """A scratch array of ``shape`` for the calling thread, reused by the next request of the same
    slot (NumPy; a fresh array on CuPy). Slots let one block hold several at once."""
    if xp is not np:
        return xp.empty(shape, dtype)
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    bufs = getattr(_local, "scratch", None)
    if bufs is None:
        bufs = _local.scratch = {}
    buf = bufs.get(slot)
    if buf is None or buf.nbytes < n:
        buf = bufs[slot] = np.empty(max(n, 1), np.uint8)
    return buf[:n].view(dtype).reshape(shape)
