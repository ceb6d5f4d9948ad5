"""Every convolution form folds and stays exact: 1d/2d/3d, transposed, grouped, depthwise."""

import pytest
import torch

import compile_affine

from .helpers import ALWAYS, check_against_eager, on_devices, pass_backend
from .nets import ConvNdAffine

CASES = {
    "conv1d": dict(dims=1),
    "conv3d": dict(dims=3),
    "conv2d grouped": dict(groups=2),
    "conv2d depthwise": dict(cin=6, cout=6, groups=6),
    "conv2d same padding": dict(padding="same", dilation=2),
    "conv_transpose1d": dict(dims=1, transposed=True, stride=2),
    "conv_transpose2d": dict(transposed=True, stride=2, output_padding=1),
    "conv_transpose2d grouped": dict(transposed=True, groups=2, stride=2),
    "conv_transpose3d": dict(dims=3, transposed=True, bias=False),
    "conv_transpose2d depthwise": dict(transposed=True, cin=6, cout=6, groups=6),
}


@pytest.mark.parametrize("case", CASES)
@on_devices
def test_conv_kind_folds_exactly(case, device):
    kw = CASES[case]
    dims = kw.get("dims", 2)
    model = ConvNdAffine(**kw).to(device)
    size = {1: (9,), 2: (7, 7), 3: (5, 5, 5)}[dims]
    x = torch.randn(2, kw.get("cin", 4), *size, device=device, requires_grad=True)
    assert check_against_eager(model, x, pass_backend(ALWAYS)) == 1
    site = compile_affine.report().graphs[0].sites[0]
    assert site.folded, site.reason
    assert site.producer == f"conv{'_transpose' if kw.get('transposed') else ''}{dims}d"
