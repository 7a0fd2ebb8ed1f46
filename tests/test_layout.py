"""The import graph keeps the architecture: the core reaches a world only through tempflow.worlds, the
math is pure, and nothing in the core depends on the benchmarks or the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "tempflow"


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every tempflow module a file imports, wherever the import stands (inside functions and under
    TYPE_CHECKING too); `from tempflow.x import y` counts as tempflow.x and tempflow.x.y."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m == "tempflow" or m.startswith("tempflow.")}


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}
WORLDS = sorted({m.split(".")[2] for m in MODULES if m.startswith("tempflow.worlds.") and m.count(".") >= 2})


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_is_read():
    assert "tempflow.training.loop" in MODULES and "shapes" in WORLDS
    assert "tempflow.worlds.shapes.grammar" in _imports(MODULES["tempflow.worlds.shapes.prompts"])


@pytest.mark.parametrize("world", WORLDS)
def test_no_module_outside_a_world_imports_it(world):
    package = f"tempflow.worlds.{world}"
    leaks = {m: sorted(i for i in _imports(p) if _inside(i, package))
             for m, p in MODULES.items() if not _inside(m, package)}
    assert {m: i for m, i in leaks.items() if i} == {}


def test_the_core_names_no_world_but_in_the_registry_of_built_in_worlds():
    """No string hands a world's module to importlib behind the graph's back: the one mention is the
    built-in table of tempflow.worlds."""
    for world in WORLDS:
        package = f"tempflow.worlds.{world}"
        mentions = [m for m, p in MODULES.items() if not _inside(m, package) and package in p.read_text("utf-8")]
        assert mentions == ["tempflow.worlds"], world


def test_the_math_is_pure():
    for m, p in MODULES.items():
        if _inside(m, "tempflow.math"):
            assert all(_inside(i, "tempflow.math") or i in ("tempflow.errors", "tempflow.math") for i in _imports(p)), m


@pytest.mark.parametrize("outer", ["tempflow.bench", "tempflow.cli"])
def test_the_core_does_not_depend_on_benchmarks_or_the_command_line(outer):
    front = ("tempflow.cli", "tempflow.__main__")  # the command line gathers every command, bench's too
    users = [m for m, p in MODULES.items()
             if not _inside(m, outer) and m not in front and any(_inside(i, outer) for i in _imports(p))]
    assert users == []
