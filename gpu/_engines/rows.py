"""The row engine's plans: the Python half of cuda_src/rows.cuh.

An op on the row engine reduces each row of an array along one axis and writes every element from
its row's statistics (softmax, log-softmax, hardmax and cross-entropy in cuda_src/softmax.cu; any
family that declares ``// @headers rows.cuh``). Its .cu names the kernel of each path
``<op>_warp_n{N}`` (N in WARP_NS), ``<op>_block`` and ``<op>_strided``, bounded by rows.cuh's block
sizes, which are planned with here (SM_WARP_THREADS, SM_BLOCK_MAX_THREADS[_F64], SM_STRIDED_MAX_TY).

An op views its array with ``layout`` (C-contiguous (outer, C, inner); rows are the (outer, inner)
pairs), asks ``plan`` for the path and launch shape, and launches ``plan.kernel(...)`` with
``plan.sizes(...)`` and its own arguments. Path per call (rows.cuh has the kernels' design):

    inner == 1, C <= warp_max_cols       warp: a lane group per row, the row in registers
    inner == 1, the row fits shared mem  block, cached=C: a block per row, the row read once
    inner == 1, longer rows              block, 0 < cached < C: the leading columns in shared
                                         memory, the rest read twice (the second read from L2)
    inner > 1                            strided: (32, TY) blocks over tiles of 32 inner positions

Grids are min(work, one wave of resident blocks), the wave by the launched kernel's occupancy
(``Plan.grid_for``: registers included); kernels grid-stride over the rest. Tests force
each path at small sizes with ``tuned(...)``, the engine's one knob (no rebuild: every path's
kernel is in the one module per dtype).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from .. import _kernels, _launch

__all__ = ["Tuning", "tuned", "knobs_key", "WARP_NS", "Layout", "layout", "Plan", "plan", "alignment"]


@dataclass(frozen=True)
class Tuning:
    """The path thresholds (``tuned(...)`` overrides them inside a block)."""

    warp_max_cols: int | None = None        # None: 32 * max_n (1024; 256 for float64 cross-entropy)
    smem_bytes: int | None = None           # cached-row budget; None: the device's opt-in limit
    strided_cache_bytes: int = 48 * 1024    # (C, 32) tile cache of the strided path, at most
    block_threads: int | None = None        # None: by row length


_DEFAULT = _knobs = Tuning()

#: The warp kernels' values per lane: ``<op>_warp_n{N}``.
WARP_NS = (1, 2, 4, 8, 16, 32)


@contextlib.contextmanager
def tuned(**changes):
    """Override the row engine's path thresholds (Tuning's fields) inside the block (tests), e.g.
    ``with rows.tuned(warp_max_cols=0):`` makes short rows take the block path."""
    global _knobs
    saved = _knobs
    _knobs = replace(_knobs, **changes)
    try:
        yield
    finally:
        _knobs = saved


def knobs_key() -> Tuning | None:
    """The knobs as part of a cache key: None while they are the defaults (cheaper to hash)."""
    return None if _knobs is _DEFAULT else _knobs


class Layout(NamedTuple):
    """An array as the row kernels see it (a tuple: built on every call, cheaper than a dataclass)."""

    z: object      # C-contiguous: the caller's array, its transpose (flip) or a contiguous copy
    axis: int      # the class axis of `z`
    outer: int
    C: int
    inner: int
    flip: bool     # z is the caller's array transposed: transpose outputs back
    copied: bool   # z is a copy of the caller's array

    @property
    def rows(self) -> int:
        return self.outer * self.inner

    @property
    def row_shape(self) -> tuple:
        """z's shape without the class axis (in this layout's orientation)."""
        return self.z.shape[:self.axis] + self.z.shape[self.axis + 1:]

    def orient(self, a):
        """A caller-oriented array (z's shape, or z's shape without axis) in this layout."""
        return a.T if self.flip else a


def layout(xp, z, ax: int) -> Layout:
    """z (class axis ``ax``) as a C-contiguous (outer, C, inner) array: itself, its transpose when
    it is Fortran-ordered (no copy), else a contiguous copy."""
    flip = copied = False
    if not z.flags.c_contiguous:
        if z.ndim > 1 and z.flags.f_contiguous:
            z, ax, flip = z.T, z.ndim - 1 - ax, True
        else:
            z, copied = xp.ascontiguousarray(z), True
    return Layout(z, ax, math.prod(z.shape[:ax]), z.shape[ax], math.prod(z.shape[ax + 1:]), flip, copied)


@dataclass(frozen=True)
class Plan:
    """Which path runs a layout's rows, and its launch shape."""

    family: str      # the kernel family (a .cu with `// @headers rows.cuh`)
    path: str        # "warp", "block" or "strided"
    grid: int
    block: tuple
    smem: int = 0
    n: int = 0       # warp: values per lane
    lanes: int = 32  # warp: lanes per row
    vec: int = 0     # 16-byte vector loads
    cached: int = 0  # strided: the tile kept in shared memory (0/1); block: its leading columns kept
    kernels: dict = field(default_factory=dict, compare=False, repr=False)   # fetched once

    def kernel(self, xp, op: str, dtype, exact: bool = False, defines: dict | None = None):
        """The kernel of this path for ``op`` (``<op>_warp_n{N}``, ``<op>_block``, ``<op>_strided``),
        or with ``exact`` the kernel named ``op``, from the module of the family's variant
        ``defines`` (None: the default); fetched once per plan."""
        key = (op, dtype) if not defines else (op, dtype, tuple(sorted(defines.items())))
        k = self.kernels.get(key)
        if k is None:
            suffix = "" if exact else f"_warp_n{self.n}" if self.path == "warp" else f"_{self.path}"
            k = self.kernels[key] = _kernels.get_kernel(self.family, op + suffix, xp, dtype, defines)
        return k

    def grid_for(self, k) -> int:
        """The grid to launch kernel ``k`` (from ``kernel``) with: ``grid`` (the work, at most one wave
        by threads and shared memory) capped at one wave by ``k``'s occupancy, registers included (a
        1024-thread block of 61 registers fits one block per SM, not the two that threads allow; more
        blocks would only queue behind the first wave). Kept per plan and kernel."""
        key = ("grid", id(k))
        g = self.kernels.get(key)
        if g is None:
            wave = max(k.device["sm_count"], _kernels.max_cooperative_grid(k, self.block, self.smem))
            g = self.kernels[key] = min(self.grid, wave)
        return g

    def sizes(self, lay: Layout, rows: str | None = "rows", cached: bool = True) -> dict:
        """The size arguments of this path's kernels, by name (``rows=None``: the kernel takes the
        row count under another name). Kept per plan, whose key holds the sizes; a fresh dict."""
        key = ("sizes", rows, cached)
        out = self.kernels.get(key)
        if out is None:
            out = self.kernels[key] = self._sizes(lay, rows, cached)
        return dict(out)

    def _sizes(self, lay: Layout, rows: str | None, cached: bool) -> dict:
        C = np.int32(lay.C)
        if self.path == "strided":
            out = dict(outer=np.int64(lay.outer), C=C, inner=np.int64(lay.inner))
        else:
            out = dict(C=C, vec=np.int32(self.vec))
            if self.path == "warp":
                out["lanes"] = np.int32(self.lanes)
            if rows:
                out[rows] = np.int64(lay.rows)
        if cached and self.path != "warp":
            out["cached"] = np.int32(self.cached)
        return out


