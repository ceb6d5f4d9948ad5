"""Regressions from the review of the eval-mode batch norm and report work: inputs that
crashed the pass, were reported wrongly, or were folded with a false reason."""

import json
import os
import sys

import pytest
import torch
import torch.nn as nn

import compile_affine
from compile_affine.settings import Settings

from .helpers import ALWAYS, Captured, check_against_eager, count, pass_backend
from .test_batchnorm import F64, randomize

aten = torch.ops.aten
AUTO = Settings(fold="auto", strict=True)


class TwiceOnOneOutput(nn.Module):
    """The same eval batch norm applied twice to one conv output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return torch.tanh(self.bn(y) + 2 * self.bn(y))


def test_one_output_normalised_twice_is_another_reader_not_a_crash():
    model = randomize(TwiceOnOneOutput()).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert check_against_eager(model, x, pass_backend(ALWAYS), **F64) == 0
    reasons = {s.reason for s in compile_affine.report().sites if s.kind == "batch_norm"}
    assert reasons == {"conv output reused"}
    assert not [g for g in compile_affine.report().graphs if g.fell_back]


class ScalarStatistics(nn.Module):
    """``(conv(x) - m) * rsqrt(v + eps)`` with 0-d ``m`` and ``v``: one value for all channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.register_buffer("m", torch.tensor(0.3))
        self.register_buffer("v", torch.tensor(1.7))

    def forward(self, x):
        return torch.tanh((self.conv(x) - self.m) * torch.rsqrt(self.v + 1e-5))


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_scalar_statistics_do_not_crash_the_pass(grad):
    model = ScalarStatistics().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    compiled = torch.compile(model, backend=pass_backend(ALWAYS))
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-12, atol=1e-12)
    graphs = compile_affine.report().graphs
    assert graphs and not [g for g in graphs if g.fell_back]
    # Refused with its reason (the rewrite needs one value per channel), not a crash.
    assert [(s.kind, s.folded, s.reason) for s in compile_affine.report().sites] == [
        ("batch_norm", False, "running mean is not one value per channel")]


def test_layer_norm_after_a_linear_is_not_a_batch_norm():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16))
    with torch.no_grad():
        torch.compile(model, backend=pass_backend(ALWAYS))(torch.randn(4, 8))
    assert [s for s in compile_affine.report().sites if s.kind == "batch_norm"] == []


class Siamese(nn.Module):
    """One eval batch norm module after two convs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.tanh(self.bn(self.a(x))) + torch.tanh(self.bn(self.b(x * 2)))


def test_a_batch_norm_shared_by_two_convs_folds_both_with_their_own_backward():
    """Each site's backward ``g * (invstd * w)`` is the one feeding its own conv's
    backward; the other conv's equal-valued multiply is not its to rewrite."""
    model = randomize(Siamese()).double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)  # 800 output elements per 108 weight: folds by default
    assert check_against_eager(model, x, pass_backend(AUTO), **F64) == 2
    assert all(s.folded for s in compile_affine.report().sites)
    torch._dynamo.reset()
    captured = Captured()
    torch.compile(model, backend=pass_backend(ALWAYS, captured))(x).sum().backward()
    assert count(captured.after[0], aten.convolution_backward.default) == 2


def test_the_shift_gradient_is_the_folded_conv_bias_gradient():
    """After an eval batch norm folds, the conv has a bias (``b_conv - rm``, scaled); its
    gradient is ``sum(g)``, the batch norm's own bias gradient too: the step computes it
    once. On CPU that is ``convolution_backward``'s bias output (inside the weight-gradient
    primitive, which reads ``g`` anyway), and the batch norm's separate ``sum(g)`` goes."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))).double()
    captured = Captured()
    torch.compile(model, backend=pass_backend(ALWAYS, captured))(torch.randn(2, 3, 6, 6, dtype=torch.float64)).sum().backward()
    (cb,) = [n for n in captured.after[0].graph.nodes if n.target is aten.convolution_backward.default]
    assert cb.args[-1] == [False, True, True]
    assert not [n for n in captured.after[0].graph.nodes
                if n.target is aten.sum.dim_IntList and sorted(n.args[1]) == [0, 2, 3]]  # fmt: skip
    assert compile_affine.report().folded == 1
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compile_affine.reset()
    assert check_against_eager(model, torch.randn(2, 3, 6, 6, dtype=torch.float64), pass_backend(ALWAYS), **F64) == 1


def test_records_key_covers_autocast():
    from compile_affine.backend import AffineFoldPass, records_key

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3)))
    args = (gm, [torch.randn(1, 3, 5, 5)], [AffineFoldPass(Settings())], {})
    plain = records_key(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert records_key(*args) != plain
    assert records_key(*args) == plain


def test_an_unreadable_kept_report_is_ignored(tmp_path, monkeypatch):
    from compile_affine import record_store as records

    monkeypatch.setattr(records, "_records_dir", lambda: str(tmp_path))
    (tmp_path / "k1.json").write_text(json.dumps([{"graph_name": "g", "training": True, "an_old_field": 1}]))
    (tmp_path / "k2.json").write_text("{not json")
    (tmp_path / "k3.json").write_text(json.dumps({"not": "a list"}))
    assert [records.restore(k) for k in ("k1", "k2", "k3", "missing")] == [None] * 4
    assert os.listdir(tmp_path)  # left in place; the next compile of that key rewrites it
