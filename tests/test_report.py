"""What the user reads: only the affines they wrote are sites, one summary line per
graph, explain(), TORCH_LOGS, and a report that survives AOTAutograd's cache."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import compile_affine

from .nets import ConvAffine

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_convnext_block_reports_its_one_layer_scale():
    """GELU's ``x * 0.5`` and ``x * 0.7071`` on the fc1 output used to be listed as four
    skipped sites ("linear output reused"): arithmetic inside another op is not a layer."""
    convnext = pytest.importorskip("timm.models.convnext")
    block = convnext.ConvNeXtBlock(16, ls_init_value=0.5)
    report = compile_affine.explain(block, torch.randn(2, 16, 16, 16))  # 8x the fc2 weight: folds by default
    (graph,) = report.graphs
    assert graph.training
    assert [(s.kind, s.producer, s.folded) for s in report.sites] == [("affine", "linear", True)]
    assert graph.summary() == f"{graph.graph_name}: 1 affine layer: 1 folded"
    # The honest count of what was left out: GELU's forward and backward arithmetic.
    assert graph.internal == {"aten.gelu": 2, "aten.gelu_backward": 2}


def test_a_block_without_affines_reports_none():
    convnext = pytest.importorskip("timm.models.convnext")
    block = convnext.ConvNeXtBlock(16, ls_init_value=None)  # ConvNeXt-V2 style: no LayerScale
    report = compile_affine.explain(block, torch.randn(2, 16, 8, 8))
    assert len(report) == 0 and report.folded == 0
    assert report.graphs[0].summary().endswith(": no affine layers")


class TwoAffines(torch.nn.Module):
    """One site that folds, one the cost rule declines (a 64x8x3x3 weight on a 2x64x8x8
    output, from a 2x3x12x12 input), and a GELU that is nobody's affine."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3)
        self.s = torch.nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.b = torch.nn.Conv2d(8, 64, 3, bias=False)
        self.t = torch.nn.Parameter(torch.rand(1, 64, 1, 1) + 0.5)

    def forward(self, x):
        return torch.nn.functional.gelu(self.b(torch.relu(self.a(x) * self.s)) * self.t)


def test_summary_says_why_in_user_terms(caplog):
    caplog.set_level(logging.INFO, logger="compile_affine")
    # The real backend at its defaults: fold="auto" and the cost rule.
    torch.compile(TwoAffines(), backend="compile_affine")(torch.randn(2, 3, 12, 12)).sum().backward()
    (graph,) = compile_affine.report().graphs
    line = f"{graph.graph_name}: 2 affine layers: 1 folded, 1 declined by cost (activation 1.78x the weight in bytes, under 3.5)"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [line]
    declined = [s for s in graph.sites if s.declined_by_cost]
    assert len(declined) == 1 and declined[0].reason.startswith("cost: activation 32768 < 3.5 x weight 18432 bytes")


def test_explain_leaves_the_callers_model_inputs_and_rng_alone():
    model = ConvAffine(4, 8)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    report = compile_affine.explain(model, x, options={"compile_affine": {"fold": "always"}})
    assert report.folded == 1 and report.graphs[0].training
    assert all(p.grad is None for p in model.parameters()) and x.grad is None
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    # Only this call's compiles are in its report; the global report has them too.
    assert len(compile_affine.report().graphs) == len(report.graphs)


def test_explain_under_no_grad_compiles_the_inference_graph():
    with torch.no_grad():
        report = compile_affine.explain(ConvAffine(4, 8), torch.randn(2, 4, 6, 6),
                                        options={"compile_affine": {"fold": "always"}})  # fmt: skip
    assert [(g.training, g.folded) for g in report.graphs] == [(False, 1)]


_SCRIPT = """
import json, torch, compile_affine
from tests.test_report import TwoAffines
torch.manual_seed(0)
m = torch.compile(TwoAffines(), backend="compile_affine")
m(torch.randn(2, 3, 12, 12)).sum().backward()
r = compile_affine.report()
print("REPORT " + json.dumps({
    "cache_hit": [g.cache_hit for g in r.graphs], "summaries": [g.summary() for g in r.graphs],
    "pass_ran": [g.pass_s > 0 for g in r.graphs],
    "sites": [[s.location, s.kind, s.producer, list(s.output_shape), s.folded, s.reason] for s in r.sites]}))
"""


def _run_process(cache_dir: pathlib.Path) -> tuple[dict, str]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO),
           "TORCH_LOGS": "+compile_affine"}  # fmt: skip
    env.pop("COMPILE_AFFINE", None)
    done = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("REPORT "))
    return json.loads(line[len("REPORT "):]), done.stderr


def test_second_process_on_a_warm_cache_reports_the_same_sites(tmp_path):
    """The second process is served by AOTAutograd's cache, so the pass does not run;
    its report must still list what folded, and why the rest did not."""
    first, first_log = _run_process(tmp_path)
    second, _ = _run_process(tmp_path)
    assert first["cache_hit"] == [False] and second["cache_hit"] == [True], (first, second)
    assert first["pass_ran"] == [True] and second["pass_ran"] == [False]  # no pass time on a hit
    assert second["sites"] == first["sites"] and len(first["sites"]) == 2
    assert second["summaries"] == [first["summaries"][0].replace("graph 0:", "graph 0 (from cache):")]
    # TORCH_LOGS="+compile_affine" turns on the per-site DEBUG lines, as for Inductor's logs.
    assert "test_report.py" in first_log and ": folded" in first_log


def test_a_cache_hit_without_records_says_so(monkeypatch):
    from compile_affine import record_store as records

    monkeypatch.setattr(records, "restore", lambda key: None)
    from torch._inductor.utils import fresh_cache

    caches = dict(fx_graph_cache=True)
    with fresh_cache(), torch._inductor.config.patch(caches), torch._functorch.config.patch(enable_autograd_cache=True):
        for _ in range(2):
            torch._dynamo.reset()
            torch.compile(ConvAffine(4, 8), backend="compile_affine")(torch.randn(2, 4, 6, 6)).sum().backward()
    first, second = compile_affine.report().graphs
    assert not first.cache_hit and second.cache_hit and not second.restored
    assert "no record of its sites was found" in second.summary()
