"""gpu-bench: this library's ops against their peers, and the float64 reference of every op.

    records.py    one record per op: name, family, inputs, reference, minimum bytes, peers
    reference.py  the float64 formulas of every op (NumPy or CuPy); the tests' truth too
    peers.py      the peers and their registry PEERS
    devices.py    the CPU and the CUDA device: arrays, timing, copy and datasheet bandwidth
    suites.py     the default suites and dtypes, the CPU speed check's cases and targets
    harness.py    one case: check before timing, then timing; the interop overhead
    host.py       the host-path measurement (`--host`)
    report.py     the table, the JSON report, the plot
    cli.py        the command line (`gpu-bench`, `python -m gpu.bench`)
    sass.py       per kernel from NVRTC's SASS: registers, spills, hot-loop instructions per element
    bounds.py     both bounds per launch (bytes, SASS instructions) on H100 and H200 (`--bounds`)
    precompile.py the kernel modules scripts/gpu_check.sh compiles before its tests, and the proof

Adding an op is adding its record to `records.py` (and its formula to `reference.py`).
"""
from .cli import main

__all__ = ["main"]
