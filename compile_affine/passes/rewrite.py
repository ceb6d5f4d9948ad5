"""Graph surgery for one legal site, forward and backward. Nothing else edits nodes.
Convolutions first; linear layers (``fold_linear``) follow the same algebra.

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
from .sites import ConvSite, LinearSite, Operand, Site

aten = torch.ops.aten
prims = torch.ops.prims

JUDGED = "compile_affine_judged"
"""Node meta key: an add the rewrite left behind, which ``fold.run`` must not judge again."""


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


# Pure ops the fold leaves dead behind it; their dead inputs of these kinds go too.
_PURE = {
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.neg.default, aten.add.Tensor, aten.sub.Tensor,
    aten.addcmul.default, aten.sum.dim_IntList, aten.sum.default, aten.convolution.default,
    aten.convolution_backward.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.view.default,
    aten._unsafe_view.default, aten.reshape.default, aten.permute.default, aten.transpose.int, aten.t.default,
    aten.clone.default, aten.alias.default, prims.convert_element_type.default, operator.getitem,
}  # fmt: skip


def _erase_dead(graph: fx.Graph, nodes: list[fx.Node | None]) -> None:
    pending = [n for n in nodes if n is not None]
    while pending:
        node = pending.pop()
        if not node._erased and not node.users and node.op == "call_function" and node.target in _PURE:
            pending += node.all_input_nodes
            graph.erase_node(node)


def _scale_vector(emit: _Emitter, site: Site, channels: int, device: torch.device, dtype: torch.dtype) -> fx.Node:
    """What multiplies each channel: ``s``, or ``1 / s`` for a division."""
    s_c = _per_channel(emit, site.scale, channels, device, dtype)
    return emit(aten.reciprocal.default, s_c) if site.divide else s_c


def _finish_result(emit: _Emitter, site: Site, result: fx.Node) -> fx.Node:
    """addcmul's shift, when it could not join the fold, is added back as it was."""
    if site.unfolded_shift is None:
        return result
    add = emit(aten.add.Tensor, site.unfolded_shift, result)
    add.meta[JUDGED] = True  # already reported with its addcmul: not a new site
    return add


def fold(graph: fx.Graph, site: Site) -> fx.Node:
    """Rewrite ``site`` in place; returns the folded producer node."""
    if isinstance(site, LinearSite):
        return fold_linear(graph, site)
    return fold_conv(graph, site)


def fold_conv(graph: fx.Graph, site: ConvSite) -> fx.Node:
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
        s_c = w_fold = weight
        if not site.shift_only:
            s_c = _scale_vector(emit, site, cmap.channels, w_val.device, compute)
            w_fold = emit.cast(cmap.scale(emit, emit.upcast(weight), s_c), w_val.dtype)
        emit.recompute = False
        # Under autocast eager computed ``y * s + t`` in fp32 from a 16-bit ``y``: the result
        # is cast up, and the shift is added after that, in fp32, not rounded into a 16-bit bias.
        result_dtype = site.tail.meta["val"].dtype
        shift_in_bias = site.shift is not None and result_dtype == out_dtype
        t_c = None if site.shift is None else _per_channel(emit, site.shift, cmap.channels, w_val.device, compute)
        b_fold = None
        if bias is not None:
            b_fold = emit.upcast(bias) if site.shift_only else emit(aten.mul.Tensor, emit.upcast(bias), s_c)
        if shift_in_bias:
            b_fold = _add_shift(emit, b_fold, t_c, site.shift_sign)
        if b_fold is not None:
            b_fold = emit.cast(b_fold, out_dtype)
        new_conv = emit(aten.convolution.default, a["x"], w_fold, b_fold, *site.conv.args[3:])
        result = emit.cast(new_conv, result_dtype)
        if t_c is not None and not shift_in_bias:
            t_view = emit(aten.reshape.default, emit.cast(t_c, result_dtype), [1, cmap.channels] + [1] * (w_val.ndim - 2))
            result = _add_shift(emit, result, t_view, site.shift_sign)
        result = _finish_result(emit, site, result)
    site.tail.replace_all_uses_with(result)

    if site.grad is not None:
        _fold_backward(graph, site, emit, cmap, s_c, w_fold)
    _erase_dead(graph, [site.shift_node, site.mul, site.conv])
    return new_conv


def _add_shift(emit: _Emitter, value: fx.Node | None, shift: fx.Node, sign: int) -> fx.Node:
    if value is None:
        return shift if sign > 0 else emit(aten.neg.default, shift)
    return emit(aten.add.Tensor if sign > 0 else aten.sub.Tensor, value, shift)


