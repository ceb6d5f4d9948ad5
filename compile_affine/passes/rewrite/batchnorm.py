"""Normalise an eval-mode batch norm into the generic affine form, which ``fold_conv`` /
``fold_linear`` then fold (docs/design.md, "Eval-mode batch norm").

    (y - rm) * invstd * w + b   ->   y' * k + b,   y' = conv(x, W, b_conv - rm),  k = invstd * w

(for a linear producer ``y' = y + (-rm)``, a bias add inside the linear's views). Every
backward ``sub(y, rm)`` of the batch-norm formula is replaced by ``y'`` (the same
values), so its ``sum(g * (y - rm))`` becomes autograd's ``sum(g * y')`` for the scale;
the ``invstd * w`` the formula recomputes for the producer's gradient is replaced by
``k`` itself. Both are value-for-value replacements: the normalised graph is correct
and costs the same whether or not the generic fold then takes the site.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..sites.batchnorm import KIND, BatchNorm
from .common import Emitter, erase_dead

aten = torch.ops.aten
prims = torch.ops.prims

def normalise(graph: fx.Graph, bn: BatchNorm) -> fx.Node:
    """Rewrite ``bn`` in place; returns the new anchor ``mul(y', k)``."""
    y_val = bn.y.meta["val"]
    c, dtype = bn.channels, y_val.dtype
    compute = torch.promote_types(dtype, torch.float32)
    view = [1, c] + [1] * (y_val.ndim - 2)
    emit = Emitter(graph, bn.norm)

    def flat(node: fx.Node) -> fx.Node:
        return emit.cast(emit(aten.reshape.default, node, [-1]), compute)

    old_scales = [m.args[i] for m, i in bn.backward_scales]
    with graph.inserting_before(bn.result):  # every operand of the chain is defined by now
        rm_c = flat(bn.running_mean)
        if bn.linear is None:
            x, weight, bias, *config = bn.y.args
            shifted = emit(aten.neg.default, rm_c) if bias is None else emit(aten.sub.Tensor, emit.upcast(bias), rm_c)
            y_new = emit(aten.convolution.default, x, weight, emit.cast(shifted, dtype), *config)
        else:
            neg_rm = emit(aten.reshape.default, emit.cast(emit(aten.neg.default, rm_c), dtype), view)
            y_new = emit(aten.add.Tensor, bn.y, neg_rm)
        # invstd is the forward's own rsqrt(rv + eps) node: Inductor's value, not a recomputation.
        k_c = flat(bn.invstd)
        if bn.weight is not None:
            k_c = emit(aten.mul.Tensor, k_c, flat(bn.weight))
        k = emit(aten.reshape.default, emit.cast(k_c, dtype), view)
        anchor = emit(aten.mul.Tensor, y_new, k)
    anchor.meta[KIND] = "batch_norm"
    bn.result.replace_all_uses_with(anchor)
    for sub in bn.backward_subs:
        sub.replace_all_uses_with(y_new)
    for mul, i in bn.backward_scales:
        mul.update_arg(i, k)
    erase_dead(graph, [bn.result, *bn.backward_subs, *old_scales, bn.y if bn.linear is None else None])
    return anchor

