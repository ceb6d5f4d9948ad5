"""Forms some torch releases write for an affine the user wrote plainly, undone value for
value so recognition sees the producer: ``addcmul``'s unit factor and a ``Dropout(p=0)``
clone (docs/design.md, "Other forms of the affine")."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._inductor.fx_passes.post_grad import same_meta

from ..graph import GraphFacts, fresh_result

aten = torch.ops.aten


def addcmul_unit_factors(gm: fx.GraphModule, facts: GraphFacts) -> bool:
    """``addcmul(t, y, s)`` is ``t + 1 * y * s`` after the decomposition some torch
    releases (2.11) apply: the ``mul(y, 1)`` hides ``y``'s producer from recognition and
    would make one user's affine two sites. Multiplying by the integer 1 changes neither
    value, dtype nor shape, so its readers may read ``y`` itself. Only multiplies that
    decomposition wrote are touched; returns whether any was."""
    graph, changed = gm.graph, False
    for node in list(graph.nodes):
        if node.target is not aten.mul.Tensor or "addcmul" not in str(node.meta.get("original_aten")):
            continue
        x, one = node.args[:2]
        if not isinstance(x, fx.Node) or isinstance(one, bool) or not isinstance(one, (int, float)) or one != 1:
            continue
        val, out = x.meta.get("val"), node.meta.get("val")
        if val is None or out is None or val.dtype != out.dtype or val.shape != out.shape:
            continue
        node.replace_all_uses_with(x)
        graph.erase_node(node)
        changed = True
    return changed


def clones_of_convolutions(gm: fx.GraphModule, facts: GraphFacts) -> bool:
    """``clone(conv(...))`` with the conv's own layout is what torch 2.11 writes for a
    ``Dropout(p=0.0)`` in training (timm's ``Mlp(drop=0.)``); it hides the conv from the
    affine after it. A conv output is a fresh tensor nothing mutates in a functional graph,
    so a clone that keeps its sizes, strides and dtype holds the same values. Reading the
    conv instead is unobservable only if no reader of the clone can hand out its storage:
    every reader must compute a fresh tensor (no view, no in-place op, not a graph output),
    or two outputs that eager keeps apart would share memory. Returns whether any was dropped."""
    graph, changed = gm.graph, False
    for node in list(graph.find_nodes(op="call_function", target=aten.clone.default)):
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.target is aten.convolution.default) or not same_meta(node, src):
            continue
        if not all(fresh_result(user) for user in node.users):
            continue
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        changed = True
    return changed
