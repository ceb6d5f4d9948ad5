"""Sites that must not fold: each legality rule leaves the graph alone, says why in
the report, and the results stay exact."""

import copy

import pytest
import torch

import compile_affine
from compile_affine.passes import legality

from .helpers import ALWAYS, assert_close_rel, assert_grads_close, check_against_eager, pass_backend
from .nets import ConvAffine, PerSampleScale, SqueezeExcite, WithExtraUser, WithScale


def only_site():
    (site,) = compile_affine.report().graphs[0].sites
    return site


CASES = {
    "extra user": (WithExtraUser, "conv output reused"),
    "spatial scale": (lambda: WithScale(torch.rand(1, 1, 8, 8)), "scale varies along spatial dim 2"),
    "(W,) scale with W == C": (lambda: WithScale(torch.rand(8)), "scale varies along spatial dim 3"),
    "scale adds a leading dim": (lambda: WithScale(torch.rand(3, 1, 8, 1, 1)), "scale has more dims than the conv output"),
    "promotes to float64": (lambda: WithScale(torch.rand(1, 8, 1, 1, dtype=torch.float64)), "fold would change result dtype"),
}


@pytest.mark.parametrize("case", CASES)
def test_illegal_site_is_left_alone(case):
    make, reason = CASES[case]
    model = make()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    assert check_against_eager(model, x, pass_backend(ALWAYS), out_tol=1e-6, grad_tol=1e-6) == 0
    site = only_site()
    assert not site.folded
    assert site.reason.startswith(reason), site.reason


GATES = {
    "squeeze-excite": SqueezeExcite,
    "per-sample scale": PerSampleScale,
    "per-sample (N,C,1,1) parameter": lambda: WithScale(torch.rand(2, 8, 1, 1)),
}


@pytest.mark.parametrize("case", GATES)
def test_a_scale_varying_per_sample_is_a_gate_not_a_site(case):
    """Not an affine layer (one value per channel): counted as a gate, left alone, not listed."""
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    assert check_against_eager(GATES[case](), x, pass_backend(ALWAYS), out_tol=1e-6, grad_tol=1e-6) == 0
    graph = compile_affine.report().graphs[0]  # the SGD steps' detached input compiles a second
    assert graph.sites == [] and graph.not_affine == {"per-sample gate or mask": 1}


def test_illegal_shift_keeps_the_add_but_folds_the_multiply():
    class PerSampleShift(ConvAffine):
        def forward(self, x):
            return torch.relu(self.conv(x) * self.scale + x.mean((1, 2, 3), keepdim=True))

    assert check_against_eager(PerSampleShift(), torch.randn(2, 4, 8, 8, requires_grad=True), pass_backend(ALWAYS)) == 1
    assert only_site().folded


def test_shared_conv_output_in_inference_is_left_alone():
    model = WithExtraUser()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=pass_backend(ALWAYS))(x), model(x), rtol=0, atol=0)
    assert only_site().reason == "conv output reused"


def test_every_rule_has_a_reason_string():
    # The report can only explain a skip if every rule speaks; this pins the list.
    assert [r.__name__ for r in legality.RULES] == [
        "graph_supported",
        "has_metadata",
        "producer_reaches_scale",
        "bias_per_feature",
        "output_not_reused",
        "backward_recognised",
        "inputs_not_mutated",
        "scale_per_channel",
        "scale_independent_of_output",
        "result_unchanged",
        "gradient_not_from_scatter",
    ]


# Regressions found in review: each once produced a wrong gradient or a crash.


def test_twin_conv_backward_is_not_taken_over():
    """Two convs share x, W, config and scale; only the second's bias needs grad. The
    first site must not rewrite the second conv's backward as if it were its own."""

    def f(x, w, b1, b2, s):
        y1 = torch.nn.functional.conv2d(x, w, b1, padding=1) * s
        y2 = torch.nn.functional.conv2d(x, w, b2, padding=1) * s
        return torch.cat([y1, y2], 1)

    d = torch.float64
    x, w, b1 = torch.randn(2, 4, 7, 7, dtype=d), torch.randn(6, 4, 3, 3, dtype=d), torch.randn(6, dtype=d)
    b2 = torch.randn(6, dtype=d, requires_grad=True)
    s = torch.randn(1, 6, 1, 1, dtype=d, requires_grad=True)
    g = torch.randn(2, 12, 7, 7, dtype=d)
    ref = torch.autograd.grad(f(x, w, b1, b2, s), (b2, s), g)
    got = torch.autograd.grad(torch.compile(f, backend=pass_backend(ALWAYS))(x, w, b1, b2, s), (b2, s), g)
    for a, b in zip(got, ref, strict=True):
        assert_close_rel(a, b, 1e-10, "gradient")
    # Each site folds its own conv (the harness checks the graph changed).
    assert [site.folded for site in compile_affine.report().sites] == [True, True]


