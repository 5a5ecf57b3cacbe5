"""The agent's modules import each other without a circle, and nothing that stands above
them in the data flow (the publisher, the command line). Imports inside functions count:
a local import only hides a circle, it does not remove it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mapsync.agent

AGENT = Path(mapsync.agent.__file__).parent
PACKAGE = "mapsync.agent"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere in it (top level, functions, TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and not node.level:
            found.add(node.module)
            # `from mapsync.agent import loop` imports the module mapsync.agent.loop
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    """Module of mapsync.agent → the modules of mapsync.agent it imports."""
    modules = {f"{PACKAGE}.{p.stem}": p for p in AGENT.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in ``graph`` (its modules in order, the first repeated), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        path.append(name)
        for dep in sorted(graph[name]):
            found = visit(dep)
            if found:
                return found
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        found = visit(name)
        if found:
            return found
    return None


def test_the_cycle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_agent_modules_import_each_other_without_a_circle() -> None:
    graph = _graph()
    assert {"mapsync.agent.pull", "mapsync.agent.repair", "mapsync.agent.node"} <= set(graph)
    assert "mapsync.agent.repair" in graph["mapsync.agent.pull"]  # the graph sees imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_agent_imports_nothing_above_it_in_the_data_flow() -> None:
    above = ("mapsync.publish", "mapsync.cli", "mapsync.maps", "mapsync.sources")
    wrong = {
        f"{PACKAGE}.{path.stem}": sorted(m for m in _imports(path) if m.startswith(above))
        for path in AGENT.glob("*.py")
    }
    assert {name: found for name, found in wrong.items() if found} == {}


def test_status_and_the_node_object_load_no_cryptography_and_no_database() -> None:
    """``mapsync status`` runs every minute and reads the node through NodeChannel."""
    code = (
        "import sys, mapsync.agent.status, mapsync.agent.node\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'cryptography', 'sqlalchemy'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
