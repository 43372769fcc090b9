"""Threads for the NumPy path: NumPy releases the GIL inside its loops, so row blocks processed on
several threads use several cores. Results are combined in block order, so they do not depend on
the number of threads or their timing."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_local = threading.local()


def threads() -> int:
    """Worker threads: ``GPU_CPU_THREADS`` if set, else the cores this process may run on."""
    env = os.environ.get("GPU_CPU_THREADS")
    if env:
        return max(1, int(env))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def map_ordered(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """[fn(item) for item in items], spread over the pool; runs inline for one item, one thread,
    or when called from a pool worker (no nested waiting on the same pool)."""
    items = list(items)
    n = threads()
    if n == 1 or len(items) < 2 or getattr(_local, "worker", False):
        return [fn(item) for item in items]
    return list(_get_pool(n).map(lambda item: _as_worker(fn, item), items))


def _as_worker(fn, item):
    _local.worker = True
    try:
        return fn(item)
    finally:
        _local.worker = False


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers != n:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="gpu-numpy")
        return _pool
