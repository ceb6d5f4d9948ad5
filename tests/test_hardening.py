"""Issue 13's hardening: training graphs with dynamic shapes and the cost policy for
them, concurrent compiles, and recognition that does not rest on names or identity."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_function
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table

import compile_affine
from compile_affine.passes import cost
from compile_affine.passes.fold import AffineFoldPass
from compile_affine.passes.mutations import graph_facts
from compile_affine.passes.sites import find_sites
from compile_affine.report import capture
from compile_affine.settings import Settings

from .helpers import ALWAYS, _boxed, count, joint_graph, pass_backend
from .nets import Chain, ConvAffine

aten = torch.ops.aten
MEMORY = Settings(fold="auto", objective="memory", strict=True)
"""The cost rule at the memory objective's 0.3, whose break-even batch these models are built around."""


def _train_and_compare(model, compiled, shapes, mark=None):
    """Each shape: forward and every parameter gradient against eager, float64.
    ``compiled`` is ``torch.compile(model)``: the two share parameters."""
    for shape in shapes:
        x = torch.randn(shape, dtype=torch.float64)
        if mark is not None:
            for dim in mark:
                torch._dynamo.mark_dynamic(x, dim)
        out_e, out_c = model(x), compiled(x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-10, atol=1e-12)
        g = torch.randn_like(out_e)
        params = [p for p in model.parameters()]
        grads_e = torch.autograd.grad(out_e, params, g)
        grads_c = torch.autograd.grad(out_c, params, g)
        for ge, gc in zip(grads_e, grads_c):
            torch.testing.assert_close(gc, ge, rtol=1e-10, atol=1e-12)


def _graphs_for(model_fn, settings, how, shapes):
    torch._dynamo.reset()
    compile_affine.reset()
    model = model_fn().double()
    compiled = torch.compile(model, backend=pass_backend(settings), dynamic=True if how == "dynamic=True" else None)
    _train_and_compare(model, compiled, shapes, mark=(0, 2, 3) if how == "mark_dynamic" and len(shapes[0]) == 4
                       else (0, 1) if how == "mark_dynamic" else None)  # fmt: skip
    return compile_affine.report().graphs


class TokenScale(torch.nn.Module):
    """LayerScale on tokens: ``linear(x) * gamma`` with x ``(B, T, C)``."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 6)
        self.gamma = torch.nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        return torch.tanh(self.fc(x) * self.gamma)


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
@pytest.mark.parametrize("model_fn,shapes,folds", [
    (Chain, [(2, 4, 12, 12), (3, 4, 9, 9), (5, 4, 15, 15)], 3),
    (TokenScale, [(2, 5, 8), (3, 7, 8), (4, 3, 8)], 1),
], ids=["conv chain", "linear"])  # fmt: skip
def test_training_with_dynamic_shapes_folds_without_recompiles(how, model_fn, shapes, folds):
    """Joint graphs with symbolic batch and spatial (token) sizes fold, stay exact, and
    the fold adds no recompile: as many graphs as with the pass folding nothing."""
    baseline = _graphs_for(model_fn, Settings(fold="never", strict=True), how, shapes)
    graphs = _graphs_for(model_fn, ALWAYS, how, shapes)
    assert len(graphs) == len(baseline), "fold decisions must not add guards that recompile"
    assert all(g.training for g in graphs)
    symbolic = [g for g in graphs if any(isinstance(d, str) for s in g.sites for d in s.output_shape)]
    assert symbolic, "no graph was traced with symbolic sizes"
    assert all(g.folded == folds for g in graphs)


class LateStage(torch.nn.Module):
    """A 64x64x3x3 conv (36864 weight elements) on a 4x4 map: 1024 output elements per
    sample. At ``objective="memory"``'s ratio 0.3, folding pays from batch 11 on."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.s = torch.nn.Parameter(torch.rand(1, 64, 1, 1) + 0.5)

    def forward(self, x):
        return torch.relu(self.conv(x) * self.s)


