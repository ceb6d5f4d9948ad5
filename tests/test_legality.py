"""Sites that must not fold: each legality rule leaves the graph alone, says why in
the report, and the results stay exact."""

import pytest
import torch

import compile_affine
from compile_affine.passes import legality

from .helpers import ALWAYS, check_against_eager, pass_backend
from .nets import ConvAffine, PerSampleScale, SqueezeExcite, WithExtraUser, WithScale


def only_site():
    (site,) = compile_affine.report().graphs[0].sites
    return site


CASES = {
    "extra user": (WithExtraUser, "conv output reused"),
    "squeeze-excite": (SqueezeExcite, "conv output reused"),
    "per-sample scale": (PerSampleScale, "scale varies per sample"),
    "spatial scale": (lambda: WithScale(torch.rand(1, 1, 8, 8)), "scale varies along spatial dim 2"),
    "(W,) scale with W == C": (lambda: WithScale(torch.rand(8)), "scale varies along spatial dim 3"),
    "per-sample (N,C,1,1) parameter": (lambda: WithScale(torch.rand(2, 8, 1, 1)), "scale varies per sample"),
    "scale adds a leading dim": (lambda: WithScale(torch.rand(3, 1, 8, 1, 1)), "scale has more dims than the conv output"),
    "promotes to float64": (lambda: WithScale(torch.rand(1, 8, 1, 1, dtype=torch.float64)), "fold would change result dtype"),
}


@pytest.mark.parametrize("case", CASES)
def test_illegal_site_is_left_alone(case):
    make, reason = CASES[case]
    model = make()
    check_against_eager(model, torch.randn(2, 4, 8, 8, requires_grad=True), pass_backend(ALWAYS), out_tol=1e-6, grad_tol=1e-6)
    site = only_site()
    assert not site.folded
    assert site.reason.startswith(reason), site.reason


def test_illegal_shift_keeps_the_add_but_folds_the_multiply():
    class PerSampleShift(ConvAffine):
        def forward(self, x):
            return torch.relu(self.conv(x) * self.scale + x.mean((1, 2, 3), keepdim=True))

    check_against_eager(PerSampleShift(), torch.randn(2, 4, 8, 8, requires_grad=True), pass_backend(ALWAYS))
    assert only_site().folded


def test_shared_conv_output_in_inference_is_left_alone():
    model = WithExtraUser()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=pass_backend(ALWAYS))(x), model(x), rtol=0, atol=0)
    assert only_site().reason == "conv output reused"


def test_every_rule_has_a_reason_string():
    # The report can only explain a skip if every rule speaks; this pins the list.
    assert [r.__name__ for r in legality.RULES] == [
        "conv_has_metadata",
        "conv_output_not_reused",
        "backward_recognised",
        "scale_per_channel",
        "scale_independent_of_conv",
        "result_unchanged",
    ]
