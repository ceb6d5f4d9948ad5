"""Shared test tools: a fast harness that runs our pass under AOTAutograd with
Inductor's decompositions but executes the graphs eagerly (no C++ compile), graph
capture and formatting, and numeric comparison helpers."""

from __future__ import annotations

import copy
import re
from typing import Callable

import torch
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import aot_function, make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table

import compile_affine
from compile_affine.passes.fold import AffineFoldPass
from compile_affine.settings import Settings

ALWAYS = Settings(fold="always", strict=True)


class Captured:
    """The graphs our pass saw, before and after it ran."""

    def __init__(self):
        self.before: list[str] = []
        self.after: list[fx.GraphModule] = []


def _pass_runner(settings: Settings, captured: Captured | None):
    fold_pass = AffineFoldPass(settings)

    def run(gm: fx.GraphModule) -> fx.GraphModule:
        if captured is not None:
            captured.before.append(graph_text(gm))
        fold_pass(gm.graph)
        if captured is not None:
            captured.after.append(gm)
        return gm

    return run


def _boxed(gm: fx.GraphModule, _inputs):
    return make_boxed_func(gm)


def pass_backend(settings: Settings = ALWAYS, captured: Captured | None = None):
    """A Dynamo backend equivalent to ours for the graph-level work: the same
    decompositions, the pass on the joint graph (training) or forward graph
    (inference), the same min-cut partitioner, but graphs run as plain FX."""
    run = _pass_runner(settings, captured)

    def partition(joint, joint_inputs, **kwargs):
        return min_cut_rematerialization_partition(run(joint), joint_inputs, **kwargs)

    return aot_autograd(
        fw_compiler=_boxed,
        bw_compiler=_boxed,
        inference_compiler=lambda gm, inputs: make_boxed_func(run(gm)),
        partition_fn=partition,
        decompositions=select_decomp_table(),
    )


def joint_graph(fn: Callable, *args, settings: Settings = ALWAYS) -> tuple[str, fx.GraphModule]:
    """Trace ``fn`` with AOTAutograd (no Dynamo) and run the pass on its joint graph."""
    captured = Captured()
    run = _pass_runner(settings, captured)
    compiled = aot_function(
        fn,
        fw_compiler=_boxed,
        bw_compiler=_boxed,
        partition_fn=lambda joint, inputs, **kw: min_cut_rematerialization_partition(run(joint), inputs, **kw),
        decompositions=select_decomp_table(),
    )
    compiled(*args)
    return captured.before[0], captured.after[0]


def forward_graph(fn: Callable, *args, settings: Settings = ALWAYS) -> tuple[str, fx.GraphModule]:
    captured = Captured()
    run = _pass_runner(settings, captured)
    with torch.no_grad():
        aot_function(fn, fw_compiler=lambda gm, inputs: run(gm), decompositions=select_decomp_table())(*args)
    return captured.before[0], captured.after[0]


_SHORT = re.compile(r"^(aten|prims)\.")


def graph_text(gm: fx.GraphModule) -> str:
    """One line per op, ``name = op(args)``: stable text for expect-tests."""
    lines = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            lines.append(f"return {fx.node.map_arg(n.args[0], lambda a: a.name)}")
            continue
        target = _SHORT.sub("", str(n.target).replace("torch.ops.", "").replace("<built-in function getitem>", "getitem"))
        target = target.removesuffix(".default")
        args = ", ".join(str(fx.node.map_arg(a, lambda a: a.name)) for a in n.args)
        kwargs = "".join(f", {k}={v}" for k, v in n.kwargs.items())
        lines.append(f"{n.name} = {target}({args}{kwargs})")
    return "\n".join(lines)


def count(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is target)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def assert_close_rel(actual, expected, tol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def check_against_eager(
    model: torch.nn.Module,
    x: torch.Tensor,
    backend,
    *,
    steps: int = 3,
    out_tol: float = 1e-5,
    grad_tol: float = 1e-4,
    lr: float = 0.1,
) -> None:
    """Forward, every gradient (inputs included), then parameters after ``steps`` SGD steps."""
    eager, compiled_model = model, copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend=backend)
    x_e = x.detach().clone().requires_grad_(x.requires_grad)
    x_c = x.detach().clone().requires_grad_(x.requires_grad)
    out_e, out_c = eager(x_e), compiled(x_c)
    assert_close_rel(out_c, out_e, out_tol, "forward")
    grad_out = torch.randn_like(out_e)
    out_e.backward(grad_out)
    out_c.backward(grad_out)
    if x.requires_grad:
        assert_close_rel(x_c.grad, x_e.grad, grad_tol, "grad input")
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
        if p_e.grad is None:
            assert p_c.grad is None, f"grad {name}: eager has none"
        else:
            assert_close_rel(p_c.grad, p_e.grad, grad_tol, f"grad {name}")
    if not any(p.requires_grad for p in eager.parameters()):
        return
    opt_e = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=lr)
    opt_c = torch.optim.SGD([p for p in compiled_model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        for opt, m, xx in ((opt_e, eager, x_e), (opt_c, compiled, x_c)):
            opt.zero_grad()
            m(xx.detach()).square().mean().backward()
            opt.step()
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
        assert_close_rel(p_c, p_e, grad_tol, f"param {name} after {steps} steps")


def check_autocast(reference: torch.nn.Module, x: torch.Tensor, backend, dtype: torch.dtype, tol: float) -> None:
    """Under CPU autocast: the compiled model keeps eager's (promoted, fp32) result dtype,
    and its output and every parameter gradient stay within ``tol`` of the fp32 model."""
    model = copy.deepcopy(reference)
    with torch.autocast("cpu", dtype=dtype):
        out = torch.compile(model, backend=backend)(x)
        eager = copy.deepcopy(reference)(x)
    ref = reference(x)
    assert out.dtype == eager.dtype == torch.float32
    assert_close_rel(out, ref, tol, "forward")
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        if p_ref.grad is not None:
            assert p.grad.dtype == torch.float32
            assert_close_rel(p.grad, p_ref.grad, tol, f"grad {name}")


def compare_gradients(out_c: torch.Tensor, out_e: torch.Tensor, inputs: list[torch.Tensor], tol: float) -> None:
    """Every gradient of ``inputs``, compiled against eager, for one random output gradient."""
    g = torch.randn_like(out_e)
    grads_c = torch.autograd.grad(out_c, inputs, g, allow_unused=True)
    grads_e = torch.autograd.grad(out_e, inputs, g, allow_unused=True)
    for gc, ge in zip(grads_c, grads_e):
        if ge is None:
            assert gc is None
        else:
            assert_close_rel(gc, ge, tol, "gradient")


def folded_sites() -> int:
    return compile_affine.report().folded
