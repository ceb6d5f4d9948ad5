"""Folding into a convolution: ``conv(x, W, b) * s + t -> conv(x, W * s, b * s + t)``,
and its backward (see the package docstring for the algebra)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import target
from ..graph import CHANNEL_AXIS
from ..sites.conv import ConvSite
from .common import (Emitter, add_shift, conv_bias, erase_dead, feature_sum, finish_result, first_in_graph, per_channel,
                     replace_scale_grad, reshape, scale_vector)

aten = torch.ops.aten

class _ChannelMap:
    """Where output channel ``c`` lives in the weight.

    Regular conv weights are ``(C_out, C_in/g, *k)``: channel = dim 0. Transposed conv
    weights are ``(C_in, C_out/g, *k)``: the output channel is ``group * C_out/g + j``
    with ``j`` on dim 1, so the weight is viewed as ``(g, C_in/g, C_out/g, *k)``.
    """

    def __init__(self, weight_shape: torch.Size, transposed: bool, groups: int):
        self.shape = list(weight_shape)
        self.transposed = transposed
        self.groups = groups
        k = len(self.shape) - 2
        if transposed:
            c_in, per_group = self.shape[0], self.shape[1]
            self.grouped = [groups, c_in // groups, per_group, *self.shape[2:]]
            self.scale_shape = [groups, 1, per_group] + [1] * k
            self.reduce_dims = [1] + list(range(3, 3 + k))
            self.channels = groups * per_group
        else:
            self.grouped = self.shape
            self.scale_shape = [self.shape[0]] + [1] * (k + 1)
            self.reduce_dims = list(range(1, k + 2))
            self.channels = self.shape[0]

    def scale(self, emit: Emitter, w: fx.Node, s_c: fx.Node) -> fx.Node:
        """``w * s`` with ``s`` (C,) broadcast onto each output channel's slice of ``w``."""
        scaled = emit(aten.mul.Tensor, reshape(emit, w, self.grouped), emit(aten.reshape.default, s_c, self.scale_shape))
        return reshape(emit, scaled, self.shape)

    def reduce(self, emit: Emitter, w: fx.Node) -> fx.Node:
        """Sum a weight-shaped tensor down to one value per output channel, (C,)."""
        summed = emit(aten.sum.dim_IntList, reshape(emit, w, self.grouped), self.reduce_dims)
        return reshape(emit, summed, [self.channels])


def fold_conv(graph: fx.Graph, site: ConvSite) -> fx.Node:
    a = site.conv_args
    weight, bias = a["weight"], a["bias"]
    w_val = weight.meta["val"]
    cmap = _ChannelMap(w_val.shape, a["transposed"], a["groups"])
    out_dtype = site.conv.meta["val"].dtype
    emit = Emitter(graph, site.conv)

    with graph.inserting_before(site.result):
        # Tagged for recompute: backward re-derives W*s from W and s instead of saving it.
        emit.recompute = True
        compute = torch.promote_types(w_val.dtype, torch.float32)
        s_c = w_fold = weight
        if not site.shift_only:
            s_c = scale_vector(emit, site, cmap.channels, w_val.device, compute)
            w_fold = emit.cast(cmap.scale(emit, emit.upcast(weight), s_c), w_val.dtype)
        emit.recompute = False
        # Under autocast eager computed ``y * s + t`` in fp32 from a 16-bit ``y``: the result
        # is cast up, and the shift is added after that, in fp32, not rounded into a 16-bit bias.
        result_dtype = site.result.meta["val"].dtype
        shift_in_bias = site.shift is not None and result_dtype == out_dtype
        t_c = None if site.shift is None else per_channel(emit, site.shift, cmap.channels, w_val.device, compute)
        b_fold = None
        if bias is not None:
            b_fold = emit.upcast(bias) if site.shift_only else emit(aten.mul.Tensor, emit.upcast(bias), s_c)
        if shift_in_bias:
            b_fold = add_shift(emit, b_fold, t_c, site.shift_sign)
        if b_fold is not None:
            b_fold = emit.cast(b_fold, out_dtype)
        new_conv = emit(aten.convolution.default, a["x"], w_fold, conv_bias(emit, b_fold), *site.conv.args[3:])
        result = emit.cast(new_conv, result_dtype)
        if t_c is not None and not shift_in_bias:
            t_view = emit(aten.reshape.default, emit.cast(t_c, result_dtype), [1, cmap.channels] + [1] * (w_val.ndim - 2))
            result = add_shift(emit, result, t_view, site.shift_sign)
        result = finish_result(emit, site, result)
    site.result.replace_all_uses_with(result)

    if site.grad is not None:
        _fold_backward(graph, site, emit, cmap, s_c, w_fold)
    erase_dead(graph, [site.shift_node, site.anchor, site.conv])
    return new_conv


