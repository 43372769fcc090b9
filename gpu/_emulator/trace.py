"""The memory-traffic tracer: what a GPU's memory system would see of each emulated launch.

Inside ``tracing()`` kernels build in the ``trace`` flavour (``GPU_EMULATOR_TRACE=1``, its own
cache entries; never with ``GPU_EMULATOR_ASAN``): the kernel source is compiled with g++'s
AddressSanitizer instrumentation in its call-per-access form, and the callbacks, defined in the
runtime (``trace_runtime.inc``) instead of libasan, hand over the address and size of every load
and store. An access inside one of the arrays passed to the launch is *global*, inside the block's
shared memory *shared*; the rest (locals, the emulator's state) is ignored.

Accesses are grouped into warp requests by (warp, segment between fiber switches, call site, the
lane's occurrence of that site in the segment): convergent code gives one request per warp
instruction, as on a GPU. Per request the runtime counts the distinct 32-byte sectors of a global
access against the ideal (the distinct bytes / 32, rounded up: 4 for 32 lanes x 4 bytes, 16 for 32
x 16 bytes) and the bank-conflict ways of a shared one (32 banks of 4 bytes, broadcasts free, 8-
and 16-byte accesses in half- and quarter-warp phases). Each launch is a ``LaunchTrace`` of
per-site statistics (``Site``); the report (``gpu.bench.traffic``) and the tests read them.

Limits of the model:

- Divergent code: lanes that take different branches make different requests of the same
  instruction; a data-dependent loop (trip counts that differ between lanes) pairs the k-th
  iteration of each lane, as a GPU does only while the warp stays converged.
- Accesses the compiler proves in bounds at a constant offset of a fixed ``__shared__`` array
  (``s[0]``) are not instrumented: they are broadcasts, free on the hardware, but not counted.
- g++ checks an address once per basic block: a second load of the same element with no call
  (barrier, warp operation) in between is not seen; on a GPU it would be an L1 hit at best.
- Atomics are not instrumented (g++ leaves ``__atomic_*`` builtins alone): the grid-merge
  counters and any atomicAdd traffic are missing from the bytes.
- Shared memory: a lane's scalar accesses that together fill one aligned 16-byte vector in a
  segment count as one vector access (NVPTX's load/store vectorizer merges them where it knows the
  alignment, as for a cached ``Pack`` read field by field); global accesses are taken as g++
  emits them (the kernels' streaming accesses are explicit ``uint4`` loads and stores).
- It counts requested bytes and sectors, not DRAM traffic: no cache is modelled (a second read
  of a row that an L2 would hold counts again, which is the point: the model is "each byte once").
- The instruction stream is g++'s at -O2 without scalar replacement of aggregates and without
  the vectorizer, which keeps a ``float4`` copy one 16-byte access and scalar loops scalar, as
  the CUDA compiler emits them; register spills and local arrays are not global memory.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

_ROW = 13          # doubles per site in gpuemu_trace_rows()


@dataclass(frozen=True)
class Site:
    """One instruction's warp requests in one launch."""

    offset: int          # its address in the kernel module (for addr2line)
    space: str           # "global" or "shared"
    store: bool
    requests: int
    bytes: int           # bytes requested: the distinct bytes of each request, summed (a
                         # broadcast counts once, as the memory system delivers it)
    sectors: int         # global: distinct 32-byte sectors, summed over requests
    ideal: int           # global: ceil(distinct bytes / 32), summed over requests
    worst: float         # global: the largest sectors / ideal of one request
    ways: int            # shared: bank-conflict ways, summed over requests (1 = conflict-free)
    ways_max: int        # shared: the largest of one request
    width: int           # the widest access in bytes
    lanes: int           # active lanes, summed over requests
    lane_bytes: int = 0  # every lane's access counted

    @property
    def sectors_per_request(self) -> float:
        return self.sectors / self.requests if self.requests else 0.0

    @property
    def ideal_per_request(self) -> float:
        return self.ideal / self.requests if self.requests else 0.0

    @property
    def coalescing(self) -> float:
        """Sectors touched / the ideal (1.0: perfectly coalesced)."""
        return self.sectors / self.ideal if self.ideal else 1.0

    @property
    def conflict_ways(self) -> float:
        return self.ways / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Buffer:
    """One buffer of a launch (an array argument, or several that share memory)."""

    start: int
    size: int
    loaded: int          # bytes requested (distinct per request)
    stored: int


