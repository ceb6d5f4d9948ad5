"""Linear producers: ``mm`` / ``addmm`` / ``bmm`` reached through views, permutes and
bias adds (``LinearChain``, also read by the eval-mode batch-norm normalisation), the
forward match and the backward walk (input, weight and bias gradients of ``g * s``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx as fx

from ..graph import CAST, PERMUTES, RESHAPES, Operand, known, same_shape, shape_of
from .base import Finding, Noted, Site, is_scale, unscaled_grad

aten = torch.ops.aten

@dataclasses.dataclass
class LinearSite(Site):
    """``y = views(mm(A, B) [+ b])`` with ``B`` the ``(in, out)`` weight operand
    (``W.t()`` for ``nn.Linear``); the features are ``mm``'s columns and ``y``'s ``axis``.
    ``bmm(A, B)`` with a ``(batch, in, out)`` weight operand (einsum's form) works alike.

    Backward: autograd fed ``gy = g * s`` through views to ``mm(gy2, B.t())`` (the input's
    gradient), ``mm(gy2.t(), A)`` (the weight's) and ``sum(gy, non-feature dims)`` (the
    bias's). The rewrite feeds ``g`` instead and corrects each of those.
    """

    mm: fx.Node = None  # type: ignore[assignment]
    chain: list[fx.Node] = dataclasses.field(default_factory=list)
    """The nodes from ``mm`` (exclusive) to ``y`` (inclusive), in order."""
    biases: list[tuple[fx.Node, int, int]] = dataclasses.field(default_factory=list)
    """``(host, index, axis)``: ``host.args[index]`` is added to the linear's output (by
    addmm or an add) while the features are on ``axis`` of ``host``'s output."""
    grad_y: fx.Node | None = None
    """``mul(g, s)`` (``div(g, s)``): the gradient of ``y``."""
    grad_input_mms: list[fx.Node] = dataclasses.field(default_factory=list)
    """``mm(G, B.t())``: the input's gradient. Only these read ``B * s`` after the fold:
    the ``B.t()`` node itself may be shared with another linear on the same weight."""
    grad_weight_mms: list[fx.Node] = dataclasses.field(default_factory=list)
    """``mm(G.t(), A)``: ``(out, in)``, one row per feature (``nn.Linear``'s backward);
    or ``mm(A.t(), G)`` / ``bmm(A.mT, G)``: ``B``'s own layout, features last."""
    grad_bias_sums: list[tuple[fx.Node, int]] = dataclasses.field(default_factory=list)
    """Reductions of the gradient to one value per feature, with the feature axis."""

    @classmethod
    def match(cls, anchor: fx.Node, y: fx.Node, scale: Operand, extra: dict) -> LinearSite | None:
        if anchor.target in (aten.add.Tensor, aten.sub.Tensor):
            # A linear's own bias is such an add when its input is not 2-D contiguous,
            # indistinguishable from a user's shift; both are left to Inductor's fusion.
            return None
        chain = LinearChain.trace(y)
        if chain is None:
            return None
        site = cls(anchor=anchor, scale=scale, mm=chain.mm, chain=chain.nodes, biases=chain.biases,
                   producer_finding=chain.finding, other_users=chain.other_users, **extra)  # fmt: skip
        site.axis = chain.axis
        return site

    def attach_backward(self, backward: set[fx.Node]) -> None:
        _attach_linear_backward(self, backward)

    @property
    def y(self) -> fx.Node:
        return self.chain[-1] if self.chain else self.mm

    @property
    def weight(self) -> fx.Node:
        return self.mm.args[-1]

    @property
    def producer(self) -> str:
        return "linear"

    @property
    def producer_node(self) -> fx.Node:
        return self.mm

    @property
    def real_weight(self) -> fx.Node:
        """``bmm(A, W.t().expand(b, in, out))``: the unexpanded ``W.t()``, when the expand
        keeps the feature (last) dim, so the fold scales and costs the stored weight."""
        w = self.weight
        if w.target is aten.expand.default and isinstance(w.args[0], fx.Node):
            src, dst = shape_of(w.args[0]), shape_of(w)
            if src and len(src) <= len(dst) and known(src[-1] == dst[-1]):
                return w.args[0]
        return w

    @property
    def produced(self) -> set[fx.Node]:
        return {self.mm, *self.chain}

    def operands(self) -> dict[str, Any]:
        ops = {"input": self.mm.args[-2], "weight": self.weight, "scale": self.scale, "shift": self.shift}
        ops.update({f"bias{i}": host.args[index] for i, (host, index, _) in enumerate(self.biases)})
        return ops

    def computes_weight_grad(self) -> bool:
        return bool(self.grad_weight_mms)

    def input_read_by_stock_backward(self) -> str | None:
        # The weight-gradient matmuls read A (or its transpose); the fold reads A nowhere
        # else in backward (the scale's gradient comes from theirs).
        return "input" if self.grad_weight_mms else None

    def residual_add(self) -> bool:
        """An add of a full-sized value between the linear and the scale is a residual
        add (``x + mlp(x)``), not the linear's bias: what follows scales the residual
        stream (MetaFormer's ``res_scale``), not this linear's output."""
        return any(host.target is aten.add.Tensor and same_shape(shape_of(host.args[index]), shape_of(host))
                   for host, index, _ in self.biases)  # fmt: skip

    def weight_grad_axis(self, node: fx.Node) -> int:
        """The feature axis of one of ``grad_weight_mms``."""
        if node.target is aten.mm.default and node.args[1] is self.mm.args[-2]:
            return 0  # mm(G.t(), A)
        return node.meta["val"].ndim - 1

    def backward_nodes(self) -> list[fx.Node]:
        nodes = [self.grad_y, self.grad_scale_sum, *self.grad_input_mms, *self.grad_weight_mms]
        return [n for n in nodes + [b for b, _ in self.grad_bias_sums] if n is not None]


_MM = (aten.mm.default, aten.addmm.default, aten.bmm.default)
_COPIES = (aten.clone.default, aten.alias.default)


def _view_axis(src: tuple, dst: tuple, axis: int) -> int | None:
    """Where a view puts the elements of ``src``'s ``axis``, if it keeps that axis whole:
    some ``dst`` dim of the same size with the same number of elements before it."""
    before = math.prod(src[:axis])
    for j, size in enumerate(dst):
        if known(size == src[axis]) and known(math.prod(dst[:j]) == before):
            return j
    return None


def _next_axis(node: fx.Node, axis: int) -> int | None:
    """The feature axis of ``node``'s output, given it is ``axis`` of its first input."""
    src, ndim = shape_of(node.args[0]), len(shape_of(node.args[0]))
    if not src or not 0 <= axis < ndim:
        return None
    if node.target in _COPIES or node.target is CAST:
        return axis
    if node.target is aten.permute.default:
        perm = [d % ndim for d in node.args[1]]
        return perm.index(axis)
    if node.target is aten.transpose.int:
        d0, d1 = (d % ndim for d in node.args[1:3])
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if node.target is aten.t.default:
        return ndim - 1 - axis
    if node.target in RESHAPES:
        return _view_axis(src, shape_of(node), axis)
    return None


def _chain_input(node: fx.Node) -> Any:
    """For a forward chain node, the operand carrying the linear's output."""
    if node.target in RESHAPES or node.target in PERMUTES or node.target in _COPIES:
        return node.args[0]
    if node.target is aten.add.Tensor and node.kwargs.get("alpha", 1) == 1:
        links = [a for a in node.args[:2] if _reaches_mm(a)]
        return links[0] if len(links) == 1 else None
    return None


def _reaches_mm(node: Any) -> bool:
    """Whether ``node`` is a linear's output through views and bias adds only."""
    stack, seen = [node], set()  # adds form a DAG (h + h): visit each node once
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node.op != "call_function" or node in seen:
            continue
        seen.add(node)
        if node.target in _MM:
            return True
        if node.target is aten.add.Tensor:
            stack += node.args[:2]
        elif node.target in RESHAPES or node.target in PERMUTES or node.target in _COPIES:
            stack.append(node.args[0])
    return False


@dataclasses.dataclass
class LinearChain:
    """``y`` as ``views(mm(A, B) [+ b])``: what the linear's output passes through on its
    way to ``y``, and where that leaves the features. Pure: it reads the graph only."""

    mm: fx.Node
    nodes: list[fx.Node]
    """From ``mm`` (exclusive) to ``y`` (inclusive), in order."""
    biases: list[tuple[fx.Node, int, int]] = dataclasses.field(default_factory=list)
    """As ``LinearSite.biases``."""
    axis: int = 1
    """The feature axis of ``y``."""
    finding: Noted | None = None
    """Set when a step broadcasts the output or splits the feature axis."""
    other_users: list[fx.Node] = dataclasses.field(default_factory=list)
    """Readers of an intermediate value (every one exists only to reach ``y``)."""

    @property
    def weight(self) -> fx.Node:
        return self.mm.args[-1]

    @property
    def produced(self) -> set[fx.Node]:
        return {self.mm, *self.nodes}

    @classmethod
    def trace(cls, y: fx.Node) -> LinearChain | None:
        """``y``'s chain back to a matrix product, or None when ``y`` is no linear's output."""
        chain, node = [], y
        while node.target not in _MM:
            chain.append(node)
            node = _chain_input(node)
            if not isinstance(node, fx.Node) or node.op != "call_function":
                return None
        mm = node
        if mm.target is aten.addmm.default and any(mm.kwargs.get(k, 1) != 1 for k in ("alpha", "beta")):
            return None
        chain.reverse()
        found = cls(mm=mm, nodes=chain)
        if mm.target is aten.addmm.default:
            found.biases.append((mm, 0, 1))
        axis, prev = len(shape_of(mm)) - 1, mm  # the features are mm's (bmm's) last dim
        for node in chain:
            if node.target is aten.add.Tensor:
                if not same_shape(shape_of(node), shape_of(prev)):
                    found.finding = (Finding.BIAS_BROADCASTS, "")
                found.biases.append((node, 1 if node.args[0] is prev else 0, axis))
                axis_next = axis
            else:
                axis_next = _next_axis(node, axis)
            if axis_next is None:
                found.finding = (Finding.SPLITS_FEATURE_AXIS, str(node.target))
                break
            axis, prev = axis_next, node
        found.axis = axis
        for node in [mm, *chain][:-1]:
            found.other_users += [u for u in node.users if u not in chain]
        return found


def _is_transpose_of(node: Any, target: fx.Node) -> bool:
    """``node`` is ``target`` with its last two dims swapped (``t``, ``permute``, ``transpose``)."""
    if not isinstance(node, fx.Node) or node.args[:1] != (target,):
        return False
    ndim = len(shape_of(target))
    if ndim < 2:
        return False
    if node.target is aten.t.default:
        return ndim == 2
    if node.target is aten.permute.default:
        return [d % ndim for d in node.args[1]] == [*range(ndim - 2), ndim - 1, ndim - 2]
    return node.target is aten.transpose.int and {d % ndim for d in node.args[1:3]} == {ndim - 2, ndim - 1}


def _attach_linear_backward(site: LinearSite, backward: set[fx.Node]) -> None:
    """Find ``gy = g * s`` and every use autograd made of it, following views, down to
    the three places it ends: the input's gradient ``mm(G, B.t())``, the weight's
    ``mm(G.t(), A)`` and the bias's ``sum``. Any other use means it is not ours to edit."""
    if isinstance(site.scale, fx.Node):
        scales = [site.scale, *(u for u in site.scale.users if is_scale(u, site))]
        readers = [u for s in scales for u in s.users]
    else:  # a Python number: look at every multiply (divide) in backward
        readers = [n for n in backward if n.target in (aten.mul.Tensor, aten.div.Tensor)]
    # Which ``g * s`` is ours? The scale's gradient names ``g`` when there is one.
    # Otherwise the walk must reach an operand only this linear reads: a second linear
    # on the same input (or the same weight node) has a backward of the very same shape.
    a_unique, b_unique = (_read_by_this_mm_only(n, site.mm, backward) for n in site.mm.args[-2:])
    ours = []
    for gy in dict.fromkeys(readers):
        g = unscaled_grad(gy, site) if gy in backward else None
        if g is None or (site.grad is not None and g is not site.grad):
            continue
        if not same_shape(shape_of(g), shape_of(site.y)):
            continue  # g broadcast by s: not a gradient of y
        uses = _gradient_uses(gy, site)
        if uses is None:
            continue
        if site.grad is None and not isinstance(uses[0], Finding):
            grad_input_mms, grad_weight_mms, _ = uses
            if not ((grad_input_mms and b_unique) or (grad_weight_mms and a_unique)):
                uses = (Finding.TWIN_LINEAR, "")
        ours.append((gy, g, uses))
    if not ours:
        if site.grad_scale_sum is not None:
            site.backward_finding = (Finding.NO_WEIGHT_GRAD, "")
        return
    if len(ours) > 1:
        site.backward_finding = (Finding.SEVERAL_LINEAR_GRADS, "")
        return
    (gy, g, uses), = ours
    if isinstance(uses[0], Finding):
        site.backward_finding = uses
        return
    site.grad_y, site.grad = gy, g
    site.grad_input_mms, site.grad_weight_mms, site.grad_bias_sums = uses
    if site.grad_scale_sum is not None and not site.grad_weight_mms:
        site.backward_finding = (Finding.NO_WEIGHT_GRAD, "")


def _read_by_this_mm_only(node: Any, mm: fx.Node, backward: set[fx.Node]) -> bool:
    return not any(u is not mm and u.target in _MM and u not in backward for u in getattr(node, "users", ()))


def _gradient_uses(gy: fx.Node, site: LinearSite) -> tuple | Noted | None:
    """Classify every use of ``gy``: None when none is this linear's, a ``(Finding, detail)``
    when one is ours but another is unrecognised, else the uses."""
    a_in, b_w = site.mm.args[-2], site.weight
    if not same_shape(shape_of(gy), shape_of(site.y)):
        return None
    grad_input_mms, grad_weight_mms, bias_sums = [], [], []
    problem, ours = None, False
    stack = [(gy, site.axis)]
    while stack:
        node, axis = stack.pop()
        ndim = len(shape_of(node))
        for user in node.users:
            target = user.target
            last = ndim - 1
            if target in (aten.mm.default, aten.bmm.default) and user.args[0] is node and axis == last \
                    and _is_transpose_of(user.args[1], b_w):  # fmt: skip
                grad_input_mms.append(user)
                ours = True
            elif target is aten.mm.default and user.args[0] is node and axis == 0 and user.args[1] is a_in:
                grad_weight_mms.append(user)  # (out, in): one row per feature
                ours = True
            elif target in (aten.mm.default, aten.bmm.default) and user.args[1] is node and axis == last \
                    and _is_transpose_of(user.args[0], a_in):  # fmt: skip
                grad_weight_mms.append(user)  # ([batch,] in, out): B's own layout
                ours = True
            elif target is aten.sum.dim_IntList and len(user.args) >= 2:
                dims = {d % ndim for d in user.args[1]}
                keepdim = bool(user.args[2]) if len(user.args) > 2 else bool(user.kwargs.get("keepdim", False))
                if axis in dims or len(dims) != ndim - 1 or user.kwargs.get("dtype") is not None:
                    problem = problem or (Finding.GRAD_REDUCED_OVER_FEATURES, "")
                else:
                    bias_sums.append((user, axis if keepdim else 0))
            elif target is aten.copy.default and user.args[1] is node and same_shape(shape_of(user), shape_of(node)):
                stack.append((user, axis))  # functional copy_ into a same-shaped buffer: the values of node
            elif target in RESHAPES or target in PERMUTES or target in _COPIES or target is CAST:
                nxt = _next_axis(user, axis)
                if nxt is None:
                    problem = problem or (Finding.GRAD_SPLITS_FEATURE_AXIS, str(target))
                else:
                    stack.append((user, nxt))
            else:
                problem = problem or (Finding.GRAD_USED_ELSEWHERE, str(target))
    if not ours:
        return None
    if problem is not None:
        return problem
    return grad_input_mms, grad_weight_mms, bias_sums
