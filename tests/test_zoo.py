"""Third-party models from the benchmark zoo (compile_affine/bench/core/zoo.py), tiny versions
built by the zoo's own builders (timm / torchvision code, ``pretrained=False``): the
forward and every parameter's gradient against eager, and which affines folded.

Three run end to end through ``backend="compile_affine"`` (real Inductor, fp32); the
rest run the pass in float64 with the graphs executed as FX (tests/helpers.pass_backend),
where a tight tolerance separates a wrong rewrite from rounding.

Counts are asserted on the sites at the model's own affine lines (``convnext.py:216``...):
``report()`` also lists decomposition internals (GELU, GroupNorm) as skipped sites today,
and those must not count here.
"""

from __future__ import annotations

import copy
import functools
from collections import Counter

import pytest
import torch

import compile_affine
from compile_affine._compat import SCATTER_FILL_MISORDERED
from compile_affine.bench.core import zoo as catalogue
from compile_affine.bench.modes import zoo
from compile_affine.passes import legality
from compile_affine.settings import Settings

from .helpers import pass_backend

pytest.importorskip("timm")

ALWAYS = {"compile_affine": {"fold": "always", "strict": True}}


def tiny(name: str, batch: int = 2) -> tuple[torch.nn.Module, torch.Tensor]:
    entry = catalogue.ZOO_BY_NAME[name]
    model = entry.build(tiny=True)
    return model, torch.randn(batch, 3, entry.tiny_size, entry.tiny_size)


def check_against_eager(model: torch.nn.Module, x: torch.Tensor, backend, tol: float) -> None:
    """Forward and every parameter gradient within ``tol``, relative, with an absolute
    floor of ``tol`` times the largest value: some gradients are zero up to rounding
    (CaiT's talking-heads ``proj_l.bias``: softmax ignores a shift) and compare as noise."""
    compiled_model = copy.deepcopy(model)
    out_e, out_c = model(x), torch.compile(compiled_model, backend=backend)(x)
    torch.testing.assert_close(out_c, out_e, rtol=tol, atol=tol * out_e.abs().max().item())
    g = torch.randn_like(out_e)
    out_e.backward(g)
    out_c.backward(g)
    pairs = [(n, p_e.grad, p_c.grad) for (n, p_e), p_c in zip(model.named_parameters(), compiled_model.parameters())
             if p_e.requires_grad]  # fmt: skip
    scale = max(ge.abs().max().item() for _, ge, _ in pairs)
    for name, ge, gc in pairs:
        torch.testing.assert_close(gc, ge, rtol=tol, atol=tol * scale, msg=lambda m, name=name: f"grad {name}: {m}")


def by_location(report) -> tuple[Counter, Counter]:
    """(sites, folded) per affine source line, e.g. ``{"convnext.py:216": 4}``."""
    sites, folded = Counter(), Counter()
    for s in report.sites:
        where = s.location.split(" in ")[0]
        sites[where] += 1
        folded[where] += s.folded
    return sites, folded


# name: {affine line: (sites, folded)} with fold="always". The lines are the models' own
# affines; sites elsewhere in the report are decomposition internals (none of them folds).
END_TO_END = {
    # LayerScale gamma (1,C,1,1) after the MLP's 1x1 conv, one block per stage; before
    # torch 2.14 the last one is left alone (its gradient comes from the head's scatter)
    "convnext_atto": {"convnext.py:216": (4, 3 if SCATTER_FILL_MISORDERED else 4)},
    # LayerScale (C,) after attn.proj and mlp.fc2, depth 1
    "deit3_small": {"layer_scale.py:27": (2, 2)},
    # per block (2 stages of 1): skip-init gain (in-place mul_ of a 0-d parameter) on conv3,
    # then * alpha; the two fold into one conv, one after the other
    "nf_resnet26": {"nfnet.py:279": (2, 2), "nfnet.py:280": (2, 2)},
}


@pytest.mark.parametrize("name", END_TO_END)
def test_zoo_model_through_inductor(name):
    model, x = tiny(name)
    backend = functools.partial(compile_affine.backend, options=ALWAYS)
    # fp32 through Inductor reorders reductions; a wrong fold is off by O(1).
    check_against_eager(model, x, backend, tol=1e-4)
    report = compile_affine.report()
    assert not any(g.fell_back for g in report.graphs)
    sites, folded = by_location(report)
    for line, (n_sites, n_folded) in END_TO_END[name].items():
        assert (sites[line], folded[line]) == (n_sites, n_folded), (line, str(report))
    assert report.folded == sum(f for _, f in END_TO_END[name].values()), str(report)


