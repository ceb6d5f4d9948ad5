"""Recognise affine sites: a producer (a convolution, or a linear layer reached through
views and permutes) feeding ``mul(., s)`` / ``div(., s)`` [-> ``add``/``sub(., t)``] or
``addcmul(t, ., s)``, and, in a joint graph, the backward nodes autograd derived from them.

Recognition only collects facts; it never mutates the graph and never decides.
``legality`` decides from the facts, ``rewrite`` acts on them.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Union

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

Operand = Union[fx.Node, int, float]
"""A scale or shift: a graph value or a Python scalar baked into the graph."""

CONV_ARG_NAMES = ("x", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")


@dataclasses.dataclass
class Site:
    """A producer's output ``y`` feeding a per-channel affine, plus its backward.

    Subclasses say what the producer is (``ConvSite``, ``LinearSite``); everything the
    rules and the cost model read is defined here.
    """

    mul: fx.Node
    """The affine's anchor: ``mul(y, s)``, ``div(y, s)`` or ``addcmul(t, y, s)``."""
    scale: Operand
    shift: Operand | None = None
    shift_node: fx.Node | None = None
    """The add/sub absorbed into the site; ``tail`` is what the folded producer replaces."""
    shift_sign: int = 1
    divide: bool = False
    """``y / s``: the fold multiplies by ``1 / s``."""
    unfolded_shift: Operand | None = None
    """``addcmul``'s shift when it cannot join the fold: the rewrite adds it back."""
    # Backward (joint graphs only).
    grad: fx.Node | None = None
    """``g``: the gradient flowing into the affine's output."""
    grad_scale_mul: fx.Node | None = None
    """The node that multiplies ``g`` by ``y`` (for ``y / s``, by ``y / s / s``)."""
    grad_scale_sum: fx.Node | None = None
    """Its reduction: the scale's gradient (for ``y / s``, already negated and divided)."""
    grad_scale_nodes: list[fx.Node] = dataclasses.field(default_factory=list)
    """The nodes between ``y`` and ``grad_scale_sum``, erased with it."""
    other_users: list[fx.Node] = dataclasses.field(default_factory=list)
    """Users of the producer's values that are neither the affine nor its recognised backward."""
    backward_problem: str | None = None
    """Set when backward nodes exist but do not have the shape autograd gives them."""
    mutated_operands: list[str] = dataclasses.field(default_factory=list)
    """Operands that are, view, or are computed from inputs the graph mutates (training)."""
    graph_problem: str | None = None
    """Set when something about the whole graph rules folding out."""
    producer_problem: str | None = None
    """Set when the producer's output reaches the affine in a way the fold cannot map."""

    # --- what subclasses define ---------------------------------------------------
    @property
    def y(self) -> fx.Node:
        """The value the affine reads."""
        raise NotImplementedError

    axis: int = 1
    """The channel (feature) axis of ``y``."""

    @property
    def weight(self) -> fx.Node:
        raise NotImplementedError

    @property
    def producer(self) -> str:
        raise NotImplementedError

    @property
    def produced(self) -> set[fx.Node]:
        """Every node computing ``y``: nothing the affine's operands depend on may be one."""
        return {self.y}

    def operands(self) -> dict[str, Any]:
        """Every graph value the fold reads, by name (for the mutated-input rule)."""
        raise NotImplementedError

    def computes_weight_grad(self) -> bool:
        """Whether the model already computes the weight's gradient (the fold reuses it)."""
        raise NotImplementedError

    def backward_nodes(self) -> list[fx.Node]:
        """The backward nodes the rewrite will edit: no two sites may share one."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------
    @property
    def shift_only(self) -> bool:
        """``y + t`` / ``y - t`` with no scale: only the bias changes."""
        return self.mul.target in (aten.add.Tensor, aten.sub.Tensor)

    @property
    def fused_shift(self) -> bool:
        """The anchor itself adds the shift (``addcmul``, or a bare add/sub)."""
        return self.mul.target is aten.addcmul.default or self.shift_only

    @property
    def tail(self) -> fx.Node:
        return self.shift_node or self.mul

    def refresh(self) -> None:
        """Re-read scale and shift from the live graph: folding an earlier site in the same
        round may have replaced the node one of them was (e.g. a shift that is another
        site's output)."""
        if self.shift_only:
            self.shift = _other(self.mul, self.y)
            return
        if self.fused_shift:  # addcmul(t, y, s) or addcmul(t, s, y)
            self.scale = self.mul.args[2] if self.mul.args[1] is self.y else self.mul.args[1]
            if self.shift is not None:
                self.shift = self.mul.args[0]
            return
        self.scale = self.mul.args[1] if self.divide else _other(self.mul, self.y)
        if self.shift_node is not None:
            self.shift = _other(self.shift_node, self.mul)

    def drop_shift(self) -> None:
        """Fold the scale alone; the shift is added as before."""
        if self.fused_shift and not self.shift_only:
            self.unfolded_shift = self.mul.args[0]
        self.shift = self.shift_node = None


@dataclasses.dataclass
class ConvSite(Site):
    conv: fx.Node = None  # type: ignore[assignment]
    grad_conv_input: fx.Node | None = None
    """``mul(g, s)`` (``div(g, s)``), the gradient of the conv output, feeding ``convolution_backward``."""
    grad_cast: fx.Node | None = None
    """Under autocast, the cast of ``mul(g, s)`` down to the conv's dtype."""
    conv_backward: fx.Node | None = None

    @property
    def y(self) -> fx.Node:
        return self.conv

    @property
    def conv_args(self) -> dict[str, Any]:
        return dict(zip(CONV_ARG_NAMES, self.conv.args))

    @property
    def weight(self) -> fx.Node:
        return self.conv.args[1]

    @property
    def producer(self) -> str:
        a = self.conv_args
        dims = len(a["weight"].meta["val"].shape) - 2
        return f"conv{'_transpose' if a['transposed'] else ''}{dims}d"

    def operands(self) -> dict[str, Any]:
        return {**self.conv_args, "scale": self.scale, "shift": self.shift}

    def computes_weight_grad(self) -> bool:
        return self.conv_backward is not None and bool(self.conv_backward.args[-1][1])

    def backward_nodes(self) -> list[fx.Node]:
        return [n for n in (self.conv_backward, self.grad_scale_sum) if n is not None]


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
    def produced(self) -> set[fx.Node]:
        return {self.mm, *self.chain}

    def operands(self) -> dict[str, Any]:
        ops = {"input": self.mm.args[-2], "weight": self.weight, "scale": self.scale, "shift": self.shift}
        ops.update({f"bias{i}": host.args[index] for i, (host, index, _) in enumerate(self.biases)})
        return ops

    def computes_weight_grad(self) -> bool:
        return bool(self.grad_weight_mms)

    def weight_grad_axis(self, node: fx.Node) -> int:
        """The feature axis of one of ``grad_weight_mms``."""
        if node.target is aten.mm.default and node.args[1] is self.mm.args[-2]:
            return 0  # mm(G.t(), A)
        return node.meta["val"].ndim - 1

    def backward_nodes(self) -> list[fx.Node]:
        nodes = [self.grad_y, self.grad_scale_sum, *self.grad_input_mms, *self.grad_weight_mms]
        return [n for n in nodes + [b for b, _ in self.grad_bias_sums] if n is not None]


# The pattern matcher finds the forward anchors; ``find_sites`` keeps those whose
# operand a convolution or a linear layer produced.
_MATCHER = PatternMatcherPass(pass_name="compile_affine_sites")
_found: list[fx.Node] = []


def _collect(match: Match, *args: Any) -> None:
    _found.append(match.output_node())


for _pattern in (
    CallFunction(aten.mul.Tensor, Arg(), Arg()),
    CallFunction(aten.div.Tensor, Arg(), Arg()),
    CallFunction(aten.addcmul.default, Arg(), Arg(), Arg()),
    CallFunction(aten.add.Tensor, Arg(), Arg()),
    CallFunction(aten.sub.Tensor, Arg(), Arg()),
):
    register_graph_pattern(_pattern, pass_dict=_MATCHER)(_collect)


@dataclasses.dataclass(frozen=True)
class InputMutations:
    """What the backend saw in the Dynamo graph: how many inputs, and which it mutates."""

    inputs: int = 0
    mutated: frozenset[int] = frozenset()


def find_sites(gm: fx.GraphModule, seen_mutations: InputMutations = InputMutations()) -> list[Site]:
    """All affine anchors on a conv or linear output in ``gm``, extended to their shift
    and backward nodes."""
    _found.clear()
    try:
        _MATCHER.apply(gm)
        found = set(_found)
    finally:
        _found.clear()
    # The matcher walks nodes in reverse; report in program order.
    anchors = [n for n in gm.graph.nodes if n in found]
    backward = backward_region(gm.graph)
    mutated = mutated_inputs(gm.graph, seen_mutations) if backward else set()
    effectful = any(n.target is torch.ops.higher_order.with_effects for n in gm.graph.nodes)
    sites = []
    for anchor in anchors:
        # A backward mul(g, y) is part of a site, not one.
        site = None if anchor in backward else _build_site(anchor, backward)
        if site is None:
            continue
        # An operand may be a view of, or computed from, a mutated input (``b[:]``, ``b * 2``).
        site.mutated_operands = [k for k, v in site.operands().items() if reaches(v, mutated)]
        if effectful:
            site.graph_problem = "graph has effectful ops: Inductor frees inputs the folded graph still needs"
        sites.append(site)
    # ``y / s`` has a twin ``div(y, s)`` computed for its scale's gradient, and a linear's
    # bias add lies inside the views to its scale: parts of a site, not sites.
    claimed = {n for site in sites for n in (*site.grad_scale_nodes, *site.produced)}
    sites = [site for site in sites if site.mul not in claimed]
    # A backward node two sites both take for their own would be rewritten twice.
    owners: dict[fx.Node, list[Site]] = {}
    for site in sites:
        for node in site.backward_nodes():
            owners.setdefault(node, []).append(site)
    for shared in (group for group in owners.values() if len(group) > 1):
        for site in shared:
            site.backward_problem = site.backward_problem or "another site claims the same backward nodes"
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
                if not (isinstance(t, fx.Node) and isinstance(y, fx.Node) and same_shape(_shape(t), _shape(y)))]  # fmt: skip
    return []


