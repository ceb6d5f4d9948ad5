"""Folding into a linear layer: ``views(mm(A, B) [+ b]) * s + t`` ->
``views(mm(A, B * s) [+ b * s] [+ t])``, and its backward."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..sites.linear import LinearSite
from .common import (Emitter, add_shift, erase_dead, feature_sum, feature_view, finish_result, per_channel, replace_scale_grad,
                     scale_vector)

aten = torch.ops.aten

def fold_linear(graph: fx.Graph, site: LinearSite) -> fx.Node:
    """``views(mm(A, B) [+ b]) * s + t``  ->  ``views(mm(A, B * s) [+ b * s] [+ t])``.

    ``B`` is ``(in, out)``: feature ``c`` is column ``c``. The new ``mm`` and views are
    built just before the affine (its operands may be defined after the old ``mm``);
    ``fold.run`` restores a topological order afterwards.
    """
    b_w, a_in = site.weight, site.mm.args[-2]
    w_val = b_w.meta["val"]
    out, y_val = w_val.shape[-1], site.y.meta["val"]
    emit = Emitter(graph, site.mm)
    compute = torch.promote_types(w_val.dtype, torch.float32)
    with graph.inserting_before(site.result):
        emit.recompute = True  # as for convs: backward recomputes B * s from B and s
        s_c = scale_vector(emit, site, out, w_val.device, compute)
        # A bmm weight broadcast over the batch (``W.t().expand(b, in, out)``) is scaled as
        # stored and broadcast again: weight-sized work, not batch-times-weight.
        stored = site.real_weight
        row = [1] * (stored.meta["val"].ndim - 1) + [out]
        w_fold = emit.cast(emit(aten.mul.Tensor, emit.upcast(stored), emit(aten.reshape.default, s_c, row)), w_val.dtype)
        if stored is not b_w:
            w_fold = emit(aten.expand.default, w_fold, list(w_val.shape))
        emit.recompute = False
        result_dtype = site.result.meta["val"].dtype
        shift_in_bias = site.shift is not None and result_dtype == y_val.dtype
        if site.mm.target is aten.bmm.default and not site.biases:
            shift_in_bias = False  # no bias slot to put it in: added after
        t_c = None if site.shift is None else per_channel(emit, site.shift, out, w_val.device, compute)
        new_bias = {}
        for i, (host, index, axis) in enumerate(site.biases):
            b_c = emit(aten.mul.Tensor, per_channel(emit, host.args[index], out, w_val.device, compute), s_c)
            if i == 0 and shift_in_bias:
                b_c = add_shift(emit, b_c, t_c, site.shift_sign)
            new_bias[host] = emit.cast(feature_view(emit, b_c, host.meta["val"].ndim, axis), host.meta["val"].dtype)
        mm_dtype = site.mm.meta["val"].dtype
        if site.mm.target is aten.addmm.default:
            new_mm = emit(aten.addmm.default, new_bias[site.mm], a_in, w_fold)
        elif shift_in_bias and not site.biases:  # the shift becomes the bias
            t_row = emit.cast(add_shift(emit, None, t_c, site.shift_sign), mm_dtype)
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
            t_view = feature_view(emit, emit.cast(t_c, result_dtype), y_val.ndim, site.axis)
            result = add_shift(emit, result, t_view, site.shift_sign)
        result = finish_result(emit, site, result)
    site.result.replace_all_uses_with(result)
    if site.grad_y is not None:
        _fold_linear_backward(graph, site, emit, s_c, w_fold)
    erase_dead(graph, [site.shift_node, site.anchor, site.y])
    return new_mm


def _rescale(emit: Emitter, node: fx.Node, s_c: fx.Node, axis: int) -> None:
    """Multiply ``node`` by ``s`` along ``axis`` for all its current readers."""
    readers = list(node.users)
    with emit.graph.inserting_after(node):
        val = node.meta["val"]
        scaled = emit(aten.mul.Tensor, emit.upcast(node), feature_view(emit, s_c, val.ndim, axis))
        scaled = emit.cast(scaled, val.dtype)
    for reader in readers:
        reader.replace_input_with(node, scaled)


def _fold_linear_backward(graph: fx.Graph, site: LinearSite, emit: Emitter, s_c: fx.Node, w_fold: fx.Node) -> None:
    """Feed ``g`` where autograd fed ``gy = g * s``, and correct each end it reaches:

    * input gradient ``mm(G, B.t())``: ``B`` becomes ``B * s``;
    * weight gradient ``mm(G.t(), A)`` (rows = features) and bias gradient ``sum(G)``:
      multiplied by ``s`` per feature;
    * scale gradient: ``sum(g * y)[c] = sum(mm(G.t(), A)[c] * B[:, c]) + sum(G)[c] * b[c]``.
    """
    gy, g = site.grad_y, site.grad
    with graph.inserting_before(gy):
        g = emit.cast(g, gy.meta["val"].dtype)
    gy.replace_all_uses_with(g)
    # Fed g, the bias's sum(G) is the shift's sum(g) over another view: one reduction
    # serves the shift, the bias and the scale's bias term (one read of g, not two).
    # (A 2-d linear's bias sum reads g itself: it is not the shift's.)
    shift_sum = feature_sum(site.grad, site.axis, exclude=frozenset(gb for gb, _ in site.grad_bias_sums))
    bias_sums = []
    for gb, axis in site.grad_bias_sums:
        if shift_sum is not None and shift_sum.meta["val"].dtype == gb.meta["val"].dtype:
            with graph.inserting_after(shift_sum):
                same = emit(aten.reshape.default, shift_sum, list(gb.meta["val"].shape))
            gb.replace_all_uses_with(same)
            erase_dead(graph, [gb])
            gb = same
        bias_sums.append((gb, axis))
    # Before rescaling: the raw corr(G, A) and sum(G) the scale's gradient needs.
    raw_gw = site.grad_weight_mms[0] if site.grad_weight_mms else None
    raw_gb = bias_sums[0] if bias_sums else None
    old_bts = [mm.args[1] for mm in site.grad_input_mms]
    for mm, bt in zip(site.grad_input_mms, old_bts):
        with graph.inserting_before(mm):
            mm.replace_input_with(bt, emit(bt.target, w_fold, *bt.args[1:]))
    for gw in site.grad_weight_mms:
        _rescale(emit, gw, s_c, site.weight_grad_axis(gw))
    for gb, axis in bias_sums:
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
                if raw_gb is None and shift_sum is not None:
                    sum_g = emit(aten.reshape.default, emit.upcast(shift_sum), [out])
                elif raw_gb is None:
                    y_dims = [d for d in range(site.y.meta["val"].ndim) if d != site.axis]
                    sum_g = emit(aten.sum.dim_IntList, emit.upcast(site.grad), y_dims)
                else:
                    sum_g = emit(aten.reshape.default, emit.upcast(raw_gb[0]), [out])
                for host, index, _ in site.biases:
                    b_c = per_channel(emit, host.args[index], out, s_c.meta["val"].device, s_c.meta["val"].dtype)
                    dot = emit(aten.add.Tensor, dot, emit(aten.mul.Tensor, sum_g, b_c))
            replace_scale_grad(emit, site, dot, s_c, site.axis)
    erase_dead(graph, [gy, *old_bts])
