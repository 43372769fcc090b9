"""gpu._kernels: sources, defines and variants, device attributes, launch checks, warm-up, the
emulator's build cache, toolchain errors, and the kernel sources inside an installed wheel."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpu import _emulator, _kernels, _sources
from gpu._backend import BFLOAT16

from shell import run_checked

REPO = Path(__file__).resolve().parents[1]
FEATURES = Path(__file__).parent / "kernels" / "emulator_features.cu"

# A family with two declared variants and two dtypes: writes its defines where the test can see.
TINY = textwrap.dedent("""\
    // @variants [{"BLOCK": 64}, {"BLOCK": 128}]
    // @dtypes float32 float64
    extern "C" __global__ void defines(int* out) {
        out[0] = BLOCK;
        out[1] = sizeof(SCALAR_T);
        out[2] = sizeof(ACC_T);
    #ifdef SCALAR_IS_DOUBLE
        out[3] = 1;
    #endif
    }
""")


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.cu"
    path.write_text(TINY)
    return path


def test_cuda_src_in_checkout():
    assert _kernels.cuda_src_dir() == REPO / "cuda_src"
    assert _kernels.families() == sorted(p.stem for p in (REPO / "cuda_src").glob("*.cu"))


def test_dtype_defines():
    assert _kernels.dtype_defines(np.float16) == {"SCALAR_T": "__half", "ACC_T": "float", "SCALAR_IS_HALF": "1"}
    assert _kernels.dtype_defines(np.float32) == {"SCALAR_T": "float", "ACC_T": "float", "SCALAR_IS_FLOAT": "1"}
    assert _kernels.dtype_defines(np.float64) == {"SCALAR_T": "double", "ACC_T": "double", "SCALAR_IS_DOUBLE": "1"}
    if BFLOAT16 is not None:
        assert _kernels.dtype_defines(BFLOAT16) == {"SCALAR_T": "__nv_bfloat16", "ACC_T": "float",
                                                    "SCALAR_IS_BF16": "1"}
    with pytest.raises(TypeError, match="int32 has no kernel variant"):
        _kernels.dtype_defines(np.int32)


def test_source_is_header_then_family_with_line_markers(tiny):
    src = _kernels.family_source(tiny)
    header = (REPO / "cuda_src" / "common.cuh").read_text()
    assert src.startswith('#line 1 "common.cuh"\n' + header)
    assert src.endswith('#line 1 "tiny.cu"\n' + TINY)
    for family in _kernels.families():
        assert f'#line 1 "{family}.cu"' in _kernels.family_source(family)


def test_variants_and_dtypes_are_declared_and_enforced(tiny):
    assert _kernels.family_variants(tiny) == [{"BLOCK": "64"}, {"BLOCK": "128"}]
    assert _kernels.family_dtypes(tiny) == [np.dtype(np.float32), np.dtype(np.float64)]
    out = np.zeros(4, np.int32)
    _kernels.launch(_kernels.get_kernel(tiny, "defines", np, np.float64, {"BLOCK": 128}), 1, 1, (out,))
    np.testing.assert_array_equal(out, [128, 8, 8, 1])
    with pytest.raises(ValueError, match=r"defines \{'BLOCK': '256'\} are not a declared variant of tiny.cu"):
        _kernels.get_kernel(tiny, "defines", np, np.float32, {"BLOCK": 256})
    with pytest.raises(ValueError, match="'// @variants' must be a JSON list"):
        bad = tiny.with_name("bad.cu")
        bad.write_text("// @variants {\"BLOCK\": 1}\n" + TINY.split("\n", 1)[1])
        _kernels.family_variants(bad)


def test_unknown_family_and_kernel(tiny):
    with pytest.raises(FileNotFoundError, match="no such kernel source"):
        _kernels.get_kernel("no_such_family", "k", np)
    with pytest.raises(ValueError, match="expected a cuda_src/\\*.cu stem"):
        _kernels.get_kernel("../etc/passwd", "k", np)
    with pytest.raises(_kernels.KernelBuildError, match="no kernel 'nope'"):
        _kernels.get_kernel(tiny, "nope", np, np.float32, {"BLOCK": 64})


def test_emulated_device_attributes(monkeypatch):
    attrs = _kernels.device_attributes(np)
    assert attrs["sm_count"] == 4
    assert attrs["max_shared_memory_per_block"] == 48 * 1024
    assert attrs["max_shared_memory_per_block_optin"] == 227 * 1024
    assert {"max_threads_per_block", "warp_size", "l2_bytes"} <= attrs.keys()
    monkeypatch.setenv("GPU_EMULATOR_SM_COUNT", "132")
    assert _kernels.device_attributes(np)["sm_count"] == 132
    monkeypatch.setenv("GPU_EMULATOR_SM_COUNT", "many")
    with pytest.raises(ValueError, match="GPU_EMULATOR_SM_COUNT"):
        _kernels.device_attributes(np)


def test_launch_checks_shape_shared_memory_and_arguments():
    k = _kernels.get_kernel(FEATURES, "index3d", np, np.float32)
    out = np.zeros(6 * 2048, np.int32)
    with pytest.raises(ValueError, match="block .* has 2048 threads; the device allows 1024"):
        _kernels.launch(k, 1, (1024, 2), (out,))
    with pytest.raises(ValueError, match=r"block.z = 65 is outside \[1, 64\]"):
        _kernels.launch(k, 1, (1, 1, 65), (out,))
    with pytest.raises(ValueError, match=r"grid.x = 0"):
        _kernels.launch(k, 0, 32, (out,))
    with pytest.raises(ValueError, match=r"index3d: \d+ bytes static \+ 300000 dynamic shared memory exceed"):
        _kernels.launch(k, 1, 32, (out,), shared_mem=300_000)
    with pytest.raises(TypeError, match="expected a tuple"):
        _kernels.launch(k, 1, 32, out)
    with pytest.raises(TypeError, match="expected an array or a NumPy scalar, got list"):
        _kernels.launch(k, 1, 32, ([0],))
    # Above 48 KiB needs the opt-in, on CUDA and on the emulator alike: launch sets it.
    _kernels.launch(k, 1, 32, (out,), shared_mem=100 * 1024)
    assert k.function.max_dynamic_shared_size_bytes >= 100 * 1024


def test_warmup_builds_every_family_dtype_and_variant(tmp_path, monkeypatch, tiny):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "cuda_src" / "common.cuh", src)
    shutil.copy(tiny, src)
    monkeypatch.setattr(_sources, "cuda_src_dir", lambda: src)
    assert _kernels.warmup(np) == 4  # 2 dtypes x 2 variants


def test_missing_compiler_names_the_package(monkeypatch, tiny):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(_kernels.KernelBuildError, match="apt-get install g.. .or set CXX."):
        _kernels.get_kernel(tiny, "defines", np, np.float32, {"BLOCK": 64})


@pytest.mark.skipif(_emulator.build_flavour().startswith("asan"), reason="ASan is loaded in this process")
def test_asan_mode_without_preloaded_asan_explains(monkeypatch, tiny):
    monkeypatch.setenv("GPU_EMULATOR_ASAN", "1")
    with pytest.raises(_emulator.EmulatorError, match=r"LD_PRELOAD=\$\(g\+\+ -print-file-name=libasan.so\)"):
        _kernels.get_kernel(tiny, "defines", np, np.float32, {"BLOCK": 64})


def test_clean_cache_concurrent_builds(tmp_path, tiny):
    """Two processes build the same module into an empty cache at once (as pytest-xdist does)."""
    script = textwrap.dedent(f"""
        import numpy as np, pathlib
        from gpu import _kernels
        out = np.zeros(4, np.int32)
        k = _kernels.get_kernel(pathlib.Path({str(tiny)!r}), "defines", np, np.float32, {{"BLOCK": 64}})
        _kernels.launch(k, 1, 1, (out,))
        print(out.tolist())
    """)
    env = dict(os.environ, GPU_EMULATOR_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        assert out.strip() == "[64, 4, 4, 0]"
    built = sorted(p.suffix for p in (tmp_path / "cache").iterdir() if p.suffix in (".so", ".o"))
    assert built == [".o", ".so"]  # the runtime object and one module, each built once


def test_wheel_ships_kernel_sources_and_emulator_runtime(tmp_path):
    """A non-editable wheel, installed elsewhere, finds cuda_src and builds an emulated kernel."""
    if not (REPO / "pyproject.toml").exists():
        pytest.skip("no pyproject.toml")
    src = tmp_path / "src"
    src.mkdir()
    for item in REPO.iterdir():
        if item.is_file() and item.suffix in (".toml", ".md", ".txt", ".cfg") or item.name.startswith("LICENSE"):
            shutil.copy(item, src)
    for d in ("gpu", "cuda_src"):
        shutil.copytree(REPO / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # without build isolation (no download): the build backend is this venv's, which the test extra pins
    run_checked([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src])
    wheel, = (tmp_path / "dist").glob("*.whl")
    run_checked([*pip, "install", "--no-deps", "--target", tmp_path / "site", wheel])
    script = textwrap.dedent(f"""
        import numpy as np, pathlib
        from gpu import _kernels
        print(_kernels.cuda_src_dir())
        for family in _kernels.families():
            assert _kernels.family_source(family)
        out = np.zeros((2, 6), np.int32)
        k = _kernels.get_kernel(pathlib.Path({str(FEATURES)!r}), "index3d", np, np.float32)
        _kernels.launch(k, (1, 1, 2), 1, (out,))
        assert out.tolist() == [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]], out
        print(" ".join(_kernels.families()))
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    proc = run_checked([sys.executable, "-c", script], env=env, cwd=tmp_path)
    where, names = proc.stdout.splitlines()
    assert Path(where) == tmp_path / "site" / "gpu" / "cuda_src"
    assert names.split() == _kernels.families()


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pin(requirements: list[str], name: str) -> str:
    """The requirement string for `name` in a list of requirements."""
    found = [r for r in requirements if re.match(rf"{re.escape(name)}\s*([<>=!~;\[]|$)", r)]
    assert len(found) == 1, (name, requirements)
    return found[0]


