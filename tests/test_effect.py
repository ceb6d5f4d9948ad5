"""What folding buys, asserted structurally: sites counted in the report and the
conv output no longer saved for backward."""

import copy
import logging

import torch

import compile_affine
from compile_affine.bench.core.measure import saved_for_backward
from compile_affine.settings import Settings

from .helpers import ALWAYS, Captured, pass_backend
from .nets import Chain, ConvAffine

OPTIONS = {"compile_affine": {"fold": "always"}}


def _saved(model, x, **compile_kwargs):
    compiled = torch.compile(model, **compile_kwargs)
    compiled(x)  # compile outside the measurement
    return saved_for_backward(lambda: compiled(x))


def test_conv_output_is_not_saved(monkeypatch):
    model = ConvAffine(4, 8)
    x = torch.randn(2, 4, 10, 10)
    conv_out = (2, 8, 10, 10)
    torch._dynamo.reset()
    monkeypatch.setenv("COMPILE_AFFINE", "0")
    stock = _saved(model, x, backend="compile_affine")
    monkeypatch.setenv("COMPILE_AFFINE", "1")
    torch._dynamo.reset()
    folded = _saved(model, x, backend="compile_affine", options=OPTIONS)
    # Stock saves the conv output (for the scale's gradient) and the relu output.
    assert stock.shapes.count(conv_out) == 2
    assert folded.shapes.count(conv_out) == 1
    assert folded.bytes < stock.bytes
    assert compile_affine.report().folded == 1


def test_saved_bytes_match_the_net_without_affine():
    """Neither the conv output nor W*s is kept: the same bytes as no affine at all (+ s, t).
    That is the memory objective's promise; the time objective saves a float for the last
    ReLU's mask where the net without affine saves a bool (the test after next)."""
    x = torch.randn(2, 4, 12, 12)
    affine = Chain()
    plain = Chain()
    for block in plain.blocks:
        block.scale = None
        block.shift = None
        block.forward = lambda x, b=block: torch.relu(b.conv(x))
    memory = Settings(fold="always", strict=True, objective="memory")
    folded = _saved(affine, x, backend=pass_backend(memory))
    torch._dynamo.reset()
    baseline = _saved(plain, x, backend=pass_backend(memory))
    scale_and_shift_bytes = sum(b.scale.nbytes + b.shift.nbytes for b in affine.blocks)
    assert folded.bytes <= baseline.bytes + scale_and_shift_bytes


def test_report_counts_and_log_line(caplog):
    caplog.set_level(logging.INFO, logger="compile_affine")
    model = torch.nn.Sequential(Chain(), torch.nn.Conv2d(16, 4, 1))
    torch.compile(model, backend=pass_backend(ALWAYS))(torch.randn(2, 4, 8, 8))
    report = compile_affine.report()
    assert (report.folded, report.skipped, len(report.graphs)) == (3, 0, 1)
    assert [r.getMessage() for r in caplog.records if r.name == "compile_affine"] == [
        f"{report.graphs[0].graph_name}: 3 affine layers: 3 folded"
    ]
    text = str(report)
    assert "nets.py" in text and "conv2d" in text and "2x8x8x8" in text and "3 folded, 0 skipped" in text


def test_report_reset():
    torch.compile(ConvAffine(), backend=pass_backend(ALWAYS))(torch.randn(1, 4, 6, 6))
    assert len(compile_affine.report()) == 1
    compile_affine.reset()
    assert len(compile_affine.report()) == 0


class Stem(torch.nn.Module):
    """A ResNet stem: conv, learnable affine, ReLU, max-pool; nothing else reads the ReLU."""

    def __init__(self, learnable: bool = True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.scale = torch.nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5, requires_grad=learnable)
        self.shift = torch.nn.Parameter(torch.randn(1, 8, 1, 1), requires_grad=learnable)

    def forward(self, x):
        return torch.nn.functional.max_pool2d(torch.relu(self.conv(x) * self.scale + self.shift), 2)


def _saved_and_tagged(model, x, settings) -> tuple[list, int]:
    """What autograd saved (dtype, shape), and how many ReLU masks the pass tagged."""
    torch._dynamo.reset()
    compile_affine.reset()
    captured = Captured()
    compiled = torch.compile(model, backend=pass_backend(settings, captured))
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(x)
    out.sum().backward()
    assert compile_affine.report().folded == 1
    (joint,) = captured.after
    masks = [n for n in joint.graph.nodes if n.target is torch.ops.aten.le.Scalar]
    return saved, sum(m.meta.get("recompute") is not None for m in masks)


def test_the_relu_mask_after_a_fold_is_recomputed_not_stored_on_cpu():
    """Stock saves the conv output (for the scale's gradient) and recomputes the ReLU mask
    in backward. Folded, the partitioner would store the mask as a bool instead, a store
    Inductor's CPU code makes slow (passes/rewrite/masks.py). Under the time objective
    the mask is tagged for recompute, and a float of the conv output's size is saved, as
    stock saves; under the memory objective, or where stock saved no float (a frozen
    scale), the mask is left to the partitioner (torch 2.14's then stores the bool)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    saved, tagged = _saved_and_tagged(Stem(), x, ALWAYS)
    assert tagged == 1
    assert torch.bool not in {dtype for dtype, _ in saved}
    assert (torch.float32, (2, 8, 12, 12)) in saved
    assert _saved_and_tagged(Stem(), x, Settings(fold="always", strict=True, objective="memory"))[1] == 0
    assert _saved_and_tagged(Stem(learnable=False), x, ALWAYS)[1] == 0


def test_a_recomputed_relu_mask_gives_eager_gradients():
    torch.manual_seed(0)
    model, x = Stem().double(), torch.randn(2, 3, 12, 12, dtype=torch.float64)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compile_affine.reset()
    compiled = torch.compile(model, backend=pass_backend(ALWAYS))
    compiled(x).square().sum().backward()
    eager(x).square().sum().backward()
    assert compile_affine.report().folded == 1
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)
