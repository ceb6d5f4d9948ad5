"""Affine forms users write: method calls, in-place, scalars, chains, shared scales.
(``torch.addcmul`` and division are not folded yet: they stay as stock Inductor runs them.)"""

import pytest
import torch
import torch.nn as nn

import compile_affine

from .helpers import ALWAYS, check_against_eager, pass_backend


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
    "shared scale": (lambda m, x: m.convs[0](x) * m.s1 + m.convs[1](x) * m.s1, 2),
}


@pytest.mark.parametrize("form", FORMS)
def test_form_folds_exactly(form):
    body, sites = FORMS[form]
    model = Form(body, convs=2 if form == "shared scale" else 1)
    check_against_eager(model, torch.randn(2, 4, 7, 7, requires_grad=True), pass_backend(ALWAYS))
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
