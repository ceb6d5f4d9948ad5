"""The matcher: find every affine anchor, let each producer kind (``PRODUCERS``) match
it, then walk what all producers share (the absorbed shift, the scale's gradient) and
let the site find its own backward.

Recognition only collects facts (a ``Finding`` where the algebra does not cover what it
saw); it never mutates the graph and never decides. ``legality`` decides from the
facts, ``rewrite`` acts on them.
"""

from __future__ import annotations

import contextvars
from typing import Any

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern

from ..graph import KIND, GraphFacts, Operand, only_user, other_operand, same_shape, shape_of
from ..mutations import mutated_operands
from .base import Finding, Site
from .conv import ConvSite
from .linear import LinearSite

aten = torch.ops.aten

PRODUCERS: tuple[type[Site], ...] = (ConvSite, LinearSite)
"""The producer kinds, in the order they try an anchor's operand."""

# The pattern matcher finds the forward anchors; ``find_sites`` keeps those whose
# operand a producer kind matches.
# The matcher is registered once; what it finds goes to the list of the ``find_sites``
# call running in this thread (a context variable), so concurrent compiles on other
# threads, or a nested one, never see or clear each other's anchors.
_MATCHER = PatternMatcherPass(pass_name="compile_affine_sites")
_found: contextvars.ContextVar[list[fx.Node]] = contextvars.ContextVar("compile_affine_found")


def _collect(match: Match, *args: Any) -> None:
    _found.get().append(match.output_node())


for _pattern in (
    CallFunction(aten.mul.Tensor, Arg(), Arg()),
    CallFunction(aten.div.Tensor, Arg(), Arg()),
    CallFunction(aten.addcmul.default, Arg(), Arg(), Arg()),
    CallFunction(aten.add.Tensor, Arg(), Arg()),
    CallFunction(aten.sub.Tensor, Arg(), Arg()),
):
    register_graph_pattern(_pattern, pass_dict=_MATCHER)(_collect)


def find_sites(gm: fx.GraphModule, facts: GraphFacts) -> list[Site]:
    """All affine anchors on a conv or linear output in ``gm``, extended to their shift
    and backward nodes. ``facts``: this round's (``mutations.graph_facts``)."""
    token = _found.set([])
    try:
        _MATCHER.apply(gm)
        found = set(_found.get())
    finally:
        _found.reset(token)
    # The matcher walks nodes in reverse; report in program order.
    anchors = [n for n in gm.graph.nodes if n in found]
    mutated = facts.mutated if facts.backward else set()  # only a saved-for-backward value can go stale
    sites = []
    for anchor in anchors:
        # A backward mul(g, y) is part of a site, not one.
        site = None if anchor in facts.backward else _build_site(anchor, facts)
        if site is None:
            continue
        site.kind = anchor.meta.get(KIND, site.kind)
        site.mutated_operands = mutated_operands(site, mutated)
        if facts.effectful:
            site.graph_finding = (Finding.EFFECTFUL_GRAPH, "")
        sites.append(site)
    # ``y / s`` has a twin ``div(y, s)`` computed for its scale's gradient, and a linear's
    # bias add lies inside the views to its scale: parts of a site, not sites.
    claimed = {n for site in sites for n in (*site.grad_scale_nodes, *site.produced)}
    sites = [site for site in sites if site.anchor not in claimed]
    # A backward node two sites both take for their own would be rewritten twice.
    owners: dict[fx.Node, list[Site]] = {}
    for site in sites:
        for node in site.backward_nodes():
            owners.setdefault(node, []).append(site)
    for shared in (group for group in owners.values() if len(group) > 1):
        for site in shared:
            site.backward_finding = site.backward_finding or (Finding.SHARED_BACKWARD, "")
    return sites


