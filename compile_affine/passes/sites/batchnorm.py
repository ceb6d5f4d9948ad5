"""Eval-mode batch norm after a convolution or a linear layer.

Inductor decomposes ``batch_norm(y, rm, rv, w, b, training=False)`` into
``sub(y, rm) -> mul(rsqrt(rv + eps)) [-> mul(w)] [-> add(b)]``, but its backward comes
from the batch-norm backward formula, not from autograd through those ops: it
recomputes ``sub(y, rm)`` from ``y`` for ``sum(g * (y - rm)) * invstd`` (w's gradient)
and feeds ``g * (invstd * w)``, computed again from the buffers, to the producer's
backward. That second reader of ``y`` hides the affine from the generic recognition.

This module only finds such chains and judges whether they may be normalised
(``legality.batch_norm_problem``); ``rewrite.batchnorm.normalise`` then turns each into the
generic form ``conv(x, W, b_conv - rm) * k [+ b]`` with ``k = invstd * w``, with the
backward written as autograd writes it for that form, so that the generic conv and
linear folds (and every legality rule and the cost model) apply unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from ..graph import ORDER_KEEPING_VIEWS, VIEW_OPS, Operand, backward_region, only_user, operand_problem, reaches, same_shape, shape_of, traced_for_backward
from .base import USER_AFFINE_OPS, InputMutations, mutated_primals
from .linear import LinearSite, linear_site

aten = torch.ops.aten
prims = torch.ops.prims

KIND = "compile_affine_kind"
"""Node meta key on a normalised anchor: the kind of layer the user wrote (``"batch_norm"``)."""

_VIEWS = ORDER_KEEPING_VIEWS | {aten.clone.default}


@dataclasses.dataclass
class BatchNorm:
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
    linear: LinearSite | None = None
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
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in _VIEWS:
            node = node.args[0]
        elif node.target is prims.convert_element_type.default and _dtype(node) == _dtype(node.args[0]):
            node = node.args[0]
        elif node.target in (aten.mul.Tensor, aten.mul.Scalar) and node.args[1] == 1 and not isinstance(node.args[1], bool):
            node = node.args[0]
        else:
            break
    return node


def _dtype(node: Any) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


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


def per_channel_problem(operand: Any, y: fx.Node, what: str) -> str | None:
    if not isinstance(operand, fx.Node):
        return f"batch norm {what} is not a tensor"
    problem = operand_problem(operand, y.meta["val"], what)
    # A 0-d operand passes the broadcast rule but is not C values: the rewrite needs C.
    if problem is None and torch.Size(shape_of(operand)).numel() != y.meta["val"].shape[1]:
        problem = f"{what} is not one value per channel"
    return problem


def _producer(y: Any) -> tuple[bool, LinearSite | None]:
    """Whether ``y`` is a conv's or a linear layer's output (and the linear's facts)."""
    if not isinstance(y, fx.Node) or y.op != "call_function":
        return False, None
    if y.target is aten.convolution.default:
        return True, None
    site = linear_site(y, y, 1, {})  # a probe: only the producer's facts are read
    if site is None or site.producer_finding or site.other_users or site.axis != 1:
        return False, None
    return True, site


def find_batch_norms(gm: fx.GraphModule, seen: InputMutations = InputMutations()) -> list[BatchNorm]:
    graph = gm.graph
    backward = backward_region(graph)
    traced = traced_for_backward(graph, backward) if backward else set()
    mutated = mutated_primals(graph, seen)
    found = []
    for sub in graph.nodes:
        if sub.target is not aten.sub.Tensor or sub in traced or sub.kwargs.get("alpha", 1) != 1:
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
        bn = BatchNorm(y=y, sub=sub, norm=norm, running_mean=rm, invstd=inv, invstd_key=key, linear=linear)
        _attach_weight(bn)
        _attach_backward_subs(bn, traced)
        bn.mutated = mutated
        if not bn.other_readers:
            bn.backward_scales = _backward_scales(bn, backward)
        found.append(bn)
    return found


def _attach_weight(bn: BatchNorm) -> None:
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


def _attach_backward_subs(bn: BatchNorm, traced: set[fx.Node]) -> None:
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
                and same_shape(shape_of(user), shape_of(bn.y)) and _dtype(user) == y_val.dtype):  # fmt: skip
            bn.backward_subs.append(user)
        else:
            bn.other_readers.append(user)


def _same_scale(node: Any, bn: BatchNorm) -> bool:
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
    readers += [u for r in readers if r.target is prims.convert_element_type.default for u in r.users]
    return any(r.target is aten.convolution_backward.default and r.args[1] is conv.args[0] and r.args[2] is conv.args[1]
               for r in readers)  # fmt: skip


def _base(node: Any) -> Any:
    """``node`` through views, permutes and same-dtype casts: the stored tensor it reads."""
    while isinstance(node, fx.Node) and (node.target in VIEW_OPS or node.target is aten.clone.default or (
            node.target is prims.convert_element_type.default and _dtype(node) == _dtype(node.args[0]))):  # fmt: skip
        node = node.args[0]
    return node


def _feeds_linear_backward(node: fx.Node, linear: LinearSite) -> bool:
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


def _backward_scales(bn: BatchNorm, backward: set[fx.Node]) -> list[tuple[fx.Node, int]]:
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
