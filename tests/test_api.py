"""The public surface is what docs/api.md lists: every public name of the package, of
the report's classes and every option, no more and no fewer. A name added to the code
must be added to the page (a bullet under its owner's heading, starting with the name
in backticks), and one removed from the page must go through a deprecation first."""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import re
import warnings

import pytest
import torch

import compile_affine
from compile_affine.report import EpilogueRecord, GraphRecord, Report, SiteRecord
from compile_affine.settings import ENV_VAR, Settings

from .nets import Chain

REPO = pathlib.Path(__file__).resolve().parent.parent
_HEADING = re.compile(r"^### `?([^`\s]+)`?$")
_BULLET = re.compile(r"^- `([^`]+)`")


def documented() -> dict[str, set[str]]:
    """``{owner: names}`` from "The surface" in docs/api.md: under each ``### `Owner```
    heading (or ``### Environment``), the first backticked word of each top-level bullet."""
    text = (REPO / "docs" / "api.md").read_text()
    surface = text.split("\n## The surface\n", 1)[1].split("\n## ", 1)[0]
    names: dict[str, set[str]] = {}
    owner = None
    for line in surface.splitlines():
        if m := _HEADING.match(line):
            owner = m.group(1)
            names[owner] = set()
        elif (m := _BULLET.match(line)) and owner is not None:
            assert m.group(1) not in names[owner], f"{owner}.{m.group(1)} listed twice"
            names[owner].add(m.group(1))
    return names


def public(cls: type, instance: object | None = None) -> set[str]:
    """Dataclass fields, class members and instance attributes not starting with ``_``."""
    names = {n for n in dir(cls) if not n.startswith("_")}
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    if instance is not None:
        names |= {n for n in vars(instance) if not n.startswith("_")}
    return names


def actual() -> dict[str, set[str]]:
    return {
        "compile_affine": set(compile_affine.__all__),
        "Report": public(Report, Report([])),
        "GraphRecord": public(GraphRecord),
        "SiteRecord": public(SiteRecord),
        "EpilogueRecord": public(EpilogueRecord),
        "Settings": public(Settings),
        "Environment": {ENV_VAR},
    }


@pytest.mark.parametrize("owner", sorted(actual()))
def test_docs_list_exactly_the_public_surface(owner):
    listed = documented().get(owner)
    assert listed is not None, f"docs/api.md has no '### `{owner}`' section"
    have = actual()[owner]
    assert not have - listed, f"public in {owner} but not in docs/api.md: {sorted(have - listed)}"
    assert not listed - have, f"in docs/api.md under {owner} but not in the package: {sorted(listed - have)}"


def test_docs_have_no_section_for_something_unknown():
    assert set(documented()) == set(actual())


def test_every_option_is_a_settings_field():
    """The options are the fields: an option with no field, or a field that is no option,
    would make the Settings list above wrong."""
    from compile_affine.settings import ACCEPTED_KEYS

    assert set(ACCEPTED_KEYS) == {f.name for f in dataclasses.fields(Settings)}


def test_all_names_exist():
    for name in compile_affine.__all__:
        assert hasattr(compile_affine, name), name


def test_version_is_the_same_everywhere_and_has_a_changelog_entry():
    # The project table's version line (tomllib is Python 3.11+; the package runs on 3.10).
    (version,) = re.findall(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert compile_affine.__version__ == version
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M), \
        f"CHANGELOG.md has no '## [{version}] - YYYY-MM-DD' entry"


def test_reasons_counts_why_sites_were_left_unfolded():
    """``report().reasons()``, which user scripts call: a Counter over unfolded sites."""
    from .helpers import pass_backend

    settings = Settings(fold="always", exclude=["blocks.0", "blocks.2"])
    torch.compile(Chain(), backend=pass_backend(settings))(torch.randn(2, 4, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a documented method: no deprecation
        reasons = compile_affine.report().reasons()
    assert isinstance(reasons, collections.Counter)
    assert reasons == collections.Counter({"excluded by option": 2})
    assert compile_affine.report().folded == 1
    compile_affine.reset()
    assert compile_affine.report().reasons() == collections.Counter()
