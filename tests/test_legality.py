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


# Mutated inputs, refused only where the fold would read what stock does not (issue 29).
# Every case runs the real backend in float64 against eager (or, where stock Inductor
# itself differs from eager, against stock): output, every gradient, buffers and the
# caller's input after the call.

D = torch.float64
REAL = {"compile_affine": {"fold": "always", "strict": True}}


class MutatingConv(torch.nn.Module):
    """``conv(x, w, b) * s + t`` with one in-place update somewhere (``how``); ``buffers``
    names the operands held as buffers (no grad) instead of parameters."""

    def __init__(self, how: str, buffers: tuple = (), c_in: int = 4, c: int = 6):
        super().__init__()
        self.how = how
        shapes = {"w": (c, c_in, 3, 3), "b": (c,), "s": (1, c, 1, 1), "t": (1, c, 1, 1)}
        for name, shape in shapes.items():
            value = torch.randn(shape, dtype=D)
            if name in buffers:
                self.register_buffer(name, value)
            else:
                setattr(self, name, torch.nn.Parameter(value))

    def forward(self, x):
        how = self.how
        if how == "inside":
            x = x * 2  # a non-leaf of the graph's own: no input is mutated at all
            x.relu_()
        elif how == "relu_":
            x.relu_()
        elif how == "mul_":
            x.mul_(2)
        elif how == "w.add_ under no_grad":
            with torch.no_grad():
                self.w.add_(0.1)
        elif how == "s.mul_":
            self.s.mul_(2)
        y = torch.nn.functional.conv2d(x, self.w, self.b, padding=1) * self.s + self.t
        if how == "t.add_ after use":
            self.t.add_(1)
        elif how == "x.mul_ after the conv":
            x.mul_(2)
        elif how == "x.data.mul_ after the conv":
            x.data.mul_(2)
        return y


def _run(model, x_grad: bool, backend=None, options=None):
    """One forward and backward of a copy of ``model`` (compiled when ``backend`` is given)
    on a fresh input: a non-leaf that requires grad (``x_grad``, the shape of a
    DDPOptimizer piece's input: the previous piece's activation), else a plain tensor.
    Returns the output, the input's and every parameter's gradient, the buffers and the
    caller's input after the call."""
    torch._dynamo.reset()
    model = copy.deepcopy(model)
    torch.manual_seed(1)
    leaf = torch.randn(2, 4, 7, 7, dtype=D, requires_grad=x_grad)
    x = leaf * 1.5 if x_grad else leaf
    fn = model if backend is None else torch.compile(model, backend=backend, options=options)
    out = fn(x)
    out.backward(torch.randn_like(out))
    return [out, leaf.grad, *(p.grad for p in model.parameters()), *model.buffers(), x]


def _assert_same(got, expected, what):
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        if b is None:
            assert a is None, f"{what} {i}: expected None"
        else:
            assert_close_rel(a.detach(), b.detach(), 1e-10, f"{what} {i}")


def _differential(model, x_grad, folded: bool, reference="eager", monkeypatch=None):
    """Compile with the fold and check the decision and every value. ``reference="stock"``
    compares with stock Inductor (``COMPILE_AFFINE=0``) where stock itself is not eager."""
    if reference == "stock":
        monkeypatch.setenv("COMPILE_AFFINE", "0")
        expected = _run(model, x_grad, "compile_affine")
        monkeypatch.setenv("COMPILE_AFFINE", "1")
        compile_affine.reset()
    else:
        expected = _run(model, x_grad)
    got = _run(model, x_grad, "compile_affine", REAL)
    _assert_same(got, expected, f"against {reference}")
    site = only_site()
    assert site.folded == folded, site.reason
    return site


@pytest.mark.parametrize("how, x_grad", [("relu_", True), ("relu_", False), ("mul_", True), ("mul_", False), ("inside", True)],
                         ids=["relu_ on a grad input", "relu_ on a no-grad input", "mul_ on a grad input",
                              "mul_ on a no-grad input", "relu_ on the graph's own non-leaf"])  # fmt: skip
def test_input_mutated_before_the_conv_folds(how, x_grad):
    """``conv(x.relu_()) * s + t``, x a graph input (a DDPOptimizer piece starts this way
    when the split falls before ``ReLU(inplace=True)``): the functionalized graph's conv
    reads the fresh value ``relu(x)``, and stock's ``convolution_backward`` reads that
    very node, as the folded backward does. The mutation reaches the caller's x after
    the forward (in the graph's ``copy_`` epilogue, or AOTAutograd's runtime epilogue for
    an input that requires grad) and never the saved value. ``mul_`` (not idempotent)
    shows the saved value is the fresh one, not the input recomputed after its update."""
    _differential(MutatingConv(how), x_grad, folded=True)


