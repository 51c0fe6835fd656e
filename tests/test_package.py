"""The package's shape: modules that import each other in one direction only.

An import cycle (``a`` imports ``b``, ``b`` imports ``a``, perhaps through others and perhaps
inside a function) means neither module can be read, tested or exported on its own: whichever a
reader opens first, its meaning depends on the other. Imports inside functions count too — they
only postpone the cycle to the first call.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minifusion"


def _imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.level == 0 and (node.module or "").startswith("minifusion"):
                parts = node.module.split(".")
                names = parts[1:2] if len(parts) > 1 else [a.name for a in node.names]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("minifusion.")]
        else:
            continue
        found.update(name.split(".")[0] for name in names)
    return (found & modules) - {path.stem}


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {p.stem: _imported_modules(p, modules) for p in sorted(PACKAGE.glob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return path[path.index(imported) :] + [imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_through_several_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_the_graph_sees_imports_inside_functions(tmp_path):
    (tmp_path / "one.py").write_text("def f():\n    from .two import g\n    return g\n")
    (tmp_path / "two.py").write_text("from minifusion.one import f\nimport minifusion.three\n")
    (tmp_path / "three.py").write_text("import torch\n")
    modules = {"one", "two", "three"}
    assert _imported_modules(tmp_path / "one.py", modules) == {"two"}
    assert _imported_modules(tmp_path / "two.py", modules) == {"one", "three"}


def test_no_import_cycle_inside_minifusion():
    graph = import_graph()
    assert {"model", "training", "config", "mamba"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


# nanoGPT's model.py, a module a reader finishes in one sitting, is about 330 lines; ours hold
# one idea each and stay under about twice that.
MAX_MODULE_LINES = 700


def test_every_module_can_be_read_in_one_sitting():
    lines = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.glob("*.py")}
    too_long = {name: n for name, n in lines.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"split these by the ideas they hold: {too_long}"
