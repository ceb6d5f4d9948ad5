"""What folding buys, asserted structurally: sites counted in the report and the
conv output no longer saved for backward."""

import logging

import torch

import compile_affine
from compile_affine.bench.core.measure import saved_for_backward

from .helpers import ALWAYS, pass_backend
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
    """Neither the conv output nor W*s is kept: the same bytes as no affine at all (+ s, t)."""
    x = torch.randn(2, 4, 12, 12)
    affine = Chain()
    plain = Chain()
    for block in plain.blocks:
        block.scale = None
        block.shift = None
        block.forward = lambda x, b=block: torch.relu(b.conv(x))
    folded = _saved(affine, x, backend=pass_backend(ALWAYS))
    torch._dynamo.reset()
    baseline = _saved(plain, x, backend=pass_backend(ALWAYS))
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
