"""The fused conv + bias + relu epilogue (``epilogue="auto"``): the custom op
(``compile_affine::conv_act``, opcheck and gradients), the rewrite (where it fires and
where it must not), and training against eager through the pass harness and through
real ``torch.compile``."""

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compile_affine
from compile_affine import ops
from compile_affine.passes.fold import AffineFoldPass
from compile_affine.settings import Settings, split_options

from .helpers import (
    LOW_PRECISION,
    assert_close_rel,
    assert_grads_close,
    check_against_eager,
    count,
    forward_graph,
    joint_graph,
    pass_backend,
)

aten = torch.ops.aten
CONV_ACT = torch.ops.compile_affine.conv_act.default
EPILOGUE = Settings(fold="always", strict=True, epilogue="auto")
BF16 = torch.bfloat16 in ops.onednn_dtypes()
ONEDNN = ops.onednn_available()


# --- the custom op -------------------------------------------------------------------


def _op_args(dtype=torch.float32, channels_last=False, bias=True, groups=1, stride=(1, 1), dilation=(1, 1), grad=True):
    x = torch.randn(2, 4, 9, 9, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=dtype)
    b = torch.randn(6, dtype=dtype) if bias else None
    tensors = [t.requires_grad_(grad) if t is not None else None for t in (x, w, b)]
    return (*tensors, list(stride), [1, 1], list(dilation), groups, "relu")


OP_CASES = {
    "fp32": {},
    "channels_last": {"channels_last": True},
    "no_bias": {"bias": False},
    "groups_stride": {"groups": 2, "stride": (2, 1)},
    "dilation": {"dilation": (2, 2)},
    "fp64_composite": {"dtype": torch.float64},
    "no_grad": {"grad": False},
}


@pytest.mark.parametrize("case", OP_CASES)
def test_opcheck(case):
    torch.library.opcheck(CONV_ACT, _op_args(**OP_CASES[case]))


@pytest.mark.skipif(not BF16, reason="no oneDNN bf16 on this CPU")
def test_opcheck_bf16():
    torch.library.opcheck(CONV_ACT, _op_args(dtype=torch.bfloat16, channels_last=True), atol=2e-2, rtol=2e-2)


def test_opcheck_conv1d_composite():
    args = (torch.randn(2, 4, 7, requires_grad=True), torch.randn(6, 4, 3, requires_grad=True), None, [1], [0], [1], 1, "relu")
    torch.library.opcheck(CONV_ACT, args)


@pytest.mark.parametrize("case", ["fp32", "channels_last", "groups_stride", "fp64_composite"])
def test_op_matches_conv_relu(case):
    args = _op_args(**OP_CASES[case])
    x, w, b, stride, padding, dilation, groups, _ = args
    out = CONV_ACT(*args)
    ref = F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, w, b), g)
    ref_grads = torch.autograd.grad(ref, (x, w, b), g)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_op_layout():
    """oneDNN path: channels_last out, whatever the input; composite: aten.convolution's."""
    out = CONV_ACT(*_op_args(grad=False))
    if ONEDNN:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert CONV_ACT(*_op_args(dtype=torch.float64, grad=False)).is_contiguous()


def test_op_rejects_other_activations():
    args = list(_op_args(grad=False))
    args[-1] = "silu"
    with pytest.raises(ValueError, match="activation must be one of"):
        CONV_ACT(*args)


# --- the rewrite ------------------------------------------------------------------------


def _inputs(c_in=4, c_out=8):
    torch.manual_seed(0)
    x = torch.randn(2, c_in, 8, 8, requires_grad=True)
    w = torch.randn(c_out, c_in, 3, 3, requires_grad=True)
    b = torch.randn(c_out, requires_grad=True)
    s = (torch.rand(1, c_out, 1, 1) + 0.5).requires_grad_()
    t = torch.randn(1, c_out, 1, 1, requires_grad=True)
    return x, w, b, s, t


def conv_bias_relu(x, w, b):
    return F.relu(F.conv2d(x, w, b, padding=1)) * 2  # not the graph output: see test_graph_output_not_fused


def conv_affine_relu(x, w, s, t):
    return F.relu(F.conv2d(x, w, padding=1) * s + t) * 2


