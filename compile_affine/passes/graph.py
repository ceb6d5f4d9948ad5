"""Facts about FX nodes that recognition, legality and the rewrite all read: values,
shapes, operands, aliasing, the chains of views and casts a value passes through, and
the joint graph's backward half (``GraphFacts``, built once per round). A leaf: it
imports nothing from the package, so no import cycle can run through it.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Union

import dataclasses

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten
prims = torch.ops.prims

Operand = Union[fx.Node, int, float]
"""A scale or shift: a graph value or a Python scalar baked into the graph."""

CHANNEL_AXIS = 1  # aten.convolution output is (N, C, *spatial)

VIEW_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.alias.default,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.as_strided.default,
})  # fmt: skip
"""The reshaping and re-striding views Inductor's decompositions leave in an ATen graph:
same values, another shape. Each walk below picks the subset it may step through."""

RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
PERMUTES = frozenset({aten.permute.default, aten.transpose.int, aten.t.default})
ORDER_KEEPING_VIEWS = RESHAPES | {aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
                                  aten.alias.default}  # fmt: skip
"""Views that keep the elements' order: the same values under another shape."""

CAST = prims.convert_element_type.default

KIND = "compile_affine_kind"
"""Node meta key on a normalised anchor: the kind of layer the user wrote (``"batch_norm"``)."""

ALREADY_JUDGED = "compile_affine_already_judged"
"""Node meta key: a node already reported with another site (a refused batch norm's
``sub(y, rm)``, the shift an addcmul fold added back), which ``fold.run`` must not judge again."""


def val(node: Any) -> torch.Tensor | None:
    """The fake tensor a node computes, or None (a Python scalar, no metadata)."""
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def same_dtype_cast(node: fx.Node) -> bool:
    """A cast that keeps the dtype: the same values."""
    return node.target is CAST and _dtype(node) == _dtype(node.args[0])


def unit_factor(node: fx.Node) -> bool:
    """``x * 1`` (the integer or float one, not ``True``): the same values."""
    return node.target in (aten.mul.Tensor, aten.mul.Scalar) and node.args[1] == 1 and not isinstance(node.args[1], bool)


def strip(node: Any, ops: Collection[Any], also: Callable[[fx.Node], bool] | None = None, once: bool = False) -> Any:
    """What ``node`` was computed from through a chain of single-input steps: ops in
    ``ops``, and nodes that ``also`` admits (``same_dtype_cast``, ``unit_factor``). Each
    step reads its first argument; ``once`` takes one step at most."""
    while isinstance(node, fx.Node) and node.op == "call_function" and (node.target in ops or (also and also(node))):
        node = node.args[0]
        if once:
            break
    return node


def _dtype(node: Any) -> torch.dtype | None:
    v = val(node)
    return v.dtype if v is not None else None


def shape_of(node: Any) -> tuple:
    v = val(node)
    return tuple(v.shape) if v is not None else ()


def known(expr: Any) -> bool:
    # statically_known_true never installs a guard, so decisions add no recompiles.
    return statically_known_true(expr)


def same_shape(a: tuple, b: tuple) -> bool:
    """Provably equal shapes, without installing a guard."""
    return len(a) == len(b) and all(known(x == y) for x, y in zip(a, b))


def other_operand(node: fx.Node, operand: Any) -> Any:
    """The operand of a binary op that is not ``operand``."""
    a, b = node.args[:2]
    return b if a is operand else a


def only_user(node: fx.Node, target: Any = None) -> fx.Node | None:
    users = list(node.users)
    if len(users) == 1 and (target is None or users[0].target is target):
        return users[0]
    return None


def reaches(node: Any, targets: set[fx.Node]) -> bool:
    """Whether ``node`` is, views, or is computed from one of ``targets``. Computed values
    count too: the partitioner may recompute them in backward from a mutated input."""
    return _walks_to(node, targets, lambda n: True)


def aliases(node: Any, targets: set[fx.Node]) -> bool:
    """Whether ``node`` is one of ``targets`` or may share its storage: it is reached
    through anything but an op known to compute a new tensor (``fresh_result``), so views,
    ``getitem`` and ops of unknown schema count. A fresh value computed from a target does not."""
    return _walks_to(node, targets, lambda n: n.op != "placeholder" and not fresh_result(n))


def _walks_to(node: Any, targets: set[fx.Node], through: Callable[[fx.Node], bool]) -> bool:
    """Whether a walk up the inputs from ``node``, entering only nodes ``through`` admits,
    meets one of ``targets``."""
    if not targets:
        return False
    stack, seen = [node] if isinstance(node, fx.Node) else [], set()
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        if n not in seen and through(n):
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


