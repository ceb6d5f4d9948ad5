"""The package as a user gets it: the wheel built from this checkout, installed apart from
it, found by name through the wheel's own entry point. No network: the build uses the
setuptools already installed, and pip only reads local files."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import compile_affine

REPO = pathlib.Path(__file__).resolve().parent.parent

_CHECK = textwrap.dedent(
    """
    import importlib.metadata as md, pathlib, sys, torch
    site = pathlib.Path(sys.argv[1])
    (ep,) = [ep for ep in md.entry_points(group="torch_dynamo_backends") if ep.name == "compile_affine"]
    assert ep.dist.version == sys.argv[2], ep.dist.version
    assert pathlib.Path(ep.dist.locate_file("compile_affine")).parent == site, ep.dist.locate_file("")
    class ConvScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.s = torch.nn.Conv2d(3, 4, 3), torch.nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

        def forward(self, x):
            return self.conv(x) * self.s

    m, x = ConvScale(), torch.randn(1, 3, 6, 6)
    out = torch.compile(m, backend="compile_affine", options={"compile_affine": {"fold": "always"}})(x)
    torch.testing.assert_close(out, m(x))
    import compile_affine  # imported already, by torch through the entry point
    assert pathlib.Path(compile_affine.__file__).parent.parent == site, compile_affine.__file__
    assert compile_affine.__version__ == sys.argv[2]
    assert compile_affine.report().folded == 1, str(compile_affine.report())
    print("ok", compile_affine.__file__)
    """
)


def test_wheel_installs_and_compiles_by_name(tmp_path):
    pytest.importorskip("setuptools", minversion="77")  # pyproject's PEP 639 licence field
    # A copy of what the build reads, so the build's own files (build/, *.egg-info) land
    # outside the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", *[p.name for p in REPO.glob("*.py")]):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "compile_affine", src / "compile_affine", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("compile_affine-*.whl")
    assert wheel.name.startswith(f"compile_affine-{compile_affine.__version__}-py3-none-any")
    names = zipfile.ZipFile(wheel).namelist()
    assert "compile_affine/__init__.py" in names and "compile_affine_graphs.py" in names
    assert not any(n.startswith("tests/") or "__pycache__" in n for n in names)
    # The licence travels in the metadata (PEP 639), so a project may depend on the wheel.
    dist_info = f"compile_affine-{compile_affine.__version__}.dist-info"
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: BSD-3-Clause" in metadata.splitlines(), metadata[:1500]
    assert "License-File: LICENSE" in metadata.splitlines()
    assert zipfile.ZipFile(wheel).read(f"{dist_info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()

    site = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]

    # ``-S``: no site module, so no .pth file runs, and the editable install's finder (which
    # maps ``compile_affine`` to a checkout) is never put on sys.meta_path. Torch comes from
    # its own folder, after the wheel's; the working directory is neither checkout.
    torch_site = pathlib.Path(torch.__file__).resolve().parent.parent
    env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMPILE_AFFINE")},
           "PYTHONPATH": os.pathsep.join([str(site), str(torch_site)]),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
    done = subprocess.run([sys.executable, "-S", "-c", _CHECK, str(site), compile_affine.__version__],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok ")

    # What a user reads: pip shows PEP 639's licence expression from pip 25.1 on (the
    # Makefile brings the venv's pip up to date; an older pip prints an empty License).
    shown = subprocess.run([*pip, "show", "compile_affine"], env={**env, "PYTHONPATH": str(site)},
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-3000:]
    if _pip_version() >= (25, 1):
        assert "License-Expression: BSD-3-Clause" in shown.stdout.splitlines(), shown.stdout


def _pip_version() -> tuple[int, ...]:
    import pip

    return tuple(int(p) for p in pip.__version__.split(".")[:2] if p.isdigit())