def _fold_backward(graph: fx.Graph, site: ConvSite, emit: _Emitter, cmap: _ChannelMap, s_c: fx.Node, w_fold: fx.Node) -> None:
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
            _replace_scale_grad(emit, site, grad_s, s_c, CHANNEL_AXIS)

    dead = [*old.values(), cb, site.grad_cast, site.grad_conv_input, site.grad_scale_sum]
    _erase_dead(graph, dead)


def _replace_scale_grad(emit: _Emitter, site: Site, dot: fx.Node, s_c: fx.Node, axis: int) -> None:
    """``dot`` is ``sum(g * y)`` per channel. For ``y * s`` that is the scale's gradient;
    for ``y / s`` it is ``-sum(g * y) / s**2``, with ``s_c`` already ``1 / s``."""
    if site.divide:
        dot = emit(aten.neg.default, emit(aten.mul.Tensor, dot, emit(aten.mul.Tensor, s_c, s_c)))
    old = site.grad_scale_sum
    old.replace_all_uses_with(_like_scale_sum(emit, dot, old, axis))
    _erase_dead(emit.graph, [old])


def _like_scale_sum(emit: _Emitter, grad_s: fx.Node, old_sum: fx.Node, axis: int) -> fx.Node:
    """Shape the per-channel ``gs`` like autograd's ``sum(g * y, dims)`` it replaces.

    If that reduction also summed the channel axis, the scale was one value for all
    channels, and its gradient is the total.
    """
    out = old_sum.meta["val"]
    ndim = old_sum.args[0].meta["val"].ndim
    dims = old_sum.args[1] if old_sum.target is aten.sum.dim_IntList else None
    if not dims or axis in [d % ndim for d in dims]:
        grad_s = emit(aten.sum.default, grad_s)
    return emit.cast(emit(aten.reshape.default, grad_s, list(out.shape)), out.dtype)


def fold_linear(graph: fx.Graph, site: LinearSite) -> fx.Node:
    """``views(mm(A, B) [+ b]) * s + t``  ->  ``views(mm(A, B * s) [+ b * s] [+ t])``.

    ``B`` is ``(in, out)``: feature ``c`` is column ``c``. The new ``mm`` and views are
    built just before the affine (its operands may be defined after the old ``mm``);
    ``fold.run`` restores a topological order afterwards.
    """
    b_w, a_in = site.weight, site.mm.args[-2]
    w_val = b_w.meta["val"]
    out, y_val = w_val.shape[-1], site.y.meta["val"]
    feature_row = [1] * (w_val.ndim - 1) + [out]
    emit = _Emitter(graph, site.mm)
    compute = torch.promote_types(w_val.dtype, torch.float32)
    with graph.inserting_before(site.tail):
        emit.recompute = True  # as for convs: backward recomputes B * s from B and s
        s_c = _scale_vector(emit, site, out, w_val.device, compute)
        w_fold = emit.cast(emit(aten.mul.Tensor, emit.upcast(b_w), emit(aten.reshape.default, s_c, feature_row)), w_val.dtype)
        emit.recompute = False
        result_dtype = site.tail.meta["val"].dtype
        shift_in_bias = site.shift is not None and result_dtype == y_val.dtype
        if site.mm.target is aten.bmm.default and not site.biases:
            shift_in_bias = False  # no bias slot to put it in: added after
        t_c = None if site.shift is None else _per_channel(emit, site.shift, out, w_val.device, compute)
        new_bias = {}
        for i, (host, index, axis) in enumerate(site.biases):
            b_c = emit(aten.mul.Tensor, _per_channel(emit, host.args[index], out, w_val.device, compute), s_c)
            if i == 0 and shift_in_bias:
                b_c = _add_shift(emit, b_c, t_c, site.shift_sign)
            new_bias[host] = emit.cast(_feature_view(emit, b_c, host.meta["val"].ndim, axis), host.meta["val"].dtype)
        mm_dtype = site.mm.meta["val"].dtype
        if site.mm.target is aten.addmm.default:
            new_mm = emit(aten.addmm.default, new_bias[site.mm], a_in, w_fold)
        elif shift_in_bias and not site.biases:  # the shift becomes the bias
            t_row = emit.cast(_add_shift(emit, None, t_c, site.shift_sign), mm_dtype)
            new_mm = emit(aten.addmm.default, t_row, a_in, w_fold)
        else:
            new_mm = emit(site.mm.target, a_in, w_fold)
        env = {site.mm: new_mm}
        for node in site.chain:
            args = [env.get(a, a) if isinstance(a, fx.Node) else a for a in node.args]
            if node in new_bias:
                (_, index, _), = [b for b in site.biases if b[0] is node]
                args[index] = new_bias[node]
            env[node] = emit(node.target, *args, **node.kwargs)
        result = emit.cast(env[site.y], result_dtype)
        if t_c is not None and not shift_in_bias:
            t_view = _feature_view(emit, emit.cast(t_c, result_dtype), y_val.ndim, site.axis)
            result = _add_shift(emit, result, t_view, site.shift_sign)
        result = _finish_result(emit, site, result)
    site.tail.replace_all_uses_with(result)
    if site.grad_y is not None:
        _fold_linear_backward(graph, site, emit, s_c, w_fold)
    _erase_dead(graph, [site.shift_node, site.mul, site.y])
    return new_mm


