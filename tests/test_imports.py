"""The project's import graph, read from the source (no module is executed).

Every ``import`` and ``from … import`` statement of every module of ``metaaligner_core``,
``annotation`` and ``webapp`` and of ``app.py`` counts: at module level, inside functions (lazy
imports) and under ``if TYPE_CHECKING``. An edge goes to the module named, or to the module an
imported name is (``from . import workflow``); a name imported from a package's ``__init__``
points at the package.
"""
from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGES = ("metaaligner_core", "annotation", "webapp")
SCRIPTS = ("app.py",)
# metaaligner_core meets the annotation tool and the web app only here: the commands
# (``metaaligner annotate``, ``evaluate --ratings-db``, ``serve``) and the server's /ui mount.
CORE_EDGES = ("metaaligner_core.commands", "metaaligner_core.serve.api")


def project_modules(root: Path, packages=PACKAGES, scripts=SCRIPTS) -> dict[str, Path]:
    mods = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    for script in scripts:
        if (root / script).is_file():
            mods[Path(script).stem] = root / script
    return mods


def parse(path: Path) -> ast.Module:
    """``ast.parse`` of a file; in a fresh interpreter when this one's parser refuses. CPython 3.11
    can raise ``SystemError: AST constructor recursion depth mismatch`` in a process whose
    recursion bookkeeping earlier code left off balance (seen once in a full suite run); the file
    itself is fine, so a child interpreter parses it and sends the tree back."""
    source = path.read_text(encoding="utf-8")
    try:
        return ast.parse(source, str(path))
    except SystemError:
        code = ("import ast, pickle, sys; p = sys.argv[1]; "
                "sys.stdout.buffer.write(pickle.dumps(ast.parse(open(p, encoding='utf-8').read(), p)))")
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, check=True, timeout=120)
        return pickle.loads(out.stdout)


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: {project modules it imports}}``."""

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Import):
                targets.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package
                    for _ in range(node.level - 1):
                        up = up.rpartition(".")[0]
                    base = f"{up}.{base}" if base else up
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.add(sub if sub in mods else known(base))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path(graph, start, goal):
    """One import chain start -> ... -> goal (breadth first), for the failure message."""
    seen, queue = {start: None}, [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w not in seen:
                seen[w] = v
                queue.append(w)
    chain, v = [goal], goal
    while seen.get(v) is not None:
        v = seen[v]
        chain.append(v)
    return list(reversed(chain))


def test_the_walker_sees_cycles_through_lazy_relative_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (pkg / "c.py").write_text("from .sub import d\n")
    (pkg / "sub" / "d.py").write_text("from .. import c\nimport os\n")
    (pkg / "e.py").write_text("import pkg.a\n")
    graph = import_graph(project_modules(tmp_path, packages=("pkg",), scripts=()))
    assert graph["pkg.e"] == {"pkg.a"} and graph["pkg.sub.d"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub.d"]]


def test_no_import_cycle_in_the_project():
    mods = project_modules(ROOT)
    assert {"app", "webapp.launch", "annotation.store", "metaaligner_core.pipeline"} <= set(mods)
    graph = import_graph(mods)
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(
        " -> ".join(_path(graph, group[0], group[1]) + _path(graph, group[1], group[0])[1:]) for group in found)


def test_core_imports_annotation_and_webapp_only_at_its_edges():
    graph = import_graph(project_modules(ROOT))
    inside = {m: sorted(t for t in targets if t.split(".")[0] in ("annotation", "webapp"))
              for m, targets in graph.items() if m.split(".")[0] == "metaaligner_core"}
    assert inside["metaaligner_core.commands.annotate"] and inside["metaaligner_core.serve.api"]  # the walker sees them
    stray = {m: t for m, t in inside.items() if t and not m.startswith(CORE_EDGES)}
    assert not stray, f"core modules importing annotation/webapp outside {CORE_EDGES}: {stray}"
