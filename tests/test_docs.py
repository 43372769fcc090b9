"""Every code block in README.md and docs/*.md runs as written, on the CPU, with what the extras
install, so the docs cannot drift from the code.

- ```python blocks run as a script (in a scratch directory, the checkout on PYTHONPATH). A block
  headed ``<!-- docs-test: ranks N -->`` is a torchrun script: it runs as N gloo ranks on
  127.0.0.1 with torchrun's variables (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT).
  A block whose imports are not installed here skips, naming the module.
- ```bash blocks run line by line with ``bash -e`` in a scratch directory where ``.venv`` is this
  Python's venv, unless headed ``<!-- docs-test: skip: REASON -->`` (installs, long runs, a GPU
  or a cluster). Every bash block, skipped or not, names the venv's programs (``.venv/bin/...``:
  no bare mpiexec, torchrun, gpu-bench, pip, pytest), gives torchrun ``--master-addr`` or an
  endpoint, and installs only extras pyproject.toml defines.
- Other blocks are ```text (diagrams, recorded output); only docs/ARCHITECTURE.md's diagram is
  untagged.
"""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import run_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
UNTAGGED_OK = {"docs/ARCHITECTURE.md"}          # its one block is the architecture diagram
MARKER = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->$")
BLOCK_TIMEOUT = 180


def blocks():
    """(file relative to ROOT, first line number, language, text, marker) of every fenced block."""
    out = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].startswith("```"):
                lang, start = lines[i][3:].strip(), i + 1
                j = start
                while j < len(lines) and not lines[j].startswith("```"):
                    j += 1
                prev = lines[i - 1].strip() if i > 0 else ""
                m = MARKER.match(prev)
                out.append((str(path.relative_to(ROOT)), start, lang, "\n".join(lines[start:j]) + "\n",
                            m.group(1) if m else None))
                i = j + 1
            else:
                i += 1
    return out


BLOCKS = blocks()


def _params(lang):
    return [pytest.param(b, id=f"{b[0]}:{b[1]}") for b in BLOCKS if b[2] == lang]


def test_blocks_are_found_and_tagged():
    assert len(_params("python")) >= 6 and len(_params("bash")) >= 10
    for f, line, lang, _, marker in BLOCKS:
        assert lang in ("python", "bash", "text") or (lang == "" and f in UNTAGGED_OK), \
            f"{f}:{line}: tag the block ```python, ```bash or ```text"
        if marker is not None:
            assert re.fullmatch(r"skip: \S.*|ranks \d+", marker), f"{f}:{line}: marker {marker!r}"
            assert lang in ("python", "bash") and not (lang == "bash" and marker.startswith("ranks")), \
                f"{f}:{line}: marker {marker!r} on a ```{lang} block"


def test_readme_first_bash_block_is_what_ci_runs():
    # .ci/run takes the first two lines of README.md's first ```bash block
    first = next(b for b in BLOCKS if b[0] == "README.md" and b[2] == "bash")
    install, test = first[3].splitlines()[:2]
    assert "gpu-bench" in install and "pip install -e '.[bench]'" in install
    assert "pytest" in test and "pip install -e '.[test]'" in test


def _commands(text):
    """The command lines of a bash block: comments dropped, continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [ln.split(" #")[0].strip() for ln in joined.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


BARE = re.compile(r"(?:^|[\s;&|(])(mpiexec|torchrun|gpu-bench|gpu-train|pip|pytest|python)(?=\s|$)")


@pytest.mark.parametrize("block", _params("bash"))
def test_bash_block_names_venv_programs_and_extras(block):
    f, line, _, text, _ = block
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for cmd in _commands(text):
        bare = [m.group(1) for m in BARE.finditer(cmd) if not cmd[:m.start(1)].rstrip().endswith("-m")]
        assert not bare, f"{f}:{line}: {cmd!r} runs {bare[0]} bare: name the venv's (.venv/bin/{bare[0]})"
        if "torchrun" in cmd:
            assert "--master-addr 127.0.0.1" in cmd or "--rdzv-endpoint" in cmd, f"{f}:{line}: {cmd!r}"
        for group in re.findall(r"pip install -e '\.\[([^\]]*)\]'", cmd):
            for extra in group.split(","):
                assert extra in extras, f"{f}:{line}: no extra {extra!r} in pyproject.toml"


#: what a block needs beyond its own imports: the package's optional layers and the programs and
#: flags that load an optional engine (a venv without the torch extra skips them, naming it)
NEEDS = {r"\bgpu\.torch\b|--framework torch|--distributed torch|\btorchrun\b|docs-test: ranks": "torch",
         r"--distributed mpi|\bmpiexec\b|gpu\.distributed\.wrap\(MPI": "mpi4py"}


def _missing_imports(text, marker=None):
    names = re.findall(r"^\s*(?:import|from)\s+([\w.]+(?:\s*,\s*[\w.]+)*)", text, re.M)
    mods = {n.strip().split(" ")[0].split(".")[0] for group in names for n in group.split(",")}
    mods |= {mod for pattern, mod in NEEDS.items()
             if re.search(pattern, text) or (marker and re.search(pattern, f"docs-test: {marker}"))}
    return sorted(m for m in mods if importlib.util.find_spec(m) is None)


def _run(cmd, cwd, timeout=BLOCK_TIMEOUT):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        pytest.fail(f"{cmd} timed out after {timeout} s")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return p.returncode, out


@pytest.mark.parametrize("block", _params("python"))
def test_python_block_runs(block, tmp_path, monkeypatch):
    f, line, _, text, marker = block
    if marker and marker.startswith("skip:"):
        pytest.skip(marker)
    missing = _missing_imports(text, marker)
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    script = tmp_path / "block.py"
    script.write_text(text)
    if marker and marker.startswith("ranks"):
        ranks = int(marker.split()[1])
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        run_ranks("gloo", ranks, [str(script)], timeout=BLOCK_TIMEOUT)
        return
    rc, out = _run([sys.executable, str(script)], tmp_path)
    assert rc == 0, f"{f}:{line} failed:\n{out[-3000:]}"


@pytest.mark.parametrize("block", _params("bash"))
def test_bash_block_runs(block, tmp_path):
    f, line, _, text, marker = block
    if marker and marker.startswith("skip:"):
        pytest.skip(marker)
    missing = _missing_imports(text)
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    rc, out = _run(["bash", "-euo", "pipefail", "-c", text], tmp_path)
    assert rc == 0, f"{f}:{line} failed:\n{out[-3000:]}"
