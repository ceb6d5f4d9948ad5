"""The GPU twin's interpreter half (``compile_affine.bench.twin.interpret``): Inductor's
Triton kernels for the plugin's folded graphs, run on CPU tensors by Triton's interpreter
with the pass deciding as on a GPU, against eager in float64: output and every gradient
after one training step, to rounding. Tiny shapes: the interpreter runs kernels in numpy."""

import copy

import pytest
import torch
import torch.nn as nn

import compile_affine
from compile_affine.bench.twin import interpret
from compile_affine.passes import target
from compile_affine.passes.fold import AffineFoldPass

from .helpers import ALWAYS, Captured, assert_close_rel, assert_grads_close, pass_backend
from .nets import Chain, ConvAffine, FrozenAffine, LayerScaleBlock

_MISSING = interpret.missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"GPU twin: {_MISSING}")

aten = torch.ops.aten
TOL = 1e-12
OPTIONS = {"compile_affine": {"fold": "always"}}


def train_step(model: nn.Module, x: torch.Tensor):
    """Output, and the gradient of the input and of every parameter, for one backward."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    torch.manual_seed(1)
    out.backward(torch.randn_like(out))
    return out, [("input", x.grad), *((name, p.grad) for name, p in model.named_parameters())]


def check_on_twin(model: nn.Module, x: torch.Tensor, folded: int) -> interpret.Launches:
    """One training step compiled by the plugin inside ``triton_on_cpu``, against eager."""
    model, x = model.double(), x.double()
    compiled = copy.deepcopy(model)
    with interpret.triton_on_cpu() as launches:
        out, grads = train_step(torch.compile(compiled, backend="compile_affine", options=OPTIONS), x)
    ref, ref_grads = train_step(model, x)
    assert_close_rel(out, ref, TOL, "forward")
    for (name, g), (_, g_ref) in zip(grads, ref_grads, strict=True):
        assert_grads_close(g, g_ref, TOL, f"grad {name}")
    assert compile_affine.report().folded == folded, str(compile_affine.report())
    assert launches.kernels, "no Triton kernel ran through the interpreter"
    assert all(k.startswith("triton_") for k in launches.kernels), launches.kernels
    return launches


def branch_facts(graph: torch.fx.Graph) -> dict:
    """What the pass's device-keyed decisions leave in a folded joint graph:
    ``rewrite/conv.py::_bias_grad_in_conv_backward`` (CPU: the shift's gradient comes out of
    ``convolution_backward``, bias mask True; GPU: a separate ``sum(g)``, mask False) and
    ``cost.recomputes_relu_mask`` (CPU only: ReLU masks tagged for recompute)."""
    backwards = [n for n in graph.nodes if n.target is aten.convolution_backward.default]
    shift_sums = [n for n in graph.nodes if n.target is aten.sum.dim_IntList
                  and any(n.args[0] is cb.args[0] for cb in backwards) and list(n.args[1]) == [0, 2, 3]]  # fmt: skip
    tagged = [n for n in graph.nodes if n.target is aten.le.Scalar and "recompute" in n.meta]
    return dict(bias_masks=[cb.args[-1][2] for cb in backwards], shift_sums=len(shift_sums), tagged_masks=len(tagged))


@pytest.fixture
def joint_facts(monkeypatch):
    """``branch_facts`` of each graph, read right after the pass ran on it."""
    facts: list[dict] = []
    inner = AffineFoldPass.__call__  # conftest's checked wrapper

    def call(self, graph):
        inner(self, graph)
        facts.append(branch_facts(graph))

    monkeypatch.setattr(AffineFoldPass, "__call__", call)
    return facts


GPU_FACTS = dict(bias_masks=[False, False], shift_sums=2, tagged_masks=0)
CPU_FACTS = dict(bias_masks=[True, True], shift_sums=0, tagged_masks=2)


def test_shift_chain_takes_the_gpu_branch(joint_facts):
    # conv -> x * s + t -> ReLU, twice, each conv with a bias and a learnable scale.
    check_on_twin(Chain(widths=(4, 8, 8)), torch.randn(2, 4, 8, 8), folded=2)
    assert joint_facts == [GPU_FACTS]


def test_the_same_chain_on_cpu_takes_the_cpu_branch(joint_facts):
    # The contrast that makes the test above a proof: without the twin (plain CPU
    # decisions, graphs run as FX, no Inductor compile) the same facts read the other way.
    model = Chain(widths=(4, 8, 8)).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    torch.compile(model, backend=pass_backend(ALWAYS, Captured()))(x).sum().backward()
    assert compile_affine.report().folded == 2
    assert joint_facts == [CPU_FACTS]
    assert target.override() is None


def test_scale_without_shift():
    check_on_twin(ConvAffine(shift=False), torch.randn(2, 4, 8, 8), folded=1)


def test_layerscale():
    # x + fc2(gelu(fc1(x))) * gamma, gamma (C,): GELU's kernel calls libdevice.erf.
    check_on_twin(LayerScaleBlock(dim=8, hidden=16), torch.randn(2, 5, 8), folded=1)


def _randomize_norm(bn: nn.Module) -> nn.Module:
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return bn


def test_eval_batchnorm_while_fine_tuning():
    # The model trains; its batch norm is frozen in eval mode (running statistics, learning
    # weight and bias). Its kernels call libdevice.rsqrt.
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), _randomize_norm(nn.BatchNorm2d(8)), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1))  # fmt: skip
    model.train()
    model[1].eval()
    check_on_twin(model, torch.randn(2, 4, 8, 8), folded=1)
    assert model.training and not model[1].training


def _torchvision_frozen(c: int) -> nn.Module:
    ops = pytest.importorskip("torchvision.ops", reason="torchvision is not installed")
    bn = ops.FrozenBatchNorm2d(c)
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 1.5)
    return bn


@pytest.mark.parametrize("frozen", [_torchvision_frozen, FrozenAffine], ids=["torchvision", "hand_written"])
def test_frozen_batchnorm(frozen):
    # scale = w * (rv + eps).rsqrt(), computed in the graph from buffers.
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), frozen(8), nn.ReLU())
    check_on_twin(model, torch.randn(2, 4, 8, 8), folded=1)


def test_everything_patched_is_put_back():
    import os

    import triton.language as tl
    from torch._inductor.runtime import triton_helpers
    from triton.runtime.driver import driver
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def state():
        libdevice = triton_helpers.libdevice
        return dict(env=os.environ.get("TRITON_INTERPRET"), backend=torch._inductor.config.cpu_backend,
                    threads=torch._inductor.config.compile_threads, driver=getattr(driver, "_active", None),
                    call=JITFunction.__call__, run=InterpretedFunction.run,
                    to_cpu=getattr(triton_helpers, "set_driver_to_cpu", None),
                    rsqrt=getattr(libdevice, "rsqrt", None), erf=getattr(libdevice, "erf", None),
                    decide=target.override())  # fmt: skip

    before = state()
    with pytest.raises(KeyError), interpret.triton_on_cpu():
        inside = state()
        assert inside["env"] == "1" and inside["backend"] == "triton" and inside["decide"] == "cuda"
        assert inside["driver"].get_current_target().backend == "cuda"
        assert triton_helpers.libdevice is tl.math or inside["rsqrt"] is not before["rsqrt"]
        raise KeyError("leave the block by an exception")
    assert state() == before