@dataclass
class LaunchTrace:
    """The traffic of one launch, per call site and per buffer."""

    kernel: str
    grid: tuple
    block: tuple
    sites: list[Site]
    unique_bytes: int
    module: str = ""
    buffers: list[Buffer] = field(default_factory=list)

    def bytes_of(self, a: np.ndarray) -> tuple[int, int]:
        """(loaded, stored): the bytes requested from the buffer holding array ``a``'s memory."""
        p = a.__array_interface__["data"][0]
        for b in self.buffers:
            if b.start <= p < b.start + b.size:
                return b.loaded, b.stored
        return 0, 0

    def tensor_bytes(self, at_least: int) -> int:
        """Bytes requested from the buffers of at least ``at_least`` bytes (the op's tensors, not
        its per-channel or per-row vectors)."""
        return sum(b.loaded + b.stored for b in self.buffers if b.size >= at_least)

    def _sum(self, attr: str, space: str, store: bool | None = None) -> int:
        return sum(getattr(s, attr) for s in self.sites
                   if s.space == space and (store is None or s.store == store))

    @property
    def load_bytes(self) -> int:
        return self._sum("bytes", "global", False)

    @property
    def store_bytes(self) -> int:
        return self._sum("bytes", "global", True)

    @property
    def global_requests(self) -> int:
        return self._sum("requests", "global")

    @property
    def sectors_per_request(self) -> float:
        n = self.global_requests
        return self._sum("sectors", "global") / n if n else 0.0

    @property
    def ideal_sectors_per_request(self) -> float:
        n = self.global_requests
        return self._sum("ideal", "global") / n if n else 0.0

    @property
    def coalescing_worst(self) -> float:
        """The largest sectors / ideal of any one global request (1.0 where all are ideal)."""
        return max((s.worst for s in self.sites if s.space == "global"), default=1.0)

    @property
    def smem_requests(self) -> int:
        return self._sum("requests", "shared")

    @property
    def smem_conflict_ways(self) -> float:
        n = self.smem_requests
        return self._sum("ways", "shared") / n if n else 0.0

    @property
    def smem_conflict_ways_max(self) -> int:
        return max((s.ways_max for s in self.sites if s.space == "shared"), default=0)

    def main(self, store: bool | None = None, share: float = 0.1) -> list[Site]:
        """The global sites carrying at least ``share`` of the launch's global bytes of their kind
        (loads, stores, or both): its streaming loads and stores."""
        total = self._sum("bytes", "global", store)
        return [s for s in self.sites if s.space == "global" and (store is None or s.store == store)
                and s.bytes >= share * total and s.bytes > 0]

    def where(self, site: Site) -> str:
        """``function file:line`` of a site (addr2line on the module's debug information)."""
        return describe(self.module, site.offset)

    def summary(self) -> dict:
        """The launch as the report's JSON has it."""
        return {"kernel": self.kernel, "load_bytes": self.load_bytes, "store_bytes": self.store_bytes,
                "unique_bytes": self.unique_bytes,
                "sectors_per_request": round(self.sectors_per_request, 3),
                "ideal_sectors_per_request": round(self.ideal_sectors_per_request, 3),
                "coalescing_worst": round(self.coalescing_worst, 3),
                "smem_conflict_ways": round(self.smem_conflict_ways, 3),
                "smem_conflict_ways_max": self.smem_conflict_ways_max}


@dataclass
class Trace:
    """The launches traced inside one ``tracing()`` block, in order."""

    launches: list[LaunchTrace] = field(default_factory=list)

    @property
    def load_bytes(self) -> int:
        return sum(t.load_bytes for t in self.launches)

    @property
    def store_bytes(self) -> int:
        return sum(t.store_bytes for t in self.launches)

    @property
    def bytes(self) -> int:
        return self.load_bytes + self.store_bytes

    @property
    def unique_bytes(self) -> int:
        return sum(t.unique_bytes for t in self.launches)

    def tensor_bytes(self, at_least: int) -> int:
        return sum(t.tensor_bytes(at_least) for t in self.launches)

    def kernels(self) -> list[str]:
        return [t.kernel for t in self.launches]


_active: list[Trace] = []
_last_buffers: list[tuple[int, int]] = []      # (start, size) of the launch being traced


def active() -> bool:
    """True inside ``tracing()``: launches of trace-flavour modules are recorded."""
    return bool(_active)


