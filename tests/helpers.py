"""Shared test tools: a fast harness that runs our pass under AOTAutograd with
Inductor's decompositions but executes the graphs eagerly (no C++ compile), graph
capture and formatting, numeric comparison helpers and the device parametrization."""

from __future__ import annotations

import copy
import re
from typing import Callable

import pytest
import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_function, make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table

import compile_affine
from compile_affine.bench.core.runner import fx_backend
from compile_affine.passes.fold import AffineFoldPass
from compile_affine.settings import Settings, env_enabled

ALWAYS = Settings(fold="always", strict=True)

# One skip reason for every cuda variant; the ids carry the device so ``pytest -k cuda``
# selects exactly the cuda variants (the GPU check runs that).
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")),
]
on_devices = pytest.mark.parametrize("device", DEVICES)


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
        # As the backend does (settings.split_options): COMPILE_AFFINE=0 leaves every graph
        # to stock code, so switching the pass off makes the fold counts fail loudly.
        # (conftest checks that a graph the report calls folded did change.)
        if settings.enabled and env_enabled():
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
    (inference), the same min-cut partitioner, but graphs run as plain FX (the
    benchmark's ``fx_backend``, with this harness's capture, switch and aliasing guard)."""
    compile_graph = fx_backend(run=_pass_runner(settings, captured))

    def backend(gm: fx.GraphModule, example_inputs):
        return _aliasing_checked(gm, compile_graph(gm, example_inputs))

    return backend


def _aliasing_checked(gm: fx.GraphModule, compiled: Callable) -> Callable:
    """The harness-wide aliasing guard: every call's outputs share storage with each other
    and with the inputs exactly as the Dynamo graph's do when run eagerly (which is what
    stock Inductor keeps). The eager run uses copies of the inputs (mutations land on the
    copies) and its own RNG stream."""
    import torch.utils._pytree as pytree

    def call(*args):
        out = compiled(*args)
        storages = [_storage(a) for a in args]
        copies = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
        devices = [a.device.index or 0 for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"]
        with torch.random.fork_rng(devices=sorted(set(devices))), torch.no_grad():
            eager = gm(*copies)
        copy_class = {_storage(c): storages[i] for i, c in enumerate(copies) if _storage(c) is not None}

        def pattern(outputs, input_class):
            flat = [_storage(t) for t in pytree.tree_leaves(outputs)]
            pairs = [(i, j) for i in range(len(flat)) for j in range(i + 1, len(flat)) if flat[i] is not None and flat[i] == flat[j]]
            return pairs, [input_class.get(k) for k in flat]

        got, want = pattern(out, {s: s for s in storages if s is not None}), pattern(eager, copy_class)
        assert got == want, f"outputs alias differently from eager (pairs, input each aliases): compiled {got}, eager {want}"
        return out

    return call


def _storage(t):
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr())


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
    """Whole-tensor max-norm relative error (kept as a bound; never the only check)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


# A slice (one channel, row, sample...) with fewer elements is a handful of sums whose
# rounding scales with their cancelling terms, not with their own values.
_MIN_SLICE = 8
# A slice whose expected values are all (near) zero gets this fraction of the tensor's
# scale, so an exact zero against a rounding-level residue does not fail.
_SLICE_FLOOR = 1e-3
# Per element, the absolute part of the bound, as a fraction of ``tol x max|expected|``.
_ELEMENT_ATOL = 0.1
# Against an fp32 reference, a 16-bit result rounds in proportion to the terms it sums
# (the pre-activation, the products), not to its own value: an element near zero may be
# off by a bf16 step of the tensor's scale, and a nearly dead channel (a relu mask that
# flips on rounding) by more than its own size. Those comparisons are bounded per element
# by the tensor's scale, and per slice by at least a tenth of it.
LOW_PRECISION = dict(element_atol=1.0, slice_floor=0.1)


def assert_close_rel(
    actual, expected, tol: float, what: str = "", *, element_atol: float = _ELEMENT_ATOL, slice_floor: float = _SLICE_FLOOR
) -> None:
    """``actual`` within ``tol`` of ``expected`` three ways, all of which must hold:
    the whole tensor (max-norm), every slice along every axis against that slice's own
    magnitude (so a small channel, sample or feature cannot be badly wrong under a large
    one), and every element (``torch.testing.assert_close``, rtol ``tol``, atol
    ``element_atol x tol`` times the tensor's magnitude)."""
    assert actual is not None, f"{what}: missing (expected a tensor)"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    a, e = actual.detach().double(), expected.detach().double()
    err = rel_err(a, e)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"
    scale = e.abs().max().item() if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=tol, atol=element_atol * tol * scale, msg=lambda m: f"{what}: {m}")
    diff, mag = (a - e).abs(), e.abs()
    for dim in range(e.dim()):
        if e.dim() < 2 or e.shape[dim] < 2 or e.numel() // e.shape[dim] < _MIN_SLICE:
            continue
        others = [d for d in range(e.dim()) if d != dim]
        slice_err, slice_mag = diff.amax(others), mag.amax(others)
        bad = slice_err > tol * slice_mag.clamp_min(slice_floor * scale)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise AssertionError(
                f"{what}: slice {i} along dim {dim}: max error {slice_err[i]:.3g} > {tol} x its magnitude {slice_mag[i]:.3g}"
            )