def _build_site(anchor: fx.Node, backward: set[fx.Node]) -> Site | None:
    for y, scale, extra in _candidates(anchor):
        if not isinstance(y, fx.Node) or y is scale:
            continue
        if y.target is aten.convolution.default:
            site: Site = ConvSite(mul=anchor, scale=scale, conv=y, **extra)
        elif anchor.target in (aten.add.Tensor, aten.sub.Tensor):
            # A linear's own bias is such an add when its input is not 2-D contiguous,
            # indistinguishable from a user's shift; both are left to Inductor's fusion.
            continue
        else:
            site = _linear_site(anchor, y, scale, extra)
            if site is None:
                continue
        if not site.fused_shift:
            _attach_shift(site)
        if site.shift_only:
            # y + t: the gradient reaches the producer unscaled and nothing in backward
            # reads y for it; the backward needs no change, and any reader of y is another.
            site.other_users = [u for u in y.users if u is not anchor]
            return site
        _attach_scale_grad(site, backward)
        if isinstance(site, ConvSite):
            _attach_conv_backward(site, backward)
        elif site.producer_problem is None:
            _attach_linear_backward(site, backward)
        return site
    return None


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
        return  # t - y*s negates y; not a shift of it
    if node.args[0] is site.mul and node.args[1] is site.mul:
        return
    site.shift_node = node
    site.shift = _other(node, site.mul)
    site.shift_sign = -1 if node.target is aten.sub.Tensor else 1


