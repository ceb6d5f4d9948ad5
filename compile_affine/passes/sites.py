"""Recognise affine sites: ``convolution -> mul(., s) [-> add/sub(., t)]`` and, in a
joint graph, the backward nodes that autograd derived from that affine.

Recognition only collects facts; it never mutates the graph and never decides.
``legality`` decides from the facts, ``rewrite`` acts on them.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Union

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import (
    MULTIPLE,
    Arg,
    CallFunction,
    Match,
    PatternMatcherPass,
    register_graph_pattern,
)

aten = torch.ops.aten

Operand = Union[fx.Node, int, float]
"""A scale or shift: a graph value or a Python scalar baked into the graph."""

CONV_ARG_NAMES = ("x", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")


@dataclasses.dataclass
class Site:
    """One convolution feeding a per-channel affine, plus what its backward looks like."""

    conv: fx.Node
    mul: fx.Node
    scale: Operand
    shift: Operand | None = None
    shift_node: fx.Node | None = None
    """The add/sub absorbed into the site; ``tail`` is what the folded conv replaces."""
    shift_sign: int = 1
    # Backward (joint graphs only).
    grad: fx.Node | None = None
    """``g``: the gradient flowing into the affine's output."""
    grad_conv_input: fx.Node | None = None
    """``mul(g, s)``, the gradient of the conv output, feeding ``convolution_backward``."""
    conv_backward: fx.Node | None = None
    grad_scale_mul: fx.Node | None = None
    """``mul(g, y)`` whose reduction is the scale's gradient."""
    grad_scale_sum: fx.Node | None = None
    saved_conv: fx.Node | None = None
    """What the backward reads for ``y``: the conv output, or autograd's clone of it when
    the forward multiply was in place (``y.mul_(s)``)."""
    other_conv_users: list[fx.Node] = dataclasses.field(default_factory=list)
    """Users of the conv output that are neither the affine nor its recognised backward."""
    backward_problem: str | None = None
    """Set when backward nodes exist but do not have the shape autograd gives them."""

    @property
    def tail(self) -> fx.Node:
        return self.shift_node or self.mul

    @property
    def conv_args(self) -> dict[str, Any]:
        return dict(zip(CONV_ARG_NAMES, self.conv.args))

    @property
    def producer(self) -> str:
        a = self.conv_args
        dims = len(a["weight"].meta["val"].shape) - 2
        return f"conv{'_transpose' if a['transposed'] else ''}{dims}d"


# The pattern matcher finds the forward anchor, conv -> mul, in either operand order.
# The conv output may have several users (its backward use, or a real second user),
# so the conv is matched with MULTIPLE and the users are judged by ``legality``.
_conv = CallFunction(aten.convolution.default, *[Arg() for _ in CONV_ARG_NAMES], _users=MULTIPLE)
_MATCHER = PatternMatcherPass(pass_name="compile_affine_sites")
_found: list[tuple[fx.Node, fx.Node]] = []


def _collect(match: Match, *args: Any) -> None:
    mul = match.output_node()
    conv = next(n for n in mul.args if isinstance(n, fx.Node) and n.target is aten.convolution.default)
    _found.append((conv, mul))


for _pattern in (CallFunction(aten.mul.Tensor, _conv, Arg()), CallFunction(aten.mul.Tensor, Arg(), _conv)):
    register_graph_pattern(_pattern, pass_dict=_MATCHER)(_collect)


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """All conv -> mul anchors in ``gm``, extended to their shift and backward nodes."""
    _found.clear()
    try:
        _MATCHER.apply(gm)
        anchors = list(_found)
    finally:
        _found.clear()
    # The matcher walks nodes in reverse; report in program order.
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    anchors.sort(key=lambda cm: order[cm[1]])
    backward = backward_region(gm.graph)
    seen: set[fx.Node] = set()
    sites = []
    for conv, mul in anchors:
        # conv * conv matches both orders; a backward mul(g, conv) is part of a site, not one.
        if mul in seen or mul in backward:
            continue
        seen.add(mul)
        sites.append(_build_site(conv, mul, backward))
    return sites


