"""Eval-mode batch norm after a convolution or a linear layer.

Inductor decomposes ``batch_norm(y, rm, rv, w, b, training=False)`` into
``sub(y, rm) -> mul(rsqrt(rv + eps)) [-> mul(w)] [-> add(b)]``, but its backward comes
from the batch-norm backward formula, not from autograd through those ops: it
recomputes ``sub(y, rm)`` from ``y`` for ``sum(g * (y - rm)) * invstd`` (w's gradient)
and feeds ``g * (invstd * w)``, computed again from the buffers, to the producer's
backward. That second reader of ``y`` hides the affine from the generic recognition.

This module finds such chains (``find_eval_batch_norms``); ``legality.batch_norm_problem``
judges whether each may be normalised, and ``normalise`` then turns it into the generic
form, value for value (docs/design.md, "Eval-mode batch norm"):

    (y - rm) * invstd * w + b   ->   y' * k + b,   y' = conv(x, W, b_conv - rm),  k = invstd * w

(for a linear producer ``y' = y + (-rm)``, a bias add inside the linear's views). Every
backward ``sub(y, rm)`` of the batch-norm formula is replaced by ``y'`` (the same
values), so its ``sum(g * (y - rm))`` becomes autograd's ``sum(g * y')`` for the scale;
the ``invstd * w`` the formula recomputes for the producer's gradient is replaced by
``k`` itself. The normalised graph is correct and costs the same whether or not the
generic conv and linear folds (every legality rule and the cost model) then take the site.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from ..graph import (CAST, KIND, ORDER_KEEPING_VIEWS, VIEW_OPS, GraphFacts, Operand, only_user, per_channel_problem,
                     reaches, same_dtype_cast, same_shape, shape_of, strip, unit_factor, val)
from ..rewrite.common import Emitter, erase_dead
from ..sites.base import USER_AFFINE_OPS
from ..sites.linear import LinearChain

aten = torch.ops.aten

_VIEWS = ORDER_KEEPING_VIEWS | {aten.clone.default}
_STORAGE_VIEWS = VIEW_OPS | {aten.clone.default}


@dataclasses.dataclass
class EvalBatchNorm:
    """One ``(y - rm) * invstd [* w] [+ b]`` chain on a producer's output ``y``."""

    y: fx.Node
    sub: fx.Node
    """The forward ``sub(y, rm)``."""
    norm: fx.Node
    """``mul(sub, invstd)``."""
    running_mean: fx.Node
    """``rm`` as ``sub`` reads it (a per-channel view)."""
    invstd: fx.Node
    """The forward's per-channel ``rsqrt(rv + eps)`` view, Inductor's own value."""
    invstd_key: tuple
    weight_mul: fx.Node | None = None
    """``mul(norm, w)``, merged into the scale when ``norm`` has no other reader."""
    weight: Operand | None = None
    linear: LinearChain | None = None
    """The producer when it is a linear layer (``y`` is then the end of its views)."""
    backward_subs: list[fx.Node] = dataclasses.field(default_factory=list)
    """The backward formula's ``sub(y, rm)``: the same values as ``sub``."""
    backward_scales: list[tuple[fx.Node, int]] = dataclasses.field(default_factory=list)
    """``(mul, index)``: ``mul.args[index]`` is the backward's own ``invstd * w`` per channel."""
    other_readers: list[fx.Node] = dataclasses.field(default_factory=list)
    mutated: set[fx.Node] = dataclasses.field(default_factory=set)
    """The graph's inputs it mutates (``legality.batch_norm_problem`` reads it)."""

    @property
    def producer(self) -> str:
        if self.linear is not None:
            return "linear"
        dims = len(shape_of(self.y.args[1])) - 2
        return f"conv{'_transpose' if self.y.args[6] else ''}{dims}d"

    @property
    def producer_node(self) -> fx.Node:
        return self.linear.mm if self.linear is not None else self.y

    @property
    def result(self) -> fx.Node:
        """The last node the normalised scale replaces."""
        return self.weight_mul or self.norm

    @property
    def channels(self) -> int:
        return shape_of(self.y)[1]


