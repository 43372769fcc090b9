"""gpu.info(): versions, and what this machine can run."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil

import numpy as np

from . import _backend as B

__version__ = "0.1.0"


class Info(dict):
    """A dict of facts that prints as a short report."""

    def __str__(self) -> str:
        width = max(map(len, self))
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.items())

    __repr__ = __str__


#: optional packages: (module, distribution, the extra that installs it, what it enables here)
OPTIONAL = (
    ("torch", "torch", "torch",
     "gpu.torch (functional ops, BatchNorm*d, CrossEntropyLoss, SyncBatchNorm), the tests' second oracle, "
     "gpu-bench's torch peers, gpu-train --framework torch and --distributed torch"),
    ("numba", "numba", "cpu-jit",
     "the NumPy path's batch norm as compiled loops (gpu/ops/batch_norm/jit.py; GPU_CPU_JIT=0 turns them off)"),
    ("mpi4py", "mpi4py", "distributed",
     "gpu.distributed.wrap(MPI communicator), gpu-train --distributed mpi, gpu-bench --distributed under mpiexec"),
    ("ml_dtypes", "ml_dtypes", "bf16", "bfloat16 arrays (every op, and bfloat16 tensors in gpu.torch)"),
)


def _optional_facts() -> dict[str, str]:
    """Whether each optional package is installed and what it enables, without importing it
    (`import gpu` and `gpu.info()` never import torch)."""
    facts = {}
    for module, dist, extra, enables in OPTIONAL:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):       # ValueError: sys.modules[module] is None (blocked)
            found = False
        if found:
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                version = "installed"
            off = module == "numba" and B.env("GPU_CPU_JIT", "1") == "0"
            facts[module] = f"{version}{' (off: GPU_CPU_JIT=0)' if off else ''}: {enables}"
        else:
            facts[module] = f"not installed (the {extra} extra would enable: {enables})"
    return facts


def _cuda_facts() -> dict[str, str]:
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install under it
        return {"cupy": f"not importable ({type(e).__name__}: {e})".splitlines()[0],
                "gpu": "none usable (install the cuda12 or cuda13 extra on a machine with a GPU)"}
    facts = {"cupy": cupy.__version__}
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        facts["gpu"] = f"{n} device(s); device 0: {name} (sm_{props['major']}{props['minor']})"
    except Exception as e:
        facts["gpu"] = f"none usable ({type(e).__name__}: {e})".splitlines()[0]
    try:
        major, minor = cupy.cuda.nvrtc.getVersion()
        facts["nvrtc"] = f"{major}.{minor}"
    except Exception as e:
        facts["nvrtc"] = f"not usable ({type(e).__name__}: {e})".splitlines()[0]
    return facts


def info() -> Info:
    """Versions and what this machine can run; prints as a report (also `python -m gpu`).

    An invalid ``GPU_BACKEND`` is reported under "backend" (starting with ``INVALID``), not raised.

    >>> import gpu
    >>> facts = gpu.info()            # facts["NumPy arrays"] says which path NumPy arrays take
    """
    facts = Info({"gpu": __version__, "python": platform.python_version(), "numpy": np.__version__,
                  "bfloat16": "yes (ml_dtypes)" if B.BFLOAT16 is not None else "no (pip install ml_dtypes)"})
    facts.update(_optional_facts())
    cuda = _cuda_facts()
    facts["cupy"] = cuda.pop("cupy")
    facts["GPU"] = cuda.pop("gpu")
    facts.update({k.upper(): v for k, v in cuda.items()})
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    facts["C++ compiler (emulator)"] = cxx or "none (apt-get install g++)"
    try:
        backend = B.current_backend()
    except ValueError as e:  # a bad GPU_BACKEND: reported here, raised by the first op call
        facts["backend"] = f"INVALID: {e}"
        facts["NumPy arrays"] = "none until GPU_BACKEND is fixed (every op call raises ValueError)"
    else:
        facts["backend"] = f"{backend} (GPU_BACKEND=emulate or gpu.use_backend('emulate') runs kernels on the CPU)"
        facts["NumPy arrays"] = "kernel emulator (CPU)" if backend == "emulate" else "NumPy reference path"
    facts["CuPy arrays"] = "CUDA kernels"
    return facts