def _is_scale(node: Any, site: Site) -> bool:
    """``s`` itself, or ``s * 1`` as autograd writes addcmul's backward."""
    if not isinstance(site.scale, fx.Node):  # a Python number, equal but maybe not the same object
        return not isinstance(node, (fx.Node, bool)) and node == site.scale
    if node is site.scale:
        return True
    return isinstance(node, fx.Node) and node.target is aten.mul.Scalar and node.args == (site.scale, 1)


def _scaled_grad(node: Any, site: Site) -> fx.Node | None:
    """``g`` if ``node`` is ``g * s`` (``g / s`` for a division site)."""
    if not isinstance(node, fx.Node):
        return None
    if site.divide:
        if node.target is aten.div.Tensor and node.args[1] is site.scale and isinstance(node.args[0], fx.Node):
            return node.args[0]
        return None
    if node.target is aten.mul.Tensor:
        a, b = node.args[:2]
        if _is_scale(b, site) and isinstance(a, fx.Node):
            return a
        if _is_scale(a, site) and isinstance(b, fx.Node):
            return b
    return None


def _only_user(node: fx.Node, target: Any = None) -> fx.Node | None:
    users = list(node.users)
    if len(users) == 1 and (target is None or users[0].target is target):
        return users[0]
    return None


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
        second = _only_user(user, aten.div.Tensor)
        if second is None or second.args != (user, site.scale):
            return None
        between, reader, y = [user, second], _only_user(second), second
    elif user.target is aten.clone.default or (user.target is aten.mul.Scalar and user.args == (y, 1)):
        between, reader, y = [user], _only_user(user), user
    if reader is None or reader not in backward or reader.target is not aten.mul.Tensor:
        return None
    if y not in reader.args[:2] or reader.args[0] is reader.args[1]:
        return None
    g = _other(reader, y)
    if site.divide:
        if not (isinstance(g, fx.Node) and g.target is aten.neg.default):
            return None
        between.append(g)
        g = g.args[0]
    return g, reader, between


