"""What the batch-norm kernel tests share: the reduced axes' layout helpers and the register
check's relaxation where NVRTC (ptxas's counts) is not installed."""
from __future__ import annotations

import contextlib

try:
    from cuda.bindings import nvrtc as _nvrtc  # noqa: F401
    PTXAS_COUNTS = True
except Exception:
    PTXAS_COUNTS = False


def axes(axis, ndim):
    """The reduced axes, sorted and non-negative."""
    return tuple(sorted(a % ndim for a in (axis if isinstance(axis, tuple) else (axis,))))


def kept(shape, axis):
    """The per-feature shape: the sizes of the kept axes."""
    ax = axes(axis, len(shape))
    return tuple(n for i, n in enumerate(shape) if i not in ax)


def keep(shape, axis):
    """The per-feature shape broadcastable against x (1 on the reduced axes)."""
    ax = axes(axis, len(shape))
    return tuple(1 if i in ax else n for i, n in enumerate(shape))


@contextlib.contextmanager
def registers_from_ptxas():
    """Without NVRTC the emulator bounds a kernel's registers by its __launch_bounds__ alone (the
    most the compiler may use), which can leave a forced persistent grid no room: there, the
    emulator's register check is relaxed (the fit with ptxas's real counts is tested wherever
    NVRTC is installed, as in CI)."""
    if PTXAS_COUNTS:
        yield
        return
    from gpu import _emulator
    with _emulator.modes(relax=["registers"]):
        yield
