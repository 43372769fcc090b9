"""Plans for cuda_src/channels.cuh, the per-channel reduction engine of ``batch_norm.cu``.

The engine reduces a C-contiguous (outer, C, inner) array over (outer, inner) for each of its C
channels. This module holds its Python half:

- the view: any layout as (outer, C, inner) (`split`, `view`): a reshape when the kept axes are
  adjacent, else a (reduced..., kept...) transposed copy;
- the streaming plan (`plan`): block shape and grid, grid.y one wave of the reductions' resident
  blocks (`resident`), so each tile has as few partials as keep every SM busy;
- the on-chip plans of the training forward (x read once) and of the backward (dy and x read once):
  one block per tile, or the persistent plan across a cooperative grid (`plans` picks);
- the partials of the grid merge and their arrival counters (`Plans.partials`, from the workspace);
- the plan cache, and the one test knob, ``tuned(...)``, that forces every path at small sizes.

The host arithmetic must agree with the .cu: block sizes, row counts and flags come from the
family's ``#define``s (`constant`). Nothing here launches: ``gpu.ops.batch_norm.kernel_path`` does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from gpu import _backend as B
from gpu import _kernels, _launch
from gpu import _workspace as _ws

#: The kernel family built on this engine (its .cu holds the constants the plans read).
FAMILY = "batch_norm"


def constant(name: str) -> int:
    """A ``#define`` of the family's source: the one place block sizes, row counts and flags are set."""
    return _kernels.family(FAMILY).constants[name]


def split(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, int, int, tuple[int, ...] | None]:
    """(outer, C, inner, perm): the engine's view of an array of ``shape`` reduced over the sorted
    ``axes``. A reshape when the kept axes are adjacent (axes of length 1 do not count); else perm,
    the (reduced..., kept...) transpose to copy first, and the view (M, C, 1)."""
    kept_axes = tuple(i for i in range(len(shape)) if i not in axes)
    m = math.prod(shape[i] for i in axes)
    C = math.prod(shape[i] for i in kept_axes)
    nontrivial = [i for i in kept_axes if shape[i] != 1]
    if not nontrivial:               # one channel: one row of M elements
        return 1, C, m, None
    if all(i in nontrivial or shape[i] == 1 for i in range(nontrivial[0], nontrivial[-1] + 1)):
        return math.prod(shape[:nontrivial[0]]), C, math.prod(shape[nontrivial[-1] + 1:]), None
    return m, C, 1, axes + kept_axes


# ---------------------------------------------------------------------------------------------
# The test knob
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tuning:
    """Launch knobs; tests override them (``tuned``) to force every path at small sizes."""

    threads: int = 256             # block size of the streaming kernels (a power of two >= 32)
    max_cols: int = 32             # channels-last: most threads along C in a tile (power of two)
    blocks_per_sm: int | None = None  # resident blocks aimed for per SM (None: full occupancy)
    grid_rows: int | None = None   # force grid.y, the blocks sharing a tile's rows
    path: str = "auto"             # training forward: "auto", "onchip" (one block per tile),
                                   # "persistent" (x on chip across a cooperative grid) or "twopass"
    backward_path: str | None = None  # backward: the same choices (dy and x on chip; "twopass":
                                   # batch_norm_backward_reduce + _apply); None follows ``path``
    vector: bool | None = None     # False forces the scalar module; None: vectors where aligned


#: The knobs when no test overrides them.
DEFAULT = Tuning()
_tuning = DEFAULT


@contextlib.contextmanager
def tuned(**knobs):
    """Override launch knobs inside the block (tests), e.g. ``tuned(threads=64, path="twopass")``."""
    global _tuning
    saved = _tuning
    _tuning = dataclasses.replace(saved, **knobs)
    try:
        yield
    finally:
        _tuning = saved


# ---------------------------------------------------------------------------------------------
# The view
# ---------------------------------------------------------------------------------------------