def test_shift_that_is_another_sites_output():
    """Site B's shift is site A's output: folding A first must not leave B holding A's erased node."""
    c = 6

    def f(x, w, b, s, w_se, s_se):
        p = x.mean((2, 3), keepdim=True)[:, :1].expand(1, c, 1, 1).contiguous()
        t = torch.nn.functional.conv2d(p, w_se, groups=c) * s_se
        return torch.nn.functional.conv2d(x, w, b, padding=1) * s + t

    args = [torch.randn(1, 4, 7, 7), torch.randn(c, 4, 3, 3), torch.randn(c), torch.randn(1, c, 1, 1),
            torch.randn(c, 1, 1, 1), torch.randn(c, 1, 1)]  # fmt: skip
    with torch.no_grad():
        out = torch.compile(f, backend=pass_backend(ALWAYS))(*args)
    assert_close_rel(out, f(*args), 1e-5, "forward")
    assert [s.folded for s in compile_affine.report().sites] == [True, True]


class UpdatesItsBias(torch.nn.Module):
    """Uses a bias buffer (or a value computed from it), then updates the buffer in place."""

    def __init__(self, update, bias=lambda b: b):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 4, 3, 3))
        self.register_buffer("b", torch.randn(6))
        self.s = torch.nn.Parameter(torch.randn(1, 6, 1, 1))
        self.update, self.bias = update, bias

    def forward(self, x):
        out = torch.nn.functional.conv2d(x, self.w, self.bias(self.b), padding=1) * self.s
        self.update(self.b)
        return out


def _refused_and_exact(model, x):
    """Compile with the real backend (the silent failure was Inductor's), compare with eager:
    output, every gradient, the mutated buffer and the caller's input."""
    reference, x_ref = copy.deepcopy(model), x.clone()
    out_ref = reference(x_ref)
    out_ref.sum().backward()
    opts = {"compile_affine": {"fold": "always", "strict": True}}
    out = torch.compile(model, backend="compile_affine", options=opts)(x)
    out.sum().backward()
    assert_close_rel(out, out_ref, 1e-5, "forward")
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert_grads_close(p.grad, p_ref.grad, 1e-4, f"grad {name}")
    for (name, b), b_ref in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, rtol=0, atol=0, msg=lambda m: f"buffer {name}: {m}")
    torch.testing.assert_close(x, x_ref, rtol=0, atol=0)  # in-place updates of the caller's tensors, as in eager
    site = only_site()
    assert not site.folded
    return site.reason


def _augmented(b):
    b += 1.0


UPDATES = {
    "add_": lambda b: b.add_(1.0),
    "+=": _augmented,
    "copy_ of a view": lambda b: b.view(2, 3)[0].copy_(torch.ones(3)),
    "aten.add_": lambda b: torch.ops.aten.add_.Tensor(b, 1.0),
    "foreach": lambda b: torch._foreach_add_([b], 1.0),
    ".data": lambda b: b.data.add_(1.0),
    "contiguous": lambda b: b.contiguous().add_(1.0),
}


@pytest.mark.parametrize("update", UPDATES)
def test_mutated_buffer_is_not_needed_by_backward(update):
    """The folded backward needs b; a graph that then updates b in place must not fold
    (with real Inductor the backward silently read the updated b)."""
    model = UpdatesItsBias(UPDATES[update])
    before = model.b.clone()
    reason = _refused_and_exact(model, torch.randn(2, 4, 7, 7))
    assert reason.startswith("graph mutates bias"), reason
    assert not torch.equal(model.b, before), "the compiled model did not update its buffer"


@pytest.mark.parametrize("bias", [lambda b: b * 2, lambda b: b[:]], ids=["computed", "view"])
def test_operand_derived_from_a_mutated_input_is_refused(bias):
    _refused_and_exact(UpdatesItsBias(UPDATES["add_"], bias), torch.randn(2, 4, 7, 7))


def test_inplace_relu_on_a_no_grad_input_is_respected():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
            self.s = torch.nn.Parameter(torch.randn(1, 4, 1, 1))
            self.act = torch.nn.ReLU(inplace=True)

        def forward(self, x):
            return self.conv(x) * self.s + self.act(x)

    _refused_and_exact(M(), torch.randn(2, 4, 7, 7))


def test_effectful_graph_is_not_folded():
    def f(x, w, s):
        torch.ops.aten._print.default("step")
        return torch.nn.functional.conv2d(x, w, padding=1) * s

    # (Stock Inductor itself mis-schedules this tiny graph, so this runs the pass only.)
    args = [torch.randn(2, 4, 7, 7), torch.randn(6, 4, 3, 3, requires_grad=True), torch.randn(1, 6, 1, 1, requires_grad=True)]
    torch.compile(f, backend=pass_backend(ALWAYS))(*args).sum().backward()
    assert only_site().reason.startswith("graph has effectful ops")