def test_dynamic_batch_is_costed_at_the_smallest_batch_the_graph_serves():
    """Traced at batch 32 with a dynamic batch, the graph also serves batch 2..10, where
    the fold would not pay: the decision is taken at batch 2 and declines. A static
    batch 32 folds. Batch 1 gets a graph of its own (Dynamo specializes it)."""
    model = LateStage().double()
    compiled = torch.compile(model, backend=pass_backend(MEMORY))
    _train_and_compare(model, compiled, [(32, 64, 4, 4)])
    (static,) = compile_affine.report().graphs
    assert static.folded == 1

    torch._dynamo.reset()
    compile_affine.reset()
    compiled = torch.compile(model, backend=pass_backend(MEMORY))
    _train_and_compare(model, compiled, [(32, 64, 4, 4), (1, 64, 4, 4)], mark=(0,))
    graphs = compile_affine.report().graphs
    assert len(graphs) == 2, [g.summary() for g in graphs]
    dynamic = graphs[0]
    assert dynamic.folded == 0 and dynamic.sites[0].declined_by_cost
    assert "activation 16384 <" in dynamic.sites[0].reason  # 2 x 64 x 4 x 4 float64 elements, in bytes
    assert graphs[1].sites[0].output_shape == (1, 64, 4, 4) and graphs[1].folded == 0


def test_mark_dynamic_min_raises_the_smallest_batch():
    """``mark_dynamic(x, 0, min=32)``: the guard allows no batch under 32, so the fold pays."""
    model = LateStage().double()
    compiled = torch.compile(model, backend=pass_backend(MEMORY))
    x = torch.randn(40, 64, 4, 4, dtype=torch.float64)
    torch._dynamo.mark_dynamic(x, 0, min=32, max=1024)
    torch.testing.assert_close(compiled(x), model(x))
    (graph,) = compile_affine.report().graphs
    assert isinstance(graph.sites[0].output_shape[0], str) and graph.folded == 1