@contextlib.contextmanager
def tracing() -> Iterator[Trace]:
    """Build and run kernels in the trace flavour inside the block; yields the ``Trace`` that
    collects every launch.

    >>> with tracing() as t:                                             # doctest: +SKIP
    ...     gpu.softmax(z)
    >>> t.launches[0].sectors_per_request                                # doctest: +SKIP
    """
    saved = os.environ.get("GPU_EMULATOR_TRACE")
    os.environ["GPU_EMULATOR_TRACE"] = "1"
    trace = Trace()
    _active.append(trace)
    try:
        yield trace
    finally:
        _active.pop()
        if saved is None:
            os.environ.pop("GPU_EMULATOR_TRACE", None)
        else:
            os.environ["GPU_EMULATOR_TRACE"] = saved


def _extent(a: np.ndarray) -> tuple[int, int] | None:
    """[first byte, past the last byte) of an array's memory, None if it has no elements."""
    if a.size == 0:
        return None
    lo = hi = a.__array_interface__["data"][0]
    for n, st in zip(a.shape, a.strides):
        if st < 0:
            lo += (n - 1) * st
        else:
            hi += (n - 1) * st
    return lo, hi + a.itemsize


def _origin(a: np.ndarray) -> int:
    """The start of the memory an array views (its owning array's), where a GPU allocation would
    start on a 256-byte boundary."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a.__array_interface__["data"][0] if a.size else 0


def buffers(args: Sequence) -> tuple[list[int], list[int], list[int]]:
    """The launch's global memory: the arrays among ``args`` as disjoint ranges (starts, sizes,
    and the start of the allocation each lies in)."""
    spans = sorted((*e, _origin(a)) for a in args if isinstance(a, np.ndarray) and (e := _extent(a)) is not None)
    merged: list[list[int]] = []
    for lo, hi, origin in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi, min(origin, lo)])
    return [m[0] for m in merged], [m[1] - m[0] for m in merged], [m[2] for m in merged]


def traced(lib) -> bool:
    """Whether a loaded module is a trace build."""
    return hasattr(lib, "gpuemu_trace_begin")


def begin(lib, args: Sequence) -> None:
    """Before a launch of a trace build: its buffers."""
    starts, sizes, origins = buffers(args)
    _last_buffers[:] = list(zip(starts, sizes))
    n = len(starts)
    arr = ctypes.c_ulonglong * max(n, 1)
    lib.gpuemu_trace_begin(ctypes.c_int(n), arr(*starts), arr(*sizes), arr(*origins))


def end(lib, name: str, grid, block, module: str) -> LaunchTrace:
    """After the launch: its statistics, recorded in the innermost ``tracing()`` block if any."""
    lib.gpuemu_trace_end.restype = ctypes.c_int
    lib.gpuemu_trace_rows.restype = ctypes.POINTER(ctypes.c_double)
    lib.gpuemu_trace_unique_bytes.restype = ctypes.c_ulonglong
    n = lib.gpuemu_trace_end()
    rows = np.ctypeslib.as_array(lib.gpuemu_trace_rows(), (n * _ROW,)).reshape(n, _ROW).copy() if n else \
        np.zeros((0, _ROW))
    sites = [Site(offset=int(r[0]), space="shared" if r[1] else "global", store=bool(r[2]), requests=int(r[3]),
                  bytes=int(r[4]), sectors=int(r[5]), ideal=int(r[6]), worst=float(r[7]), ways=int(r[8]),
                  ways_max=int(r[9]), width=int(r[10]), lanes=int(r[11]),
                  lane_bytes=int(r[12])) for r in rows]
    nbuf = len(_last_buffers)
    per = (ctypes.c_double * max(2 * nbuf, 1))()
    lib.gpuemu_trace_buffer_bytes(per)
    bufs = [Buffer(s, n, int(per[2 * i]), int(per[2 * i + 1])) for i, (s, n) in enumerate(_last_buffers)]
    t = LaunchTrace(name, tuple(grid), tuple(block), sites, int(lib.gpuemu_trace_unique_bytes()), module, bufs)
    if _active:
        _active[-1].launches.append(t)
    return t


_lines: dict[tuple[str, int], str] = {}


def describe(module: str, offset: int) -> str:
    """``function file:line`` of the instruction before ``offset`` in ``module`` (a call site's
    return address), or the offset in hex where addr2line cannot tell."""
    key = (module, offset)
    if key not in _lines:
        try:
            out = subprocess.run(["addr2line", "-f", "-C", "-e", module, hex(offset - 1)], capture_output=True,
                                 text=True, timeout=30).stdout.split("\n")
            fn, loc = out[0].strip(), out[1].strip()
            _lines[key] = f"{fn} {os.path.basename(loc.split(' ')[0])}" if loc and not loc.startswith("??") \
                else hex(offset)
        except (OSError, IndexError, subprocess.SubprocessError):
            _lines[key] = hex(offset)
    return _lines[key]
