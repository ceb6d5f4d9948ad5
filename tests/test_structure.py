"""The package's shape: no import cycle among its modules, and no import from a lower
layer up to a higher one, lazy imports included (recognition -> legality -> recognition
was one, hidden inside a function)."""

from __future__ import annotations

import ast
import pathlib

import compile_affine

ROOT = pathlib.Path(compile_affine.__file__).resolve().parent.parent


def _imports() -> dict[str, set[str]]:
    modules = {}
    for path in (ROOT / "compile_affine").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                target = node.module or ""
                if node.level:
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                deps.update(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_no_import_cycle_among_the_package_modules():
    graph = _imports()
    assert "compile_affine.passes.legality" in graph["compile_affine.passes.fold"]  # the scan sees imports
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, dep])
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


LAYERS: tuple[tuple[str, ...], ...] = (
    ("compile_affine._compat", "compile_affine._torch_internals", "compile_affine.settings", "compile_affine.trace",
     "compile_affine.ops"),
    ("compile_affine.report",),
    ("compile_affine.record_store",),
    ("compile_affine.passes", "compile_affine.passes.graph", "compile_affine.passes.target"),
    ("compile_affine.passes.mutations",),
    ("compile_affine.passes.sites.base",),
    ("compile_affine.passes.sites.conv", "compile_affine.passes.sites.linear"),
    ("compile_affine.passes.sites.find", "compile_affine.passes.sites"),
    ("compile_affine.passes.legality", "compile_affine.passes.cost", "compile_affine.passes.describe"),
    ("compile_affine.passes.rewrite", "compile_affine.passes.rewrite.common", "compile_affine.passes.rewrite.conv",
     "compile_affine.passes.rewrite.linear", "compile_affine.passes.rewrite.masks"),
    ("compile_affine.passes.normalise", "compile_affine.passes.normalise.batchnorm", "compile_affine.passes.normalise.forms",
     "compile_affine.passes.normalise.steps", "compile_affine.passes.epilogue"),
    ("compile_affine.passes.fold",),
    ("compile_affine.backend",),
    ("compile_affine.install", "compile_affine.explain"),
    ("compile_affine",),
)
"""Lowest first: a module may import its own layer or lower ones. The benchmark
(``compile_affine.bench`` and everything under it) is one layer above all of these."""


def _layer(name: str) -> int:
    if name == "compile_affine.bench" or name.startswith("compile_affine.bench."):
        return len(LAYERS)
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"{name} has no layer in tests/test_structure.py's LAYERS")


def test_no_import_runs_from_a_lower_layer_up_to_a_higher_one():
    graph = _imports()
    assert "compile_affine.backend" in graph["compile_affine.install"]  # the scan sees lazy imports
    upward = [f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
              for name in sorted(graph) for dep in sorted(graph[name]) if _layer(dep) > _layer(name)]  # fmt: skip
    assert not upward, "\n".join(upward)