_PLANS = _launch.PlanCache()


def plan(xp, family: str, lay: Layout, itemsize: int, aligned: bool, vec_first: bool, *, regions: int = 1,
         cache: bool = True, max_n: int = 32, max_threads: int | None = None) -> Plan:
    """The path and launch shape for ``lay``'s rows in ``family``'s kernels, kept per shape, dtype
    size, alignment, options, device and knobs. ``aligned``: every operand has the same address
    modulo 16 (``alignment``); ``vec_first``: z itself is 16-byte aligned; ``regions``: the
    row-shaped operands kept in shared memory (2: z and a dense second input); ``cache``: keep rows
    in shared memory at all (False for an op that never reads a row twice); ``max_n``: the largest
    warp kernel's values per lane; ``max_threads``: the block kernel's own bound on its threads
    (the smaller of it and rows.cuh's holds, a tuning knob's block size included)."""
    dev = _launch.device(xp)
    key = (family, lay.outer, lay.C, lay.inner, itemsize, aligned, vec_first, regions, cache, max_n, max_threads,
           id(dev), None if _knobs is _DEFAULT else _knobs)   # hashing the dataclass costs more than the key
    return _PLANS.get(key, lambda: _make_plan(dev, family, lay, itemsize, aligned, vec_first, regions, cache,
                                              max_n, max_threads))


