"""The package's layering, read from the source: data flows one way (io at the ground, merge on it, learn on
merge, lora and suite on top, the CLI above all) and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# sub-package -> layer; a module may import its own sub-package and lower layers only
LAYERS = {"io": 0, "kernels": 0, "merge": 1, "learn": 2, "lora": 3, "suite": 3, "cli": 4}


def _modules() -> dict[str, Path]:
    """Every module of the installed namespace, by dotted name (engine/ is blockmerge, kernels/ its kernels)."""
    found = {}
    for top, prefix in (("engine", ("blockmerge",)), ("kernels", ("blockmerge", "kernels"))):
        for path in (REPO / top).rglob("*.py"):
            parts = prefix + path.relative_to(REPO / top).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """blockmerge modules `name` imports anywhere in its body (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
            }
    return {m for m in out if m in MODULES and m != name}


def _layer(name: str) -> tuple[str, int]:
    part = name.split(".")[1] if name.count(".") else "io"  # the root package holds only __version__
    return part, LAYERS[part]


def test_every_module_belongs_to_a_layer():
    assert len(MODULES) > 20
    for name in MODULES:
        assert _layer(name)[0] in LAYERS, name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_flow_down(name):
    part, layer = _layer(name)
    for dep in _imports(name):
        dep_part, dep_layer = _layer(dep)
        assert dep_part == part or dep_layer < layer, f"{name} imports {dep}: {part} may not depend on {dep_part}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (found := visit(d, path + [d])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle({m: _imports(m) for m in MODULES})
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_see_what_they_claim():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    # function-level and `from package import module` imports are seen
    assert "blockmerge.merge.methods" in _imports("blockmerge.merge.registry")  # from blockmerge.merge import methods
    assert "blockmerge.lora.learn" in _imports("blockmerge.lora.cli")  # inside a function
    assert "blockmerge.io.checkpoint" in _imports("blockmerge.merge.config")