def _attach_scale_grad(site: Site, backward: set[fx.Node]) -> None:
    for user in site.y.users:
        if user is site.mul:
            continue
        found = _scale_grad_of(user, site, backward) if site.grad_scale_mul is None else None
        if found is None:
            site.other_users.append(user)
            continue
        site.grad, site.grad_scale_mul, site.grad_scale_nodes = found
        total = _only_user(site.grad_scale_mul)
        if total is not None and total.target in (aten.sum.dim_IntList, aten.sum.default):
            site.grad_scale_sum = total
        else:
            site.backward_problem = "scale gradient is not a plain reduction of grad * output"


def _through_cast(node: Any) -> Any:
    """Under autocast the conv's gradient is ``mul(g, s)`` cast down to the conv's dtype."""
    if isinstance(node, fx.Node) and node.target is torch.ops.prims.convert_element_type.default:
        return node.args[0]
    return node


def _attach_conv_backward(site: ConvSite, backward: set[fx.Node]) -> None:
    """Find ``convolution_backward(g * s, x, W, ...)`` belonging to this conv."""
    a = site.conv_args
    found = []
    for user in a["weight"].users:
        if user.target is not aten.convolution_backward.default or user not in backward:
            continue
        grad_out, x, w, _bias_sizes, *config = user.args
        if x is not a["x"] or w is not a["weight"] or list(config[:6]) != list(site.conv.args[3:9]):
            continue
        g = _scaled_grad(_through_cast(grad_out), site)
        if g is None:
            continue
        # Another conv with the same input, weight and scale has a backward of this very
        # shape; when the scale's gradient told us g, only a backward fed g * s is ours.
        if site.grad is not None and g is not site.grad:
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
    if site.grad is None:
        site.grad = _scaled_grad(grad_in, site)
    site.conv_backward, site.grad_conv_input = cb, grad_in
    site.grad_cast = cb.args[0] if cb.args[0] is not grad_in else None
    if any(u.target is not operator.getitem for u in cb.users):
        site.backward_problem = "convolution_backward result used other than by index"


