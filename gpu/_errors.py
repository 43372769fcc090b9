"""Errors of the kernel toolchain, in a module of their own so that the loader (``gpu._kernels``)
and the CPU emulator (``gpu._emulator``) can both raise them without importing each other."""
from __future__ import annotations

__all__ = ["KernelBuildError"]


class KernelBuildError(RuntimeError):
    """A kernel module could not be built (compiler error or a missing toolchain piece)."""
