"""What the command lines (gpu-bench, gpu-train) share: output paths checked before any work."""
from __future__ import annotations

import os
import sys


def extra_hint(extra: str) -> str:
    """How to get an optional extra, for an error message (the package installs from a checkout)."""
    return f"pip install -e '.[{extra}]' in the checkout (the {extra} extra)"


def output_problem(path: str) -> str | None:
    """Why the file `path` cannot be written, or None."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a directory"
    if not os.path.isdir(folder):
        return f"no directory {folder}"
    if not os.access(folder, os.W_OK) or os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


def output_dir_problem(path: str) -> str | None:
    """Why files cannot be written in the directory `path` (made if missing), or None."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            return f"{path} is not a directory"
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    parent = path
    while not os.path.exists(parent):   # the nearest existing folder is where it will be made
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    return None if os.access(parent, os.W_OK) else f"cannot make {path}: {parent} is not writable"


def write_output(program: str, what: str, write) -> bool:
    """Run one output writer; a failure is printed, not raised, so the other outputs still go out."""
    try:
        write()
        return True
    except Exception as e:
        print(f"{program}: could not write {what}: {type(e).__name__}: {e}", file=sys.stderr)
        return False