# --- linear layers -------------------------------------------------------------------

_MM = (aten.mm.default, aten.addmm.default, aten.bmm.default)
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_PERMUTES = (aten.permute.default, aten.transpose.int, aten.t.default)
_SAME = (aten.clone.default, aten.alias.default)
_CAST = torch.ops.prims.convert_element_type.default


def _shape(node: Any) -> tuple:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _known(expr: Any) -> bool:
    # statically_known_true never installs a guard, so decisions add no recompiles.
    return statically_known_true(expr)


def _view_axis(src: tuple, dst: tuple, axis: int) -> int | None:
    """Where a view puts the elements of ``src``'s ``axis``, if it keeps that axis whole:
    some ``dst`` dim of the same size with the same number of elements before it."""
    before = math.prod(src[:axis])
    for j, size in enumerate(dst):
        if _known(size == src[axis]) and _known(math.prod(dst[:j]) == before):
            return j
    return None


def _next_axis(node: fx.Node, axis: int) -> int | None:
    """The feature axis of ``node``'s output, given it is ``axis`` of its first input."""
    src, ndim = _shape(node.args[0]), len(_shape(node.args[0]))
    if not src or not 0 <= axis < ndim:
        return None
    if node.target in _SAME or node.target is _CAST:
        return axis
    if node.target is aten.permute.default:
        perm = [d % ndim for d in node.args[1]]
        return perm.index(axis)
    if node.target is aten.transpose.int:
        d0, d1 = (d % ndim for d in node.args[1:3])
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if node.target is aten.t.default:
        return ndim - 1 - axis
    if node.target in _VIEWS:
        return _view_axis(src, _shape(node), axis)
    return None


def _chain_input(node: fx.Node) -> Any:
    """For a forward chain node, the operand carrying the linear's output."""
    if node.target in _VIEWS or node.target in _PERMUTES or node.target in _SAME:
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
        elif node.target in _VIEWS or node.target in _PERMUTES or node.target in _SAME:
            stack.append(node.args[0])
    return False


def _linear_site(anchor: fx.Node, y: fx.Node, scale: Operand, extra: dict) -> LinearSite | None:
    """``y`` as ``views(mm(A, B) [+ b])``, or None when ``y`` is not a linear's output."""
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
    site = LinearSite(mul=anchor, scale=scale, mm=mm, chain=chain, **extra)
    if mm.target is aten.addmm.default:
        site.biases.append((mm, 0, 1))
    axis, prev = len(_shape(mm)) - 1, mm  # the features are mm's (bmm's) last dim
    for node in chain:
        if node.target is aten.add.Tensor:
            if not same_shape(_shape(node), _shape(prev)):
                site.producer_problem = "bias add broadcasts the linear's output"
            site.biases.append((node, 1 if node.args[0] is prev else 0, axis))
            axis_next = axis
        else:
            axis_next = _next_axis(node, axis)
        if axis_next is None:
            site.producer_problem = f"{node.target} between the linear and the scale splits the feature axis"
            break
        axis, prev = axis_next, node
    site.axis = axis
    # Every intermediate value exists only to reach ``y``.
    for node in [mm, *chain][:-1]:
        site.other_users += [u for u in node.users if u not in chain]
    return site


def same_shape(a: tuple, b: tuple) -> bool:
    """Provably equal shapes, without installing a guard (also used by ``legality``)."""
    return len(a) == len(b) and all(_known(x == y) for x, y in zip(a, b))


