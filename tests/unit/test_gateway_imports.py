"""No import cycle among the gateway's modules (issue 23: ``proxy <-> jobs <-> idempotency``).

Read from the source with ``ast``; nothing of the gateway is imported. Importing
``gateway`` builds no app: ``tests/unit/test_gateway_import.py`` checks that.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gateway"


def module_name(package: Path, path: Path) -> str:
    """``gateway/x.py`` -> ``gateway.x``; ``gateway/__init__.py`` -> ``gateway``."""
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level(body: list[ast.stmt]):
    """The statements that run when the module is imported: the module's own, and those in
    its ``if``, ``try`` and ``with`` blocks and class bodies; not those in functions (an
    import there runs when it is called, after every module is loaded, as
    ``gateway/__init__.py`` makes the app), nor those under ``if TYPE_CHECKING:`` (never
    run: annotations only)."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name != "TYPE_CHECKING":
                yield from module_level(node.body)
            yield from module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse):
                yield from module_level(block)
            yield from module_level(node.finalbody)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from module_level(node.body)


def imported(node: ast.stmt, importer: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules that an import statement loads: ``import gateway.x``,
    ``from gateway import x``, ``from gateway.x import y``, ``from . import x``, ``from .x
    import y``; a name imported from a module is that module, unless it is a submodule.
    The package's ``__init__`` that Python loads before a submodule is not counted."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = importer.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = set()
    for alias in node.names:
        if f"{source}.{alias.name}" in modules:
            found.add(f"{source}.{alias.name}")
        elif source in modules:
            found.add(source)
    found.discard(importer)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Each module of ``package`` -> the modules of it that it imports at module level."""
    files = {module_name(package, path): path for path in package.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = set().union(
            *(imported(node, name, is_package, modules) for node in module_level(tree.body))
        )
    return graph


def a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the modules on it, first one repeated at the end; None
    when there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        path.append(name)
        for target in sorted(graph.get(name, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name)
        if cycle:
            return cycle
    return None


def test_the_gateway_package_has_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert len(graph) >= 15 and graph["gateway.proxy"]  # the package was found and read
    assert {"gateway.request", "gateway.process", "gateway.answers"} <= graph["gateway.proxy"]
    assert a_cycle(graph) is None, " -> ".join(a_cycle(graph))


def test_the_cycle_finder_finds_a_cycle_and_nothing_else():
    assert a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert a_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
