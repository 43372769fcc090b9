"""`python -m gpu` / `gpu.info()`: the optional packages (torch, Numba, mpi4py, ml_dtypes), whether
each is installed, and which paths it enables; found without importing them."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import gpu

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = {"torch": "torch", "numba": "cpu-jit", "mpi4py": "distributed", "ml_dtypes": "bf16"}


def _python(code: str, *, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("module", sorted(OPTIONAL))
def test_info_says_whether_each_optional_package_is_installed(module):
    fact = gpu.info()[module]
    if importlib.util.find_spec(module) is not None:
        assert fact.startswith(importlib.metadata.version(module) + ": "), fact
    else:
        assert fact.startswith(f"not installed (the {OPTIONAL[module]} extra"), fact
    assert {"torch": "gpu.torch", "numba": "compiled loops", "mpi4py": "--distributed mpi",
            "ml_dtypes": "bfloat16"}[module] in fact, fact


def test_python_m_gpu_without_the_optional_packages_names_their_extras():
    # each blocked (sys.modules[name] = None, as if not installed); nothing of them is imported
    code = ("import sys, json\n"
            f"for m in {sorted(OPTIONAL)!r}: sys.modules[m] = None\n"
            "import gpu\n"
            "facts = gpu.info()\n"
            f"print(json.dumps({{m: facts[m] for m in {sorted(OPTIONAL)!r}}}))\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    for module, extra in OPTIONAL.items():
        assert facts[module].startswith(f"not installed (the {extra} extra would enable: "), facts[module]


def test_python_m_gpu_prints_the_optional_packages_and_imports_none_of_them():
    code = ("import sys, runpy, contextlib, io\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try: runpy.run_module('gpu', run_name='__main__')\n"
            "    except SystemExit as e: assert not e.code, e.code\n"
            "print(out.getvalue())\n"
            "print('IMPORTED', sorted(m for m in ('torch', 'numba', 'mpi4py') if m in sys.modules))\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for module in OPTIONAL:
        assert any(line.split()[:1] == [module] for line in lines), proc.stdout
    assert lines[-1] == "IMPORTED []", lines[-1]
    off = _python("import gpu; print(gpu.info()['numba'])", env_extra={"GPU_CPU_JIT": "0"}).stdout
    if importlib.util.find_spec("numba") is not None:
        assert "(off: GPU_CPU_JIT=0)" in off, off
