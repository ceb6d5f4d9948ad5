"""Recognise affine sites: a producer (a convolution, or a linear layer reached through
views and permutes) feeding ``mul(., s)`` / ``div(., s)`` [-> ``add``/``sub(., t)``] or
``addcmul(t, ., s)``, and, in a joint graph, the backward nodes autograd derived from them.

One module per producer (``conv``, ``linear``) on the shared facts in ``base``.
Recognition only collects facts (a ``Finding`` where the algebra does not cover what it saw);
it never mutates the graph and never decides.
``legality`` decides from the facts, ``rewrite`` acts on them.
"""

from __future__ import annotations

import contextvars
from typing import Any

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern

from ..graph import aliases
from .base import (TRAINING_BATCH_NORM, Finding, InputMutations, Operand, Site, attach_scale_grad, attach_shift, backward_region,
                   mutated_primals, reaches, same_shape, shape_of, traced_for_backward)
from .conv import CONV_ARG_NAMES, ConvSite, attach_conv_backward
from .batchnorm import KIND, BatchNorm, find_batch_norms
from .linear import LinearSite, attach_linear_backward, linear_site

aten = torch.ops.aten

# The pattern matcher finds the forward anchors; ``find_sites`` keeps those whose
# operand a convolution or a linear layer produced.
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


def find_sites(gm: fx.GraphModule, seen_mutations: InputMutations = InputMutations()) -> list[Site]:
    """All affine anchors on a conv or linear output in ``gm``, extended to their shift
    and backward nodes."""
    token = _found.set([])
    try:
        _MATCHER.apply(gm)
        found = set(_found.get())
    finally:
        _found.reset(token)
    # The matcher walks nodes in reverse; report in program order.
    anchors = [n for n in gm.graph.nodes if n in found]
    backward = backward_region(gm.graph)
    traced = traced_for_backward(gm.graph, backward) if backward else set()
    mutated = mutated_primals(gm.graph, seen_mutations) if backward else set()
    effectful = any(n.target is torch.ops.higher_order.with_effects for n in gm.graph.nodes)
    sites = []
    for anchor in anchors:
        # A backward mul(g, y) is part of a site, not one.
        site = None if anchor in backward else _build_site(anchor, backward, traced)
        if site is None:
            continue
        site.kind = anchor.meta.get(KIND, site.kind)
        # An operand may be a view of, or computed from, a mutated input (``b[:]``, ``b * 2``).
        # The producer's input, where stock's backward reads the same node, only if it
        # shares the mutated storage (see ``Site.input_read_by_stock_backward``).
        shared = site.input_read_by_stock_backward()
        site.mutated_operands = [k for k, v in site.operands().items()
                                 if (aliases(v, mutated) if k == shared else reaches(v, mutated))]  # fmt: skip
        if effectful:
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


def _build_site(anchor: fx.Node, backward: set[fx.Node], traced: set[fx.Node]) -> Site | None:
    for y, scale, extra in _candidates(anchor):
        if not isinstance(y, fx.Node) or y is scale:
            continue
        if y.target is aten.convolution.default:
            site: Site = ConvSite(anchor=anchor, scale=scale, conv=y, **extra)
        elif anchor.target in (aten.add.Tensor, aten.sub.Tensor):
            # A linear's own bias is such an add when its input is not 2-D contiguous,
            # indistinguishable from a user's shift; both are left to Inductor's fusion.
            continue
        else:
            site = linear_site(anchor, y, scale, extra)
            if site is None:
                continue
        if not site.fused_shift:
            attach_shift(site)
        if site.shift_only:
            # y + t: the gradient reaches the producer unscaled and nothing in backward
            # reads y for it; the backward needs no change, and any reader of y is another.
            site.other_users = [u for u in y.users if u is not anchor]
            return site
        attach_scale_grad(site, backward, traced)
        if isinstance(site, ConvSite):
            attach_conv_backward(site, backward)
        elif site.producer_finding is None:
            attach_linear_backward(site, backward)
        return site
    return None


__all__ = ["TRAINING_BATCH_NORM", "BatchNorm", "CONV_ARG_NAMES", "ConvSite", "Finding", "find_batch_norms", "InputMutations", "LinearSite", "Operand", "Site", "backward_region",
           "find_sites", "mutated_primals", "reaches", "same_shape"]
