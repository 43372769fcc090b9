"""NVRTC compile check, no GPU needed: every kernel source x dtype x variant x sm_75..sm_90.

Clean means: compiles, no warning, and no ptxas spill on sm_80 and sm_90 (gpu/_nvrtc_check.py).
Runs with the NVRTC that cuda-bindings loads and the CUDA headers of the same major: NVRTC 12 with
the test extra (the -cu12 wheels), NVRTC 13 in a venv with the nvrtc13 extra (.ci/run makes one);
skips with the reason where they are missing.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from gpu import _kernels, _nvrtc_check, _toolchain

REASON = _nvrtc_check.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"NVRTC compile check unavailable: {REASON}")

TEST_KERNELS = sorted((Path(__file__).parent / "kernels").glob("*.cu"))


MATRIX = [(family, dt, variant) for family in _kernels.families() for dt, variant in _nvrtc_check.variants(family)]


def _id(case) -> str:
    family, dt, variant = case
    return "-".join([family, "no_dtype" if dt is None else dt.name, *(f"{k}={v}" for k, v in variant.items())])


@pytest.mark.parametrize("case", MATRIX, ids=[_id(c) for c in MATRIX])
def test_kernel_family_compiles_clean(case):
    problems = _nvrtc_check.check_variant(*case)
    assert not problems, "\n\n".join(problems)


@pytest.mark.parametrize("path", TEST_KERNELS, ids=lambda p: p.name)
def test_test_kernels_are_valid_cuda(path):
    """The emulator's test kernels must be CUDA that NVRTC accepts, not just what g++ accepts."""
    problems = _nvrtc_check.check_family(path, archs=("sm_75", "sm_90"))
    assert not problems, "\n\n".join(problems)


def test_check_reports_warnings_spills_and_errors(tmp_path):
    src = tmp_path / "planted.cu"
    src.write_text(
        "// @dtypes float32\n"
        "// @variants [{\"PLANT\": 0}, {\"PLANT\": 1}, {\"PLANT\": 2}]\n"
        "extern \"C\" __global__ void __launch_bounds__(1024, 2) k(float* y, const float* x) {\n"
        "#if PLANT == 0\n"
        "    int unused = 3;  // planted: a warning\n"
        "    y[threadIdx.x] = x[threadIdx.x];\n"
        "#elif PLANT == 1\n"
        "    // planted: 96 live values under a 32-register cap spill\n"
        "    float v[96];\n"
        "#pragma unroll\n"
        "    for (int i = 0; i < 96; ++i) v[i] = x[threadIdx.x + i * 1024];\n"
        "    float s = 0.f;\n"
        "#pragma unroll\n"
        "    for (int i = 0; i < 96; ++i) s += v[i] * v[95 - i];\n"
        "    y[threadIdx.x] = s;\n"
        "#else\n"
        "    y[threadIdx.x] = undeclared;  // planted: an error\n"
        "#endif\n"
        "}\n")
    problems = _nvrtc_check.check_family(src, archs=("sm_80",))
    joined = "\n".join(problems)
    assert "planted.cu [float32 PLANT=0] sm_80" in joined and "warning" in joined
    assert "planted.cu [float32 PLANT=1] sm_80: ptxas spills" in joined
    assert "planted.cu [float32 PLANT=2] sm_80: does not compile" in joined and "undeclared" in joined


def test_headers_are_nvrtcs_major():
    """The compiles above used the runtime headers of NVRTC's own major (12 with the test extra,
    13 with the nvrtc13 extra), whatever else the machine has (a CUDA 13 /usr/local/cuda, say)."""
    major = _nvrtc_check.nvrtc_major()
    runtime, cccl = _toolchain.header_dirs(major)
    assert _toolchain.runtime_headers_major(runtime) == major
    assert major in _toolchain.CCCL_CUDA_MAJORS[_toolchain.cccl_headers_major(cccl)]


@pytest.mark.parametrize("major", [12, 13])
def test_every_family_compiles_with_matching_headers(major):
    """NVRTC 12 + CUDA 12 headers, NVRTC 13 + CUDA 13 headers: each runs where that NVRTC is the
    one installed (CI: the test venv for 12, the nvrtc13 venv for 13); float32, every variant,
    sm_75..sm_90 (the full dtype matrix is test_kernel_family_compiles_clean's)."""
    if _nvrtc_check.nvrtc_major() != major:
        pytest.skip(f"NVRTC {_nvrtc_check.nvrtc_major()} is installed here, not {major}")
    import numpy as np
    for family in _kernels.families():
        for variant in _kernels.family_variants(family):
            problems = _nvrtc_check.check_variant(family, np.dtype(np.float32), variant)
            assert not problems, "\n\n".join(problems)
