"""The compatibility watch, fold counts (docs/design.md, "The compatibility watch"): a torch
upgrade that silently stops a pattern from matching turns this red, instead of a user's
model quietly running at stock speed (pytorch#131693: ``fuse_conv_bn`` stopped matching
after module inlining, and mobilenet_v2 went from 2.4x to 0.7x).

The counts are pinned per torch minor version: the seed nets end to end through the
backend (stock Inductor underneath), the seed's ResNet-50 and two zoo models with the
pass on the joint graph and graphs run as FX (their compile through Inductor is a
benchmark's job, not CI's). A torch newer than every pin is held to the newest pin: an
upgrade starts from "nothing stopped folding", and a count that rightly changes gets a
pin of its own, with its reason.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch

import compile_affine
from compile_affine._compat import TORCH_MINOR
from compile_affine.settings import Settings

from .helpers import pass_backend
from .nets import ConvAffine, ConvFrozen, LayerScaleStack, TinyResNet

ALWAYS = {"compile_affine": {"fold": "always", "strict": True}}


def pinned(pins: dict[tuple[int, int], int]) -> tuple[int, str]:
    """The count pinned for this torch: its own minor version's, else the newest older one."""
    older = [v for v in pins if v <= TORCH_MINOR]
    version = max(older) if older else min(pins)
    return pins[version], "torch %d.%d" % version


def check(name: str, pins: dict[tuple[int, int], int]) -> None:
    want, source = pinned(pins)
    report = compile_affine.report()
    assert not any(g.fell_back for g in report.graphs), f"{name}: the pass fell back\n{report}"
    if report.folded != want:
        left = Counter(s.reason for s in report.sites if not s.folded)
        pytest.fail(
            f"{name}: {report.folded} of {len(report.sites)} affine sites folded on torch {torch.__version__}, "
            f"pinned {want} ({source}). A pattern stopped (or started) matching; unfolded: {dict(left)}"
        )


def train_step(model: torch.nn.Module, x: torch.Tensor, backend) -> None:
    out = torch.compile(model, backend=backend)(x)
    out.backward(torch.randn_like(out))


# net: (builder, input shape, pins). Every version checked so far folds every site.
SEED_NETS = {
    "conv_affine_relu": (ConvAffine, (2, 4, 8, 8), {(2, 11): 1}),
    "conv_scale_relu": (functools.partial(ConvAffine, shift=False), (2, 4, 8, 8), {(2, 11): 1}),
    "conv_frozen_bn": (ConvFrozen, (2, 4, 8, 8), {(2, 11): 1}),
    "conv_eval_bn": (lambda: _EvalBN(), (2, 4, 8, 8), {(2, 11): 1}),
    "layer_scale_stack": (LayerScaleStack, (2, 5, 16), {(2, 11): 3}),
    "tiny_resnet": (functools.partial(TinyResNet, width=8, blocks=2), (2, 3, 8, 8), {(2, 11): 7}),
}


class _EvalBN(torch.nn.Module):
    """Fine-tuning: a batch norm kept in eval mode while the rest trains."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        self.bn.eval()
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("name", SEED_NETS)
def test_seed_net_fold_count_is_pinned(name):
    build, shape, pins = SEED_NETS[name]
    train_step(build(), torch.randn(shape), functools.partial(compile_affine.backend, options=ALWAYS))
    check(name, pins)


def test_seed_resnet50_fold_count_is_pinned():
    pytest.importorskip("torchvision", reason="no torchvision for this torch (none pairs with 2.15 yet)")
    from compile_affine.bench.core.models import resnet50

    train_step(resnet50("affine", num_classes=10), torch.randn(2, 3, 32, 32), pass_backend(Settings(fold="always")))
    check("resnet50 x*w+b", {(2, 11): 53})


# Two zoo models, each a form of its own: LayerScale (C,) after a linear (timm's), and
# torchvision's FrozenBatchNorm2d (a scale computed from buffers) in a ResNet: (package, pins).
ZOO = {"deit3_small": ("timm", {(2, 11): 2}), "resnet18_frozenbn": ("torchvision", {(2, 11): 12})}


@pytest.mark.parametrize("name", ZOO)
def test_zoo_fold_count_is_pinned(name):
    package, pins = ZOO[name]
    pytest.importorskip(package, reason=f"no {package} for this torch (none pairs with 2.15 yet)")
    from compile_affine.bench.core import zoo

    entry = zoo.ZOO_BY_NAME[name]
    x = torch.randn(2, 3, entry.tiny_size, entry.tiny_size)
    train_step(entry.build(tiny=True), x, pass_backend(Settings(fold="always")))
    check(name, pins)


def test_a_pattern_that_stops_matching_is_red_and_named(monkeypatch):
    """What an upgrade that breaks the conv pattern looks like here: the conv producer no
    longer matches (as if torch renamed what it traces), and the pinned count fails, naming
    the net and the count, instead of the model quietly compiling as stock."""
    from compile_affine.passes.sites import find, LinearSite

    monkeypatch.setattr(find, "PRODUCERS", (LinearSite,))
    build, shape, pins = SEED_NETS["conv_affine_relu"]
    train_step(build(), torch.randn(shape), functools.partial(compile_affine.backend, options=ALWAYS))
    with pytest.raises(pytest.fail.Exception, match=r"conv_affine_relu: 0 of \d+ affine sites folded on torch .* pinned 1 "):
        check("conv_affine_relu", pins)