def fresh_result(node: fx.Node) -> bool:
    """``node`` computes a new tensor from its inputs: it returns none of their storage
    (no view, no in-place or out= op, not the graph's output), so what it reads may be
    swapped for an equal value in another buffer without anything observing it."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    schema = target._schema
    return not schema.is_mutable and all(r.alias_info is None for r in schema.returns)


def is_tangent(node: fx.Node) -> bool:
    """A joint graph's gradient input, from what AOTAutograd says of it: its input
    descriptor (``TangentAOTInput``), else the tag it gives what it traced for backward.
    Only a graph with neither (an older torch) falls back to the placeholder's name."""
    if node.op != "placeholder":
        return False
    desc = node.meta.get("desc")
    if desc is not None and callable(getattr(desc, "is_tangent", None)):
        return bool(desc.is_tangent())
    tag = node.meta.get("partitioner_tag")
    if tag is not None:
        return tag == "is_backward"
    return "tangents" in str(node.target)


def backward_region(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that depend on a tangent: the backward half of a joint graph (empty in inference)."""
    region: set[fx.Node] = set()
    for node in graph.nodes:
        if is_tangent(node) or any(a in region for a in node.all_input_nodes):
            region.add(node)
    return region


def traced_for_backward(graph: fx.Graph, region: set[fx.Node]) -> set[fx.Node]:
    """Every node a backward formula wrote, whether or not it reads a tangent (batch
    norm's recomputed ``y - mean``, a custom autograd.Function reading a saved value):
    AOTAutograd's ``partitioner_tag`` where it set one, and for untagged nodes, whatever
    comes after the first node of ``region`` (AOTAutograd traces the whole forward first)."""
    traced, started = set(), False
    for node in graph.nodes:
        started = started or (node in region and node.op != "placeholder")
        tag = node.meta.get("partitioner_tag")
        if node in region or tag == "is_backward" or (tag is None and started and node.op != "output"):
            traced.add(node)
    return traced


def operand_problem(operand: Operand, out: torch.Tensor, what: str, axis: int = CHANNEL_AXIS) -> str | None:
    """Is ``operand`` one value per channel of ``out`` (its ``axis``), or one value overall?
    The shape test recognition and legality share; its answer is a reason string."""
    if isinstance(operand, bool) or not isinstance(operand, (int, float, fx.Node)):
        return f"{what} is not a tensor or a real number"
    if not isinstance(operand, fx.Node):
        return None
    v = val(operand)
    if v is None:
        return f"{what} has no tensor metadata"
    if v.ndim > out.ndim:
        return f"{what} has more dims than the conv output"
    shape = (1,) * (out.ndim - v.ndim) + tuple(v.shape)
    for dim, size in enumerate(shape):
        if known(size == 1):
            continue
        if dim == axis:
            if known(size == out.shape[axis]):
                continue
            return f"{what} size {size} does not match {out.shape[axis]} channels"
        if dim == 0:
            return f"{what} {VARIES_PER_SAMPLE}"
        return f"{what} varies along {'spatial ' if axis == CHANNEL_AXIS else ''}dim {dim}, not the channel axis"
    return None


def per_channel_problem(operand: Any, y: fx.Node, what: str) -> str | None:
    """``operand_problem`` for an operand the rewrite reshapes to exactly one value per channel."""
    if not isinstance(operand, fx.Node):
        return f"batch norm {what} is not a tensor"
    problem = operand_problem(operand, y.meta["val"], what)
    # A 0-d operand passes the broadcast rule but is not C values: the rewrite needs C.
    if problem is None and torch.Size(shape_of(operand)).numel() != y.meta["val"].shape[1]:
        problem = f"{what} is not one value per channel"
    return problem


VARIES_PER_SAMPLE = "varies per sample"
"""The tail of ``operand_problem``'s reason for an operand with a batch dim: such an
operand (a residual stream, an SE gate, a drop-path mask) is not an affine layer."""


@dataclasses.dataclass(frozen=True)
class GraphFacts:
    """What a round of recognition reads about the whole graph, computed once per round
    (a fold adds nodes, so the next round builds its own)."""

    backward: set[fx.Node]
    """``backward_region``: empty for an inference graph."""
    traced: set[fx.Node]
    """``traced_for_backward``: what a backward formula wrote, tangent or not."""
    effectful: bool
    """The graph threads effect tokens (``with_effects``)."""
    mutated: set[fx.Node]
    """The graph inputs the compiled code mutates (``mutations.mutated_primals``)."""

    @classmethod
    def of(cls, graph: fx.Graph, mutated: set[fx.Node]) -> GraphFacts:
        backward = backward_region(graph)
        return cls(backward=backward, traced=traced_for_backward(graph, backward) if backward else set(),
                   effectful=any(n.target is torch.ops.higher_order.with_effects for n in graph.nodes),
                   mutated=mutated)  # fmt: skip