def conv_add_bias_relu_(x, w, b):
    return F.conv2d(x, w, None, padding=1).add(b.view(1, -1, 1, 1)).relu_() * 2


def _fused(gm) -> tuple[int, int, int]:
    return count(gm, CONV_ACT), count(gm, aten.relu.default), count(gm, aten.convolution.default)


def test_fires_on_conv_bias_relu():
    x, w, b, *_ = _inputs()
    _, gm = joint_graph(conv_bias_relu, x, w, b, settings=EPILOGUE)
    assert _fused(gm) == (1, 0, 0)
    assert compile_affine.report().fused_epilogues == 1
    # backward untouched: convolution_backward still reads x and W, the mask reads the op's output
    assert count(gm, aten.convolution_backward.default) == 1


def test_fires_after_fold():
    x, w, _, s, t = _inputs()
    _, gm = joint_graph(conv_affine_relu, x, w, s, t, settings=EPILOGUE)
    assert _fused(gm) == (1, 0, 0)
    (op,) = [n for n in gm.graph.nodes if n.target is CONV_ACT]
    assert op.args[2] is not None  # the folded bias b*s + t rides in the fused op
    report = compile_affine.report()
    assert report.folded == 1 and report.fused_epilogues == 1
    assert "fused 1 of 1 conv epilogues" in report.graphs[0].summary()


def test_fires_on_added_bias_and_inplace_relu():
    x, w, b, *_ = _inputs()
    _, gm = joint_graph(conv_add_bias_relu_, x, w, b, settings=EPILOGUE)
    assert _fused(gm) == (1, 0, 0)
    assert count(gm, aten.add.Tensor) == 0


def test_fires_in_inference_graph():
    x, w, b, *_ = _inputs()
    _, gm = forward_graph(conv_bias_relu, x.detach(), w.detach(), b.detach(), settings=EPILOGUE)
    assert _fused(gm) == (1, 0, 0)


def test_off_by_default_and_when_off():
    x, w, b, *_ = _inputs()
    assert Settings().epilogue == "off"
    _, gm = joint_graph(conv_bias_relu, x, w, b, settings=Settings(fold="always", strict=True))
    assert _fused(gm) == (0, 1, 1)
    assert compile_affine.report().epilogues == []


def _refused(fn, *args) -> str:
    _, gm = joint_graph(fn, *args, settings=EPILOGUE)
    assert count(gm, CONV_ACT) == 0
    (record,) = compile_affine.report().epilogues
    assert not record.fused
    return record.reason


def test_not_fused_when_pre_activation_reused():
    x, w, b, *_ = _inputs()
    assert _refused(lambda x, w, b: (lambda y: F.relu(y) + y)(F.conv2d(x, w, b, padding=1)), x, w, b) == "conv output reused"


def test_not_fused_when_pre_activation_reused_in_backward():
    """``y * y`` reads the conv output in backward only through autograd's saved copy."""
    x, w, b, *_ = _inputs()

    def fn(x, w, b):
        y = F.conv2d(x, w, b, padding=1)
        return F.relu(y) * 2 + (y * y).sum()

    assert _refused(fn, x, w, b) == "conv output reused"


def test_graph_output_not_fused():
    """Its layout would change (channels_last) for the caller."""
    x, w, b, *_ = _inputs()
    assert "graph output" in _refused(lambda x, w, b: F.relu(F.conv2d(x, w, b, padding=1)), x, w, b)


def test_view_of_output_not_fused():
    x, w, b, *_ = _inputs()
    assert "view" in _refused(lambda x, w, b: F.relu(F.conv2d(x, w, b, padding=1)).view(2, -1) * 2, x, w, b)


def test_float64_not_fused():
    x, w, b, *_ = (t.detach().double().requires_grad_() for t in _inputs())
    assert "no oneDNN path" in _refused(conv_bias_relu, x, w, b)


def test_conv1d_and_transposed_not_fused():
    x = torch.randn(2, 4, 8, requires_grad=True)
    w = torch.randn(6, 4, 3, requires_grad=True)
    assert "2-d only" in _refused(lambda x, w: F.relu(F.conv1d(x, w)) * 2, x, w)
    compile_affine.reset()
    x2, wt = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(4, 6, 3, 3, requires_grad=True)
    assert "transposed" in _refused(lambda x, w: F.relu(F.conv_transpose2d(x, w)) * 2, x2, wt)


