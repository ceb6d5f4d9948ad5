"""The compatibility watch, private APIs (docs/design.md, "The compatibility watch"): every
private torch name the package touches is importable on this torch, or the test names the
one that is gone; the package uses no private name the list does not hold; and the list
in docs/design.md is the list in ``compile_affine/_torch_internals.py``."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest
import torch

from compile_affine._compat import TORCH_MINOR
from compile_affine._torch_internals import APIS, CHECKED_NEWEST, CHECKED_OLDEST, Api, table

REPO = pathlib.Path(__file__).resolve().parent.parent


def _resolve(api: Api) -> object:
    # The longest prefix that imports as a module (``torch.ops.mkldnn`` is an attribute path).
    parts = api.module.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
            break
        except ImportError:
            continue
    for part in [*parts[cut:], *api.name.split(".")]:
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("api", APIS, ids=lambda a: f"{a.module}.{a.name}")
def test_private_api_is_there(api):
    if TORCH_MINOR < api.since:
        pytest.skip(f"{api.module}.{api.name} comes in torch {api.since[0]}.{api.since[1]}; _compat shims it here")
    try:
        _resolve(api)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"torch {torch.__version__} lacks {api.module}.{api.name}, which compile_affine/{api.used_by} "
                    f"uses (checked on {CHECKED_OLDEST} to {CHECKED_NEWEST}): {type(e).__name__}: {e}")  # fmt: skip


def test_a_missing_api_is_named(monkeypatch):
    """The failure message names the API: what a user upgrading torch reads first."""
    import torch._inductor.pattern_matcher as pm

    monkeypatch.delattr(pm, "register_graph_pattern")
    (api,) = [a for a in APIS if a.name == "register_graph_pattern"]
    with pytest.raises(pytest.fail.Exception, match=r"lacks torch\._inductor\.pattern_matcher\.register_graph_pattern"):
        test_private_api_is_there(api)


def _private_uses(tree: ast.AST) -> set[str]:
    """Every dotted torch name the code (not its docstrings) reaches: attribute chains from
    ``torch``, ``from torch... import name`` and ``import torch....``, that pass through a
    private component (``_inductor``, ``_pytree``, ``_has_mkldnn``...)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "parent", None), ast.Attribute):
            parts, inner = [], node
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "torch":
                names.add(".".join(["torch", *reversed(parts)]))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("torch."))
    return {n for n in names if any(p.startswith("_") and not p.startswith("__") for p in n.split("."))}


def test_the_package_uses_no_unlisted_private_name():
    listed = {f"{a.module}.{a.name}" for a in APIS}
    unlisted = []
    for path in sorted((REPO / "compile_affine").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                child.parent = node  # the outermost attribute of a chain is the whole name
        for name in sorted(_private_uses(tree)):
            # covered: a listed name, a member of one, or a module some listed name lives in
            if not any(name == f or name.startswith(f + ".") or f.startswith(name + ".") for f in listed):
                unlisted.append(f"{path.relative_to(REPO)}: {name}")
    assert not unlisted, "private torch names not in compile_affine/_torch_internals.py: " + ", ".join(unlisted)


def test_design_doc_lists_the_same_apis():
    section = (REPO / "docs" / "design.md").read_text().split("## The compatibility watch", 1)[1].split("\n## ", 1)[0]
    assert table() in section, "docs/design.md's table differs from compile_affine/_torch_internals.py; it should read:\n" + table()
    assert f"{CHECKED_OLDEST} to {CHECKED_NEWEST}" in section
