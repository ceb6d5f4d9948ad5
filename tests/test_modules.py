"""Per-module control: ``modules=`` and ``exclude=`` select sites by the qualified name of
the affine's module or of its producer, as ``model.named_modules()`` names them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import compile_affine
from compile_affine.passes.describe import qualified_name
from compile_affine.settings import EXCLUDED, Settings, matches, split_options

from .helpers import check_against_eager, joint_graph, pass_backend
from .nets import Chain


def _folded_modules() -> dict[str, bool]:
    return {s.module: s.folded for s in compile_affine.report().sites}


def _chain(settings: Settings) -> dict[str, bool]:
    folded = check_against_eager(Chain(), torch.randn(2, 4, 8, 8), pass_backend(settings))
    assert folded == sum(_folded_modules().values())
    return _folded_modules()


def test_modules_selects_by_affine_or_producer_name():
    assert _chain(Settings(fold="always", modules=["blocks.1"])) == {"blocks.0": False, "blocks.1": True, "blocks.2": False}
    compile_affine.reset()
    torch._dynamo.reset()
    # The producer's name selects too: the conv inside block 2.
    assert _chain(Settings(fold="always", modules=("blocks.2.conv",))) == {"blocks.0": False, "blocks.1": False, "blocks.2": True}
    assert compile_affine.report().reasons() == {EXCLUDED: 2}


def test_exclude_wins_over_modules_and_over_legality_reasons():
    settings = Settings(fold="always", modules=["blocks"], exclude=["blocks.0*", "*.2.conv"])
    assert _chain(settings) == {"blocks.0": False, "blocks.1": True, "blocks.2": False}
    assert [s.reason for s in compile_affine.report().sites if not s.folded] == [EXCLUDED, EXCLUDED]
    # A site a legality rule refuses reports the exclusion when excluded.
    def fn(x, w, s):
        y = torch.nn.functional.conv2d(x, w)
        return y * s + y  # the conv output is read twice: not legal

    args = (torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3, requires_grad=True), torch.rand(1, 4, 1, 1, requires_grad=True))
    reasons = []
    for exclude in ((), ("*",)):
        compile_affine.reset()
        joint_graph(fn, *args, settings=Settings(fold="always", exclude=exclude))
        (site,) = compile_affine.report().sites
        reasons.append(site.reason)
    assert reasons[0] not in (None, EXCLUDED) and reasons[1] == EXCLUDED, reasons


def test_everything_excluded_leaves_the_graph_as_it_came():
    def fn(x, w, s, t):
        return torch.nn.functional.conv2d(x, w) * s + t

    args = (torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3, requires_grad=True),
            torch.rand(1, 4, 1, 1, requires_grad=True), torch.randn(1, 4, 1, 1, requires_grad=True))  # fmt: skip
    before, after = joint_graph(fn, *args, settings=Settings(fold="always", exclude=["*"]))
    from .helpers import graph_text

    assert graph_text(after) == before
    assert compile_affine.report().reasons() == {EXCLUDED: 1}


def test_patterns_match_a_name_or_a_dotted_prefix():
    assert matches("backbone.layer1.0.bn1", ("backbone",)) and matches("backbone.layer1.0.bn1", ("backbone.*",))
    assert matches("layer1.0.bn1", ("layer1*",)) and matches("layer1.0.bn1", ("*.bn1",))
    assert not matches("backbone2.conv", ("backbone",)) and not matches("layer10.bn", ("layer1",))
    assert not matches("Layer1.bn", ("layer1",))  # case-sensitive, as module names are
    assert matches("", ("*",))  # an affine written in the compiled module's own forward


def test_options_are_lists_of_strings_stored_as_tuples():
    settings, _ = split_options({"compile_affine": {"modules": ["backbone"], "exclude": ["backbone.fpn"]}})
    assert settings.modules == ("backbone",) and settings.exclude == ("backbone.fpn",)
    assert hash(settings) == hash(Settings(modules=("backbone",), exclude=("backbone.fpn",)))
    with pytest.raises(TypeError, match=r"'modules' must be a list of module name patterns, got the string 'backbone'; write \['backbone'\]"):
        Settings(modules="backbone")
    with pytest.raises(TypeError, match="'exclude' must be a list of strings"):
        Settings(exclude=[1])
    with pytest.raises(TypeError, match="'exclude' must be a list"):
        Settings(exclude=None)


@pytest.mark.parametrize("path", ["L['self'].layer1.0.bn1", "L['self'].layer1[0].bn1",
                                  "self._modules['layer1']._modules['0'].bn1", "G['model'].layer1.0.bn1", "layer1.0.bn1"])  # fmt: skip
def test_dynamo_module_paths_become_qualified_names(path):
    assert qualified_name(path) == "layer1.0.bn1"
    assert qualified_name("L['self']") == ""


def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).double().eval()  # eval-mode BN: sites under fold="always"
    with torch.no_grad():  # statistics that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    return model, torch.randn(1, 3, 32, 32, dtype=torch.float64)


@pytest.mark.parametrize("option, folds", [
    ({"modules": ["layer4"]}, lambda name: name.startswith("layer4.")),
    ({"exclude": ["layer1*", "bn1"]}, lambda name: not name.startswith("layer1.") and name != "bn1"),
])  # fmt: skip
def test_torchvision_resnet18_eval_batch_norms(option, folds):
    model, x = _resnet18()
    settings = Settings(fold="always", strict=True, **option)
    check_against_eager(model, x, pass_backend(settings), out_tol=1e-10, grad_tol=1e-9)
    sites = compile_affine.report().graphs[0].sites
    assert len(sites) == 20 and all(s.kind == "batch_norm" for s in sites)
    assert [s.folded for s in sites] == [folds(s.module) for s in sites]
    assert sum(s.folded for s in sites) == (5 if "modules" in option else 15)
    # An excluded batch norm is not normalised: it keeps its record, producer and reason.
    left = [s for s in sites if not s.folded]
    assert all(s.reason == EXCLUDED for s in left)
    assert all(s.producer_module == s.module.replace("bn", "conv").replace("downsample.1", "downsample.0") for s in sites)


def test_timm_convnext_stage_selected():
    pytest.importorskip("timm")
    from .test_zoo import tiny

    model, x = tiny("convnext_atto")
    check_against_eager(model.double(), x.double(), pass_backend(Settings(fold="always", strict=True, modules=["stages.3"])),
                        out_tol=1e-10, grad_tol=1e-9)  # fmt: skip
    assert _folded_modules() == {"stages.0.blocks.0": False, "stages.1.blocks.0": False,
                                 "stages.2.blocks.0": False, "stages.3.blocks.0": True}  # fmt: skip


def test_through_the_backend_by_name():
    """The real backend: options parsed from ``torch.compile(options=...)``."""
    model, x = Chain(), torch.randn(2, 4, 8, 8)
    options = {"compile_affine": {"fold": "always", "exclude": ["blocks.1"]}}
    out = torch.compile(model, backend="compile_affine", options=options)(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert _folded_modules() == {"blocks.0": True, "blocks.1": False, "blocks.2": True}


def test_backbone_only_recipe():
    """docs/integrations.md, "Backbone only": the whole detector compiled, folds only in
    ``backbone``. In float64 against eager, with ``fold="always"`` so the cost rule does
    not decide which backbone sites fold at this size."""
    from .nets import ConvAffine

    torchvision = pytest.importorskip("torchvision")

    class Detector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(*list(torchvision.models.resnet18().children())[:-2])
            self.neck = ConvAffine(512, 16, k=1, padding=0)
            self.bbox_head = torch.nn.Sequential(torch.nn.Conv2d(16, 8, 1), torch.nn.BatchNorm2d(8))

        def forward(self, x):
            return self.bbox_head(self.neck(self.backbone(x)))

    model = Detector().double().eval()
    settings, _ = split_options({"compile_affine": {"modules": ["backbone"]}})
    settings = dataclasses.replace(settings, fold="always", strict=True)
    check_against_eager(model, torch.randn(1, 3, 32, 32, dtype=torch.float64), pass_backend(settings),
                        out_tol=1e-10, grad_tol=1e-9)  # fmt: skip
    sites = compile_affine.report().graphs[0].sites
    backbone = [s for s in sites if s.module.startswith("backbone.")]
    assert len(backbone) == 20 and all(s.folded for s in backbone)
    assert {(s.module, s.reason) for s in sites if not s.folded} == {("neck", EXCLUDED), ("bbox_head.1", EXCLUDED)}


def test_an_excluded_eval_batch_norm_is_not_normalised():
    """Normalising a batch norm only serves its fold: excluded (by its name or its conv's),
    it stays Inductor's decomposition, and the graph reaches Inductor as it came."""
    from .helpers import Captured, graph_text

    for pattern in ("1", "0"):  # the batch norm, then the conv before it
        torch._dynamo.reset()
        compile_affine.reset()
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
        captured = Captured()
        settings = Settings(fold="always", strict=True, exclude=[pattern])
        torch.compile(model, backend=pass_backend(settings, captured))(torch.randn(2, 3, 6, 6)).sum().backward()
        (site,) = compile_affine.report().sites
        assert (site.kind, site.module, site.producer_module, site.reason) == ("batch_norm", "1", "0", EXCLUDED)
        assert graph_text(captured.after[0]) == captured.before[0]
