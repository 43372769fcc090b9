#!/usr/bin/env bash
# Run the kernel-marked tests on the CPU emulator built with AddressSanitizer + UBSan, once per
# thread order (forward, then reversed between barriers): an out-of-bounds access to an array, a
# stack or past the dynamic shared memory aborts with a report naming the kernel's source line.
#
# Usage: scripts/test_kernels_asan.sh [PYTHON] [extra pytest arguments...]
#   PYTHON defaults to python3; it needs the package importable (installed, or run from the repo).
#
# Python itself is not instrumented: libasan is preloaded so the instrumented kernel modules can
# load, and leak checking is off (CPython's allocations at exit are not leaks of ours). pytest
# captures only Python-level output (--capture=sys), so a sanitizer report that aborts the process
# reaches the terminal instead of dying with pytest's captured file descriptors.
set -euo pipefail

python=${1:-python3}
shift || true
cxx=${CXX:-g++}
libasan=$("$cxx" -print-file-name=libasan.so)
if [[ "$libasan" != /* || ! -e "$libasan" ]]; then
    echo "test_kernels_asan.sh: libasan not found by $cxx: apt-get install libasan8 (gcc's ASan runtime)" >&2
    exit 2
fi
cd "$(dirname "$0")/.."

for order in forward reverse; do
    echo "== kernel tests under ASan, thread order: $order"
    LD_PRELOAD="$libasan" \
    ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    GPU_EMULATOR_ASAN=1 GPU_EMULATOR_ORDER="$order" GPU_CPU_JIT=0 \
        "$python" -m pytest -q -m kernel -p no:cacheprovider --capture=sys "$@"
done
