"""Differential tests against eager: forward, every gradient, and parameters after
3 SGD steps. Most run through ``pass_backend`` (our pass, Inductor's decompositions
and partitioner, graphs executed as FX) so the matrix stays fast; ``test_inductor_*``
run the real backend end to end."""

import pytest
import torch

import compile_affine

from .helpers import ALWAYS, check_against_eager, pass_backend
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
def test_training_matches_eager(geometry, bias, shift):
    model = ConvAffine(bias=bias, shift=shift, **geometry)
    check_against_eager(model, torch.randn(2, 4, 11, 11), pass_backend(ALWAYS))
    assert compile_affine.report().folded >= 1


@pytest.mark.parametrize("form", ["flat_params", "scale_first"])
def test_param_forms(form):
    check_against_eager(ConvAffine(**{form: True}), torch.randn(2, 4, 9, 9), pass_backend(ALWAYS))
    assert compile_affine.report().folded >= 1


# Which of x, W, b, s, t require grad.
SUBSETS = ["xWbst", "Wbst", "x", "s", "st", "W", "xs", "Wb", "t", "none"]


@pytest.mark.parametrize("subset", SUBSETS)
def test_requires_grad_subsets(subset):
    model = ConvAffine()
    flags = dict(W=model.conv.weight, b=model.conv.bias, s=model.scale, t=model.shift)
    for key, p in flags.items():
        p.requires_grad_(key in subset)
    x = torch.randn(2, 4, 9, 9, requires_grad="x" in subset)
    if subset == "none":
        with torch.no_grad():
            out = torch.compile(model, backend=pass_backend(ALWAYS))(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    else:
        check_against_eager(model, x, pass_backend(ALWAYS))
    assert compile_affine.report().folded >= 1


def test_frozen_batchnorm_buffers():
    check_against_eager(ConvFrozen(), torch.randn(2, 4, 9, 9, requires_grad=True), pass_backend(ALWAYS))
    assert compile_affine.report().folded >= 1


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_inference_matches_eager(context):
    model = Chain()
    x = torch.randn(2, 4, 12, 12)
    with context():
        out = torch.compile(model, backend=pass_backend(ALWAYS))(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert compile_affine.report().folded == 3


def test_float64_fold_is_exact_to_rounding():
    # The fold is algebra, not an approximation: in float64 it must agree to ~1e-12, and
    # nothing may be computed in a lower precision along the way.
    model = Chain(stride=2).double()
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64, requires_grad=True)
    check_against_eager(model, x, pass_backend(ALWAYS), out_tol=1e-12, grad_tol=1e-10)


def test_chain_training():
    check_against_eager(Chain(stride=2), torch.randn(2, 4, 16, 16, requires_grad=True), pass_backend(ALWAYS))
    assert compile_affine.report().graphs[0].folded == 3


ALWAYS_OPTIONS = {"compile_affine": {"fold": "always", "strict": True}}


def _inductor(**kw):
    return lambda gm, inputs: compile_affine.backend(gm, inputs, options=ALWAYS_OPTIONS, **kw)


def test_inductor_training_end_to_end():
    check_against_eager(Chain(stride=2), torch.randn(2, 4, 16, 16, requires_grad=True), _inductor())
    report = compile_affine.report()
    assert report.graphs[0].training and report.graphs[0].folded == 3
    assert all(s.folded for s in report.sites)


def test_inductor_frozen_and_nobias_end_to_end():
    model = torch.nn.Sequential(ConvFrozen(), ConvAffine(8, 8, bias=False, shift=False, stride=2))
    check_against_eager(model, torch.randn(2, 4, 12, 12), _inductor())
    assert compile_affine.report().graphs[0].folded == 2


def test_inductor_inference_end_to_end():
    model = Chain()
    x = torch.randn(2, 4, 12, 12)
    with torch.inference_mode():
        out = torch.compile(model, backend="compile_affine", options=ALWAYS_OPTIONS)(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    assert compile_affine.report().folded == 3
