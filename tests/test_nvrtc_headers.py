"""Which CUDA headers NVRTC gets: those of its own major version, never the first found.

Pure logic on fake header directories: no NVRTC, no CUDA, no GPU needed. The real pairings (NVRTC 12
with CUDA 12 headers, NVRTC 13 with CUDA 13 headers) are compiled in tests/test_nvrtc.py.
"""
from __future__ import annotations

import pytest

from gpu import _toolchain
from gpu._errors import KernelBuildError


def _runtime(root, cudart_version: int):
    """A fake runtime header directory of CUDART_VERSION ``cudart_version`` (12090: CUDA 12.9)."""
    d = root / f"cuda{cudart_version}" / "include"
    d.mkdir(parents=True)
    (d / "cuda_fp16.h").write_text("// fake\n")
    (d / "cuda_runtime_api.h").write_text(f"#pragma once\n#define CUDART_VERSION  {cudart_version}\n")
    return str(d)


def _cccl(root, cccl_version: int):
    """A fake CCCL directory of CCCL_VERSION ``cccl_version`` (2008002: CCCL 2.8.2)."""
    d = root / f"cccl{cccl_version}"
    (d / "nv").mkdir(parents=True)
    (d / "nv" / "target").write_text("// fake\n")
    (d / "cuda" / "std" / "__cccl").mkdir(parents=True)
    (d / "cuda" / "std" / "__cccl" / "version.h").write_text(f"#define CCCL_VERSION {cccl_version}\n")
    return str(d)


def test_versions_are_read_from_the_headers(tmp_path):
    assert _toolchain.runtime_headers_major(_runtime(tmp_path, 12090)) == 12
    assert _toolchain.runtime_headers_major(_runtime(tmp_path, 13050)) == 13
    assert _toolchain.cccl_headers_major(_cccl(tmp_path, 2008002)) == 2
    assert _toolchain.cccl_headers_major(_cccl(tmp_path, 3005000)) == 3
    assert _toolchain.runtime_headers_major(tmp_path / "missing") is None
    bare = tmp_path / "bare"                 # cuda_fp16.h but no readable version: not trusted
    bare.mkdir()
    (bare / "cuda_fp16.h").write_text("")
    assert _toolchain.runtime_headers_major(bare) is None


def test_nvrtc_12_skips_cuda_13_headers_found_first(tmp_path):
    # the image's /usr/local/cuda is CUDA 13 and comes first; cupy-cuda12x's NVRTC 12 cannot parse
    # its cuda_fp8.hpp, so the CUDA 12 wheel's headers must be taken
    rt13, rt12 = _runtime(tmp_path, 13000), _runtime(tmp_path, 12090)
    cc3, cc2 = _cccl(tmp_path, 3000001), _cccl(tmp_path, 2008002)
    assert _toolchain.choose_header_dirs(12, [rt13, rt12], [cc3, cc2]) == (rt12, cc2)
    assert _toolchain.choose_header_dirs(13, [rt13, rt12], [cc2, cc3]) == (rt13, cc3)


def test_cccl_of_another_supported_major_is_the_fallback(tmp_path):
    # CCCL 3 supports CUDA 12 too (CuPy's bundled copy, say): taken when no CCCL 2 is there
    rt12, cc3 = _runtime(tmp_path, 12090), _cccl(tmp_path, 3005000)
    assert _toolchain.choose_header_dirs(12, [rt12], [cc3]) == (rt12, cc3)
    # CCCL 2 does not support CUDA 13
    with pytest.raises(KernelBuildError, match=r"CCCL headers .* for CUDA 13 not found .*CCCL 2"):
        _toolchain.choose_header_dirs(13, [_runtime(tmp_path, 13000)], [_cccl(tmp_path, 2008002)])


def test_missing_headers_name_the_wheels_of_nvrtcs_major(tmp_path):
    rt13, rt12 = _runtime(tmp_path, 13000), _runtime(tmp_path, 12090)
    cc = _cccl(tmp_path, 3005000)
    with pytest.raises(KernelBuildError) as e12:
        _toolchain.choose_header_dirs(12, [rt13], [cc])
    msg = str(e12.value)
    assert "CUDA 12 runtime headers" in msg and "nvidia-cuda-runtime-cu12" in msg and "gpu[cuda12]" in msg
    assert f"{rt13} (CUDA 13)" in msg            # what was found instead
    with pytest.raises(KernelBuildError) as e13:
        _toolchain.choose_header_dirs(13, [rt12], [cc])
    msg = str(e13.value)
    assert "nvidia-cuda-runtime>=13,<14" in msg and "gpu[cuda13]" in msg and "-cu12" not in msg
    with pytest.raises(KernelBuildError, match="found none"):
        _toolchain.choose_header_dirs(12, [str(tmp_path / "nowhere")], [cc])


def test_header_dirs_follow_the_nvrtc_version(monkeypatch, tmp_path):
    rt13, rt12 = _runtime(tmp_path, 13050), _runtime(tmp_path, 12090)
    cc2, cc3 = _cccl(tmp_path, 2008002), _cccl(tmp_path, 3005000)
    monkeypatch.setattr(_toolchain, "_header_candidates", lambda: ([rt13, rt12], [cc3, cc2]))
    monkeypatch.setattr(_toolchain, "_chosen_dirs", {})
    for major, (rt, cc) in ((12, (rt12, cc2)), (13, (rt13, cc3))):
        monkeypatch.setattr(_toolchain, "nvrtc_version", lambda xp=None, m=major: (m, 0))
        assert _toolchain.header_dirs() == (rt, cc)
        assert _toolchain.nvrtc_include_options() == [f"-I{rt}", f"-I{cc}"]


class _FakeCupy:
    """What the loader asks of CuPy for the headers: its NVRTC's version."""

    class cuda:
        class nvrtc:
            @staticmethod
            def getVersion():
                return (13, 0)


def test_cupys_nvrtc_version_decides(monkeypatch):
    assert _toolchain.nvrtc_version(_FakeCupy) == (13, 0)


def test_nvrtc_hint_names_the_wheel_of_the_installed_cupy(monkeypatch):
    monkeypatch.setattr(_toolchain, "installed_cupy_cuda_major", lambda: 13)
    hint = _toolchain.nvrtc_hint()
    assert "cupy-cuda13x" in hint and "nvidia-cuda-nvrtc>=13,<14" in hint and "-cu12" not in hint
    monkeypatch.setattr(_toolchain, "installed_cupy_cuda_major", lambda: 12)
    assert "nvidia-cuda-nvrtc-cu12" in _toolchain.nvrtc_hint()
