"""No import cycles in fastfeat/ or kernels/ (installed as fastfeat.kernels): the static import graph,
read from the source with ``ast``, has no cycle; a new one fails here, naming its modules.

What counts as an edge (a module A depends on B):
- Every ``import``/``from ... import`` anywhere in A, at module level *or inside a function*: a lazy
  import only postpones the dependency (it is how a cycle usually hides: the three this test was
  written to stop were all lazy on one side).
- Not imports under ``if TYPE_CHECKING:``: they never run, and annotations may name any module.
- ``from P import name``: an edge to the submodule ``P.name`` when there is one, else to ``P`` itself
  (a package's ``__init__``).  A submodule is not made to depend on its parent package by being
  imported: every module of a package would otherwise "cycle" with an ``__init__`` that imports it.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"fastfeat": "fastfeat", "kernels": "fastfeat.kernels"}  # folder -> installed package name


def module_files() -> dict[str, str]:
    """{dotted module name: file path} of every module of the packages."""
    found = {}
    for folder, package in PACKAGES.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
            rel = os.path.relpath(dirpath, base)
            parts = [package] + ([] if rel == "." else rel.split(os.sep))
            for name in filenames:
                if name.endswith(".py"):
                    mod = parts if name == "__init__.py" else [*parts, name[:-3]]
                    found[".".join(mod)] = os.path.join(dirpath, name)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _known(name: str, modules) -> str | None:
    """``name`` or its longest prefix that is one of our modules."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if (candidate := ".".join(parts[:i])) in modules:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_package = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [_known(alias.name, files) for alias in node.names]
            else:
                if node.level:
                    here = mod.split(".") if is_package else mod.split(".")[:-1]
                    here = here[: len(here) - (node.level - 1)]
                    base = ".".join(here + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else _known(base, files)
                    for alias in node.names
                ]
            graph[mod].update(t for t in targets if t is not None and t != mod)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a path
    a -> b -> ... -> a through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_through(graph, set(c)) for c in sorted(components)]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle from the component's first module back to it (breadth first, inside the component)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a component of >1 modules always has one


def test_the_graph_sees_every_kind_of_import():
    """The graph is read right: a known module-level, relative and function-level import each give an edge."""
    graph = import_graph()
    assert "fastfeat.kernels.conv" in graph and "fastfeat.serve.engine" in graph
    assert "fastfeat.stages" in graph["fastfeat.extractor"]  # from .stages import ...
    assert "fastfeat.stages" in graph["fastfeat.serve.engine"]  # from ..stages import ...
    assert "fastfeat.kernels.native" in graph["fastfeat.kernels.conv"]  # from . import native, in a function


def test_find_cycles_names_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
