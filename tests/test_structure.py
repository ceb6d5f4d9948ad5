"""The package's shape: no import cycle among its modules, lazy imports included
(recognition -> legality -> recognition was one, hidden inside a function)."""

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