@pytest.mark.parametrize("how, buffers, reason", [
    ("w.add_ under no_grad", ("w",), "graph mutates weight"),
    ("w.add_ under no_grad", (), "graph mutates weight"),
    ("t.add_ after use", ("t",), "graph mutates shift"),
], ids=["buffer weight", "parameter weight", "shift buffer after use"])  # fmt: skip
def test_operand_mutated_in_place_is_refused(how, buffers, reason):
    """The folded backward reads W, s and b where stock's does not (W and s to recompute
    ``W * s``, b for the scale gradient's bias term), and the min-cut partitioner of
    torch 2.14 may save a mutated graph input and recompute what was computed from it
    in backward (see the next test). So an operand that is, views or is computed from
    a mutated input still refuses (a false positive costs a fold). With the rule switched
    off, both weight cases fold to wrong gradients and a wrong updated buffer (measured);
    the shift folds right (the fold reads t in the forward only): refusing it is the
    conservative rule's price, kept because a shift buffer is rarely updated in place."""
    site = _differential(MutatingConv(how, buffers), x_grad=True, folded=False)
    assert site.reason.startswith(reason), site.reason


def test_scale_buffer_mutated_before_use_is_refused(monkeypatch):
    """``self.s.mul_(2)`` on a buffer scale before it is used. Stock Inductor's gradients
    of w and b differ from eager's here (torch 2.14: the min-cut partitioner saves the
    buffer, which the graph's epilogue then updates, and recomputes ``s * 2`` from it in
    backward; upstream's fix stops it saving inputs mutated after the forward). The fold
    must leave exactly stock's graph: compared with stock."""
    site = _differential(MutatingConv("s.mul_", ("s",)), x_grad=True, folded=False, reference="stock",
                         monkeypatch=monkeypatch)  # fmt: skip
    assert site.reason.startswith("graph mutates scale"), site.reason


def test_conv_input_mutated_after_the_conv_is_an_error_as_in_eager():
    """``y = conv(x) * s + t; x.mul_(2)``: autograd saved x for the conv's backward, so
    eager raises at backward and the compile raises while tracing it. Nothing to fold."""
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _run(MutatingConv("x.mul_ after the conv"), x_grad=True)
    with pytest.raises(Exception, match="modified by an inplace operation"):
        _run(MutatingConv("x.mul_ after the conv"), x_grad=True, backend="compile_affine", options=REAL)


@pytest.mark.parametrize("x_grad", [False, True], ids=["no-grad input", "grad input"])
def test_conv_input_mutated_behind_autograd_after_the_conv(x_grad):
    """``y = conv(x) * s + t; x.data.mul_(2)``: autograd does not see the update, and
    eager's backward reads the updated x for the weight's gradient but the saved y for
    the scale's. The fold's scale gradient ``<gW', W>`` would read x there too, so this
    is a real hazard, decided from the functionalized graph:

    * a no-grad input: the conv and stock's ``convolution_backward`` read the input
      itself, which the graph's ``copy_`` epilogue updates before backward runs. Refused.
    * an input that requires grad: the conv reads a clone of it, and stock's
      ``convolution_backward`` reads the updated value, another node (as eager does).
      The fold computes its scale gradient from its own ``convolution_backward`` on the
      clone (the value eager's y came from) and leaves stock's in place: folds, and
      matches eager.

    With the rule switched off the no-grad case folds to a scale gradient 257x off
    eager's (measured): the refusal is needed."""
    site = _differential(MutatingConv("x.data.mul_ after the conv"), x_grad, folded=x_grad)
    if not x_grad:
        assert site.reason.startswith("graph mutates x"), site.reason


class MutatingLinear(torch.nn.Module):
    """``linear(x.relu_()) * gamma``: LayerScale on an input updated in place."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8).double()
        self.gamma = torch.nn.Parameter(torch.randn(8, dtype=D))

    def forward(self, x):
        x.relu_()
        return self.fc(x) * self.gamma


def test_linear_input_mutated_before_the_linear_folds():
    model = MutatingLinear()
    results = []
    for backend, options in ((None, None), ("compile_affine", REAL)):
        torch._dynamo.reset()
        m = copy.deepcopy(model)
        torch.manual_seed(1)
        leaf = torch.randn(3, 5, 8, dtype=D, requires_grad=True)
        x = leaf * 1.5
        out = (m if backend is None else torch.compile(m, backend=backend, options=options))(x)
        out.backward(torch.randn_like(out))
        results.append([out, leaf.grad, *(p.grad for p in m.parameters()), x])
    _assert_same(results[1], results[0], "against eager")
    assert only_site().folded, only_site().reason
