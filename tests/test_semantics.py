"""What the program can observe stays as stock Inductor gives it: which outputs share
memory, and, where nothing folds, the very graph Inductor compiles."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compile_affine
from compile_affine.passes.fold import AffineFoldPass
from compile_affine.settings import Settings

from .helpers import ALWAYS, alias_pattern, forward_graph, joint_graph, pass_backend, graph_text

NEVER = Settings(fold="never", strict=True)


class CloneView(torch.nn.Module):
    """``y, y.clone().view(-1)``: eager returns two storages; a second conv's affine
    gives the graph a site, so the pass runs its normalisations on it."""

    def __init__(self, with_site: bool):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(3, 4, 1)
        self.s = torch.nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)
        self.with_site = with_site

    def forward(self, x):
        y = self.conv(x)
        outs = (y, y.clone().view(-1))
        return (*outs, self.conv2(x) * self.s) if self.with_site else outs


def _compiled_outputs(model, x, options, grad: bool):
    compiled = torch.compile(model, backend="compile_affine", options=options)
    with torch.set_grad_enabled(grad):
        return compiled(x)


def _assert_apart(outs, what):
    a, b = outs[0], outs[1]
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr(), f"{what}: outputs share a storage"
    before = b.detach().clone()
    with torch.no_grad():
        a.zero_()
    assert torch.equal(b.detach(), before), f"{what}: writing one output changed the other"


def test_clone_of_a_conv_output_stays_a_copy():
    """The issue's case, through the real backend, in inference, training and with
    fold='never', with and without a site in the same graph."""
    x = torch.randn(2, 3, 6, 6)
    for with_site in (False, True):
        for grad in (False, True):
            for fold in ("auto", "always", "never"):
                torch._dynamo.reset()
                compile_affine.reset()
                outs = _compiled_outputs(CloneView(with_site), x, {"compile_affine": {"fold": fold, "strict": True}}, grad)
                _assert_apart(outs, f"site={with_site} grad={grad} fold={fold}")
                # The other conv's affine still folds: the kept clone costs no fold.
                folds = compile_affine.report().folded
                assert folds == (1 if with_site and fold != "never" else 0), (with_site, grad, fold, folds)


def _conv_clone(returns_view: bool):
    """torch 2.11's ``Dropout(p=0)`` in training is ``clone(conv)``; the affine after it is
    a site, and only there may the clone go (its reader, the multiply, makes a new tensor)."""

    def fn(x, w, s):
        c = torch.ops.aten.clone.default(F.conv2d(x, w, padding=1))
        return (c * s, c.view(-1)) if returns_view else c * s

    return fn


def test_clone_read_only_by_the_affine_is_dropped_and_one_read_through_a_view_is_kept():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    s = (torch.rand(1, 4, 1, 1) + 0.5).requires_grad_()
    for returns_view, folds in ((False, 1), (True, 0)):
        compile_affine.reset()
        _, after = joint_graph(_conv_clone(returns_view), x, w, s)
        clones = sum(1 for n in after.graph.nodes if n.target is torch.ops.aten.clone.default)
        assert compile_affine.report().folded == folds
        # Kept: the clone is both the affine's operand and a view's base, so the conv
        # output has a second reader and the site is refused for it, not folded wrongly.
        assert clones == (0 if folds else 1)


def _model_zoo():
    """Graphs with sites of every kind (conv, linear, eval batch norm, addcmul, a clone),
    as functions of their input and parameters ``(x, w, s, b, rm, rv)``."""
    w, b, rm, rv = torch.randn(4, 3, 3, 3), torch.randn(4), torch.randn(4), torch.rand(4) + 0.5
    s4, x4 = torch.rand(1, 4, 1, 1) + 0.5, torch.randn(2, 3, 6, 6)
    conv = lambda x, w, b=None: F.conv2d(x, w, b, padding=1)  # noqa: E731
    clone = _conv_clone(False)
    return [
        ("conv affine", lambda x, w, s, b, rm, rv: F.relu(conv(x, w, b) * s + 1.0)),
        ("eval batch norm", lambda x, w, s, b, rm, rv: F.relu(F.batch_norm(conv(x, w), rm, rv, s.view(-1), b))),
        ("addcmul", lambda x, w, s, b, rm, rv: torch.addcmul(s, conv(x, w), s)),
        ("clone then affine", lambda x, w, s, b, rm, rv: clone(x, w, s)),
        ("linear layer scale", lambda x, w, s, b, rm, rv: F.linear(x.flatten(1)[:, :27], w.flatten(1)) * b),
        ("nothing to fold", lambda x, w, s, b, rm, rv: F.relu(conv(x, w)) * s.sum()),
    ], (x4, w, s4, b, rm, rv)


def _grad(args):
    # Buffers (the batch norm's statistics) take no gradient.
    return [a.detach().clone().requires_grad_(i < 4) for i, a in enumerate(args)]


def test_fold_never_leaves_every_graph_exactly_as_it_came():
    """Only the report is written: the graph code after the pass equals the input's."""
    cases, args = _model_zoo()
    for name, fn in cases:
        for inference in (False, True):
            compile_affine.reset()
            trace = forward_graph if inference else joint_graph
            before, after = trace(fn, *(args if inference else _grad(args)), settings=NEVER)
            assert graph_text(after) == before, f"{name} (inference={inference}): fold='never' changed the graph"
            assert compile_affine.report().folded == 0