def test_test_venv_has_the_build_backend_the_project_builds_with():
    """The wheel test builds without isolation, with this venv's setuptools: the test extra pins the
    build-system's, and the installed one satisfies it (a fresh 3.11 venv has setuptools 65, which has
    no bdist_wheel)."""
    from importlib.metadata import version
    from packaging.requirements import Requirement
    meta = _pyproject()
    build = _pin(meta["build-system"]["requires"], "setuptools")
    assert _pin(meta["project"]["optional-dependencies"]["test"], "setuptools") == build
    installed = version("setuptools")
    assert Requirement(build).specifier.contains(installed), \
        f"setuptools {installed} in this venv does not satisfy the build-system's {build}: pip install -e '.[test]'"


def test_torch_when_installed_is_the_pinned_release():
    """The torch oracle tests run against the release the `torch` extra pins."""
    from importlib.metadata import PackageNotFoundError, version
    from packaging.requirements import Requirement
    pin = Requirement(_pin(_pyproject()["project"]["optional-dependencies"]["torch"], "torch"))
    try:
        installed = version("torch")
    except PackageNotFoundError:
        pytest.skip(f"torch is not installed: its oracle tests skip (the torch extra: {pin})")
    assert pin.specifier.contains(installed, prereleases=True), f"torch {installed} is not the torch extra's {pin}"