def through_views(node: Any) -> Any:
    """``node`` through views and value-preserving casts (same dtype) and ``* 1``."""
    return strip(node, _VIEWS, also=lambda n: same_dtype_cast(n) or unit_factor(n))


def invstd_key(node: Any) -> tuple | None:
    """``(rv, eps)`` if ``node`` is a view of ``rsqrt(rv + eps)`` (rv up to views and
    same-dtype casts), as both the forward and the backward decomposition compute it.
    torch 2.11's inference decomposition writes ``reciprocal(sqrt(rv + eps)) * 1`` instead."""
    node = through_views(node)
    if isinstance(node, fx.Node) and node.target is aten.reciprocal.default:
        node = node.args[0]
        if not (isinstance(node, fx.Node) and node.target is aten.sqrt.default):
            return None
    elif not (isinstance(node, fx.Node) and node.target is aten.rsqrt.default):
        return None
    add = node.args[0]
    if not (isinstance(add, fx.Node) and add.target is aten.add.Tensor and add.kwargs.get("alpha", 1) == 1):
        return None
    rv, eps = add.args[:2]
    if not isinstance(rv, fx.Node) or isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return None
    return through_views(rv), float(eps)


def _producer(y: Any) -> tuple[bool, LinearChain | None]:
    """Whether ``y`` is a conv's or a linear layer's output (and the linear's chain)."""
    if not isinstance(y, fx.Node) or y.op != "call_function":
        return False, None
    if y.target is aten.convolution.default:
        return True, None
    chain = LinearChain.trace(y)
    if chain is None or chain.finding or chain.other_users or chain.axis != 1:
        return False, None
    return True, chain


def find_eval_batch_norms(gm: fx.GraphModule, facts: GraphFacts) -> list[EvalBatchNorm]:
    found = []
    for sub in gm.graph.nodes:
        if sub.target is not aten.sub.Tensor or sub in facts.traced or sub.kwargs.get("alpha", 1) != 1:
            continue
        if not _from_batch_norm_or_user(sub):
            continue  # LayerNorm's (y - mean) * rstd looks the same
        y, rm = sub.args[:2]
        norm = only_user(sub, aten.mul.Tensor)
        if norm is None or not isinstance(rm, fx.Node):
            continue
        inv = norm.args[1] if norm.args[0] is sub else norm.args[0]
        key = invstd_key(inv)
        ok, linear = _producer(y)
        if key is None or not ok:
            continue
        bn = EvalBatchNorm(y=y, sub=sub, norm=norm, running_mean=rm, invstd=inv, invstd_key=key, linear=linear)
        _attach_weight(bn)
        _attach_backward_subs(bn, facts.traced)
        bn.mutated = facts.mutated
        if not bn.other_readers:
            bn.backward_scales = _backward_scales(bn, facts.backward)
        found.append(bn)
    return found


def _attach_weight(bn: EvalBatchNorm) -> None:
    """Merge ``* w`` into the scale when only it reads the normalised value (the batch-norm
    formula's backward never does; autograd's would, for a user's own ``* gamma``)."""
    mul = only_user(bn.norm, aten.mul.Tensor)
    if mul is None or mul.args[0] is mul.args[1]:
        return
    w = mul.args[1] if mul.args[0] is bn.norm else mul.args[0]
    produced = {bn.y, *(bn.linear.produced if bn.linear else ())}
    if isinstance(w, fx.Node) and per_channel_problem(w, bn.y, "weight") is None and not reaches(w, produced):
        bn.weight_mul, bn.weight = mul, w


def _from_batch_norm_or_user(sub: fx.Node) -> bool:
    """A batch norm's decomposition wrote ``sub`` (or the user did, by hand); not another
    op's (LayerNorm's, GroupNorm's), whose statistics are computed from ``y``."""
    origin = sub.meta.get("original_aten")
    return origin is None or "batch_norm" in str(origin) or str(origin) in USER_AFFINE_OPS