def _is_transpose_of(node: Any, target: fx.Node) -> bool:
    """``node`` is ``target`` with its last two dims swapped (``t``, ``permute``, ``transpose``)."""
    if not isinstance(node, fx.Node) or node.args[:1] != (target,):
        return False
    ndim = len(_shape(target))
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
        scales = [site.scale, *(u for u in site.scale.users if _is_scale(u, site))]
        readers = [u for s in scales for u in s.users]
    else:  # a Python number: look at every multiply (divide) in backward
        readers = [n for n in backward if n.target in (aten.mul.Tensor, aten.div.Tensor)]
    # Which ``g * s`` is ours? The scale's gradient names ``g`` when there is one.
    # Otherwise the walk must reach an operand only this linear reads: a second linear
    # on the same input (or the same weight node) has a backward of the very same shape.
    a_unique, b_unique = (_read_by_this_mm_only(n, site.mm, backward) for n in site.mm.args[-2:])
    ours = []
    for gy in dict.fromkeys(readers):
        g = _scaled_grad(gy, site) if gy in backward else None
        if g is None or (site.grad is not None and g is not site.grad):
            continue
        if not same_shape(_shape(g), _shape(site.y)):
            continue  # g broadcast by s: not a gradient of y
        uses = _gradient_uses(gy, site)
        if uses is None:
            continue
        if site.grad is None and not isinstance(uses, str):
            grad_input_mms, grad_weight_mms, _ = uses
            if not ((grad_input_mms and b_unique) or (grad_weight_mms and a_unique)):
                uses = "another linear reads the same input or weight: its backward is indistinguishable"
        ours.append((gy, g, uses))
    if not ours:
        if site.grad_scale_sum is not None:
            site.backward_problem = "scale gradient needs the weight gradient, which the model does not compute"
        return
    if len(ours) > 1:
        site.backward_problem = "several gradients could belong to this linear"
        return
    (gy, g, uses), = ours
    if isinstance(uses, str):
        site.backward_problem = uses
        return
    site.grad_y, site.grad = gy, g
    site.grad_input_mms, site.grad_weight_mms, site.grad_bias_sums = uses
    if site.grad_scale_sum is not None and not site.grad_weight_mms:
        site.backward_problem = "scale gradient needs the weight gradient, which the model does not compute"


def _read_by_this_mm_only(node: Any, mm: fx.Node, backward: set[fx.Node]) -> bool:
    return not any(u is not mm and u.target in _MM and u not in backward for u in getattr(node, "users", ()))


def _gradient_uses(gy: fx.Node, site: LinearSite) -> tuple | str | None:
    """Classify every use of ``gy``: None when none is this linear's, a reason string when
    one is ours but another is unrecognised, else the uses."""
    a_in, b_w = site.mm.args[-2], site.weight
    if not same_shape(_shape(gy), _shape(site.y)):
        return None
    grad_input_mms, grad_weight_mms, bias_sums = [], [], []
    problem, ours = None, False
    stack = [(gy, site.axis)]
    while stack:
        node, axis = stack.pop()
        ndim = len(_shape(node))
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
                    problem = problem or "gradient reduced over the feature axis"
                else:
                    bias_sums.append((user, axis if keepdim else 0))
            elif target is aten.copy.default and user.args[1] is node and same_shape(_shape(user), _shape(node)):
                stack.append((user, axis))  # functional copy_ into a same-shaped buffer: the values of node
            elif target in _VIEWS or target in _PERMUTES or target in _SAME or target is _CAST:
                nxt = _next_axis(user, axis)
                if nxt is None:
                    problem = problem or f"gradient {target} splits the feature axis"
                else:
                    stack.append((user, nxt))
            else:
                problem = problem or f"gradient used by {target}"
    if not ours:
        return None
    if problem is not None:
        return problem
    return grad_input_mms, grad_weight_mms, bias_sums
