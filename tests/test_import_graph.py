"""The import graph of kvmmmu: no cycles, and layers only import downwards.

Two views of the same rule:

* static: every ``import``/``from ... import``/``cimport`` in every module,
  function-level (lazy) imports included, parsed from the source; the graph
  between kvmmmu modules must have no cycle;
* runtime: each module imported alone in a fresh interpreter; what it pulls
  into ``sys.modules`` must respect the layers: nothing below the VM loads
  ``kvmmmu.vm``, and the compiled core loads neither ``kvmmmu.mmutrace`` nor any
  other module above ``kvmmmu._core``.
"""
import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

import kvmmmu

ROOT = pathlib.Path(kvmmmu.__file__).resolve().parent
TOP = ROOT.parent

# Modules that sit above the VM (they may import it); everything else is below.
ABOVE_VM = {"kvmmmu", "kvmmmu.vm", "kvmmmu.demo", "kvmmmu.__main__", "kvmmmu.replay",
            "kvmmmu.workloads", "kvmmmu.sweep", "kvmmmu.cli", "kvmmmu.plots"}
# Leaves: they import nothing of kvmmmu, so every layer (the core included)
# may import them: the package itself, its exception classes, the WARN sink.
LEAVES = {"kvmmmu", "kvmmmu.errors", "kvmmmu.warn"}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(TOP).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules():
    mods = {}
    for p in sorted(ROOT.rglob("*")):
        if p.suffix in (".py", ".pyx") and "__pycache__" not in p.parts:
            mods[_module_name(p)] = p
    return mods


MODULES = _modules()


def _resolve(current: str, is_pkg: bool, level: int, target: str | None) -> str:
    if not level:
        return target or ""
    base = current.split(".") if is_pkg else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


_CIMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+cimport\s+([\w, ()]+)|cimport\s+([\w.]+))", re.M)
_PYX_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import\s+([\w, ()]+)|import\s+([\w.]+))", re.M)


def _from_targets(mod: str, names) -> set[str]:
    """What `from mod import names` depends on: the submodule where a name is
    one (`from kvmmmu import vm`), else the module `mod` itself."""
    out = set()
    for n in names:
        out.add(f"{mod}.{n}" if f"{mod}.{n}" in MODULES else mod)
    return out


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """kvmmmu modules that `name` imports anywhere in its source."""
    found = set()
    text = path.read_text()
    if path.suffix == ".py":
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                mod = _resolve(name, is_pkg, node.level, node.module)
                found.update(_from_targets(mod, [a.name for a in node.names]))
    else:
        for rx in (_CIMPORT, _PYX_IMPORT):
            for m in rx.finditer(text):
                if m.group(1):
                    names = [n.strip(" ()").split(" as ")[0].strip() for n in m.group(2).split(",")]
                    found.update(_from_targets(m.group(1), names))
                else:
                    found.add(m.group(3))
    # a .pxd-only module (cimport of declarations) has no .py/.pyx: not a node
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_static_import_graph_has_no_cycle():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    g = {k: set(v) for k, v in GRAPH.items()}
    g["kvmmmu.warn"] = g["kvmmmu.warn"] | {"kvmmmu.host"}
    g["kvmmmu.host"] = g["kvmmmu.host"] | {"kvmmmu.warn"}
    assert ["kvmmmu.host", "kvmmmu.warn"] in _cycles(g)


def test_the_parser_sees_lazy_imports_and_cimports(tmp_path):
    pkg = tmp_path / "kvmmmu"
    pkg.mkdir()
    py = pkg / "x.py"
    py.write_text("def f():\n    from kvmmmu import vm\n    from . import host\n")
    pyx = pkg / "y.pyx"
    pyx.write_text("from kvmmmu._core.rmap cimport RmapHead\ndef g():\n    import kvmmmu.mmutrace\n")
    global TOP
    old, TOP = TOP, tmp_path
    try:
        assert {"kvmmmu.vm", "kvmmmu.host"} <= _imports("kvmmmu.x", py)
        assert {"kvmmmu._core.rmap", "kvmmmu.mmutrace"} <= _imports("kvmmmu.y", pyx)
    finally:
        TOP = old


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n not in ABOVE_VM))
def test_nothing_below_the_vm_imports_it(name):
    assert "kvmmmu.vm" not in GRAPH[name], f"{name} imports kvmmmu.vm"


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith("kvmmmu._core")))
def test_the_core_imports_nothing_above_it(name):
    above = {m for m in GRAPH[name] if not m.startswith("kvmmmu._core") and m not in LEAVES}
    assert not above, f"{name} imports {sorted(above)}"


@pytest.mark.parametrize("name", sorted(LEAVES - {"kvmmmu"}))
def test_leaves_import_nothing_of_kvmmmu(name):
    assert GRAPH[name] == set()


def _loaded_alone(name):
    code = (f"import sys, json, importlib; importlib.import_module({name!r}); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('kvmmmu'))))")
    env = dict(os.environ, PYTHONPATH=str(TOP))    # the kvmmmu this test imported
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_importing_each_layer_alone_respects_the_layers():
    # One interpreter per module; the static test above already covers lazy
    # imports, this one catches what the parser cannot see (importlib, __import__).
    bad = []
    for name in sorted(GRAPH):
        if name in ABOVE_VM or name.endswith("__main__"):
            continue
        loaded = _loaded_alone(name)
        if "kvmmmu.vm" in loaded:
            bad.append(f"{name} loads kvmmmu.vm")
        if name.startswith("kvmmmu._core"):
            above = {m for m in loaded if m not in LEAVES and not m.startswith("kvmmmu._core")}
            if above:
                bad.append(f"{name} loads {sorted(above)}")
    assert not bad, "\n".join(bad)