def _attach_backward_subs(bn: EvalBatchNorm, traced: set[fx.Node]) -> None:
    """Sort the other readers of ``y``: the formula's ``sub(y, rm)``, which the backward
    wrote (it reads no tangent, so only AOTAutograd's tag tells), or anything else. A
    forward ``sub(y, rm)`` is another reader: a second batch norm on the same output."""
    rm_base = through_views(bn.running_mean)
    y_val = bn.y.meta["val"]
    for user in bn.y.users:
        if user is bn.sub:
            continue
        if (user in traced and user.target is aten.sub.Tensor and user.args[0] is bn.y and user.kwargs.get("alpha", 1) == 1
                and isinstance(user.args[1], fx.Node) and through_views(user.args[1]) is rm_base
                and per_channel_problem(user.args[1], bn.y, "running mean") is None
                and same_shape(shape_of(user), shape_of(bn.y)) and getattr(val(user), "dtype", None) == y_val.dtype):  # fmt: skip
            bn.backward_subs.append(user)
        else:
            bn.other_readers.append(user)


def _same_scale(node: Any, bn: EvalBatchNorm) -> bool:
    """Is ``node`` (stripped) the value ``invstd [* w]``, recomputed from the same buffers?"""
    node = through_views(node)
    if bn.weight is None:
        return invstd_key(node) == bn.invstd_key
    if not (isinstance(node, fx.Node) and node.target is aten.mul.Tensor):
        return False
    a, b = node.args[:2]
    w = through_views(bn.weight)
    return (invstd_key(a) == bn.invstd_key and through_views(b) is w) or (invstd_key(b) == bn.invstd_key and through_views(a) is w)


def _feeds_conv_backward(node: fx.Node, conv: fx.Node) -> bool:
    """``node`` (through a cast) is the grad-output of ``conv``'s own backward."""
    readers = list(node.users)
    readers += [u for r in readers if r.target is CAST for u in r.users]
    return any(r.target is aten.convolution_backward.default and r.args[1] is conv.args[0] and r.args[2] is conv.args[1]
               for r in readers)  # fmt: skip


def _base(node: Any) -> Any:
    """``node`` through views, permutes and same-dtype casts: the stored tensor it reads."""
    return strip(node, _STORAGE_VIEWS, also=same_dtype_cast)


def _feeds_linear_backward(node: fx.Node, linear: LinearChain) -> bool:
    """``node`` (through views) is the gradient a matmul of ``linear``'s own backward
    reads: the weight gradient's (with the linear's input) or the input gradient's
    (with its weight)."""
    inputs, weight = _base(linear.mm.args[-2]), _base(linear.weight)
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if user.target in (aten.mm.default, aten.bmm.default):
                if any(_base(a) in (inputs, weight) for a in user.args if a is not n):
                    return True
            elif _base(user) is not user:  # a view or cast of the gradient
                stack.append(user)
    return False


def _backward_scales(bn: EvalBatchNorm, backward: set[fx.Node]) -> list[tuple[fx.Node, int]]:
    """The backward's ``g * (invstd * w)``: it feeds the producer's backward, and is
    recognised there only if it multiplies by the forward's scale node itself."""
    found = []
    for node in backward:
        if node.target is not aten.mul.Tensor or not same_shape(shape_of(node), shape_of(bn.y)):
            continue
        if not (_feeds_conv_backward(node, bn.y) if bn.linear is None else _feeds_linear_backward(node, bn.linear)):
            continue  # the same batch norm module after another producer (a Siamese net)
        for i in (0, 1):
            operand = node.args[i]
            if (isinstance(operand, fx.Node) and len(shape_of(operand)) == len(shape_of(bn.y))
                    and per_channel_problem(operand, bn.y, "scale") is None and _same_scale(operand, bn)):  # fmt: skip
                found.append((node, i))
                break
    return found


def normalise(graph: fx.Graph, bn: EvalBatchNorm) -> fx.Node:
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
