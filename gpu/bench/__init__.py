"""gpu-bench: this library's ops against their peers, and the float64 reference of every op.

    records.py    one record per op: name, family, inputs, reference, minimum bytes, peers
    reference.py  the float64 formulas of every op (NumPy or CuPy); the tests' truth too
    harness.py    peers, devices, timing, check before timing, the host-path measurement
    report.py     the table, the JSON report, the plot
    cli.py        the command line (`gpu-bench`, `python -m gpu.bench`)

Adding an op is adding its record to `records.py` (and its formula to `reference.py`).
"""
from .cli import main

__all__ = ["main"]
