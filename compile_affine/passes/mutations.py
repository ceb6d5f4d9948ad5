"""Input mutation, in one place. A fold saves x, W and b for backward where autograd
saved the producer's output; if one of them is updated in place after the forward, the
folded backward reads the new value. Two scans find such inputs (the backend's, of the
Dynamo graph, and the joint graph's own ``copy_``), and ``mutated_operands`` says which
of a site's operands they reach; ``legality`` decides from that.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from .graph import GraphFacts, aliases, is_tangent, reaches


@dataclasses.dataclass(frozen=True)
class InputMutations:
    """What the backend saw in the Dynamo graph: how many inputs, and which it mutates."""

    inputs: int = 0
    mutated: frozenset[int] = frozenset()


def mutated_inputs(gm: torch.fx.GraphModule) -> InputMutations:
    """Indices of Dynamo graph inputs that the graph may mutate in place.

    Conservative on purpose: any input (or view of it) passed first to an op whose name
    ends in ``_`` (``add_``, ``copy_``...), to ``setitem`` or an augmented assignment
    (``+=``), or as an ``out=`` argument counts.
    A false positive only costs a fold.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    aliased = {n: i for i, n in enumerate(placeholders)}
    mutated = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_OPERATORS:
            mutated.update(aliased[a] for a in args[:1] if a in aliased)
        if isinstance(node.kwargs.get("out"), torch.fx.Node) and node.kwargs["out"] in aliased:
            mutated.add(aliased[node.kwargs["out"]])
        # Views share storage: a mutation through a view mutates the input.
        if args and args[0] in aliased and name in _VIEW_OPS:
            aliased[node] = aliased[args[0]]
    return InputMutations(inputs=len(placeholders), mutated=frozenset(mutated))


_INPLACE_OPERATORS = {"setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "ipow", "iand", "ior", "ixor"}
_VIEW_OPS = {"view", "reshape", "transpose", "permute", "expand", "__getitem__", "getitem", "select", "narrow",
             "unsqueeze", "squeeze", "flatten", "unflatten", "t", "as_strided", "view_as", "split", "chunk",
             "unbind", "diagonal", "movedim", "detach"}  # fmt: skip


def mutated_primals(graph: fx.Graph, seen: InputMutations) -> set[fx.Node]:
    """Joint-graph inputs the compiled code mutates (a buffer updated in place). Two
    sources, both conservative:

    * the joint graph itself: AOTAutograd keeps mutations of inputs that need no grad as
      ``copy_(primal, new_value)`` in the graph (those would go wrong silently);
    * ``seen``, the backend's scan of the Dynamo graph. Its inputs line
      up with the joint graph's only when the counts match (subclass inputs, synthetic
      bases and effect tokens add or remove inputs); if they do not, every input counts.
    """
    primals = [n for n in graph.nodes if n.op == "placeholder" and not is_tangent(n)]
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


def graph_facts(gm: fx.GraphModule, seen: InputMutations = InputMutations()) -> GraphFacts:
    """The facts one round of recognition reads, mutated inputs included."""
    return GraphFacts.of(gm.graph, mutated_primals(gm.graph, seen))


def mutated_operands(site: Any, mutated: set[fx.Node]) -> list[str]:
    """The names of ``site``'s operands that are, view, or are computed from a mutated
    input (``b[:]``, ``b * 2``). The producer's input, where stock's backward reads the
    same node, counts only if it shares the mutated storage (see
    ``Site.input_read_by_stock_backward``)."""
    shared = site.input_read_by_stock_backward()
    return [k for k, v in site.operands().items() if (aliases(v, mutated) if k == shared else reaches(v, mutated))]
