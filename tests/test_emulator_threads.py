"""Emulated launches from many short-lived Python threads.

Each OS thread has its own copy of a kernel module's thread-local storage (its shared memory), and
glibc gives a new thread the pthread_t of one that has exited while the new thread's TLS lies
elsewhere. The runtime must find the calling thread's shared memory on every launch: a stale copy
meant a segfault (poison written into freed memory) or shared memory that was never poisoned.

The threads run in a subprocess, so a crash fails the test instead of killing the pytest worker;
it inherits the environment, so under scripts/test_kernels_asan.sh it runs under ASan too.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[1]
BUGS = Path(__file__).parent / "kernels" / "emulator_bugs.cu"

SCRIPT = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    import numpy as np
    import gpu
    from gpu import _kernels

    x = np.random.default_rng(0).standard_normal((8, 100)).astype(np.float32)
    e = np.exp(x - x.max(-1, keepdims=True))
    truth = e / e.sum(-1, keepdims=True)
    planted = np.random.default_rng(1).standard_normal(2 * 256).astype(np.float32)
    missing_sync = _kernels.get_kernel(Path(sys.argv[1]), "missing_sync_first", np)
    failures = []

    def work(i):
        try:
            with gpu.use_backend("emulate"):
                y = gpu.softmax(x, axis=-1)
            np.testing.assert_allclose(y, truth, rtol=1e-5, atol=1e-7)
            # Shared memory is poisoned in this thread's own TLS: the planted missing barrier reads
            # NaN in forward order (never-poisoned memory would read zeros and give a number).
            s = np.zeros(2, np.float32)
            _kernels.launch(missing_sync, 2, 256, (s, planted))
            assert np.isnan(s).all(), f"shared memory not poisoned: {s}"
        except BaseException as exc:
            failures.append(f"thread {i}: {type(exc).__name__}: {exc}")

    for i in range(60):  # one after another: each new thread may reuse the last one's pthread_t
        t = threading.Thread(target=work, args=(i,))
        t.start()
        t.join()
    print("sequential ok", flush=True)
    ts = [threading.Thread(target=work, args=(60 + i,)) for i in range(60)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print("concurrent ok", flush=True)
    if failures:
        sys.exit("\\n".join(failures[:5]))
""")


def test_launches_from_many_short_lived_threads():
    env = dict(os.environ, GPU_EMULATOR_ORDER="forward",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("GPU_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(BUGS)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "sequential ok" in proc.stdout and "concurrent ok" in proc.stdout
