"""``compile_affine::conv_act``: convolution + bias + activation as one training-capable op.

    conv_act(x, weight, bias, stride, padding, dilation, groups, activation)
        == act(aten.convolution(x, weight, bias, stride, padding, dilation, False, 0, groups))

``activation`` is ``"relu"``: its backward needs only the op's output (``out > 0``),
which is what eager's relu saves too, so fusing keeps nothing eager would not.
(SiLU and GELU are not offered: their backward reads the pre-activation, which the
fused op never materialises; see docs/design.md, "Epilogues".)

Forward on CPU, float32 or bfloat16 (where oneDNN has bf16), 2-d convs:
``torch.ops.mkldnn._convolution_pointwise`` with a ReLU post-op, on plain (not
prepacked) weights: one pass over the output instead of two. Everywhere else
(other devices, dtypes or dims, mkldnn disabled) an exact composite:
``aten.convolution`` then ``relu_`` on its fresh output.

Output layout: the oneDNN path is channels_last in and out (a contiguous ``x`` is
converted first), as Inductor runs CPU convs (``layout_optimization``) and as
``mkldnn._convolution_pointwise``'s own meta says; the composite path follows
``aten.convolution`` (channels_last when ``x`` is). The fake implementation says the same.

Backward (``register_autograd``): ``threshold_backward(g, out, 0)``, then
``aten.convolution_backward`` with the output mask autograd asks for.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch._prims_common import make_channels_last_strides_for, make_contiguous_strides_for

aten = torch.ops.aten

ACTIVATIONS = ("relu",)
"""Activations whose backward reads only the op's output."""


def onednn_dtypes() -> tuple[torch.dtype, ...]:
    """Dtypes the oneDNN path takes on this CPU (fp16 needs avx512_fp16 / avx_ne_convert)."""
    dtypes = [torch.float32]
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.append(torch.bfloat16)
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        dtypes.append(torch.float16)
    return tuple(dtypes)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _out_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> list:
    shape = [x.shape[0], weight.shape[0]]
    for d in range(x.dim() - 2):
        k = dilation[d] * (weight.shape[d + 2] - 1) + 1
        shape.append((x.shape[d + 2] + 2 * padding[d] - k) // stride[d] + 1)
    return shape


def _uses_onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and onednn_available()
        and x.dtype in onednn_dtypes()
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and x.layout == torch.strided
        and weight.layout == torch.strided
    )


def _composite(x, weight, bias, stride, padding, dilation, groups) -> Tensor:
    out = aten.convolution(x, weight, bias, stride, padding, dilation, False, [0] * (x.dim() - 2), groups)
    return out.relu_()


@torch.library.custom_op("compile_affine::conv_act", mutates_args=())
def conv_act(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    activation: str,
) -> Tensor:
    _check_activation(activation)
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    if not _uses_onednn(x, weight, bias):
        return _composite(x, weight, bias, stride, padding, dilation, groups)
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups, activation, [], "")
    # oneDNN follows the input's layout, and calls a (N, 1, H, W) input contiguous.
    want = make_channels_last_strides_for(out.shape)
    if _significant_strides(out.shape, out.stride()) != _significant_strides(out.shape, want):
        out = torch.empty_strided(out.shape, want, dtype=out.dtype, device=out.device).copy_(out)
    return out


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"conv_act: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _significant_strides(shape, strides) -> tuple:
    return tuple(s for n, s in zip(shape, strides) if n != 1)


@conv_act.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, activation):
    _check_activation(activation)
    shape = _out_shape(x, weight, list(stride), list(padding), list(dilation))
    channels_last = _uses_onednn(x, weight, bias) or _channels_last(x)
    strides = make_channels_last_strides_for(shape) if channels_last else make_contiguous_strides_for(shape)
    return x.new_empty_strided(shape, strides)


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, activation = inputs
    ctx.config = (list(stride), list(padding), list(dilation), groups)
    ctx.bias_sizes = None if bias is None else [bias.shape[0]]
    # What eager's convolution + relu keep: x and weight (for the conv), the relu output.
    ctx.save_for_backward(x, weight, output)


def _backward(ctx, grad):
    x, weight, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.config
    grad_pre = aten.threshold_backward(grad, out, 0)
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.bias_sizes is not None and ctx.needs_input_grad[2]]
    if not any(mask):
        return None, None, None, None, None, None, None, None
    gx, gw, gb = aten.convolution_backward(
        grad_pre, x, weight, ctx.bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups, mask
    )
    return gx, gw, gb, None, None, None, None, None


conv_act.register_autograd(_backward, setup_context=_setup_context)
