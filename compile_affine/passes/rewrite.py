"""Graph surgery for one legal site, forward and backward. Nothing else edits nodes.

Forward:  ``conv(x, W, b) * s + t``  ->  ``conv(x, W * s, b * s + t)``.

Backward, with ``g`` the gradient of the affine's output and ``y`` the old conv output,
autograd had computed ``gy = g * s`` for ``convolution_backward`` and ``gs = sum(g * y)``.
Running ``convolution_backward(g, x, W * s)`` instead gives ``gx`` unchanged, and
``gW' = corr(x, g)``, ``gb' = sum(g)``, from which, per output channel ``c``:

    gW[c] = gW'[c] * s[c]                  (since corr(x, g * s)[c] = s[c] * corr(x, g)[c])
    gb[c] = gb'[c] * s[c]
    gs[c] = sum(gW'[c] * W[c]) + gb'[c] * b[c]      (since y[c] = conv(x, W)[c] + b[c])

All three are weight-sized, so ``y`` need not be saved. The folded weight is computed
in fp32 and cast back, and is tagged for recompute so the partitioner saves ``W`` and
``s`` (alive anyway as parameters) instead of a second weight-sized ``W * s``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from .legality import CHANNEL_AXIS
from .sites import Operand, Site

aten = torch.ops.aten
prims = torch.ops.prims


class _Emitter:
    """Adds nodes with fake-tensor ``val`` metadata, as later Inductor passes require."""

    def __init__(self, graph: fx.Graph, like: fx.Node):
        self.graph = graph
        self.fake_mode = like.meta["val"].fake_mode
        self.meta = {k: like.meta[k] for k in ("stack_trace", "nn_module_stack") if k in like.meta}
        self.recompute = False

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        fake_args, fake_kwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
        with self.fake_mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        node.meta.update(self.meta)
        if self.recompute:
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        return node

    def cast(self, node: fx.Node, dtype: torch.dtype) -> fx.Node:
        if node.meta["val"].dtype == dtype:
            return node
        return self(prims.convert_element_type.default, node, dtype)

    def upcast(self, node: fx.Node) -> fx.Node:
        """At least fp32: 16-bit floats are upcast, fp32 and fp64 kept as they are."""
        dtype = node.meta["val"].dtype
        return self.cast(node, torch.float32) if dtype.is_floating_point and dtype.itemsize < 4 else node


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

    def scale(self, emit: _Emitter, w: fx.Node, s_c: fx.Node) -> fx.Node:
        """``w * s`` with ``s`` (C,) broadcast onto each output channel's slice of ``w``."""
        scaled = emit(aten.mul.Tensor, _reshape(emit, w, self.grouped), emit(aten.reshape.default, s_c, self.scale_shape))
        return _reshape(emit, scaled, self.shape)

    def reduce(self, emit: _Emitter, w: fx.Node) -> fx.Node:
        """Sum a weight-shaped tensor down to one value per output channel, (C,)."""
        summed = emit(aten.sum.dim_IntList, _reshape(emit, w, self.grouped), self.reduce_dims)
        return _reshape(emit, summed, [self.channels])


def _reshape(emit: _Emitter, node: fx.Node, shape: list) -> fx.Node:
    if list(node.meta["val"].shape) == list(shape):
        return node
    return emit(aten.reshape.default, node, shape)


def _per_channel(emit: _Emitter, operand: Operand, channels: int, device: torch.device, dtype: torch.dtype) -> fx.Node:
    """``operand`` as a vector of one value per channel, in at least fp32."""
    if not isinstance(operand, fx.Node):
        return emit(aten.full.default, [channels], float(operand), dtype=dtype, device=device, pin_memory=False)
    flat = emit(aten.reshape.default, operand, [-1])
    if flat.meta["val"].shape[0] != channels:
        flat = emit(aten.expand.default, flat, [channels])
    return emit.upcast(flat)


def _first_in_graph(graph: fx.Graph, nodes: list[fx.Node]) -> fx.Node:
    wanted = set(nodes)
    return next(n for n in graph.nodes if n in wanted)


def _erase_dead(graph: fx.Graph, nodes: list[fx.Node | None]) -> None:
    for node in nodes:  # callers list users before producers
        if node is not None and not node.users:
            graph.erase_node(node)


