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
    grad_cast: fx.Node | None = None
    """Under autocast, the cast of ``mul(g, s)`` down to the conv's dtype."""
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
    mutated_operands: list[str] = dataclasses.field(default_factory=list)
    """Operands that are, view, or are computed from inputs the graph mutates (training)."""
    graph_problem: str | None = None
    """Set when something about the whole graph rules folding out."""

    def refresh(self) -> None:
        """Re-read scale and shift from the live graph: folding an earlier site in the same
        round may have replaced the node one of them was (e.g. a shift that is another
        site's output)."""
        self.scale = _other(self.mul, self.conv)
        if self.shift_node is not None:
            self.shift = _other(self.shift_node, self.mul)

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


@dataclasses.dataclass(frozen=True)
class InputMutations:
    """What the backend saw in the Dynamo graph: how many inputs, and which it mutates."""

    inputs: int = 0
    mutated: frozenset[int] = frozenset()


def find_sites(gm: fx.GraphModule, seen_mutations: InputMutations = InputMutations()) -> list[Site]:
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
    mutated = mutated_inputs(gm.graph, seen_mutations) if backward else set()
    effectful = any(n.target is torch.ops.higher_order.with_effects for n in gm.graph.nodes)
    seen: set[fx.Node] = set()
    sites = []
    for conv, mul in anchors:
        # conv * conv matches both orders; a backward mul(g, conv) is part of a site, not one.
        if mul in seen or mul in backward:
            continue
        seen.add(mul)
        site = _build_site(conv, mul, backward)
        operands = {**site.conv_args, "scale": site.scale, "shift": site.shift}
        # An operand may be a view of, or computed from, a mutated input (``b[:]``, ``b * 2``).
        site.mutated_operands = [k for k, v in operands.items() if reaches(v, mutated)]
        if effectful:
            site.graph_problem = "graph has effectful ops: Inductor frees inputs the folded graph still needs"
        sites.append(site)
    return sites


def mutated_inputs(graph: fx.Graph, seen: InputMutations) -> set[fx.Node]:
    """Joint-graph inputs the compiled code mutates (a buffer updated in place).

    A fold saves x, W and b for backward where autograd saved the conv output; if one is
    updated after the forward, the folded backward reads the new value. Two sources, both
    conservative:

    * the joint graph itself: AOTAutograd keeps mutations of inputs that need no grad as
      ``copy_(primal, new_value)`` in the graph (those would go wrong silently);
    * ``seen``, the backend's scan of the Dynamo graph. Its inputs line
      up with the joint graph's only when the counts match (subclass inputs, synthetic
      bases and effect tokens add or remove inputs); if they do not, every input counts.
    """
    primals = [n for n in graph.nodes if n.op == "placeholder" and "tangents" not in str(n.target)]
    mutated = {
        n.args[0] for n in graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
        and n.target._schema.is_mutable and n.args and n.args[0] in primals
    }  # fmt: skip
    if seen.mutated:
        if len(primals) != seen.inputs:
            return set(primals)
        mutated.update(primals[i] for i in seen.mutated)
    return mutated


def reaches(node: Any, targets: set[fx.Node]) -> bool:
    """Whether ``node`` is, views, or is computed from one of ``targets``. Computed values
    count too: the partitioner may recompute them in backward from the mutated input."""
    if not targets:
        return False
    stack, seen = [node] if isinstance(node, fx.Node) else [], set()
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


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


def _through_cast(node: Any) -> Any:
    """Under autocast the conv's gradient is ``mul(g, s)`` cast down to the conv's dtype."""
    if isinstance(node, fx.Node) and node.target is torch.ops.prims.convert_element_type.default:
        return node.args[0]
    return node


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
        grad_out = _through_cast(grad_out)
        if not (isinstance(grad_out, fx.Node) and grad_out.target is aten.mul.Tensor):
            continue
        if site.scale not in grad_out.args[:2]:
            continue
        # Another conv with the same input, weight and scale has a backward of this very
        # shape; when the scale's gradient told us g, only a backward fed g * s is ours.
        if site.grad is not None and _other(grad_out, site.scale) is not site.grad:
            continue
        found.append(user)
    twins = [u for u in a["weight"].users if u is not site.conv and u.target is aten.convolution.default
             and u.args[0] is a["x"] and list(u.args[3:]) == list(site.conv.args[3:])]  # fmt: skip
    if not found:
        return
    if site.grad is None and twins:
        site.backward_problem = "another conv with the same input and weight: its backward is indistinguishable"
        return
    if len(found) > 1:
        site.backward_problem = "several convolution_backward nodes could belong to this conv"
        return
    cb = found[0]
    # ``grad_in`` may have other readers (in a chain, the previous shift's gradient sums
    # it); the rewrite stops feeding it to the conv and leaves it to them.
    grad_in = _through_cast(cb.args[0])
    g = _other(grad_in, site.scale)
    if site.grad is None:
        site.grad = g
    site.conv_backward, site.grad_conv_input = cb, grad_in
    site.grad_cast = cb.args[0] if cb.args[0] is not grad_in else None
    if any(u.target is not operator.getitem for u in cb.users):
        site.backward_problem = "convolution_backward result used other than by index"
