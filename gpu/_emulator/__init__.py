"""The CPU emulator: the project's CUDA kernels, unchanged, compiled by the system C++ compiler.

``gpu._kernels`` is its only caller: ``get_kernel(..., xp=numpy)`` builds a module here and
``launch`` calls the returned ``EmulatedKernel`` with NumPy arrays standing in for device memory.

How a module is built (once per source + flags + compiler, cached on disk):

1. The kernel source (``common.cuh`` + ``<family>.cu``, as CuPy sees it) is preprocessed with
   ``cuda_emulator.h`` force-included, to find its ``extern "C" __global__`` kernels.
2. It is compiled together with a table of those kernels (a typed invoker and a parameter
   signature for each), then every ``extern __shared__`` array it declares is aliased to the one
   dynamic shared-memory buffer, and all is linked with ``runtime.cpp`` (the fiber scheduler) into
   a shared library loaded with ctypes.

Execution model and what it catches: see ``runtime.cpp``. In short: blocks run one after another
in a shuffled order (a cooperative launch runs them all at once, so
``cooperative_groups::this_grid().sync()`` works), each CUDA thread is a fiber, threads switch only
at barriers and warp operations, in a fresh shuffled order at each; a divergent barrier, a
grid.sync that some thread never reaches, a warp operation that cannot complete, an overflow of
dynamic shared memory or a scalar argument of the wrong type raises ``EmulatorError`` naming the
kernel and the source line; shared memory starts every block as NaN and stays private to its
block.

Strict by default
-----------------
The emulator is at least as strict as a GPU. Each of these is on unless ``GPU_EMULATOR_RELAX``
names it (or ``modes(relax=...)``):

``launch_bounds``
    ``__launch_bounds__(maxThreads, minBlocks)`` is kept (``EmulatedKernel.max_threads_per_block``);
    a launch with more threads per block fails as CUDA's does (cudaErrorLaunchOutOfResources).
``shared_memory``
    Static + dynamic shared memory is held to the emulated device's limits, with CUDA's opt-in
    rule: a kernel may take ``48 KiB - static`` bytes of dynamic shared memory until its
    ``max_dynamic_shared_size_bytes`` (cudaFuncAttributeMaxDynamicSharedMemorySize, as on CuPy's
    RawKernel) is raised, at most to the opt-in limit minus its static shared memory.
    ``gpu._kernels.launch`` raises it above 48 KiB, as it does on CuPy.
``alignment``
    Kernels are built with ``-fsanitize=alignment``: an access through a pointer not aligned to its
    type (a ``float4`` load from an address that is not a multiple of 16) stops the launch with
    the kernel, block, thread, type and source line, where a GPU faults with "misaligned address".
``registers``
    Cooperative launches must fit the device at once counting registers too
    (``max_active_blocks_per_sm``): the kernel's register count is ptxas's for the emulated
    architecture (sm_90) through NVRTC where it is installed (cuda-bindings and
    nvidia-cuda-nvrtc, as for ``gpu._nvrtc_check``; the report is cached with the builds), else a
    conservative bound: the most registers its ``__launch_bounds__`` let the compiler
    use, or 255 (the per-thread maximum) without them.

Environment
-----------
``GPU_EMULATOR_ORDER``
    The order threads run between synchronization points: ``shuffle`` (default: a fresh seeded
    permutation of the blocks of a group and of the threads of a block at every sweep, so every
    phase between barriers interleaves differently), ``forward`` or ``reverse`` (fixed orders; a
    missing barrier shows up in one or the other).
``GPU_EMULATOR_SEED``
    An integer (default 1): seeds the shuffled thread order, and the block order unless
    ``GPU_EMULATOR_BLOCK_SEED`` is set. Each launch mixes it with the kernel's name and launch
    shape, so an order can be replayed alone.
``GPU_EMULATOR_BLOCK_SEED``
    An integer: run blocks in an order shuffled by this seed; ``0`` runs them in index order
    (default: ``GPU_EMULATOR_SEED``).
``GPU_EMULATOR_RELAX``
    Comma-separated checks to turn off: ``launch_bounds``, ``shared_memory``, ``alignment``,
    ``registers``, or ``all`` (default: none; see above).
``GPU_EMULATOR_ASAN``
    ``1``: build with ``-fsanitize=address,undefined``, so out-of-bounds accesses to arrays,
    stacks and past the dynamic shared memory abort with a report. Python must then run with
    ASan preloaded::

        LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \\
            GPU_EMULATOR_ASAN=1 python -m pytest -m kernel

    (``scripts/test_kernels_asan.sh PYTHON`` does this in both thread orders).
``GPU_EMULATOR_TRACE``
    ``1``: the trace flavour (``trace.tracing()`` sets it): every load and store of the kernel code
    reaches the runtime through AddressSanitizer's callbacks, without libasan, and each launch
    reports its memory traffic (``trace.py``). Excludes ``GPU_EMULATOR_ASAN``.
``GPU_EMULATOR_FIBERS``
    ``asm`` (default on x86-64) or ``ucontext``: the fiber context switch.
``GPU_EMULATOR_CACHE``
    The build cache directory (default ``$XDG_CACHE_HOME/gpu-emulator``, else
    ``~/.cache/gpu-emulator``). Safe to share between processes building at once.
``CXX``
    The C++ compiler (default: the first of ``g++``, ``c++``, ``clang++`` on PATH).

Layout
------
``config.py``  the emulated device, the environment above, ``modes``, build flags, compiler, cache directory
``build.py``   the cached g++ build of the runtime and of a kernel module (kernel discovery included)
``launch.py``  ``Module`` and ``EmulatedKernel``: loading, launch checks, ptxas's registers, argument packing
``trace.py``   the trace flavour's reports: warp requests, sectors, bank conflicts, bytes per buffer
"""
from __future__ import annotations

from .config import CHECKS, DEVICE, EmulatorError, build_flavour, cache_dir, device_attributes, modes
from .launch import EmulatedKernel, Module, build_module

__all__ = ["EmulatorError", "EmulatedKernel", "Module", "build_module", "build_flavour", "cache_dir", "DEVICE",
           "CHECKS", "device_attributes", "modes"]
