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
    threshold = Settings().activation_ratio  # the default objective's
    assert not site.folded and site.declined_by_cost
    assert site.reason == f"cost: activation 2304 < {threshold} x weight 147456 bytes"
    assert site.summary_reason == f"activation 0.0156x the weight in bytes, under {threshold}"


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


# The default threshold is the objective's (settings.OBJECTIVE_MIN_ACTIVATION_RATIO), the
# same on every device; a site whose activation equals its weight lies between the two.
def _stub_site(device: str, activation: tuple, weight: tuple, activation_dtype=torch.float32):
    from types import SimpleNamespace

    def node(shape, dtype=torch.float32):
        return SimpleNamespace(meta={"val": SimpleNamespace(shape=shape, dtype=dtype, device=torch.device(device))})

    w = node(weight)
    return SimpleNamespace(y=node(activation, activation_dtype), weight=w, real_weight=w, grad_scale_sum=None,
                           computes_weight_grad=lambda: True)  # fmt: skip


def test_default_threshold_is_the_objectives():
    from compile_affine.passes import cost
    from compile_affine.settings import MEMORY_MIN_ACTIVATION_RATIO, TRAFFIC_BREAK_EVEN

    assert Settings().objective == "time" and Settings().min_activation_ratio is None
    assert Settings().activation_ratio == TRAFFIC_BREAK_EVEN
    assert Settings(objective="memory").activation_ratio == MEMORY_MIN_ACTIVATION_RATIO <= 1.0 < TRAFFIC_BREAK_EVEN
    assert Settings(objective="memory", min_activation_ratio=2.0).activation_ratio == 2.0  # an explicit value wins
    shapes = dict(activation=(1, 8, 6, 6), weight=(8, 4, 3, 3))  # 288 elements each
    for device in ("cpu", "cuda"):
        by_time = cost.estimate(_stub_site(device, **shapes), Settings().activation_ratio)
        by_memory = cost.estimate(_stub_site(device, **shapes), Settings(objective="memory").activation_ratio)
        assert not by_time.pays and by_memory.pays
    assert by_time.reason() == f"cost: activation 1152 < {TRAFFIC_BREAK_EVEN} x weight 1152 bytes"
    with pytest.raises(ValueError, match="objective"):
        Settings(objective="speed")


@pytest.mark.parametrize("objective,folded", [("time", False), ("memory", True)])
def test_a_site_between_the_objectives_folds_only_for_memory(objective, folded):
    model = ConvAffine(4, 8)  # 288-element weight, 1x8x6x6 output: ratio 1.0
    x = torch.randn(1, 4, 6, 6)
    assert check_against_eager(model, x, pass_backend(Settings(objective=objective, strict=True))) == int(folded)
    assert _site().folded == folded and _site().declined_by_cost == (not folded)


def test_pass_uuid_follows_the_effective_threshold():
    from compile_affine.passes.fold import _SOURCES, AffineFoldPass

    # The objectives' defaults live in settings.py, whose source the uuid hashes.
    assert any(p.endswith("compile_affine/settings.py") for p in _SOURCES)
    uuids = {AffineFoldPass(Settings(min_activation_ratio=r)).uuid() for r in (None, 0.5, 3.0)}
    uuids.add(AffineFoldPass(Settings(objective="memory")).uuid())
    assert len(uuids) == 4


def test_rule_compares_bytes_in_each_dtype():
    from compile_affine.passes import cost

    # 2x the weight's elements: pays at 1.5 in fp32, but under bf16 autocast the conv
    # output is 2 bytes against the fp32 weight's 4, so it is only 1x the weight in bytes.
    shapes = dict(activation=(1, 8, 12, 6), weight=(8, 4, 3, 3))  # 576 against 288 elements
    fp32 = cost.estimate(_stub_site("cpu", **shapes), 1.5)
    bf16 = cost.estimate(_stub_site("cpu", **shapes, activation_dtype=torch.bfloat16), 1.5)
    assert fp32.pays and (fp32.activation_bytes, fp32.weight_bytes) == (2304, 1152)
    assert not bf16.pays and (bf16.activation_bytes, bf16.weight_bytes) == (1152, 1152)
    assert bf16.short_reason() == "activation 1x the weight in bytes, under 1.5"
    # In fp32 the bytes rule takes the decisions the element rule took at the same number.
    assert cost.estimate(_stub_site("cpu", **shapes), 2.0).pays
    assert not cost.estimate(_stub_site("cpu", **shapes), 2.01).pays