def _feature_view(emit: _Emitter, vector: fx.Node, ndim: int, axis: int) -> fx.Node:
    """A (C,) vector shaped to broadcast along ``axis`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return emit(aten.reshape.default, vector, shape)


def _rescale(emit: _Emitter, node: fx.Node, s_c: fx.Node, axis: int) -> None:
    """Multiply ``node`` by ``s`` along ``axis`` for all its current readers."""
    readers = list(node.users)
    with emit.graph.inserting_after(node):
        val = node.meta["val"]
        scaled = emit(aten.mul.Tensor, emit.upcast(node), _feature_view(emit, s_c, val.ndim, axis))
        scaled = emit.cast(scaled, val.dtype)
    for reader in readers:
        reader.replace_input_with(node, scaled)


def _fold_linear_backward(graph: fx.Graph, site: LinearSite, emit: _Emitter, s_c: fx.Node, w_fold: fx.Node) -> None:
    """Feed ``g`` where autograd fed ``gy = g * s``, and correct each end it reaches:

    * input gradient ``mm(G, B.t())``: ``B`` becomes ``B * s``;
    * weight gradient ``mm(G.t(), A)`` (rows = features) and bias gradient ``sum(G)``:
      multiplied by ``s`` per feature;
    * scale gradient: ``sum(g * y)[c] = sum(mm(G.t(), A)[c] * B[:, c]) + sum(G)[c] * b[c]``.
    """
    gy, g = site.grad_y, site.grad
    # Before rescaling: the raw corr(G, A) and sum(G) the scale's gradient needs.
    raw_gw = site.grad_weight_mms[0] if site.grad_weight_mms else None
    raw_gb = site.grad_bias_sums[0] if site.grad_bias_sums else None
    with graph.inserting_before(gy):
        g = emit.cast(g, gy.meta["val"].dtype)
    gy.replace_all_uses_with(g)
    old_bts = [mm.args[1] for mm in site.grad_input_mms]
    for mm, bt in zip(site.grad_input_mms, old_bts):
        with graph.inserting_before(mm):
            mm.replace_input_with(bt, emit(bt.target, w_fold, *bt.args[1:]))
    for gw in site.grad_weight_mms:
        _rescale(emit, gw, s_c, site.weight_grad_axis(gw))
    for gb, axis in site.grad_bias_sums:
        _rescale(emit, gb, s_c, axis)
    if site.grad_scale_sum is not None:
        out = s_c.meta["val"].shape[0]
        with graph.inserting_before(graph.output_node()):  # fold.run re-sorts the graph
            # sum(g * y)[c] = <raw weight gradient, B> over everything but feature c.
            weight = emit.upcast(site.weight)
            axis = site.weight_grad_axis(raw_gw)
            if axis == 0:  # (out, in): B transposed
                weight = emit(aten.permute.default, weight, [1, 0])
            dims = [d for d in range(weight.meta["val"].ndim) if d != axis]
            dot = emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, emit.upcast(raw_gw), weight), dims)
            if site.biases:
                if raw_gb is None:
                    y_dims = [d for d in range(site.y.meta["val"].ndim) if d != site.axis]
                    sum_g = emit(aten.sum.dim_IntList, emit.upcast(site.grad), y_dims)
                else:
                    sum_g = emit(aten.reshape.default, emit.upcast(raw_gb[0]), [out])
                for host, index, _ in site.biases:
                    b_c = _per_channel(emit, host.args[index], out, s_c.meta["val"].device, s_c.meta["val"].dtype)
                    dot = emit(aten.add.Tensor, dot, emit(aten.mul.Tensor, sum_g, b_c))
            _replace_scale_grad(emit, site, dot, s_c, site.axis)
    _erase_dead(graph, [gy, *old_bts])