def test_expanded_bmm_weight_is_costed_and_scaled_as_stored():
    """``bmm(x, W.t().expand(b, in, out))``: the fold scales the stored (in, out) weight
    and broadcasts it again, and the cost rule counts in*out weight elements, not b*in*out."""
    weight = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()

    def fn(x, weight, gamma):
        return torch.tanh(torch.bmm(x, weight.t().expand(x.shape[0], 8, 6)) * gamma)

    x = torch.randn(16, 5, 8, dtype=torch.float64)
    _, gm = joint_graph(fn, x, weight, gamma)
    (site,) = compile_affine.report().graphs[0].sites
    assert site.folded
    muls = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor and weight.shape[::-1] ==
            tuple(n.meta["val"].shape[-2:]) and n.meta["val"].ndim == 2]  # fmt: skip
    assert muls, "the stored (8, 6) weight is scaled"
    assert not [n for n in gm.graph.nodes if n.target is aten.mul.Tensor and tuple(n.meta["val"].shape) == (16, 8, 6)
                and n.meta.get("recompute")], "no batch-sized copy of the folded weight"  # fmt: skip
    # The cost rule sees the stored weight.
    _, unfolded = joint_graph(fn, x, weight, gamma, settings=Settings(fold="never", strict=True))
    (found,) = find_sites(unfolded, graph_facts(unfolded))
    assert cost.estimate(found, 0.5).weight_bytes == 48 * 8  # float64
    out_e = fn(x, weight, gamma)
    compiled = torch.compile(fn, backend=pass_backend(ALWAYS))
    out_c = compiled(x, weight, gamma)
    torch.testing.assert_close(out_c, out_e, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out_e)
    for a, b in zip(torch.autograd.grad(out_c, [weight, gamma], g), torch.autograd.grad(out_e, [weight, gamma], g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_two_models_compiled_on_two_threads_report_their_own_sites():
    results: dict[str, object] = {}

    def compile_and_run(name, model, x):
        try:
            with capture() as graphs:
                torch.compile(model, backend=pass_backend(ALWAYS))(x).sum().backward()
            results[name] = graphs
        except BaseException as e:  # surface it in the main thread
            results[name] = e

    threads = [
        threading.Thread(target=compile_and_run, args=("chain", Chain(), torch.randn(2, 4, 8, 8))),
        threading.Thread(target=compile_and_run, args=("linear", TokenScale(), torch.randn(2, 5, 8))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for name, graphs in results.items():
        assert not isinstance(graphs, BaseException), f"{name}: {graphs!r}"
    assert [(g.folded, len(g.sites)) for g in results["chain"]] == [(3, 3)]
    assert [(g.folded, {s.producer for s in g.sites}) for g in results["linear"]] == [(1, {"linear"})]
    assert sorted(g.folded for g in compile_affine.report().graphs) == [1, 3]


def _functional(model):
    """``model`` as a function of its input and parameters, as AOTAutograd traces it."""
    names = [n for n, _ in model.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(model, dict(zip(names, params)), (x,))

    return fn, list(model.parameters())


def test_find_sites_is_reentrant_across_threads():
    """The matcher is shared; what it finds must not leak between concurrent calls
    (a module-level list, cleared by one call while another ran, lost or mixed anchors)."""
    never = Settings(fold="never")
    (chain, p_chain), (tokens, p_tokens) = _functional(Chain()), _functional(TokenScale())
    graphs = [joint_graph(chain, torch.randn(2, 4, 6, 6), *p_chain, settings=never)[1],
              joint_graph(tokens, torch.randn(2, 3, 8), *p_tokens, settings=never)[1]]  # fmt: skip
    expected = [[s.anchor.name for s in find_sites(gm, graph_facts(gm))] for gm in graphs]
    assert expected[0] and expected[1] and expected[0] != expected[1]
    errors: list[str] = []

    def worker(i):
        for _ in range(30):
            got = [s.anchor.name for s in find_sites(graphs[i], graph_facts(graphs[i]))]
            if got != expected[i]:
                errors.append(f"graph {i}: {got} != {expected[i]}")

    threads = [threading.Thread(target=worker, args=(i % 2,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def _joint_with(edit, fn, *args, settings=ALWAYS, undo=None):
    """AOTAutograd's joint graph of ``fn``, changed by ``edit`` before our pass runs
    (and by ``undo`` after it, for the partitioner's sake)."""
    fold_pass = AffineFoldPass(settings)
    seen = {}

    def partition(joint: fx.GraphModule, inputs, **kwargs):
        edit(joint)
        fold_pass(joint.graph)
        seen["names"] = [n.name for n in joint.graph.nodes]
        if undo is not None:
            undo(joint)
        seen["gm"] = joint
        return min_cut_rematerialization_partition(joint, inputs, **kwargs)

    compiled = aot_function(fn, fw_compiler=_boxed, bw_compiler=_boxed, partition_fn=partition,
                            decompositions=select_decomp_table())  # fmt: skip
    return compiled(*args), seen


def test_backward_is_found_without_the_tangents_name():
    """AOTAutograd says which inputs are tangents (input descriptors, partitioner tags);
    the placeholder's name is not needed. (The partitioner itself still reads the name,
    so it is restored before partitioning.)"""
    fn, params = _functional(ConvAffine(4, 8))

    def rename(old, new):
        def edit(joint):
            for n in joint.graph.nodes:
                if n.op == "placeholder" and old in n.name:
                    n.target = n.name = n.name.replace(old, new)
            joint.recompile()
        return edit

    out, seen = _joint_with(rename("tangents", "upstream"), fn, torch.randn(2, 4, 6, 6), *params,
                            undo=rename("upstream", "tangents"))  # fmt: skip
    assert "upstream_1" in seen["names"] and not [n for n in seen["names"] if "tangents" in n]
    out.sum().backward()
    assert compile_affine.report().folded == 1
    assert count(seen["gm"], aten.convolution_backward.default) == 1
    assert not [n for n in seen["gm"].graph.nodes if n.target is aten.mul.Tensor
                and getattr(n.args[0], "target", None) is aten.convolution.default]  # fmt: skip


def test_a_scalar_scale_is_compared_by_value():
    """``y / 2.5``: autograd's ``div(g, 2.5)`` need not hold the same float object."""
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)

    def fresh_floats(joint):
        for n in joint.graph.nodes:
            if n.target is aten.div.Tensor and isinstance(n.args[1], float):
                n.args = (n.args[0], float(repr(n.args[1])))

    def fn(x, w, b):
        return torch.tanh(torch.nn.functional.conv2d(x, w, b) / 2.5)

    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    out, _ = _joint_with(fresh_floats, fn, x, w, b)
    assert compile_affine.report().folded == 1
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [w, b], g)
    want = torch.autograd.grad(fn(x, w, b), [w, b], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _ScaleReadingOutputInBackward(torch.autograd.Function):
    """``y * s`` whose backward reads ``y`` through an op the walk does not know, as a
    changed decomposition in a new torch could."""

    @staticmethod
    def forward(ctx, y, s):
        ctx.save_for_backward(y, s)
        return y * s

    @staticmethod
    def backward(ctx, g):
        y, s = ctx.saved_tensors
        return g * s, (g * torch.abs(y).neg().neg()).sum((0, 2, 3), keepdim=True)


def test_an_unknown_backward_form_has_its_own_reason():
    conv = torch.nn.Conv2d(4, 8, 3)
    s = torch.nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)

    def fn(x):
        return torch.relu(_ScaleReadingOutputInBackward.apply(conv(x), s))

    torch.compile(fn, backend=pass_backend(ALWAYS))(torch.randn(2, 4, 6, 6)).sum().backward()
    (site,) = compile_affine.report().sites
    assert not site.folded
    assert site.reason.startswith("backward form not recognised (aten.abs.default reads the conv2d output)"), site.reason