def test_spatial_add_not_fused():
    x, w, *_ = _inputs()
    other = torch.randn(1, 8, 8, 8)
    reason = _refused(lambda x, w, other: F.relu(F.conv2d(x, w, padding=1) + other) * 2, x, w, other)
    assert reason == "added operand is not one value per channel"


def test_residual_add_not_fused():
    x, w, b, *_ = _inputs(c_in=8)
    assert "another is added" in _refused(lambda x, w, b: F.relu(F.conv2d(x, w, b, padding=1) + x) * 2, x, w, b)


# --- settings -------------------------------------------------------------------------


def test_setting_validated_and_in_uuid():
    with pytest.raises(ValueError, match="epilogue"):
        Settings(epilogue="always")
    settings, _ = split_options({"compile_affine": {"epilogue": "auto"}})
    assert settings.epilogue == "auto" and "epilogue='auto'" in repr(settings)
    assert AffineFoldPass(settings).uuid() != AffineFoldPass(Settings()).uuid()


# --- training against eager -----------------------------------------------------------


class Net(nn.Module):
    """conv -> affine -> relu twice (one strided, one grouped), conv + bias -> relu, a head."""

    def __init__(self, c=8):
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.s1, self.t1 = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5), nn.Parameter(torch.randn(1, c, 1, 1))
        self.c2 = nn.Conv2d(c, c, 3, stride=2, padding=1, groups=2, bias=False)
        self.s2, self.t2 = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5), nn.Parameter(torch.randn(1, c, 1, 1))
        self.c3 = nn.Conv2d(c, c, 1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = F.relu(self.c1(x) * self.s1 + self.t1)
        x = F.relu(self.c2(x) * self.s2 + self.t2)
        x = F.relu(self.c3(x), inplace=True)
        return self.head(x.mean((2, 3)))


def _net_and_input(channels_last: bool) -> tuple[Net, torch.Tensor]:
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    model = Net()
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        model = model.to(memory_format=torch.channels_last)
    return model, x


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_training_matches_eager(channels_last):
    model, x = _net_and_input(channels_last)
    assert check_against_eager(model, x, pass_backend(EPILOGUE)) == 2
    assert compile_affine.report().graphs[0].fused_epilogues == (3 if ONEDNN else 0)


@pytest.mark.skipif(not BF16, reason="no oneDNN bf16 on this CPU")
def test_bf16_autocast_matches_fp32():
    """Autocast: the plain conv + relu runs bf16 in the fused op (the folded ones add the
    shift in fp32 after the upcast, so they are not the pattern); bounded against fp32."""
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 12, 12)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend=pass_backend(EPILOGUE))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, eager_bf16 = compiled(x), copy.deepcopy(reference)(x)
    ref = reference(x)
    assert out.dtype == eager_bf16.dtype
    assert_close_rel(out.float(), ref, 5e-2, "forward", **LOW_PRECISION)
    g = torch.randn_like(ref)
    out.float().backward(g)
    ref.backward(g)
    # Through two relus in bf16, eager's own gradients are several percent off fp32 on
    # single channels (masks flip on rounding): 5e-2 on the whole tensor, 1e-1 per slice.
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert_grads_close(p.grad, p_ref.grad, 5e-2, f"grad {name}", element_atol=1.0, slice_floor=1.0)
        assert_grads_close(p.grad, p_ref.grad, 1e-1, f"grad {name}", **LOW_PRECISION)
    assert compile_affine.report().fused_epilogues == 1


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_torch_compile_inductor(channels_last):
    """The real backend: Inductor lowers the op to its oneDNN extern kernel (CPU)."""
    model, x = _net_and_input(channels_last)
    options = {"compile_affine": {"epilogue": "auto", "fold": "always", "strict": True}}
    assert check_against_eager(model, x, functools.partial(compile_affine.backend, options=options), steps=2) == 2
    assert compile_affine.report().graphs[0].fused_epilogues == (3 if ONEDNN else 0)
