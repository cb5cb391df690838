"""The package's layers import downward only, and no module imports itself round a cycle.

Every ``import`` in every module counts: at the top, inside functions and under
``TYPE_CHECKING``. Layers, lowest first (a module may import its own layer and those below):

0. foundations: errors, version, device, lora, linalg, heap, layer_map, paths, speed, hooks, padding
1. formats and architectures: io, arch
2. the shared types and resources of a transfer: core, memory, basis_cache, pair_cache
3. methods
4. the pipeline: plan, execute, draws, report, pipeline, refine
5. tools built on it: inspect, eval, bench, zoo, cluster
6. the command line: cli, __main__

The package root (``crosslora/__init__.py``, the public API) sits above them all and nothing in
the package imports it. Run alone: ``python -m pytest tests/test_layers.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "crosslora"
LAYERS = [
    {"errors", "version", "device", "lora", "linalg", "heap", "layer_map", "paths", "speed",
     "hooks", "padding"},
    {"io", "arch"},
    {"core", "memory", "basis_cache", "pair_cache"},
    {"methods"},
    {"plan", "execute", "draws", "report", "pipeline", "refine"},
    {"inspect", "eval", "bench", "zoo", "cluster"},
    {"cli", "__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (
        ROOT.parent / rel / "__init__.py"
    ).is_file()


def imports_of(source: str) -> set[str]:
    """Every crosslora module ``source`` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "crosslora"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "crosslora":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if is_module(sub) else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p.read_text()) for p in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> int:
    if module == "crosslora":
        return len(LAYERS)
    part = module.split(".")[1]
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and the docstring)")


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the list of its modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_is_in_a_layer_and_imports_downward_only():
    edges = graph()
    assert len(edges) > 40, "the scan found too few modules to mean anything"
    upward = [
        f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for src, dsts in edges.items()
        for dst in dsts
        if layer_of(dst) > layer_of(src)
    ]
    assert not upward, "\n".join(upward)


def test_there_is_no_import_cycle():
    assert find_cycle(graph()) is None, find_cycle(graph())


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The scanner sees imports inside functions and under TYPE_CHECKING, and the cycle finder
    finds a cycle: the two tests above can fail."""
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from crosslora.plan import x\n"
        "def f():\n    import crosslora.cli\n    from crosslora.methods import base\n"
    )
    assert imports_of(source) == {"crosslora.plan", "crosslora.cli", "crosslora.methods.base"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    with pytest.raises(AssertionError, match="is in no layer"):
        layer_of("crosslora.somewhere_new")


def test_no_source_file_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}  # fmt: skip
    assert not long, long
