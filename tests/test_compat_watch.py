"""The compatibility watch, private APIs (docs/design.md, "The compatibility watch"): every
private torch name the package touches is importable on this torch, or the test names the
one that is gone; the package uses no private name the list does not hold; and the list
in docs/design.md is the list in ``compile_affine/_torch_internals.py``."""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest
import torch

from compile_affine._compat import TORCH_MINOR
from compile_affine._torch_internals import APIS, CHECKED_NEWEST, CHECKED_OLDEST, Api, table

REPO = pathlib.Path(__file__).resolve().parent.parent


def _resolve(api: Api) -> object:
    obj = importlib.import_module(api.module)
    for part in api.name.split("."):
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


_IMPORT = re.compile(r"^\s*from (torch(?:\.\w+)*) import \(?([\w, ]+)", re.M)


def test_the_package_imports_no_unlisted_private_name():
    listed = {(a.module, a.name.split(".")[0]) for a in APIS}
    modules = {a.module for a in APIS}
    unlisted = []
    for path in sorted((REPO / "compile_affine").rglob("*.py")):
        for module, names in _IMPORT.findall(path.read_text()):
            if "._" not in f".{module.removeprefix('torch')}":
                continue  # a public module: torch.nn, torch.fx ...
            for name in (n.split(" as ")[0].strip() for n in names.split(",") if n.strip()):
                # a submodule imported by name (``from torch._inductor import lowering``) is
                # covered when its own entries are listed
                if (module, name) not in listed and f"{module}.{name}" not in modules:
                    unlisted.append(f"{path.relative_to(REPO)}: {module}.{name}")
    assert not unlisted, "private torch names not in compile_affine/_torch_internals.py: " + ", ".join(unlisted)


def test_design_doc_lists_the_same_apis():
    section = (REPO / "docs" / "design.md").read_text().split("## The compatibility watch", 1)[1].split("\n## ", 1)[0]
    assert table() in section, "docs/design.md's table differs from compile_affine/_torch_internals.py; it should read:\n" + table()
    assert f"{CHECKED_OLDEST} to {CHECKED_NEWEST}" in section