class View(NamedTuple):
    """x as the kernels see it (a tuple: built on every call, and cheaper than a dataclass)."""

    x: object                        # C-contiguous (outer, C, inner) array
    outer: int
    C: int
    inner: int
    shape: tuple[int, ...]           # shape of the array x3 was reshaped from
    perm: tuple[int, ...] | None     # transpose applied before the copy, if any
    aligned: bool                    # x starts on a 16-byte boundary

    def restore(self, y3):
        """An output of the view's shape back in the caller's layout."""
        y = y3.reshape(self.shape)
        return y if self.perm is None else y.transpose(tuple(int(i) for i in np.argsort(self.perm)))


def view(xp, x, lay) -> View:
    """x as the C-contiguous (outer, C, inner) array of ``lay`` (its outer, C, inner and perm:
    `split`'s)."""
    if lay.perm is not None:
        x = x.transpose(lay.perm)
    shape = x.shape
    xc = xp.ascontiguousarray(x)
    return View(xc.reshape(lay.outer, lay.C, lay.inner), lay.outer, lay.C, lay.inner, shape, lay.perm,
                _launch.aligned(xc))


# ---------------------------------------------------------------------------------------------
# The streaming plan
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    vector: bool      # BN_VECTOR module: 16-byte vectors
    vec: int          # elements per vector
    bx: int           # threads along the contiguous axis
    threads: int      # block size
    tiles: int        # channels-last: C / (bx * vec) tiles; channels-first: C
    chunks: int       # channels-first: pieces of the inner axis per channel
    grid_rows: int    # grid.y
    smem: int         # dynamic shared memory of the reductions (and the on-chip kernels' row cache)
    cache_rows: int = 0   # on-chip kernels: rows per thread in the row cache, after the register rows

    @property
    def grid(self) -> tuple[int, int]:
        return (self.tiles * self.chunks, self.grid_rows)

    @property
    def parts(self) -> int:
        return self.chunks * self.grid_rows

    @property
    def defines(self) -> dict[str, int]:
        return {"BN_VECTOR": int(self.vector)}


def _smem(threads: int, vec: int, acc) -> int:
    """Dynamic shared memory of the reductions: a BnWelford<VEC> per thread, 1 + 3 VEC words
    (the backward's sums take 2 VEC)."""
    return threads * (1 + 3 * vec) * acc.itemsize


#: The kernels whose partials the streaming grid sizes: one wave of the more constrained of the two.
REDUCTIONS = ("batch_norm_stats", "batch_norm_backward_reduce")


