"""The package layers and the import graph, read statically (ast) from the source.

DESIGN.md's layout: `zeda_rl/` is the library (no Ray, no Megatron, nothing from the packages above it);
`actors/` and `learner/` build on it, `launch/` on all three. An upward import (the library reaching into
the engines or the driver) or a circle between modules makes a change in one place move another; this
test names each one it finds.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zeda_rl", "actors", "learner", "launch")
# what each package may import from the project (itself included)
ALLOWED = {
    "zeda_rl": {"zeda_rl"},
    "actors": {"zeda_rl", "actors"},
    "learner": {"zeda_rl", "learner"},
    "launch": {"zeda_rl", "actors", "learner", "launch"},
}
FORBIDDEN_THIRD_PARTY = {"zeda_rl": {"ray", "megatron"}}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules (and top-level third-party packages) it imports, anywhere in the file."""
    graph = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = _module_name(path)
            deps = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    deps.add(node.module)
                    deps.update(f"{node.module}.{a.name}" for a in node.names)
            graph[name] = deps
    return graph


def _project(mod: str, graph: dict) -> str | None:
    """The project module `mod` names (a `from pkg import submodule` names the submodule), or None."""
    while mod and mod not in graph:
        mod = mod.rpartition(".")[0]
    return mod or None


def test_no_upward_imports_and_the_library_stays_free_of_ray_and_megatron():
    graph = import_graph()
    bad = []
    for mod, deps in graph.items():
        pkg = mod.split(".")[0]
        for d in deps:
            top = d.split(".")[0]
            if top in PACKAGES and top not in ALLOWED[pkg]:
                bad.append(f"{mod} imports {d}")
            if top in FORBIDDEN_THIRD_PARTY.get(pkg, ()):
                bad.append(f"{mod} imports {d} (the library imports neither Ray nor Megatron)")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_circles():
    graph = import_graph()
    edges = {m: {p for d in deps if (p := _project(d, graph)) and p != m} for m, deps in graph.items()}
    # a package's __init__ importing its own modules is not a circle of meaning
    edges = {m: {p for p in ps if not (p == m.rpartition(".")[0])} for m, ps in edges.items()}
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