# name: ({affine line: (sites, folded)}, {refusal reason: count}) with fold="always".
IN_FLOAT64 = {
    # gamma_1/gamma_2 after the linears: 1 self-attention block and 2 class-attention blocks
    "cait_xxs24": ({"cait.py:230": (1, 1), "cait.py:231": (1, 1), "cait.py:128": (2, 2), "cait.py:129": (2, 2)}, {}),
    # ls1 scales the features after a token-mixing linear (the linear's own axis is tokens):
    # refused; ls2 after mlp.fc2 folds. The Affine norm reads the residual stream: no site.
    "resmlp_12": ({"mlp_mixer.py:177": (1, 0), "mlp_mixer.py:178": (1, 1)},
                  {"scale varies along spatial dim 2, not the channel axis": 1}),
    # layer_scale2 after the MLP's 1x1 conv, one block per stage; layer_scale1 follows pooling
    "poolformer_s12": ({"metaformer.py:151": (4, 4)}, {}),
    # FrozenBatchNorm2d in Bottlenecks: stem, 3 per block (4 blocks), 4 downsamples
    "resnet50_frozenbn": ({"misc.py:63": (17, 17)}, {}),
    # FrozenBatchNorm2d: stem, 2 per BasicBlock (4 blocks), 3 downsamples
    "resnet18_frozenbn": ({"misc.py:63": (12, 12)}, {}),
    # the detection backbone on the same short ResNet; the FPN's convs carry no affine
    "fpn_resnet18_frozenbn": ({"misc.py:63": (12, 12)}, {}),
    # Eval-mode BatchNorm2d kept in eval while the net trains: bn1 and bn2 of 4 BasicBlocks,
    # 3 downsamples, the stem
    "resnet18_evalbn": ({"resnet.py:93": (4, 4), "resnet.py:97": (4, 4), "resnet.py:100": (3, 3),
                         "resnet.py:269": (1, 1)}, {}),
}


@pytest.mark.parametrize("name", IN_FLOAT64)
def test_zoo_model_in_float64(name):
    model, x = tiny(name)
    model, x = model.double(), x.double()
    check_against_eager(model, x, pass_backend(Settings(fold="always", strict=True)), tol=1e-9)
    expected, refused = IN_FLOAT64[name]
    report = compile_affine.report()
    sites, folded = by_location(report)
    for line, (n_sites, n_folded) in expected.items():
        assert (sites[line], folded[line]) == (n_sites, n_folded), (line, str(report))
    assert report.folded == sum(f for _, f in expected.values()), str(report)
    mine = {line for line in expected}
    got = Counter(s.reason for s in report.sites if not s.folded and s.location.split(" in ")[0] in mine)
    assert got == Counter(refused)


@pytest.mark.parametrize("misordered", [False, True])
def test_gradient_from_a_scatter_is_left_alone_before_torch_2_14(monkeypatch, misordered):
    # The global pool's backward scatters into the last block's gradient; the rule that
    # keeps the fold away from it is on for torch < 2.14 only, and exercised here on any.
    monkeypatch.setattr(legality, "SCATTER_FILL_MISORDERED", misordered)
    model, x = tiny("convnext_atto")
    check_against_eager(model.double(), x.double(), pass_backend(Settings(fold="always", strict=True)), tol=1e-9)
    sites = [s for s in compile_affine.report().sites if s.location.startswith("convnext.py:216")]
    assert [s.folded for s in sites] == [True, True, True, not misordered]
    assert [s.reason for s in sites[3:] if not s.folded] == (
        ["gradient comes from as_strided_scatter, which Inductor before torch 2.14 can zero"] if misordered else [])


def test_eval_norms_keeps_batchnorm_in_eval_mode():
    model = catalogue.ZOO_BY_NAME["resnet18_evalbn"].build(tiny=True)  # as built, and after train()
    assert model.training and not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    model.train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert model.training and model.model.conv1.training
    assert all(m.weight.requires_grad for m in norms)


def test_affines_are_not_left_at_their_identity_init():
    from torchvision.ops import FrozenBatchNorm2d

    model = catalogue.ZOO_BY_NAME["resnet18_frozenbn"].build(tiny=True)
    bn = next(m for m in model.modules() if isinstance(m, FrozenBatchNorm2d))
    assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    deit = catalogue.ZOO_BY_NAME["deit3_small"].build(tiny=True)
    assert deit.blocks[0].ls1.gamma.min() >= 0.5  # timm's init is 1e-5


def test_model_selection():
    assert [m.name for m in catalogue.select_zoo(None)] == [m.name for m in catalogue.ZOO if m.default]
    assert len(catalogue.select_zoo("all")) == len(catalogue.ZOO)
    assert [m.name for m in catalogue.select_zoo("deit3_small,convnext_atto")] == ["deit3_small", "convnext_atto"]
    with pytest.raises(SystemExit, match="unknown zoo model 'vgg'"):
        catalogue.select_zoo("vgg")


def test_table_reads_a_row():
    row = {"model": "m", "input": [8, 3, 128, 128], "sites": 5, "folded": 3, "declined": 1, "refused": 1,
           "refused_reasons": {"conv output reused": 1}, "fell_back": [], "saved_ratio": 0.5, "step_ratio": 0.9,
           "fp32_vs_eager_ours": (1e-7, 2e-6), "fp32_vs_eager_stock": (1e-7, 3e-6),
           "vs_float64_eager": {"ours": 1e-6, "stock": 1e-6, "eager": 5e-7},
           "float64_fx": {"out": 1e-16, "grad": 2e-15, "folded": 4, "sites": 5}}  # fmt: skip
    lines = zoo.table([row]).splitlines()
    assert len(lines) == 3 and lines[0].startswith("| model |")
    assert "| 1 (1: conv output reused) |" in lines[2] and "| 0.500 | 0.900 |" in lines[2]
    assert "1e-16/2e-15, 4 of 5" in lines[2]
    failed = zoo.table([{"model": "m", "source": "s", "error": "RuntimeError: boom"}]).splitlines()[2]
    assert failed.startswith("| m | FAILED: RuntimeError: boom |") and failed.count("|") == len(zoo.COLUMNS) + 1