def _make_plan(dev, family: str, lay: Layout, itemsize: int, aligned: bool, vec_first: bool, regions: int,
               cache: bool, max_n: int, max_threads: int | None = None) -> Plan:
    const = _kernels.family(family).constants
    tune, C = _knobs, lay.C
    pack = 16 // itemsize
    limit = dev["max_shared_memory_per_block_optin"] - 4096   # leave room for static scratch
    budget = min(limit, tune.smem_bytes if tune.smem_bytes is not None else limit)
    if lay.inner > 1:
        ty = min(const["SM_STRIDED_MAX_TY"], _launch.pow2_ceil(C))
        smem = C * 32 * itemsize * regions
        cached = int(cache and smem <= min(budget, tune.strided_cache_bytes))
        smem = smem if cached else 0
        tiles = lay.outer * _launch.ceil_div(lay.inner, 32)
        if tiles >= 2**31:   # the kernel counts tiles in 32 bits
            raise ValueError(f"z: {tiles} tiles of 32 positions along the axes after axis {lay.axis} "
                             "exceed the strided kernel's 2^31")
        return Plan(family, "strided", min(tiles, _launch.resident_blocks(dev, 32 * ty, smem)), (32, ty), smem,
                    cached=cached)

    warp_max = tune.warp_max_cols if tune.warp_max_cols is not None else 32 * max_n
    if C <= min(warp_max, 32 * max_n):
        n = next(n for n in WARP_NS if 32 * n >= C)
        lanes = 32 if C > 32 else _launch.pow2_ceil(C)
        vec = int(aligned and vec_first and C % pack == 0)
        block = const["SM_WARP_THREADS"]
        groups = _launch.ceil_div(lay.rows, block // lanes)
        return Plan(family, "warp", min(groups, _launch.resident_blocks(dev, block)), (block,),
                    n=n, lanes=lanes, vec=vec)

    # About four 16-byte vectors per thread per pass; 512 at most for float64 (its registers).
    most = const["SM_BLOCK_MAX_THREADS" if itemsize < 8 else "SM_BLOCK_MAX_THREADS_F64"]
    if max_threads is not None:
        most = min(most, max_threads)
    threads = tune.block_threads or max(128, min(most, _launch.pow2_ceil(_launch.ceil_div(C, 4 * pack))))
    if max_threads is not None:
        threads = min(threads, most)   # a tuned block size too: the kernel's own bound
    # The leading `cached` columns stay in shared memory: the whole row where it fits, else as many
    # as the budget holds (the rest is read again, from L2: see rows_block). Its region per operand:
    # SM_BLOCK_REGION(cached) elements, (ceil(cached / pack) + 2) 16-byte vectors.
    cached = 0
    if cache:
        cached = min(C, (budget // (16 * regions) - 2) * pack)
        cached = cached if cached > 0 else 0
    smem = (_launch.ceil_div(cached, pack) + 2) * 16 * regions if cached else 0
    return Plan(family, "block", min(lay.rows, _launch.resident_blocks(dev, threads, smem)), (threads,), smem,
                vec=int(aligned), cached=cached)


def alignment(*arrays) -> tuple[bool, bool]:
    """(every array at the same address modulo 16, the first 16-byte aligned): plan's
    ``aligned`` and ``vec_first``."""
    if _launch.aligned(*arrays):     # the common case, without reading every address
        return True, True
    ptrs = [_launch.data_ptr(a) for a in arrays]
    return len({p % 16 for p in ptrs}) == 1, ptrs[0] % 16 == 0
