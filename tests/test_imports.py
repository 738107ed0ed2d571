"""The import graph of the project's own modules: no cycles, and no data stack under the metrics.

Nodes are the modules at the repo root (``corpora``, ``dataloader``, ...) and the ``models``
package with its submodules (``models``, ``models.dit``, ...). ``scripts/`` and ``bench/`` are
left out: they are entry points run as files, which no project module imports, so they cannot
close a cycle. Edges come from every ``import`` / ``from ... import`` anywhere in a module
(module level, inside functions, under ``try``), read with :mod:`ast` without importing
anything; only imports under ``if TYPE_CHECKING:`` are skipped, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models",)
DATA_STACK = {"dataloader", "corpora", "data_cache"}


def project_modules() -> dict[str, Path]:
    """Module name -> file: every ``*.py`` at the root, and each package with its submodules."""
    modules = {path.stem: path for path in ROOT.glob("*.py")}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree`` except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _with_parents(name: str, modules: dict[str, Path]) -> set[str]:
    """``models.dit`` -> {``models``, ``models.dit``}: importing a submodule runs its package first."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()


def imports_of(name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules that module ``name`` imports (directly), itself excluded."""
    path = modules[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                targets |= _with_parents(alias.name, modules)
            continue
        if node.level:  # relative: from .dit import X / from . import dit
            base_parts = package.split(".") if package else []
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join([*base_parts, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        targets |= _with_parents(base, modules)
        for alias in node.names:  # from models import dit: the submodule too
            targets |= _with_parents(f"{base}.{alias.name}" if base else alias.name, modules)
    targets.discard(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, modules) for name in sorted(modules)}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                strongconnect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)

    cycles = []
    for component in components:
        if len(component) < 2:
            continue
        start = min(component)
        paths = {start: [start]}  # breadth-first inside the component: a shortest cycle through start
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            following = []
            for node in frontier:
                for target in sorted(graph[node] & component):
                    if target == start:
                        cycle = [*paths[node], start]
                        break
                    if target not in paths:
                        paths[target] = [*paths[node], target]
                        following.append(target)
                if cycle:
                    break
            frontier = following
        cycles.append(cycle)
    return sorted(cycles)


def reachable_from(graph: dict[str, set[str]], name: str) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_graph_sees_the_project() -> None:
    """Sanity check of the walker itself: known edges, function-local imports and ``models.x`` included."""
    graph = import_graph()
    assert {"dataloader", "corpora", "metrics", "checkpoints", "hub", "models", "models.dit"} <= graph.keys()
    assert "corpora" in graph["dataloader"]
    assert {"models", "models.dit"} <= graph["models.hf"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles among project modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_metrics_does_not_pull_in_the_data_stack() -> None:
    """metrics needs only the hub-access decision, not the data pipeline (and lightning with it)."""
    graph = import_graph()
    pulled = reachable_from(graph, "metrics") & DATA_STACK
    assert not pulled, f"metrics imports the data stack ({', '.join(sorted(pulled))}), directly or through others"


def test_hub_is_a_leaf() -> None:
    """hub.py decides hub access for the data, the metrics and the checkpoints: it imports none of them."""
    assert import_graph()["hub"] == set()
