"""Affine forms users write: method calls, in-place, division, addcmul, bare shifts,
scalars, chains, shared scales. (Linear-layer forms are in test_linear.py.)"""

import pytest
import torch
import torch.nn as nn

import compile_affine

from .helpers import ALWAYS, check_against_eager, pass_backend
from .nets import ConvAffine


class Form(nn.Module):
    def __init__(self, body, convs=1):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(4, 6, 3, padding=1) for _ in range(convs)])
        self.s1 = nn.Parameter(torch.rand(1, 6, 1, 1) + 0.5)
        self.t1 = nn.Parameter(torch.randn(1, 6, 1, 1))
        self.s2 = nn.Parameter(torch.rand(6) + 0.5)
        self.t2 = nn.Parameter(torch.randn(6, 1, 1))
        self.s0 = nn.Parameter(torch.tensor(1.3))
        self.body = body

    def forward(self, x):
        return torch.tanh(self.body(self, x))


FORMS = {
    "method calls": (lambda m, x: m.convs[0](x).mul(m.s1).add(m.t1), 1),
    "in-place": (lambda m, x: m.convs[0](x).mul_(m.s1).add_(m.t1), 1),
    "t + x * s": (lambda m, x: m.t1 + m.convs[0](x) * m.s1, 1),
    "python scalar": (lambda m, x: m.convs[0](x) * 0.7 + m.t1, 1),
    "0-d parameter": (lambda m, x: m.s0 * m.convs[0](x), 1),
    "(C,1,1) shift, (C,) viewed scale": (lambda m, x: m.convs[0](x) * m.s2.view(-1, 1, 1) - m.t2, 1),
    "chain": (lambda m, x: ((m.convs[0](x) * m.s1 + m.t1) * m.s2.view(-1, 1, 1)) - m.t2, 2),
    "chain of scales": (lambda m, x: m.convs[0](x) * m.s1 * m.s0 * 2.0, 3),
    "x / s": (lambda m, x: m.convs[0](x) / m.s1, 1),
    "x / python scalar": (lambda m, x: m.convs[0](x) / 3.0, 1),
    "addcmul(t, x, s)": (lambda m, x: torch.addcmul(m.t1, m.convs[0](x), m.s1), 1),
    "addcmul(t, s, x)": (lambda m, x: torch.addcmul(m.t2, m.s2.view(-1, 1, 1), m.convs[0](x)), 1),
    "x - t": (lambda m, x: m.convs[0](x) - m.t1, 1),
    "t + x": (lambda m, x: m.t2 + m.convs[0](x), 1),
    "issue chain ((x*s1 + t1) * s2) / s3 - t2": (
        lambda m, x: ((m.convs[0](x) * m.s1 + m.t1) * m.s2.view(-1, 1, 1)) / m.s0 - m.t2,
        3,
    ),
    "shared scale": (lambda m, x: m.convs[0](x) * m.s1 + m.convs[1](x) * m.s1, 2),
    # torch 2.11 writes Dropout(p=0) in training as a clone of the conv output
    "Dropout(0.0), then * s": (lambda m, x: torch.nn.functional.dropout(m.convs[0](x), 0.0) * m.s1, 1),
    "clone, then * s": (lambda m, x: m.convs[0](x).clone() * m.s1, 1),
    # a clone that changes the layout is not the conv's value as laid out: no site
    "channels_last clone, then * s": (lambda m, x: m.convs[0](x).clone(memory_format=torch.channels_last) * m.s1, 0),
}


@pytest.mark.parametrize("form", FORMS)
def test_form_folds_exactly(form):
    body, sites = FORMS[form]
    model = Form(body, convs=2 if form == "shared scale" else 1)
    assert check_against_eager(model, torch.randn(2, 4, 7, 7, requires_grad=True), pass_backend(ALWAYS)) == sites
    graph = compile_affine.report().graphs[0]
    assert [s.folded for s in graph.sites] == [True] * sites, [s.reason for s in graph.sites]


def test_chain_leaves_one_conv_and_no_multiply_on_activations():
    from .helpers import joint_graph

    def fn(x, w, s1, t1, s2):
        y = torch.nn.functional.conv2d(x, w)
        return torch.relu((y * s1.view(1, -1, 1, 1) + t1.view(1, -1, 1, 1)) * s2.view(1, -1, 1, 1))

    args = [torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)] + [torch.rand(4) + 0.5 for _ in range(3)]
    _, after = joint_graph(fn, *[a.requires_grad_(i > 0) for i, a in enumerate(args)])
    convs = [n for n in after.graph.nodes if n.target is torch.ops.aten.convolution.default]
    assert len(convs) == 1
    assert [u.target for u in convs[0].users] == [torch.ops.aten.relu.default]


def test_addcmul_with_a_per_sample_shift_folds_the_scale_and_adds_the_shift_back():
    class PerSampleShift(ConvAffine):
        def forward(self, x):
            return torch.addcmul(x.mean((1, 2, 3), keepdim=True), self.conv(x), self.scale)

    model = PerSampleShift(shift=False)
    assert check_against_eager(model, torch.randn(2, 4, 7, 7, requires_grad=True), pass_backend(ALWAYS)) == 1
    (site,) = compile_affine.report().graphs[0].sites
    assert site.folded


def test_residual_add_is_not_a_site():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x) + x)

    check_against_eager(Residual(), torch.randn(2, 4, 7, 7, requires_grad=True), pass_backend(ALWAYS))
    assert compile_affine.report().graphs[0].sites == []