def plan(dev, outer: int, C: int, inner: int, itemsize: int, acc, vector: bool, tune: Tuning,
         resident=None) -> Plan:
    """Block shape and grid of the streaming kernels for an (outer, C, inner) view; ``vector``:
    every element-wise operand is 16-byte aligned.

    grid.y is one wave of resident blocks over the tiles, so each tile's partials are as few as
    keep every SM busy: ``resident(vector, threads, smem)`` gives the blocks per SM of the
    reduction kernels (`resident`: the occupancy calculator, registers included on a GPU); without
    it, threads alone decide (an upper bound: the partials buffer then holds more than one wave)."""
    vmax = 16 // itemsize
    n = C if inner == 1 else inner                 # contiguous run: a row of channels, or a plane
    vector = vector and n % vmax == 0
    if tune.vector is not None:
        vector = vector and tune.vector
    vec = vmax if vector else 1
    w = _launch.ceil_div(n, vec)                   # vectors per run
    T = tune.threads
    if inner == 1:
        # channels-last: a warp reads bx vectors of a row, 32/bx rows at once (bx < 32 for few
        # channels keeps every lane busy: C = 3 reads 8 rows per warp instruction)
        bx = min(_launch.pow2_ceil(w), tune.max_cols, T)
        tiles, chunks = _launch.ceil_div(w, bx), 1
    else:
        # channels-first: pick the chunk width wasting the fewest lanes on the plane's tail
        # (inner = 3136 floats = 784 vectors: 32 lanes x 25 chunks use 98%, 256 x 4 only 77%)
        hi = min(_launch.pow2_ceil(w), T)
        cands = [b for b in (1 << k for k in range(11)) if min(32, hi) <= b <= hi]
        bx = max(cands, key=lambda b: (w / (b * _launch.ceil_div(w, b)) + 0.02 * math.log2(b)))
        tiles, chunks = C, _launch.ceil_div(w, bx)
    by = max(32 // bx, min(T // bx, _launch.pow2_ceil(outer)))
    T = bx * by
    grid_rows = tune.grid_rows
    if grid_rows is None:
        per_sm = tune.blocks_per_sm
        if per_sm is None:
            per_sm = (resident(vector, T, _smem(T, vec, acc)) if resident is not None
                      else dev["max_threads_per_sm"] // T)
        grid_rows = (dev["sm_count"] * max(1, per_sm)) // (tiles * chunks)
    grid_rows = max(1, min(grid_rows, _launch.ceil_div(outer, by), dev["max_grid_dims"][1]))
    return Plan(vector, vec, bx, T, tiles, chunks, grid_rows, _smem(T, vec, acc))


def resident(xp, dtype, vector: bool, threads: int, smem: int) -> int:
    """Blocks per SM that the reduction kernels (`REDUCTIONS`) can each keep resident with
    ``threads`` threads and ``smem`` bytes of dynamic shared memory: the occupancy calculator
    (`max_cooperative_grid`; registers count on a GPU: 64 registers a thread at 256 threads allow 4
    blocks of float32, not the 8 that threads alone would), the lesser of the two."""
    dev = _launch.device(xp)
    most = min(_kernels.max_cooperative_grid(
        _kernels.get_kernel(FAMILY, name, xp, dtype, {"BN_VECTOR": int(vector)}), threads, smem)
        for name in REDUCTIONS)
    return max(1, most // dev["sm_count"])


# ---------------------------------------------------------------------------------------------
# The on-chip plans
# ---------------------------------------------------------------------------------------------

class OnChip(NamedTuple):
    """An on-chip kernel: its name, the constant of its register rows, and the tensors it keeps on
    chip (x; or dy and x)."""

    kernel: str
    rows: str
    rows_16bit: str
    tensors: int

    def register_rows(self, dtype) -> int:
        return constant(self.rows if dtype.itemsize >= 4 else self.rows_16bit)

    def smem(self, threads: int, vec: int, itemsize: int, acc, cache_rows: int) -> int:
        """Dynamic shared memory: the reduction's area (a BnWelford<VEC> or BnGradSums<VEC> per
        thread), then the row cache (cache_rows vectors per thread and tensor)."""
        words = 1 + 3 * vec if self.tensors == 1 else 2 * vec
        return threads * (words * acc.itemsize + cache_rows * vec * itemsize * self.tensors)


FORWARD_ONCHIP = OnChip("batch_norm_forward_onchip", "BN_ONCHIP_ROWS", "BN_ONCHIP_ROWS", 1)
BACKWARD_ONCHIP = OnChip("batch_norm_backward_onchip", "BN_BACKWARD_ROWS", "BN_BACKWARD_ROWS_16BIT", 2)


def _onchip_geometry(xp, dtype, spec: OnChip, p: Plan, outer: int, gy: int, by_max: int, cooperative: bool):
    """The on-chip plan of gy blocks per tile (by threads along the rows, at most ``by_max``): each
    thread's rows in registers, then the row cache; None if its shared memory exceeds the block's
    limit (the opt-in limit for a cooperative grid, else the default 48 KiB: many waves of blocks
    keep their occupancy) or a cooperative grid does not fit the device at once."""
    rows = spec.register_rows(dtype)
    by = max(32 // p.bx, min(by_max, _launch.pow2_ceil(_launch.ceil_div(outer, gy * rows))))
    T = p.bx * by
    gy = max(1, min(gy, _launch.ceil_div(outer, by)))   # no block without rows
    cache = max(0, _launch.ceil_div(outer, gy * by) - rows)
    acc = B.compute_dtype(dtype)
    smem = spec.smem(T, p.vec, dtype.itemsize, acc, cache)
    plan = Plan(p.vector, p.vec, p.bx, T, p.tiles, p.chunks if cooperative else 1, gy, smem, cache)
    k = _kernels.get_kernel(FAMILY, spec.kernel, xp, dtype, plan.defines)
    dev = _launch.device(xp)
    limit = dev["max_shared_memory_per_block_optin" if cooperative else "max_shared_memory_per_block"]
    if k.static_smem + smem > limit:
        return None
    if cooperative and plan.tiles * plan.parts > _kernels.max_cooperative_grid(k, T, smem):
        return None
    return plan


def _onchip_plan(xp, dtype, spec: OnChip, p: Plan, outer: int, inner: int) -> Plan | None:
    """One block per tile holding all its rows (an ordinary launch), or None if they do not fit a
    block of at most BN_ONCHIP_THREADS threads: its register rows and a row cache within the
    default 48 KiB of shared memory."""
    if p.chunks != 1 or (inner == 1 and p.bx > constant("BN_MAX_COLS")):
        return None
    return _onchip_geometry(xp, dtype, spec, p, outer, 1, max(1, constant("BN_ONCHIP_THREADS") // p.bx), False)


def _persistent_plan(xp, dtype, spec: OnChip, p: Plan, outer: int, inner: int, tune: Tuning) -> Plan | None:
    """The cooperative on-chip plan: a tile's rows (and, channels-first, its chunks) spread over gy
    blocks of at most BN_ONCHIP_THREADS threads (capped by the ``threads`` knob), every block
    resident at once (``max_cooperative_grid``). First the register rows alone (the most blocks);
    where those cannot hold x, one wave of 2, then 1 block per SM with the rest of each thread's
    rows in the row cache (up to the opt-in shared memory: 227 KiB a block on an H100/H200). None
    if the tile's rows fit in neither. ``grid_rows`` forces gy."""
    if inner == 1 and p.bx > constant("BN_MAX_COLS"):
        return None
    by_max = max(1, min(tune.threads, constant("BN_ONCHIP_THREADS")) // p.bx)
    if tune.grid_rows:
        return _onchip_geometry(xp, dtype, spec, p, outer, tune.grid_rows, by_max, True)
    plan = _onchip_geometry(xp, dtype, spec, p, outer, _launch.ceil_div(outer, by_max * spec.register_rows(dtype)),
                            by_max, True)
    if plan is not None:
        return plan
    sm_count = _launch.device(xp)["sm_count"]
    for per_sm in (2, 1):
        gy = sm_count * per_sm // (p.tiles * p.chunks)
        plan = _onchip_geometry(xp, dtype, spec, p, outer, gy, by_max, True) if gy >= 1 else None
        if plan is not None:
            return plan
    return None


def _onchip_choice(xp, dev, p: Plan, outer: int, inner: int, dtype, tune: Tuning, spec: OnChip,
                   path: str) -> Plan | None:
    """The on-chip plan of the training forward (x read once) or of the backward (dy and x read
    once), or None for the two-kernel path.

    ``auto``: one block per tile when that costs no parallelism (the streaming grid has one block
    per tile anyway, or there are tiles enough to fill every SM); else the persistent grid if the
    rows fit on chip across the blocks the device holds at once; else two kernels. ``onchip`` /
    ``persistent`` force one of the two (ValueError if it does not fit), ``twopass`` two kernels.
    """
    if path == "twopass":
        return None
    if path in ("auto", "onchip"):
        plan = _onchip_plan(xp, dtype, spec, p, outer, inner)
        if path == "onchip" and plan is None:
            raise ValueError(f"path='onchip': a tile of {outer} rows does not fit one block")
        if plan is not None and (path == "onchip" or p.grid_rows == 1 or p.tiles >= dev["sm_count"]):
            return plan
    plan = _persistent_plan(xp, dtype, spec, p, outer, inner, tune)
    if path == "persistent" and plan is None:
        raise ValueError(f"path='persistent': {outer} rows x {p.tiles} tiles do not fit on chip across "
                         "the blocks the device holds at once")
    return plan


# ---------------------------------------------------------------------------------------------
# The plan cache
# ---------------------------------------------------------------------------------------------

class Plans:
    """The launch plans of one (view, dtype, alignment, device, knobs): the streaming plan ``p``,
    the on-chip plan ``onchip`` of the op asked for (or None), and the kernels they launch,
    fetched once."""

    __slots__ = ("p", "onchip", "_xp", "_dtype", "_kernels", "_geometry", "_stand_ins")

    def __init__(self, xp, dtype, p: Plan, onchip: Plan | None):
        self.p, self.onchip, self._xp, self._dtype, self._kernels, self._geometry = p, onchip, xp, dtype, {}, {}
        self._stand_ins: dict = {}

    def stand_in(self, dtype):
        """A one-element array of ``dtype`` for a pointer argument the kernel does not touch
        (`gpu._launch.dummy`: one per device, and these plans are of one device)."""
        a = self._stand_ins.get(dtype)
        if a is None:
            a = self._stand_ins[dtype] = _launch.dummy(self._xp, dtype)
        return a

    def partials(self, plan: Plan, words: int, C: int, acc):
        """(partials, counters) of ``plan``'s grid merge, ``words`` per channel and partial (a
        stand-in each when one block per tile needs none), from the stream's persistent workspace:
        nothing allocated or zeroed per call (the last block of each tile leaves its counter at
        zero)."""
        if plan.parts == 1:        # never touched: the kernels skip the merge
            return self.stand_in(acc), self.stand_in(np.uint32)
        ws = _ws.get(self._xp)
        return ws.buffer("batch_norm.partials", acc, words * plan.parts * C), ws.counters("batch_norm", plan.tiles)

    def geometry(self, v: View, plan: Plan) -> dict:
        """The size arguments of the streaming kernels (the view's shape is part of the key)."""
        g = self._geometry.get(id(plan))
        if g is None:
            g = self._geometry[id(plan)] = dict(outer=np.int64(v.outer), C=np.int32(v.C), inner=np.int64(v.inner),
                                                bx=np.int32(plan.bx), chunks=np.int32(plan.chunks))
        return g

    def scalars(self, v: View, acc) -> dict:
        """1/M and the unbiasing factor M/(M-1) of the statistics kernels (M = outer * inner)."""
        sc = self._geometry.get("scalars")
        if sc is None:
            m = v.outer * v.inner
            sc = self._geometry["scalars"] = dict(inv_m=acc.type(1.0 / m), unbias=acc.type(m / (m - 1) if m > 1 else 0.0))
        return sc

    def fixed(self, v: View, plan: Plan, acc) -> dict:
        """The statistics kernels' arguments that the plan and the view fix: geometry and scalars."""
        f = self._geometry.get(("fixed", id(plan)))
        if f is None:
            f = self._geometry[("fixed", id(plan))] = self.geometry(v, plan) | self.scalars(v, acc)
        return f

    def kernel(self, name: str, plan: Plan):
        k = self._kernels.get(name)
        if k is None:
            k = self._kernels[name] = _kernels.get_kernel(FAMILY, name, self._xp, self._dtype, plan.defines)
        return k


_PLANS = _launch.PlanCache()


def plans(xp, v: View, dtype, vector: bool, op: str | None) -> Plans:
    """The plans for this view, kept per shape, dtype, alignment, device and knobs; with the on-chip
    plan of ``op`` ("forward" or "backward"; None: the streaming plan alone)."""
    dev = _launch.device(xp)
    tune = _tuning
    # the default knobs by identity (hashing the dataclass costs more than the rest of the key)
    key = (v.outer, v.C, v.inner, dtype, vector, op, id(dev), None if tune is DEFAULT else tune)

    def make():
        acc = B.compute_dtype(dtype)
        p = plan(dev, v.outer, v.C, v.inner, dtype.itemsize, acc, vector, tune,
                 resident=lambda vec, T, smem: resident(xp, dtype, vec, T, smem))
        onchip = None
        if op == "forward":
            onchip = _onchip_choice(xp, dev, p, v.outer, v.inner, dtype, tune, FORWARD_ONCHIP, tune.path)
        elif op == "backward":
            onchip = _onchip_choice(xp, dev, p, v.outer, v.inner, dtype, tune, BACKWARD_ONCHIP,
                                    tune.path if tune.backward_path is None else tune.backward_path)
        return Plans(xp, dtype, p, onchip)

    return _PLANS.get(key, make)

