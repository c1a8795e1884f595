"""The dependency rule, checked on the source: bots → core → storage.base, nothing back.

The import graph of `core`, `storage` and `bots` is read with `ast` (every import: module level,
inside functions, and under `TYPE_CHECKING`). Run `python -m tests.test_layers` for the report.

`KNOWN_*` list what issue 13 has not moved yet; each check fails on anything new, and on a
listed entry that is gone (so the lists only shrink).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "storage", "bots")
Graph = dict[str, set[str]]

# storage → core beyond core.messages: none left (the factory takes StorageOptions).
KNOWN_STORAGE_TO_CORE: set[tuple[str, str]] = set()
# Cycles, TYPE_CHECKING and function-level imports included, as sorted member tuples.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" not in path.parts:
                found[module_name(path)] = path
    return found


def imported(tree: ast.AST, known: set[str]) -> Iterator[str]:
    """The project modules named by any import statement of a module's code."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (_resolve(alias.name, known) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:  # `from core.dialogue import texts` names core.dialogue.texts
                submodule = f"{node.module}.{alias.name}"
                yield submodule if submodule in known else _resolve(node.module, known)


def _resolve(name: str, known: set[str]) -> str:
    """The module itself, or the innermost project module that holds it ('' for none)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> Graph:
    found = modules()
    known = set(found) - set(PACKAGES)  # the top packages' __init__ files are empty
    graph: Graph = {}
    for name, path in found.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[name] = set(imported(tree, known)) - {name, ""}
    return graph


def edges_into(graph: Graph, source: str, target: str) -> set[tuple[str, str]]:
    return {
        (a, b) for a, targets in graph.items() for b in targets if _in(a, source) and _in(b, target)
    }


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def cycles(graph: Graph) -> set[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[tuple[str, ...]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                found.add(tuple(sorted(members)))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def storage_to_core(graph: Graph) -> set[tuple[str, str]]:
    return {(a, b) for a, b in edges_into(graph, "storage", "core") if b != "core.messages"}


# --- the checks -------------------------------------------------------------------------------


def test_the_graph_sees_type_checking_and_function_level_imports() -> None:
    graph = import_graph()
    assert "core.dialogue.manager" in graph["core.ops.server"]  # under TYPE_CHECKING
    assert "storage.redis.client" in graph["core.ops.server"]  # inside a method
    assert "core.dialogue.texts" in graph["core.dialogue.uses"]  # `from core.dialogue import texts`


def test_core_and_storage_never_import_bots() -> None:
    graph = import_graph()
    assert edges_into(graph, "core", "bots") == set()
    assert edges_into(graph, "storage", "bots") == set()


def test_storage_imports_nothing_of_core_but_its_message_types() -> None:
    assert storage_to_core(import_graph()) == KNOWN_STORAGE_TO_CORE


def test_no_import_cycle_but_the_known_ones() -> None:
    assert cycles(import_graph()) == KNOWN_CYCLES


if __name__ == "__main__":
    graph = import_graph()
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports")
    for source, target in (("core", "bots"), ("storage", "bots")):
        print(f"{source} → {target}: {sorted(edges_into(graph, source, target)) or 'none'}")
    print(f"storage → core beyond core.messages: {sorted(storage_to_core(graph)) or 'none'}")
    print("cycles (TYPE_CHECKING included):")
    for cycle in sorted(cycles(graph)):
        print("  " + " ↔ ".join(cycle))
