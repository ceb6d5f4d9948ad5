"""What counts as an affine layer, and how the report counts them: gates, masks and
residual adds are not layers; a training-mode batch norm is called that; a layer is
counted once however many graphs compile it; a shared batch norm folds at each producer."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import compile_affine
from compile_affine.settings import Settings

from .helpers import ALWAYS, check_against_eager, joint_graph, pass_backend
from .test_batchnorm import F64, randomize

AUTO = Settings(fold="auto", min_activation_ratio=0.0, strict=True)


def _graph_record():
    graphs = compile_affine.report().graphs
    assert len(graphs) == 1
    return graphs[0]


def test_caformer_residual_scales_are_residual_adds_not_refused_sites():
    """timm's MetaFormer: ``res_scale(x) + mlp(norm(x))`` scales the residual stream, which
    the MLP's last linear feeds through an add. The issue: 0 of 22 folded, 'bias varies
    per sample'."""
    metaformer = pytest.importorskip("timm.models.metaformer")
    # caformer_s18's layout (conv mixers, then attention), one block per stage, narrow.
    m = metaformer
    model = m.MetaFormer(depths=(1, 1, 1, 1), dims=(8, 16, 32, 32), num_classes=4,
                         token_mixers=[m.SepConv, m.SepConv, m.Attention, m.Attention],
                         norm_layers=[m.LayerNorm2dNoBias] * 2 + [m.LayerNormNoBias] * 2)  # fmt: skip
    x = torch.randn(1, 3, 64, 64)
    torch.compile(model, backend=pass_backend(ALWAYS))(x).sum().backward()
    record = _graph_record()
    assert record.sites == [] and record.not_affine == {"residual add": 3}, record.summary()
    assert record.summary() == f"{record.graph_name}: no affine layers; 3 residual adds: not affine layers"


class GatedBlock(nn.Module):
    """A conv with a layer scale, a squeeze-excitation gate and a drop-path mask."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import SqueezeExcitation, StochasticDepth

        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.se = SqueezeExcitation(4, 2)
        self.drop = StochasticDepth(0.5, "row")

    def forward(self, x):
        y = self.gamma * self.conv(x)  # a layer scale: folds
        y = self.drop(self.conv2(y))  # a mask: not a layer
        return self.se(self.conv3(y)) + x  # a gate: not a layer


def test_gates_and_masks_are_counted_not_listed():
    torch.manual_seed(1)
    model = GatedBlock().train()
    x = torch.randn(4, 4, 6, 6)
    torch.compile(model, backend=pass_backend(ALWAYS))(x).sum().backward()
    record = _graph_record()
    assert [(s.kind, s.folded) for s in record.sites] == [("affine", True)]
    assert record.not_affine == {"per-sample gate or mask": 2}, record.summary()
    assert "2 per-sample gates or masks: not affine layers" in record.summary()


def test_training_mode_batch_norms_are_called_that():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    torch.compile(model, backend=pass_backend(ALWAYS))(torch.randn(2, 3, 6, 6)).sum().backward()
    record = _graph_record()
    assert record.sites == [] and record.not_affine == {"training-mode batch norm": 1}
    summary = record.summary()
    assert "eval-mode" not in summary and "1 training-mode batch norm: not affine layers" in summary


class ScaledConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 3, 1) for _ in range(4))
        self.s = nn.Parameter(torch.rand(1, 3, 1, 1) + 0.5)

    def forward(self, x):
        for conv in self.convs:
            x = conv(x) * self.s  # one source line, four layers
        return x


def test_a_layer_is_counted_once_across_graphs():
    """Four layers on one source line (a loop over modules) are four; compiling them
    again (a recompile for a new shape, an inference graph) adds graphs, not layers."""
    model = ScaledConv()
    compiled = torch.compile(model, backend=pass_backend(ALWAYS), dynamic=False)
    compiled(torch.randn(2, 3, 4, 4)).sum().backward()
    compiled(torch.randn(2, 3, 5, 5)).sum().backward()
    with torch.no_grad():
        compiled(torch.randn(2, 3, 4, 4))
    report = compile_affine.report()
    assert report.folded == 12  # per graph: 3 graphs x 4 sites
    assert len(report.layers()) == 4
    assert report.summary() == ("4 affine layers: 4 folded, 0 not folded, across 3 graphs "
                                "(2 of them compile layers compiled before: recompiles or another mode)")  # fmt: skip
    assert report.summary() in str(report)


class SharedNorm1d(nn.Module):
    """The issue's case: one BatchNorm1d after two linears."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(5, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return torch.tanh(self.bn(self.a(x))) + torch.tanh(self.bn(self.b(2 * x)))


class SharedNorm3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv3d(2, 3, 1), nn.Conv3d(2, 3, 1)
        self.bn = nn.BatchNorm3d(3)

    def forward(self, x):
        return torch.tanh(self.bn(self.a(x))) + torch.tanh(self.bn(self.b(2 * x)))


@pytest.mark.parametrize("net, shape", [(SharedNorm1d, (6, 5)), (SharedNorm3d, (2, 2, 3, 3, 3))], ids=["linear", "conv3d"])
def test_a_batch_norm_shared_by_two_producers_folds_at_each(net, shape):
    model = randomize(net()).double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    x = torch.randn(*shape, dtype=torch.float64)
    assert check_against_eager(model, x, pass_backend(AUTO), **F64) == 2
    assert all(s.folded for s in compile_affine.report().sites)


def test_inf_times_zero_folds_to_zero_where_eager_gives_nan():
    """Pinned: a conv output that overflows to inf, scaled by 0, is NaN in eager and 0
    after the fold (the weight is scaled first). Inductor's own constant folding does the
    same to ``x * 0`` (docs/design.md, "What the fold may change")."""
    x = torch.full((1, 1, 2, 2), 1e30)
    w = torch.full((2, 1, 1, 1), 1e30, requires_grad=True)
    s = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).requires_grad_()

    def fn(x, w, s):
        return torch.nn.functional.conv2d(x, w) * s

    eager = fn(x, w, s)
    assert eager[0, 0].isnan().all() and eager[0, 1].isinf().all()
    _, after = joint_graph(fn, x, w, s)
    assert compile_affine.report().folded == 1
    compiled = torch.compile(fn, backend=pass_backend(ALWAYS))(x, w, s)
    assert (compiled[0, 0] == 0).all() and compiled[0, 1].isinf().all()
