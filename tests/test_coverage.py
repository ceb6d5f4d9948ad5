"""Layouts, dtypes, dynamic shapes, devices and real third-party models."""

import copy

import pytest
import torch

import compile_affine

from .helpers import (
    ALWAYS,
    LOW_PRECISION,
    assert_close_rel,
    assert_grads_close,
    check_against_eager,
    check_autocast,
    on_devices,
    pass_backend,
)
from .nets import Chain, ConvAffine


@on_devices
def test_devices(device):
    model = ConvAffine().to(device)
    assert check_against_eager(model, torch.randn(2, 4, 9, 9, device=device, requires_grad=True), pass_backend(ALWAYS)) == 1
    assert compile_affine.report().graphs[0].folded == 1


@on_devices
def test_channels_last(device):
    model = Chain().to(device, memory_format=torch.channels_last)
    x = torch.randn(2, 4, 10, 10, device=device).to(memory_format=torch.channels_last).requires_grad_()
    assert check_against_eager(model, x, pass_backend(ALWAYS)) == 3
    assert compile_affine.report().graphs[0].folded == 3


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@on_devices
def test_low_precision_model_against_fp32_reference(dtype, tol, device):
    # tanh, not relu: a relu mask that flips on rounding makes even eager's low-precision
    # gradients differ from fp32 by several percent, which would test nothing.
    reference = ConvAffine(4, 8, act=torch.tanh).to(device)
    model = copy.deepcopy(reference).to(dtype)
    x = torch.randn(2, 4, 9, 9, device=device)
    out = torch.compile(model, backend=pass_backend(ALWAYS))(x.to(dtype))
    ref = reference(x)
    assert out.dtype == dtype  # what eager produces for a model held in this dtype
    assert_close_rel(out.float(), ref, tol, "forward", **LOW_PRECISION)
    g = torch.randn_like(ref)
    out.backward(g.to(dtype))
    ref.backward(g)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and p.grad.dtype == dtype, name
        assert_grads_close(p.grad.float(), p_ref.grad, tol, f"grad {name}", **LOW_PRECISION)
    assert compile_affine.report().graphs[0].folded == 1


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@on_devices
def test_autocast_folds_and_keeps_the_promoted_dtype(dtype, tol, device):
    # Under autocast the conv runs in 16 bits and ``y * s`` with an fp32 scale is fp32.
    model, x = ConvAffine(4, 8, act=torch.tanh).to(device), torch.randn(2, 4, 9, 9, device=device)
    check_autocast(model, x, pass_backend(ALWAYS), dtype, tol)
    assert compile_affine.report().graphs[0].folded == 1


def _run_shapes(model, settings, how: str, shapes: list[tuple], device="cpu") -> list:
    """Compile once with ``how`` dynamism, run every shape, return the graphs compiled."""
    compiled = torch.compile(model, backend=pass_backend(settings), dynamic=True if how == "dynamic=True" else None)
    for shape in shapes:
        x = torch.randn(shape, device=device)
        if how == "mark_dynamic":
            for dim in (0, 2, 3):
                torch._dynamo.mark_dynamic(x, dim)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    return compile_affine.report().graphs


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
@on_devices
def test_dynamic_shapes_fold_without_recompiles(how, device):
    graphs = _run_shapes(Chain().to(device), ALWAYS, how, [(2, 4, 12, 12), (3, 4, 9, 9), (5, 4, 15, 15)], device)
    assert len(graphs) == 1, "fold decisions must not add guards that recompile"
    assert graphs[0].folded == 3


def _randomize_frozen_bn(model):
    from torchvision.ops.misc import FrozenBatchNorm2d

    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    return model


def test_torchvision_resnet18_frozen_bn_through_inductor():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = _randomize_frozen_bn(torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d))

    def backend(gm, inputs):
        return compile_affine.backend(gm, inputs, options={"compile_affine": {"fold": "always", "strict": True}})

    # float64: a deep net's fp32 gradients differ from eager by relu masks flipping on
    # reassociation alone; in float64 the fold must agree to rounding.
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert check_against_eager(model.double(), x, backend, steps=1, out_tol=1e-12, grad_tol=1e-10, lr=1e-3) == 20
    graph = compile_affine.report().graphs[0]
    assert graph.training and graph.folded == 20 == len(graph.sites)


def test_torchvision_mobilenet_v2_frozen_bn():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = _randomize_frozen_bn(torchvision.models.mobilenet_v2(num_classes=10, norm_layer=FrozenBatchNorm2d))
    model.classifier[0].p = 0.0  # dropout draws differ between eager and compiled
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert check_against_eager(model.double(), x, pass_backend(ALWAYS), steps=1, out_tol=1e-12, grad_tol=1e-10, lr=1e-3) == 52
    graph = compile_affine.report().graphs[0]
    assert graph.folded == len(graph.sites) == 52  # every conv, depthwise included


@on_devices
def test_autocast_through_inductor(device):
    reference = ConvAffine(4, 8, act=torch.tanh).to(device)
    model = copy.deepcopy(reference)
    x = torch.randn(2, 4, 9, 9, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = torch.compile(model, backend="compile_affine", options={"compile_affine": {"fold": "always", "strict": True}})(x)
    ref = reference(x)
    assert out.dtype == torch.float32
    assert_close_rel(out, ref, 2e-2, "forward", **LOW_PRECISION)
    out.sum().backward()
    ref.sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert_grads_close(p.grad, p_ref.grad, 2e-2, f"grad {name}", **LOW_PRECISION)
    assert compile_affine.report().graphs[0].folded == 1


@on_devices
def test_channels_last_3d(device):
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 6, 3, padding=1), Affine(6), torch.nn.Tanh())
    model = model.double().to(device, memory_format=torch.channels_last_3d)
    x = torch.randn(2, 3, 5, 6, 4, dtype=torch.float64, device=device)
    x = x.to(memory_format=torch.channels_last_3d).requires_grad_()
    assert check_against_eager(model, x, pass_backend(ALWAYS), out_tol=1e-12, grad_tol=1e-10) == 1
    assert compile_affine.report().graphs[0].folded == 1


class Affine(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.s = torch.nn.Parameter(torch.rand(c) + 0.5)
        self.t = torch.nn.Parameter(torch.randn(c))

    def forward(self, y):
        view = (1, -1) + (1,) * (y.dim() - 2)
        return y * self.s.view(view) + self.t.view(view)


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
@on_devices
def test_layerscale_dynamic_shapes_fold_without_recompiles(how, device):
    from compile_affine.settings import Settings

    from .test_linear import FORMS, LinearScale

    def compiles(settings):
        torch._dynamo.reset()
        compile_affine.reset()
        model = LinearScale(FORMS["NHWC linear, permute to NCHW, (1, C, 1, 1) scale"][0]).to(device)
        return _run_shapes(model, settings, how, [(2, 8, 3, 3), (3, 8, 5, 4), (5, 8, 2, 7)], device)

    # Dynamo itself recompiles this model once under dynamic=True (it does so with the
    # pass folding nothing too); the fold must add no recompile of its own.
    baseline = compiles(Settings(fold="never", strict=True))
    graphs = compiles(ALWAYS)
    assert len(graphs) == len(baseline), "fold decisions must not add guards that recompile"
    assert all(g.folded == 1 for g in graphs)