def fold(graph: fx.Graph, site: Site) -> fx.Node:
    """Rewrite ``site`` in place; returns the folded convolution node."""
    a = site.conv_args
    weight, bias = a["weight"], a["bias"]
    w_val = weight.meta["val"]
    cmap = _ChannelMap(w_val.shape, a["transposed"], a["groups"])
    out_dtype = site.conv.meta["val"].dtype
    emit = _Emitter(graph, site.conv)

    with graph.inserting_before(site.tail):
        # Tagged for recompute: backward re-derives W*s from W and s instead of saving it.
        emit.recompute = True
        compute = torch.promote_types(w_val.dtype, torch.float32)
        s_c = _per_channel(emit, site.scale, cmap.channels, w_val.device, compute)
        w_fold = emit.cast(cmap.scale(emit, emit.upcast(weight), s_c), w_val.dtype)
        emit.recompute = False
        # Under autocast eager computed ``y * s + t`` in fp32 from a 16-bit ``y``: the result
        # is cast up, and the shift is added after that, in fp32, not rounded into a 16-bit bias.
        result_dtype = site.tail.meta["val"].dtype
        shift_in_bias = site.shift is not None and result_dtype == out_dtype
        t_c = None if site.shift is None else _per_channel(emit, site.shift, cmap.channels, w_val.device, compute)
        b_fold = None
        if bias is not None:
            b_fold = emit(aten.mul.Tensor, emit.upcast(bias), s_c)
        if shift_in_bias:
            b_fold = _add_shift(emit, b_fold, t_c, site.shift_sign)
        if b_fold is not None:
            b_fold = emit.cast(b_fold, out_dtype)
        new_conv = emit(aten.convolution.default, a["x"], w_fold, b_fold, *site.conv.args[3:])
        result = emit.cast(new_conv, result_dtype)
        if t_c is not None and not shift_in_bias:
            t_view = emit(aten.reshape.default, emit.cast(t_c, result_dtype), [1, cmap.channels] + [1] * (w_val.ndim - 2))
            result = _add_shift(emit, result, t_view, site.shift_sign)
    site.tail.replace_all_uses_with(result)

    if site.grad is not None:
        _fold_backward(graph, site, emit, cmap, s_c, w_fold)
    _erase_dead(graph, [site.shift_node, site.mul, site.conv])
    return new_conv


def _add_shift(emit: _Emitter, value: fx.Node | None, shift: fx.Node, sign: int) -> fx.Node:
    if value is None:
        return shift if sign > 0 else emit(aten.neg.default, shift)
    return emit(aten.add.Tensor if sign > 0 else aten.sub.Tensor, value, shift)


def _fold_backward(graph: fx.Graph, site: Site, emit: _Emitter, cmap: _ChannelMap, s_c: fx.Node, w_fold: fx.Node) -> None:
    a = site.conv_args
    weight, bias = a["weight"], a["bias"]
    cb = site.conv_backward
    old_mask = list(cb.args[-1]) if cb is not None else [False, False, False]
    need_gs = site.grad_scale_sum is not None
    has_bias = bias is not None
    mask = [old_mask[0], old_mask[1] or need_gs, has_bias and (old_mask[2] or need_gs)]
    if not any(mask):
        return
    old = {u.args[1]: u for u in (cb.users if cb is not None else ())}

    anchor = _first_in_graph(graph, [n for n in (cb, site.grad_scale_sum) if n is not None])
    with graph.inserting_before(anchor):
        grad = emit.cast(site.grad, site.conv.meta["val"].dtype)  # autocast: g is wider
        new_cb = emit(
            aten.convolution_backward.default,
            grad, a["x"], w_fold, [cmap.channels], *site.conv.args[3:9], mask,
        )
        grad_x, grad_w_fold, grad_b_fold = (
            emit(operator.getitem, new_cb, i) if mask[i] else None for i in range(3)
        )
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
            site.grad_scale_sum.replace_all_uses_with(_like_scale_sum(emit, grad_s, site.grad_scale_sum))

    dead = [*old.values(), cb, site.grad_cast, site.grad_conv_input, site.grad_scale_sum, site.grad_scale_mul, site.saved_conv]
    _erase_dead(graph, dead)


def _like_scale_sum(emit: _Emitter, grad_s: fx.Node, old_sum: fx.Node) -> fx.Node:
    """Shape the per-channel ``gs`` like autograd's ``sum(g * y, dims)`` it replaces.

    If that reduction also summed the channel axis, the scale was one value for all
    channels, and its gradient is the total.
    """
    out = old_sum.meta["val"]
    ndim = old_sum.args[0].meta["val"].ndim
    dims = old_sum.args[1] if old_sum.target is aten.sum.dim_IntList else None
    if not dims or CHANNEL_AXIS in [d % ndim for d in dims]:
        grad_s = emit(aten.sum.default, grad_s)
    return emit.cast(emit(aten.reshape.default, grad_s, list(out.shape)), out.dtype)