def _candidates(anchor: fx.Node) -> list[tuple[Any, Operand, dict]]:
    """``(y, s, extra fields)`` readings of an anchor, most likely first."""
    args = anchor.args
    if anchor.target is aten.mul.Tensor:
        return [(args[0], args[1], {}), (args[1], args[0], {})]
    if anchor.target is aten.div.Tensor:
        return [(args[0], args[1], {"divide": True})]  # s / y is not an affine of y
    if anchor.target is aten.addcmul.default and anchor.kwargs.get("value", 1) == 1:
        return [(args[1], args[2], {"shift": args[0]}), (args[2], args[1], {"shift": args[0]})]
    if anchor.target in (aten.add.Tensor, aten.sub.Tensor) and anchor.kwargs.get("alpha", 1) == 1:
        # A bare shift. Residual adds (a full-sized other operand) are not affines at all.
        pairs = [(args[0], args[1])] if anchor.target is aten.sub.Tensor else [(args[0], args[1]), (args[1], args[0])]
        sign = -1 if anchor.target is aten.sub.Tensor else 1
        return [(y, 1, {"shift": t, "shift_sign": sign}) for y, t in pairs
                if not (isinstance(t, fx.Node) and isinstance(y, fx.Node) and same_shape(shape_of(t), shape_of(y)))]  # fmt: skip
    return []


def _build_site(anchor: fx.Node, facts: GraphFacts) -> Site | None:
    for y, scale, extra in _candidates(anchor):
        if not isinstance(y, fx.Node) or y is scale:
            continue
        site = next((s for kind in PRODUCERS if (s := kind.match(anchor, y, scale, extra)) is not None), None)
        if site is None:
            continue
        if not site.fused_shift:
            _attach_shift(site)
        if site.shift_only:
            # y + t: the gradient reaches the producer unscaled and nothing in backward
            # reads y for it; the backward needs no change, and any reader of y is another.
            site.other_users = [u for u in y.users if u is not anchor]
            return site
        _attach_scale_grad(site, facts.backward, facts.traced)
        if site.producer_finding is None:
            site.attach_backward(facts.backward)
        return site
    return None


def _attach_shift(site: Site) -> None:
    """Absorb a following ``add``/``sub`` of a per-channel shift, if it is the mul's only user.

    Anything unusual (alpha, a second user) simply ends the chain: the mul alone can
    still fold and the add stays in the graph.
    """
    users = list(site.anchor.users)
    if len(users) != 1:
        return
    node = users[0]
    if node.target not in (aten.add.Tensor, aten.sub.Tensor) or node.kwargs.get("alpha", 1) != 1:
        return
    if node.target is aten.sub.Tensor and node.args[0] is not site.anchor:
        return  # t - y*s negates y; not a shift of it
    if node.args[0] is site.anchor and node.args[1] is site.anchor:
        return
    site.shift_node = node
    site.shift = other_operand(node, site.anchor)
    site.shift_sign = -1 if node.target is aten.sub.Tensor else 1


def _scale_grad_of(user: fx.Node, site: Site, backward: set[fx.Node]) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """If ``user`` (a reader of ``y``) starts autograd's scale gradient, return
    ``(g, the multiply by g, nodes between y and that multiply)``.

    * ``y * s``: ``mul(g, y)``; ``y`` may be read through autograd's ``clone`` (in-place
      ``mul_``) or ``y * 1`` (addcmul).
    * ``y / s``: ``mul(-g, y / s / s)``.
    """
    y, between = site.y, []
    reader = user
    if site.divide:
        if not (user.target is aten.div.Tensor and user.args == (y, site.scale)):
            return None
        second = only_user(user, aten.div.Tensor)
        if second is None or second.args != (user, site.scale):
            return None
        between, reader, y = [user, second], only_user(second), second
    elif user.target is aten.clone.default or (user.target is aten.mul.Scalar and user.args == (y, 1)):
        between, reader, y = [user], only_user(user), user
    if reader is None or reader not in backward or reader.target is not aten.mul.Tensor:
        return None
    if y not in reader.args[:2] or reader.args[0] is reader.args[1]:
        return None
    g = other_operand(reader, y)
    if site.divide:
        if not (isinstance(g, fx.Node) and g.target is aten.neg.default):
            return None
        between.append(g)
        g = g.args[0]
    return g, reader, between


def _attach_scale_grad(site: Site, backward: set[fx.Node], traced: set[fx.Node]) -> None:
    for user in site.y.users:
        if user is site.anchor:
            continue
        found = _scale_grad_of(user, site, backward) if site.grad_scale_mul is None else None
        if found is None:
            (site.backward_readers if user in traced else site.other_users).append(user)
            continue
        site.grad, site.grad_scale_mul, site.grad_scale_nodes = found
        total = only_user(site.grad_scale_mul)
        if total is not None and total.target in (aten.sum.dim_IntList, aten.sum.default):
            site.grad_scale_sum = total
        else:
            site.backward_finding = (Finding.SCALE_GRAD_NOT_A_SUM, "")
