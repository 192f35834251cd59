"""The layers and the import graph, read from the code (no tool beyond ``ast``).

The dependency rule (issue 14): ``billing`` (the domain) imports nothing of ours;
``runtime`` (process plumbing) imports ``billing``; ``workers`` (job functions) import
``runtime`` and ``billing``; ``api`` (the edge) imports ``runtime`` and ``billing``, and
``workers`` only from ``api/asgi.py``, the composition root. And no import circle between
any two modules, inside a layer as well.

What counts as an import, decided here:

- Every ``import`` and ``from ... import`` in a module, wherever it is written: at the top,
  inside a function (a lazy import), under ``if TYPE_CHECKING:``. A type-only import is
  still a dependency of the code that reads it, so it counts for the layer rule; a lazy
  import written to dodge a circle is still that circle, so every import counts for the
  circles as well.
- ``from billing import invoices`` is an import of the module ``billing.invoices`` when
  ``invoices`` is a submodule, else of the package ``billing`` (its ``__init__``).
  ``import a.b.c`` is an import of ``a.b.c``. A package's ``__init__`` that the import
  system also runs on the way is not counted as an edge of its own (ours are empty or
  import only below themselves).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # tests/system/ -> the checkout
LAYERS = ("api", "billing", "runtime", "workers")

#: Which layers a layer may import (its own included).
ALLOWED: dict[str, frozenset[str]] = {
    "billing": frozenset({"billing"}),
    "runtime": frozenset({"runtime", "billing"}),
    "workers": frozenset({"workers", "runtime", "billing"}),
    "api": frozenset({"api", "runtime", "billing"}),
}
#: The composition root: the one module of ``api`` that may import ``workers``.
COMPOSITION_ROOT = "api.asgi"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for layer in LAYERS
        for path in sorted((ROOT / layer).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


MODULES = our_modules()


def resolve(name: str) -> str | None:
    """The deepest module of ours that ``name`` (dotted) names, if any."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _from_base(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from ... import`` names (relative ones resolved from ``package``)."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _targets(node: ast.AST, package: str) -> list[str]:
    """The modules of ours one statement imports (none if it is not an import)."""
    if isinstance(node, ast.Import):
        found = [resolve(alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = _from_base(node, package)
        found = [resolve(f"{base}.{alias.name}") or resolve(base) for alias in node.names]
    else:
        return []
    return [target for target in found if target is not None]


def imports_of(module: str) -> Iterator[tuple[str, int]]:
    """(imported module of ours, line) for every import statement in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        for target in _targets(node, package):
            yield target, getattr(node, "lineno", 0)


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module -> first line importing it} (self-imports left out)."""
    graph: dict[str, dict[str, int]] = {}
    for module in MODULES:
        edges: dict[str, int] = {}
        for target, line in imports_of(module):
            if target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def layer_of(module: str) -> str:
    return module.split(".", 1)[0]


def may_import(module: str, target: str) -> bool:
    source, wanted = layer_of(module), layer_of(target)
    if wanted in ALLOWED[source]:
        return True
    return module == COMPOSITION_ROOT and wanted == "workers"


class _Tarjan:
    """Tarjan's strongly connected components (recursive: the module graph is shallow)."""

    def __init__(self, graph: dict[str, dict[str, int]]) -> None:
        self.graph = graph
        self.index: dict[str, int] = {}
        self.low: dict[str, int] = {}
        self.stack: list[str] = []
        self.on_stack: set[str] = set()
        self.components: list[list[str]] = []

    def visit(self, node: str) -> None:
        self.index[node] = self.low[node] = len(self.index)
        self.stack.append(node)
        self.on_stack.add(node)
        for child in sorted(self.graph[node]):
            if child not in self.index:
                self.visit(child)
                self.low[node] = min(self.low[node], self.low[child])
            elif child in self.on_stack:
                self.low[node] = min(self.low[node], self.index[child])
        if self.low[node] == self.index[node]:
            self._pop_component(node)

    def _pop_component(self, root: str) -> None:
        component: list[str] = []
        while not component or component[-1] != root:
            member = self.stack.pop()
            self.on_stack.discard(member)
            component.append(member)
        self.components.append(sorted(component))


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of two or more modules: the import circles."""
    tarjan = _Tarjan(graph)
    for node in sorted(graph):
        if node not in tarjan.index:
            tarjan.visit(node)
    return sorted(c for c in tarjan.components if len(c) > 1)


def describe_component(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    members = set(component)
    edges = [
        f"    {source} -> {target}  ({MODULES[source].relative_to(ROOT)}:{line})"
        for source in component
        for target, line in sorted(graph[source].items())
        if target in members
    ]
    return "  circle of " + ", ".join(component) + ":\n" + "\n".join(edges)


def test_every_layer_is_read() -> None:
    """The reader finds the modules and their imports (a guard against a test that passes
    because it reads nothing)."""
    graph = import_graph()
    for layer in LAYERS:
        assert layer in MODULES, layer
    assert "billing.models" in graph["billing.invoices"]
    assert "runtime.settings" in graph["runtime.db"]
    # A submodule named in ``from package import submodule`` is that module.
    assert any(target.startswith("billing.") for target in graph["workers.invoicing"])


def test_imports_follow_the_dependency_rule() -> None:
    graph = import_graph()
    crossing = sorted(
        (module, target, line)
        for module, edges in graph.items()
        for target, line in edges.items()
        if not may_import(module, target)
    )
    report = "\n".join(
        f"  {module} -> {target}  ({MODULES[module].relative_to(ROOT)}:{line})"
        for module, target, line in crossing
    )
    assert not crossing, f"imports across the dependency rule:\n{report}"


def test_no_import_circles() -> None:
    graph = import_graph()
    found = strongly_connected(graph)
    circles = found
    report = "\n".join(describe_component(component, graph) for component in circles)
    assert not circles, f"import circles (lazy and type-only imports included):\n{report}"


def test_the_circle_finder_finds_circles() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}, "e": {}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
