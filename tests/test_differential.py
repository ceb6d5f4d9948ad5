"""Differential tests against eager: forward, every gradient, and parameters after
3 SGD steps. Most run through ``pass_backend`` (our pass, Inductor's decompositions
and partitioner, graphs executed as FX) so the matrix stays fast; ``test_inductor_*``
run the real backend end to end."""

import pytest
import torch

import compile_affine

from .helpers import ALWAYS, check_against_eager, on_devices, pass_backend
from .nets import Chain, ConvAffine, ConvFrozen

GEOMETRIES = [
    dict(k=3, stride=1, padding=1, dilation=1),
    dict(k=3, stride=2, padding=1, dilation=1),
    dict(k=3, stride=1, padding=2, dilation=2),
    dict(k=1, stride=1, padding=0, dilation=1),
    dict(k=5, stride=3, padding=0, dilation=1),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "k{k}s{stride}p{padding}d{dilation}".format(**g))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shift", [True, False], ids=["shift", "noshift"])
@on_devices
def test_training_matches_eager(geometry, bias, shift, device):
    model = ConvAffine(bias=bias, shift=shift, **geometry).to(device)
    assert check_against_eager(model, torch.randn(2, 4, 11, 11, device=device), pass_backend(ALWAYS)) == 1


@pytest.mark.parametrize("form", ["flat_params", "scale_first"])
@on_devices
def test_param_forms(form, device):
    model = ConvAffine(**{form: True}).to(device)
    assert check_against_eager(model, torch.randn(2, 4, 9, 9, device=device), pass_backend(ALWAYS)) == 1


# Which of x, W, b, s, t require grad.
SUBSETS = ["xWbst", "Wbst", "x", "s", "st", "W", "xs", "Wb", "t", "none"]


@pytest.mark.parametrize("subset", SUBSETS)
@on_devices
def test_requires_grad_subsets(subset, device):
    model = ConvAffine().to(device)
    flags = dict(W=model.conv.weight, b=model.conv.bias, s=model.scale, t=model.shift)
    for key, p in flags.items():
        p.requires_grad_(key in subset)
    x = torch.randn(2, 4, 9, 9, device=device, requires_grad="x" in subset)
    if subset == "none":
        with torch.no_grad():
            out = torch.compile(model, backend=pass_backend(ALWAYS))(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
        assert compile_affine.report().folded == 1
    else:
        assert check_against_eager(model, x, pass_backend(ALWAYS)) == 1


@on_devices
def test_frozen_batchnorm_buffers(device):
    x = torch.randn(2, 4, 9, 9, device=device, requires_grad=True)
    assert check_against_eager(ConvFrozen().to(device), x, pass_backend(ALWAYS)) == 1


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@on_devices
def test_inference_matches_eager(context, device):
    model = Chain().to(device)
    x = torch.randn(2, 4, 12, 12, device=device)
    with context():
        out = torch.compile(model, backend=pass_backend(ALWAYS))(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert compile_affine.report().folded == 3


@on_devices
def test_float64_fold_is_exact_to_rounding(device):
    # The fold is algebra, not an approximation: in float64 it must agree to ~1e-12, and
    # nothing may be computed in a lower precision along the way.
    model = Chain(stride=2).double().to(device)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64, device=device, requires_grad=True)
    assert check_against_eager(model, x, pass_backend(ALWAYS), out_tol=1e-12, grad_tol=1e-10) == 3


@on_devices
def test_chain_training(device):
    x = torch.randn(2, 4, 16, 16, device=device, requires_grad=True)
    assert check_against_eager(Chain(stride=2).to(device), x, pass_backend(ALWAYS)) == 3
    assert compile_affine.report().graphs[0].folded == 3


ALWAYS_OPTIONS = {"compile_affine": {"fold": "always", "strict": True}}


def _inductor(**kw):
    return lambda gm, inputs: compile_affine.backend(gm, inputs, options=ALWAYS_OPTIONS, **kw)


@on_devices
def test_inductor_training_end_to_end(device):
    x = torch.randn(2, 4, 16, 16, device=device, requires_grad=True)
    assert check_against_eager(Chain(stride=2).to(device), x, _inductor()) == 3
    report = compile_affine.report()
    assert report.graphs[0].training and report.graphs[0].folded == 3
    assert all(s.folded for s in report.sites)


@on_devices
def test_inductor_frozen_and_nobias_end_to_end(device):
    model = torch.nn.Sequential(ConvFrozen(), ConvAffine(8, 8, bias=False, shift=False, stride=2)).to(device)
    assert check_against_eager(model, torch.randn(2, 4, 12, 12, device=device), _inductor()) == 2
    assert compile_affine.report().graphs[0].folded == 2


@on_devices
def test_inductor_inference_end_to_end(device):
    model = Chain().to(device)
    x = torch.randn(2, 4, 12, 12, device=device)
    with torch.inference_mode():
        out = torch.compile(model, backend="compile_affine", options=ALWAYS_OPTIONS)(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    assert compile_affine.report().folded == 3