def assert_grads_close(actual, expected, tol: float, what: str = "grad", **kw) -> None:
    """A gradient compiled against eager; a gradient missing on either side fails."""
    if expected is None:
        assert actual is None, f"{what}: eager has no gradient, compiled has one"
        return
    assert actual is not None, f"{what}: compiled has no gradient, eager has one"
    assert_close_rel(actual, expected, tol, what, **kw)


def check_against_eager(
    model: torch.nn.Module,
    x: torch.Tensor,
    backend,
    *,
    steps: int = 3,
    out_tol: float = 1e-5,
    grad_tol: float = 1e-4,
    lr: float = 0.1,
) -> int:
    """Forward, every gradient (inputs included), buffers, then parameters and buffers
    after ``steps`` SGD steps. Returns the number of sites the first compile folded, for
    the caller to assert: a pass that does nothing passes every numeric check."""
    eager, compiled_model = model, copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend=backend)
    x_e = x.detach().clone().requires_grad_(x.requires_grad)
    x_c = x.detach().clone().requires_grad_(x.requires_grad)
    out_e, out_c = eager(x_e), compiled(x_c)
    assert_aliasing_as_eager(out_c, out_e, [x_c, *compiled_model.parameters()], [x_e, *eager.parameters()])
    assert_close_rel(out_c, out_e, out_tol, "forward")
    grad_out = torch.randn_like(out_e)
    out_e.backward(grad_out)
    out_c.backward(grad_out)
    folded = compile_affine.report().folded
    if x.requires_grad:
        assert_grads_close(x_c.grad, x_e.grad, grad_tol, "grad input")
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        assert_grads_close(p_c.grad, p_e.grad, grad_tol, f"grad {name}")
    _assert_buffers_equal(compiled_model, eager, out_tol, "after the first step")
    if not any(p.requires_grad for p in eager.parameters()):
        return folded
    opt_e = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=lr)
    opt_c = torch.optim.SGD([p for p in compiled_model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        for opt, m, xx in ((opt_e, eager, x_e), (opt_c, compiled, x_c)):
            opt.zero_grad()
            m(xx.detach()).square().mean().backward()
            opt.step()
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        assert_close_rel(p_c, p_e, grad_tol, f"param {name} after {steps} steps")
    _assert_buffers_equal(compiled_model, eager, grad_tol, f"after {steps} steps")
    return folded


def alias_pattern(*values) -> list[tuple[int, int]]:
    """Which of the tensors in ``values`` (flattened) share a storage, as index pairs:
    what a program can observe of aliasing by writing through one of them."""
    import torch.utils._pytree as pytree

    keys = [(t.device, t.untyped_storage().data_ptr()) if isinstance(t, torch.Tensor) and t.numel() else None
            for t in pytree.tree_leaves(values)]  # fmt: skip
    return [(i, j) for i in range(len(keys)) for j in range(i + 1, len(keys)) if keys[i] is not None and keys[i] == keys[j]]


def assert_aliasing_as_eager(compiled_out, eager_out, compiled_inputs, eager_inputs) -> None:
    """The harness-wide guard: outputs share memory with each other and with the inputs
    and parameters exactly where eager's do (stock Inductor keeps eager's aliasing)."""
    got, want = alias_pattern(compiled_out, compiled_inputs), alias_pattern(eager_out, eager_inputs)
    assert got == want, f"outputs alias differently from eager: compiled {got}, eager {want}"


def _assert_buffers_equal(compiled: torch.nn.Module, eager: torch.nn.Module, tol: float, when: str) -> None:
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled.buffers(), strict=True):
        if b_e.is_floating_point():
            assert_close_rel(b_c, b_e, tol, f"buffer {name} {when}")
        else:
            assert torch.equal(b_c, b_e), f"buffer {name} {when}"


def check_autocast(reference: torch.nn.Module, x: torch.Tensor, backend, dtype: torch.dtype, tol: float) -> None:
    """Under autocast on ``x``'s device: the compiled model keeps eager's (promoted, fp32)
    result dtype, and its output and every parameter gradient stay within ``tol`` of the
    fp32 model."""
    model = copy.deepcopy(reference)
    with torch.autocast(x.device.type, dtype=dtype):
        out = torch.compile(model, backend=backend)(x)
        eager = copy.deepcopy(reference)(x)
    ref = reference(x)
    assert out.dtype == eager.dtype == torch.float32
    assert_close_rel(out, ref, tol, "forward", **LOW_PRECISION)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert_grads_close(p.grad, p_ref.grad, tol, f"grad {name}", **LOW_PRECISION)
        if p.grad is not None:
            assert p.grad.dtype == torch.float32


def compare_gradients(out_c: torch.Tensor, out_e: torch.Tensor, inputs: list[torch.Tensor], tol: float) -> None:
    """Every gradient of ``inputs``, compiled against eager, for one random output gradient."""
    g = torch.randn_like(out_e)
    grads_c = torch.autograd.grad(out_c, inputs, g, allow_unused=True)
    grads_e = torch.autograd.grad(out_e, inputs, g, allow_unused=True)
    for i, (gc, ge) in enumerate(zip(grads_c, grads_e, strict=True)):
        assert_grads_close(gc, ge, tol, f"gradient {i}")


