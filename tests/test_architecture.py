"""The layout's own rules: no import cycles in the package, kernel arguments by name from the
parsed signatures, constants from the .cu files, and a warm call that does no file I/O, no
parsing and no module build (the host path's budget)."""
from __future__ import annotations

import ast
import builtins
import pathlib
import re
from pathlib import Path

import numpy as np
import pytest

import gpu
from gpu import _emulator, _kernels, _sources

PKG = Path(gpu.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (at module level or inside functions)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule when there is one, else pkg itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[mod].update(t for t in targets if t in modules and t != mod)
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    assert "gpu._kernels" in graph and "gpu._emulator" in graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


#: the most lines a Python module of the package may have (the emulator's C++ runtime is not Python)
MAX_MODULE_LINES = 600


def _private_uses() -> list[str]:
    """Every use of an underscore name defined in another package's module: `from mod import _x`
    and `mod._x` on a module bound by an import (modules themselves, `gpu._kernels` say, are the
    internal layer and may be imported; their private names stay in their package). A package is
    the directory a module sits in: `gpu/ops/batch_norm/` shares its private names inside itself."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}

    def package_of(m: str) -> str:
        return m if modules[m].name == "__init__.py" else m.rpartition(".")[0]

    found = []
    for mod, path in sorted(modules.items()):
        here = package_of(mod)
        bound: dict[str, str] = {}        # local name -> the package module it is bound to
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in modules:
                        bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base not in modules:
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in modules:                       # a submodule: bound, not a name
                        bound[a.asname or a.name] = sub
                    elif a.name.startswith("_") and not a.name.startswith("__") and package_of(base) != here:
                        found.append(f"{mod}: from {base} import {a.name}")
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and node.attr.startswith("_") and not node.attr.startswith("__")):
                target = bound[node.value.id]
                if f"{target}.{node.attr}" not in modules and package_of(target) != here:
                    found.append(f"{mod}: {target}.{node.attr}")
    return sorted(set(found))


def test_no_private_name_crosses_a_package():
    # a private name stays in its package; what another package needs is a named seam
    assert _private_uses() == []


def test_no_module_over_the_line_budget():
    # each file one job: the line count is the symptom to watch
    over = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert over == {}


def test_the_rules_catch_a_planted_breach(tmp_path, monkeypatch):
    # the two checks above on a package with one breach of each: they must find both
    pkg = tmp_path / "gpu"
    (pkg / "ops" / "op").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_backend.py").write_text("def _secret():\n    pass\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "op" / "__init__.py").write_text(
        "from gpu._backend import _secret\nfrom gpu import _backend\n_backend._secret()\n")
    (pkg / "ops" / "op" / "big.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    monkeypatch.setitem(globals(), "PKG", pkg)
    assert _private_uses() == ["gpu.ops.op: from gpu._backend import _secret", "gpu.ops.op: gpu._backend._secret"]
    with pytest.raises(AssertionError, match="big.py"):
        test_no_module_over_the_line_budget()


def test_kernels_and_emulator_do_not_import_each_other():
    graph = _import_graph()
    assert "gpu._emulator" not in graph["gpu._kernels"] or "gpu._kernels" not in graph["gpu._emulator"]
    assert "gpu._kernels" not in graph["gpu._emulator"]


@pytest.mark.kernel
@pytest.mark.parametrize("family", _kernels.families())
def test_parsed_signatures_match_the_compiled_kernels(family):
    # the names come from the source text (macros expanded by the loader's small preprocessor);
    # the compiled module knows each kernel's parameter types: the counts must agree for every
    # kernel of every dtype's module, or arguments built by name would land in the wrong slots
    fam = _kernels.family(family)
    for dtype in fam.dtypes:
        mod = _kernels._module(fam, np, _kernels._all_defines(fam, dtype, fam.variants[-1]))
        assert set(mod.kernels) <= set(fam.signatures), f"kernels without a parsed signature in {family}"
        for name, k in mod.kernels.items():
            assert len(fam.signatures[name]) == len(k.params), (name, fam.signatures[name], k.params)


def test_args_by_name_orders_and_rejects():
    k = _kernels.get_kernel("softmax", "softmax_block", np, np.float32)
    assert k.params == ("out", "z", "rows", "C", "cached", "vec", "log")
    out, z = np.empty(4, np.float32), np.ones(4, np.float32)
    args = k.args(log=np.int32(0), z=z, out=out, rows=np.int64(1), C=np.int32(4), cached=np.int32(0),
                  vec=np.int32(0))
    assert args[0] is out and args[1] is z and args[-1] == 0
    with pytest.raises(TypeError, match="missing log"):
        k.args(out=out, z=z, rows=np.int64(1), C=np.int32(4), cached=np.int32(0), vec=np.int32(0))
    with pytest.raises(TypeError, match="no parameter extra"):
        k.args(out=out, z=z, rows=np.int64(1), C=np.int32(4), cached=np.int32(0), vec=np.int32(0),
               extra=np.int32(1))


def test_constants_come_from_the_sources():
    bn, sm = _kernels.constants("batch_norm"), _kernels.constants("softmax")
    # the launch arithmetic's constants and flags: present, and as the .cu spells them
    for name in ("BN_ONCHIP_ROWS", "BN_BACKWARD_ROWS", "BN_BACKWARD_ROWS_16BIT", "BN_ONCHIP_THREADS", "BN_MAX_COLS", "BN_HAS_GAMMA", "BN_HAS_BETA", "BN_RUNNING"):
        assert name in bn
        assert re.search(rf"#define {name} {bn[name]}\b", _kernels.family_source("batch_norm"))
    for name in ("CE_GRAD", "CE_ROWS", "CE_PROBS", "CE_WEIGHT", "CE_DENOM", "CE_RED_MEAN_ROWS", "SM_STRIDED_MAX_TY"):
        assert name in sm


def test_recording_launches_counts_and_skips():
    z = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    out = None
    with gpu.use_backend("emulate"):
        with _kernels.recording_launches(run=True) as ran:
            out = gpu.softmax(z)
        with _kernels.recording_launches() as skipped:
            gpu.softmax(z)
            gpu.batch_norm_backward(z, z, None, np.zeros(5, np.float32), np.ones(5, np.float32))
    assert ran.count == 1 and ran.launches[0][0].startswith("softmax_warp")
    assert np.allclose(out.sum(-1), 1, atol=1e-6)
    assert [name for name, _, _ in skipped.launches] == [
        ran.launches[0][0], "batch_norm_backward_onchip"]   # (3, 5): one block holds dy and x


@pytest.mark.kernel
def test_warm_calls_do_no_file_io_parsing_or_builds(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 24)).astype(np.float32)
    t = rng.integers(0, 24, 64)
    g, b = np.ones(24, np.float32), np.zeros(24, np.float32)
    rm, rv = np.zeros(24, np.float32), np.ones(24, np.float32)
    calls = [
        lambda: gpu.batch_norm_forward(x, g, b, running_mean=rm, running_var=rv),
        lambda: gpu.batch_norm_backward(x, x, g, np.zeros(24, np.float32), np.ones(24, np.float32)),
        lambda: gpu.batch_norm_inference(x, g, b, rm, rv),
        lambda: gpu.batch_stats(x),
        lambda: gpu.softmax(x),
        lambda: gpu.log_softmax(x, axis=0),
        lambda: gpu.hardmax(x),
        lambda: gpu.softmax_cross_entropy(x, t, return_grad=True),
    ]
    with gpu.use_backend("emulate"):
        for call in calls:
            call()

        def refuse(what):
            def fail(*a, **k):
                raise AssertionError(f"a warm call used {what}")
            return fail

        monkeypatch.setattr(builtins, "open", refuse("open()"))
        monkeypatch.setattr(pathlib.Path, "read_text", refuse("Path.read_text"))
        monkeypatch.setattr(pathlib.Path, "is_file", refuse("Path.is_file"))
        for fn in ("compile", "findall", "finditer", "sub", "fullmatch"):
            monkeypatch.setattr(re, fn, refuse(f"re.{fn}"))
        monkeypatch.setattr(_sources, "_read_family", refuse("a family read"))
        monkeypatch.setattr(_kernels, "_build_module", refuse("a module build"))
        monkeypatch.setattr(_emulator, "build_module", refuse("an emulator build"))
        for call in calls:
            call()


@pytest.mark.kernel
def test_repeated_calls_skip_shape_checks_but_not_value_checks():
    # a kernel-path call like one that passed its checks skips them; what a signature does not
    # hold (eps, momentum, label_smoothing's range, writeability) is still checked every call
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 6)).astype(np.float32)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    t = rng.integers(0, 6, 16)
    with gpu.use_backend("emulate"):
        gpu.batch_norm_forward(x, running_mean=rm, running_var=rv)
        with pytest.raises(ValueError, match="eps"):
            gpu.batch_norm_forward(x, running_mean=rm, running_var=rv, eps=-1.0)
        with pytest.raises(ValueError, match="momentum"):
            gpu.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=float("nan"))
        rv.flags.writeable = False
        with pytest.raises(ValueError, match="running_var: must be writeable"):
            gpu.batch_norm_forward(x, running_mean=rm, running_var=rv)
        rv.flags.writeable = True
        gpu.batch_norm_inference(x, None, None, rm, rv)
        with pytest.raises(ValueError, match="eps"):
            gpu.batch_norm_inference(x, None, None, rm, rv, eps=-1.0)
        gpu.softmax_cross_entropy(x, t, label_smoothing=0.1)
        with pytest.raises(ValueError, match="label_smoothing"):
            gpu.softmax_cross_entropy(x, t, label_smoothing=1.5)
        # the same arrays with a bad target value: found by the kernel, not by a signature
        t_bad = t.copy()
        t_bad[3] = 6
        gpu.check_errors()
        gpu.softmax_cross_entropy(x, t_bad)     # recorded on the device, raised at the check
        with pytest.raises(ValueError, match=r"target: class index 6 at row 3 "):
            gpu.check_errors()
    # the same signature on the NumPy path is checked there, not taken from the kernel path's calls
    with pytest.raises(ValueError, match="target: class index 6"):
        gpu.softmax_cross_entropy(x, t_bad)


def test_planning_defaults_fit_the_kernels_bounds():
    # the host's knobs and the .cu's limits come from one place each; these tie the defaults to the
    # limits they must respect (a default past a __launch_bounds__ would fail at launch)
    from gpu._engines import channels
    from gpu.ops import softmax as sm
    c = _kernels.constants("batch_norm")
    assert channels.Tuning().threads <= c["BN_MAX_THREADS"] and channels.Tuning().threads % 32 == 0
    assert channels.Tuning().max_cols <= c["BN_MAX_COLS"]
    s = _kernels.constants("softmax")
    assert s["SM_WARP_THREADS"] % 32 == 0 and s["SM_BLOCK_MAX_THREADS_F64"] <= s["SM_BLOCK_MAX_THREADS"]


@pytest.mark.kernel
def test_cross_entropy_warp_kernels_match_the_planner():
    # float64 rows past 8 values per lane take the block path (registers): the planner's max_n
    # and the kernels the module holds must agree
    from gpu._engines import rows
    fam = _kernels.family("softmax")
    for dtype, max_n in ((np.float32, 32), (np.float64, 8)):
        mod = _kernels._module(fam, np, _kernels._all_defines(fam, np.dtype(dtype), {}))
        have = {n for n in rows.WARP_NS if f"softmax_cross_entropy_warp_n{n}" in mod.kernels}
        assert have == {n for n in rows.WARP_NS if n <= max_n}, dtype