def backward_region(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that depend on a tangent: the backward half of a joint graph (empty in inference)."""
    region: set[fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and "tangents" in str(node.target)) or any(
            a in region for a in node.all_input_nodes
        ):
            region.add(node)
    return region


def _other(node: fx.Node, known: Any) -> Any:
    """The operand of a binary op that is not ``known``."""
    a, b = node.args[:2]
    return b if a is known else a


def _build_site(conv: fx.Node, mul: fx.Node, backward: set[fx.Node]) -> Site:
    site = Site(conv=conv, mul=mul, scale=_other(mul, conv))
    _attach_shift(site)
    for user in conv.users:
        if user is mul:
            continue
        saved, reader = conv, user
        if user.target is aten.clone.default and len(user.users) == 1:
            saved, reader = user, next(iter(user.users))  # in-place mul_: autograd saved a copy
        if reader in backward and _is_grad_scale_mul(reader, saved) and site.grad_scale_mul is None:
            site.grad_scale_mul, site.saved_conv = reader, saved
        else:
            site.other_conv_users.append(user)
    if site.grad_scale_mul is not None:
        _attach_scale_grad(site)
    _attach_conv_backward(site, backward)
    if site.grad_scale_mul is not None and site.conv_backward is not None:
        if site.grad is not _other(site.grad_scale_mul, site.saved_conv):
            site.backward_problem = "backward uses of the affine disagree on its gradient"
    return site


def _attach_shift(site: Site) -> None:
    """Absorb a following ``add``/``sub`` of a per-channel shift, if it is the mul's only user.

    Anything unusual (alpha, a second user) simply ends the chain: the mul alone can
    still fold and the add stays in the graph.
    """
    users = list(site.mul.users)
    if len(users) != 1:
        return
    node = users[0]
    if node.target not in (aten.add.Tensor, aten.sub.Tensor) or node.kwargs.get("alpha", 1) != 1:
        return
    if node.target is aten.sub.Tensor and node.args[0] is not site.mul:
        return  # t - conv*s negates the conv; not a shift of it
    if node.args[0] is site.mul and node.args[1] is site.mul:
        return
    site.shift_node = node
    site.shift = _other(node, site.mul)
    site.shift_sign = -1 if node.target is aten.sub.Tensor else 1


def _is_grad_scale_mul(node: fx.Node, y: fx.Node) -> bool:
    return node.target is aten.mul.Tensor and y in node.args[:2] and node.args[0] is not node.args[1]


def _attach_scale_grad(site: Site) -> None:
    users = list(site.grad_scale_mul.users)
    if len(users) == 1 and users[0].target in (aten.sum.dim_IntList, aten.sum.default):
        site.grad_scale_sum = users[0]
        site.grad = _other(site.grad_scale_mul, site.saved_conv)
    else:
        site.backward_problem = "scale gradient is not a plain reduction of grad * conv output"


def _attach_conv_backward(site: Site, backward: set[fx.Node]) -> None:
    """Find ``convolution_backward(mul(g, s), x, W, ...)`` belonging to this conv."""
    a = site.conv_args
    found = []
    for user in a["weight"].users:
        if user.target is not aten.convolution_backward.default or user not in backward:
            continue
        grad_out, x, w, _bias_sizes, *config = user.args
        if x is not a["x"] or w is not a["weight"] or list(config[:6]) != list(site.conv.args[3:9]):
            continue
        if not (isinstance(grad_out, fx.Node) and grad_out.target is aten.mul.Tensor):
            continue
        if site.scale not in grad_out.args[:2]:
            continue
        found.append(user)
    if not found:
        return
    if len(found) > 1:
        site.backward_problem = "several convolution_backward nodes could belong to this conv"
        return
    cb = found[0]
    # ``grad_in`` may have other readers (in a chain, the previous shift's gradient sums
    # it); the rewrite stops feeding it to the conv and leaves it to them.
    grad_in = cb.args[0]
    g = _other(grad_in, site.scale)
    if site.grad is None:
        site.grad = g
    site.conv_backward, site.grad_conv_input = cb, grad_in
    if any(u.target is not operator.getitem for u in cb.users):
        site.backward_problem = "convolution_backward result used other than by index"
