"""`run_checked`: run a command for a test; when it fails, the assertion shows its stderr.

`subprocess.run(..., check=True, capture_output=True)` fails with a bare `CalledProcessError`
and hides what the command said; a test that shells out uses this instead.
"""
from __future__ import annotations

import subprocess
from typing import Any, Sequence


def run_checked(cmd: Sequence[Any], *, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd) with text output captured; AssertionError with stderr and stdout unless it exits 0."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    if proc.returncode != 0:
        raise AssertionError(f"`{' '.join(map(str, cmd))}` exited {proc.returncode}\n"
                             f"--- stderr (last 6000 characters) ---\n{proc.stderr[-6000:]}"
                             f"--- stdout (last 2000 characters) ---\n{proc.stdout[-2000:]}")
    return proc