def test_a_graph_whose_sites_all_stay_is_left_untouched():
    """Normalising (a batch norm into the generic form, a clone dropped) serves a fold; a
    graph where every site is declined keeps its nodes, and their rounding."""
    declined = Settings(min_activation_ratio=1e9, strict=True)
    cases, args = _model_zoo()
    for name, fn in cases:
        compile_affine.reset()
        before, after = joint_graph(fn, *_grad(args), settings=declined)
        assert compile_affine.report().folded == 0
        assert graph_text(after) == before, f"{name}: a graph with no fold was changed"


def test_enabled_false_never_installs_the_pass(monkeypatch):
    calls = []
    monkeypatch.setattr(AffineFoldPass, "__call__", lambda self, graph: calls.append(graph))
    model = CloneView(with_site=True)
    torch.compile(model, backend="compile_affine", options={"compile_affine": {"enabled": False}})(torch.randn(1, 3, 4, 4))
    assert calls == [] and compile_affine.report().graphs == []


# --- the aliasing property ----------------------------------------------------------------


class Outputs(torch.nn.Module):
    """A conv with a foldable affine, whose output (or a clone of it, the base) also
    leaves the graph as itself, as views, or feeds an in-place op, in any combination."""

    def __init__(self, plan):
        super().__init__()
        self.plan = plan
        self.conv = torch.nn.Conv2d(2, 3, 1)
        self.other = torch.nn.Conv2d(2, 3, 1)
        self.s = torch.nn.Parameter(torch.rand(1, 3, 1, 1) + 0.5)

    def forward(self, x):
        y = self.conv(x)
        base = torch.ops.aten.clone.default(y) if self.plan["clone"] else y
        # Another site that always folds, so the graph is rewritten whatever this one does.
        outs = [base * self.s, self.other(x) * self.s]
        for how in self.plan["extra"]:
            if how == "conv":
                outs.append(y)
            elif how == "self":
                outs.append(base)
            elif how == "view":
                outs.append(base.view(-1))
            elif how == "transpose":
                outs.append(base.transpose(2, 3))
            elif how == "clone_view":
                outs.append(base.clone().view(-1))
            elif how == "inplace":
                outs.append(base.clone().add_(1.0))
        return tuple(outs)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.fixed_dictionaries({
    "clone": st.booleans(),
    "extra": st.lists(st.sampled_from(["conv", "self", "view", "transpose", "clone_view", "inplace"]), max_size=3),
    "grad": st.booleans(),
}))  # fmt: skip
def test_fuzz_outputs_alias_as_in_eager(plan):
    """Clones, views and several outputs: the compiled outputs share storage exactly
    where eager's do, and hold eager's values."""
    torch._dynamo.reset()
    model = Outputs(plan)
    x = torch.randn(2, 2, 3, 3)
    with torch.set_grad_enabled(plan["grad"]):
        eager = model(x)
        compiled = torch.compile(model, backend=pass_backend(ALWAYS))(x)
    assert alias_pattern(compiled, x) == alias_pattern(eager, x)
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e)


def test_the_pass_uuid_hashes_every_module_the_pass_imports():
    """A source that shapes the rewrite but is missing from the uuid lets the FX graph
    cache serve a graph an older pass emitted. Every package module loaded by importing
    the pass (``_compat`` among them) must be hashed."""
    import json
    import pathlib
    import subprocess
    import sys

    code = ("import json, sys; import compile_affine.passes.fold as f; "
            "print(json.dumps([m.__file__ for n, m in sys.modules.items() if n.startswith('compile_affine')]))")  # fmt: skip
    root = str(pathlib.Path(compile_affine.__file__).parent.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    loaded = {str(pathlib.Path(p).resolve()) for p in json.loads(out.stdout.strip().splitlines()[-1])}
    from compile_affine.passes.fold import _SOURCES

    assert any(p.endswith("compile_affine/_compat.py") for p in loaded)
    assert loaded <= set(_SOURCES), sorted(loaded - set(_SOURCES))