def _fold_backward(graph: fx.Graph, site: ConvSite, emit: Emitter, cmap: _ChannelMap, s_c: fx.Node, w_fold: fx.Node) -> None:
    a = site.conv_args
    weight, bias = a["weight"], a["bias"]
    cb = site.conv_backward
    old_mask = list(cb.args[-1]) if cb is not None else [False, False, False]
    need_gs = site.grad_scale_sum is not None
    has_bias = bias is not None
    mask = [old_mask[0], old_mask[1] or need_gs, has_bias and (old_mask[2] or need_gs)]
    # gb' = sum(g) per channel, and the shift's gradient (an eval batch norm's bias always
    # has one) is that same reduction, already in the graph: the step needs it once.
    shift_sum = feature_sum(site.grad, CHANNEL_AXIS)
    bias_in_backward = shift_sum is not None and _bias_grad_in_conv_backward(site, mask)
    if bias_in_backward:
        mask[2] = True  # and the separate sum(g) goes
    elif shift_sum is not None and mask[2]:
        mask[2] = False  # gb' is the shift's sum
    if not any(mask):
        return
    old = {u.args[1]: u for u in (cb.users if cb is not None else ())}

    anchor = first_in_graph(graph, [n for n in (cb, site.grad_scale_sum) if n is not None])
    with graph.inserting_before(anchor):
        grad = emit.cast(site.grad, site.conv.meta["val"].dtype)  # autocast: g is wider
        new_cb = emit(
            aten.convolution_backward.default,
            grad, a["x"], w_fold, [cmap.channels], *site.conv.args[3:9], mask,
        )
        grad_x, grad_w_fold, grad_b_fold = (
            emit(operator.getitem, new_cb, i) if mask[i] else None for i in range(3)
        )
        if bias_in_backward:
            shift_val = shift_sum.meta["val"]
            shift_sum.replace_all_uses_with(emit(aten.reshape.default, grad_b_fold, list(shift_val.shape)))
        elif shift_sum is not None:
            grad_b_fold = emit(aten.reshape.default, shift_sum, [cmap.channels])
        if 0 in old:
            old[0].replace_all_uses_with(grad_x)
        if 1 in old:
            grad_w = cmap.scale(emit, emit.upcast(grad_w_fold), s_c)
            old[1].replace_all_uses_with(emit.cast(grad_w, weight.meta["val"].dtype))
        if 2 in old:
            grad_b = emit(aten.mul.Tensor, emit.upcast(grad_b_fold), s_c)
            old[2].replace_all_uses_with(emit.cast(grad_b, bias.meta["val"].dtype))
        if need_gs:
            grad_s = cmap.reduce(emit, emit(aten.mul.Tensor, emit.upcast(grad_w_fold), emit.upcast(weight)))
            if has_bias:
                grad_s = emit(aten.add.Tensor, grad_s, emit(aten.mul.Tensor, emit.upcast(grad_b_fold), emit.upcast(bias)))
            replace_scale_grad(emit, site, grad_s, s_c, CHANNEL_AXIS)

    dead = [*old.values(), cb, site.grad_cast, site.grad_conv_input, site.grad_scale_sum,
            shift_sum if bias_in_backward else None]
    erase_dead(graph, dead)


def _bias_grad_in_conv_backward(site: ConvSite, mask: list[bool]) -> bool:
    """Whether ``convolution_backward`` should compute ``gb'`` (and so the shift's
    gradient) instead of a separate ``sum(g)``.

    On CPU it does so inside the weight-gradient primitive (oneDNN's diff_bias), which
    reads ``g`` anyway, so the separate reduction is one activation read the step no
    longer makes. Only when that primitive runs for ``gx`` or ``gW'`` already (a frozen
    first conv keeps its lone sum), and only when ``g`` has the conv's dtype (under
    autocast the convolution sees ``g`` cast down to 16 bits, and the shift's gradient
    must stay the fp32 sum eager computes). Elsewhere Inductor's decomposition splits
    a conv's bias gradient back out as ``aten.sum(g)`` (``torch/_inductor/decomposition.py``,
    GPUs), so the existing ``sum(g)`` stays as the one reduction, where Inductor may
    fuse it with the kernel that writes ``g``.
    """
    if not (mask[0] or mask[1]) or target.device_type(site.conv.meta["val"]) != "cpu":
        return False
    return site.grad.meta["val"].dtype == site.conv.meta["val"].dtype
