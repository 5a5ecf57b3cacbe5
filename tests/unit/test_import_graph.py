"""The modules of mapsync import each other one way: no cycle, and each layer only from the ones
below it (docs/STYLE: data flows source → snapshot → maps → release → transport → agent).

Every import counts, at module level and inside a function (a local import is still a
dependency; it only hides a cycle until the function runs). Imports under
``if TYPE_CHECKING:`` count for the layering, not for cycles: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mapsync

PACKAGE = Path(mapsync.__file__).parent

# Cycles known when this test was written, each to be deleted with the change that removes it.
EXPECTED_CYCLES: set[frozenset[str]] = set()

# (importer prefix, imported prefixes it must never import)
LAYERS = [
    ("mapsync.release", ("mapsync.publish", "mapsync.agent", "mapsync.cli")),
    ("mapsync.formats", ("mapsync.publish", "mapsync.agent", "mapsync.cli")),
    ("mapsync.agent", ("mapsync.publish", "mapsync.cli")),
    ("mapsync.publish", ("mapsync.agent", "mapsync.cli")),
]


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(mapsync modules ``module`` imports when it runs, those it imports for type checking only)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    runs: set[str] = set()
    typing: set[str] = set()

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name for a in node.names}
        base = node.module or ""
        if node.level:
            up = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(up + ([base] if base else []))
        # ``from mapsync.x import y``: y may be a module of its own (and x's __init__ runs too)
        return {base} | {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}

    def visit(node: ast.AST, only_typing: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.body:
                    visit_node(sub, True)
                for sub in child.orelse:
                    visit_node(sub, only_typing)
            else:
                visit_node(child, only_typing)

    def visit_node(node: ast.AST, only_typing: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            # A module's packages are loaded before it: importing from them closes no cycle.
            found = {t for t in targets(node) if t in MODULES and not _within(module, t)}
            (typing if only_typing else runs).update(found)
        visit(node, only_typing)

    visit(ast.parse(path.read_text(), str(path)), False)
    return runs, typing - runs


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a cycle
    through its modules, in import order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [_a_cycle(c, edges) for c in components]


def _a_cycle(component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """One cycle through the first module of ``component``: a → b → ... → a."""
    start = min(component)
    paths = {start: [start]}
    todo = [start]
    while todo:  # breadth first: the shortest way back to start
        v = todo.pop(0)
        for w in sorted(edges[v] & component):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                todo.append(w)
    raise AssertionError(f"no cycle in {component}")


def test_the_graph_is_read() -> None:
    """The parser finds what it must: a module-level import and a local one."""
    assert "mapsync.release.format" in GRAPH["mapsync.release.verify"][0]
    assert "mapsync.publish.repository" in GRAPH["mapsync.publish.rollback"][0]
    local = GRAPH["mapsync.cli.commands"][0]  # commands import their machinery when called
    assert {"mapsync.publish.publisher", "mapsync.agent.pull"} <= local


def test_no_module_imports_itself_back() -> None:
    cycles = _cycles({m: runs for m, (runs, _) in GRAPH.items()})
    unexpected = [c for c in cycles if frozenset(c) not in EXPECTED_CYCLES]
    assert not unexpected, "import cycle(s): " + "; ".join(" → ".join(c) for c in unexpected)


def test_the_expected_cycles_are_still_there() -> None:
    """An allowlisted cycle that is gone is deleted from EXPECTED_CYCLES, so none comes back."""
    cycles = {frozenset(c) for c in _cycles({m: runs for m, (runs, _) in GRAPH.items()})}
    gone = [sorted(c) for c in EXPECTED_CYCLES if c not in cycles]
    assert not gone, f"no longer a cycle, delete from EXPECTED_CYCLES: {gone}"


def test_each_layer_imports_only_what_is_below_it() -> None:
    wrong = []
    for module, (runs, typing) in sorted(GRAPH.items()):
        for imported in sorted(runs | typing):
            for layer, never in LAYERS:
                if _within(module, layer) and any(_within(imported, n) for n in never):
                    wrong.append(f"{module} imports {imported}")
            if (
                _within(imported, "mapsync.cli")
                and not _within(module, "mapsync.cli")
                and module != "mapsync.__main__"  # ``python -m mapsync``: the CLI's entry
            ):
                wrong.append(f"{module} imports {imported} (only mapsync.cli imports the CLI)")
    assert not wrong, "\n".join(wrong)
