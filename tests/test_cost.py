"""The per-site cost model: weight-heavy sites are declined under fold="auto" with a
reason, activation-heavy ones fold, and the threshold is a setting."""

import pytest
import torch

import compile_affine
from compile_affine.settings import Settings

from .helpers import check_against_eager, on_devices, pass_backend
from .nets import ConvAffine

AUTO = Settings(strict=True)


def _site():
    (site,) = compile_affine.report().graphs[0].sites
    return site


@on_devices
def test_weight_heavy_site_is_declined(device):
    # 64x64x3x3 weight (36,864 elements) against a 1x64x3x3 output (576): folding loses.
    model = ConvAffine(64, 64).to(device)
    assert check_against_eager(model, torch.randn(1, 64, 3, 3, device=device), pass_backend(AUTO)) == 0
    site = _site()
    assert not site.folded and site.declined_by_cost
    assert site.reason == "cost: activation 576 < 0.5 x weight 36864 elements"


@on_devices
def test_activation_heavy_site_folds(device):
    model = ConvAffine(4, 8).to(device)  # 8x4x3x3 weight, 2x8x16x16 output
    assert check_against_eager(model, torch.randn(2, 4, 16, 16, device=device), pass_backend(AUTO)) == 1
    assert _site().folded


@pytest.mark.parametrize("ratio,folded", [(0.0, True), (0.015, True), (0.016, False)])
@on_devices
def test_threshold_is_a_setting(ratio, folded, device):
    model = ConvAffine(64, 64).to(device)  # 576 / 36864 = 0.0156
    x = torch.randn(1, 64, 3, 3, device=device)
    assert check_against_eager(model, x, pass_backend(Settings(min_activation_ratio=ratio))) == int(folded)
    assert _site().folded is folded


@on_devices
def test_frozen_weight_with_trainable_scale_is_declined(device):
    # The fold would need a weight-gradient conv the model never ran.
    model = ConvAffine(4, 8).to(device)
    model.conv.weight.requires_grad_(False)
    model.conv.bias.requires_grad_(False)
    assert check_against_eager(model, torch.randn(2, 4, 16, 16, device=device), pass_backend(AUTO)) == 0
    assert _site().reason == "cost: fold needs a weight-gradient conv the model does not compute"


@on_devices
def test_always_folds_what_auto_declines(device):
    model = ConvAffine(4, 8).to(device)
    model.conv.weight.requires_grad_(False)
    x = torch.randn(2, 4, 16, 16, device=device)
    assert check_against_eager(model, x, pass_backend(Settings(fold="always", strict=True))) == 1
    assert _site().folded


def test_bad_threshold():
    with pytest.raises(ValueError, match="min_activation_ratio"):
        Settings(min_activation_ratio=-1)
