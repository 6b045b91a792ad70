"""The import structure of ``convnets/`` and ``hydra_plugins/``, read statically with ``ast``.

Every ``import`` counts, at module level or inside a function (a lazy import defers the
cost, not the dependency), except those under ``if TYPE_CHECKING:``, which never run.
Importing ``convnets.x`` also runs the package's ``__init__`` (the facade that re-exports
:mod:`convnets.api`); that is containment, not use, and is not counted: counted, it would make
every module depend on every other through the facade. ``from convnets import plots`` is a use
of ``convnets.plots``; ``from convnets import train`` (a name) is a use of the facade.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("convnets", "hydra_plugins")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name ``tree`` imports (absolute; ``from a import b`` gives ``a.b`` when
    that is a module, else ``a``), outside ``if TYPE_CHECKING:`` blocks."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.add(full if full in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def _imports(module: str) -> set[str]:
    """The project's modules that ``module`` imports (the nearest enclosing module for a
    dotted name: ``import convnets.sweep.x`` is ``convnets.sweep``)."""
    path = MODULES[module]
    names = _imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py")
    found = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}  # "visiting" | "done"
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "visiting"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "visiting":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# ---------------------------------------------------------------- the walk itself


def test_the_walk_sees_module_level_lazy_and_relative_imports_but_not_type_checking_ones():
    source = """
from typing import TYPE_CHECKING
import convnets.errors
from convnets import plots, train
from . import sweep_files
if TYPE_CHECKING:
    from convnets import job
else:
    import convnets.tracking
def f():
    from convnets.search import check
"""
    names = _imported_names(ast.parse(source), "convnets.sweep", is_package=False)
    assert {"convnets.errors", "convnets.plots", "convnets", "convnets.sweep_files"} <= names
    assert {"convnets.tracking", "convnets.search"} <= names
    assert "convnets.job" not in names


def test_the_cycle_finder_reports_the_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_walk_finds_the_known_edges():
    assert "convnets.sweep_files" in GRAPH["convnets.search"]
    assert "convnets.search_storage" in GRAPH["convnets.sweep"]  # lazy, in the callback
    assert "convnets.search" in GRAPH["hydra_plugins.convnets_optuna.convnets_optuna_sweeper"]


# ---------------------------------------------------------------- the rules


def test_no_import_cycle_among_the_project_modules():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


SEARCH_MODULES = sorted(m for m in MODULES if m.split(".")[-1].startswith("search"))


@pytest.mark.parametrize("module", SEARCH_MODULES)
def test_sweep_and_search_do_not_import_each_other(module):
    assert "convnets.sweep" not in _reachable(module)
    assert module not in GRAPH["convnets.sweep_files"]


def test_the_search_is_cut_by_concern():
    # settings and space know nothing of the storage, the loop or the reports
    assert SEARCH_MODULES == [
        "convnets.search",
        "convnets.search_report",
        "convnets.search_settings",
        "convnets.search_space",
        "convnets.search_storage",
    ]
    assert not {m for m in _reachable("convnets.search_space") if m.startswith("convnets.search")}
    assert {
        m for m in _reachable("convnets.search_settings") if m.startswith("convnets.search")
    } == {"convnets.search_space"}
    assert "convnets.search" not in _reachable("convnets.search_storage")
    assert "convnets.search" not in _reachable("convnets.search_report")


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if m.startswith("hydra_plugins.convnets_launcher"))
)
def test_the_launcher_imports_nothing_from_convnets(module):
    # A Hydra launcher runs jobs; how a job's record ends is the application's callbacks'.
    assert not {m for m in _reachable(module) if m.split(".")[0] == "convnets"}


def test_the_protocol_module_is_a_leaf():
    path = MODULES["convnets.sweep_files"]
    names = _imported_names(ast.parse(path.read_text()), "convnets.sweep_files", False)
    heavy = ("mlflow", "optuna", "tensorflow", "keras", "sqlalchemy", "pandas")
    assert not {n for n in names if n.split(".")[0] in heavy}
    assert not {n for n in names if n.split(".")[0] == "convnets"} - {"convnets.errors"}
