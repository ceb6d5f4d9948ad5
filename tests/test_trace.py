"""The pass in PyTorch's own trace and logs: each record a ``TORCH_TRACE`` artifact (what
tlparse shows), and ``TORCH_LOGS="compile_affine_graphs"`` the graph before and after."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import compile_affine
from compile_affine import trace

from .helpers import pass_backend
from .nets import Chain

REPO = pathlib.Path(__file__).resolve().parent.parent

_SCRIPT = """
import torch, compile_affine
from tests.nets import Chain
torch.manual_seed(0)
m = torch.compile(Chain(), backend="compile_affine", options={"compile_affine": {"fold": "always", "exclude": ["blocks.2"]}})
m(torch.randn(2, 4, 8, 8)).sum().backward()
print("FOLDED", compile_affine.report().folded)
"""


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> tuple[pathlib.Path, str]:
    """One compile in a fresh process (torch reads both variables when it is imported),
    run outside the checkout: ``TORCH_LOGS`` must find its name through ``PYTHONPATH``."""
    tmp = tmp_path_factory.mktemp("trace")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_TRACE": str(tmp / "trace"),
           "TORCH_LOGS": "compile_affine_graphs", "TORCHINDUCTOR_CACHE_DIR": str(tmp / "cache")}  # fmt: skip
    env.pop("COMPILE_AFFINE", None)
    done = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FOLDED 2" in done.stdout
    return tmp / "trace", done.stderr


def _artifacts(folder: pathlib.Path, name: str) -> list[str]:
    """The payloads of the artifacts called ``name`` in the trace logs (one line of
    metadata, then the payload's lines, each indented by a tab)."""
    payloads = []
    for path in folder.iterdir():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if f'"artifact": {{"name": "{name}"' in line:
                body = []
                for more in lines[i + 1:]:
                    if not more.startswith("\t"):
                        break
                    body.append(more[1:])
                payloads.append("\n".join(body))
    return payloads


def test_each_record_is_a_trace_artifact(traced):
    folder, _ = traced
    (payload,) = _artifacts(folder, trace.REPORT_ARTIFACT)
    record = json.loads(payload)
    assert record["folded"] == 2 and record["training"]
    assert [(s["module"], s["folded"], s["reason"]) for s in record["sites"]] == [
        ("blocks.0", True, None), ("blocks.1", True, None), ("blocks.2", False, "excluded by option")]


def test_graphs_before_and_after_in_the_trace_and_the_log(traced):
    folder, stderr = traced
    (before,) = _artifacts(folder, trace.BEFORE_ARTIFACT)
    (after,) = _artifacts(folder, trace.AFTER_ARTIFACT)
    assert before.startswith("# graph 0 before compile_affine") and after.startswith("# graph 0 after compile_affine")
    # Three convolutions each way; the two folds scale their weights (mul on primals).
    assert before.count("aten.convolution.default") == after.count("aten.convolution.default") == 3
    assert after != before
    assert "graph 0 before compile_affine:" in stderr and "graph 0 after compile_affine:" in stderr
    assert "aten.convolution.default" in stderr


def test_a_failing_trace_never_fails_the_compile(monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("trace_structured() got an unexpected keyword argument 'payload_fn'")

    monkeypatch.setattr(trace, "trace_structured", broken)
    monkeypatch.setattr(trace, "tracing", lambda: True)  # as under TORCH_TRACE: the graphs are dumped too
    torch.compile(Chain(), backend=pass_backend())(torch.randn(2, 4, 8, 8)).sum().backward()
    assert compile_affine.report().folded == 3


def test_no_graph_text_is_made_unless_asked(monkeypatch):
    """The dump costs a graph print per compile: only with the log or the trace on."""
    assert not trace.graphs_wanted()
    monkeypatch.setattr(trace, "graph_text", lambda gm: pytest.fail("graph printed with the dump off"))
    torch.compile(Chain(), backend=pass_backend())(torch.randn(2, 4, 8, 8)).sum().backward()
    assert compile_affine.report().folded == 3
