"""Graph surgery for one legal site, forward and backward. Nothing else edits nodes.
One module per producer (``conv``, ``linear``) on the shared helpers in ``common``;
linear layers follow the same algebra.

Forward:  ``conv(x, W, b) * s + t``  ->  ``conv(x, W * s, b * s + t)``.

Backward, with ``g`` the gradient of the affine's output and ``y`` the old conv output,
autograd had computed ``gy = g * s`` for ``convolution_backward`` and ``gs = sum(g * y)``.
Running ``convolution_backward(g, x, W * s)`` instead gives ``gx`` unchanged, and
``gW' = corr(x, g)``, ``gb' = sum(g)``, from which, per output channel ``c``:

    gW[c] = gW'[c] * s[c]                  (since corr(x, g * s)[c] = s[c] * corr(x, g)[c])
    gb[c] = gb'[c] * s[c]
    gs[c] = sum(gW'[c] * W[c]) + gb'[c] * b[c]      (since y[c] = conv(x, W)[c] + b[c])

All three are weight-sized, so ``y`` need not be saved. The folded weight is computed
in fp32 and cast back, and is tagged for recompute so the partitioner saves ``W`` and
``s`` (alive anyway as parameters) instead of a second weight-sized ``W * s``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._inductor.fx_passes.post_grad import same_meta

from ..graph import fresh_result
from ..sites import LinearSite, Site
from .batchnorm import normalise as normalise_batch_norm
from .common import REFUSED_BATCH_NORM, Emitter
from .conv import fold_conv
from .linear import fold_linear
from .masks import recompute_relu_masks

aten = torch.ops.aten


def drop_addcmul_unit_factors(graph: fx.Graph) -> bool:
    """``addcmul(t, y, s)`` is ``t + 1 * y * s`` after the decomposition some torch
    releases (2.11) apply: the ``mul(y, 1)`` hides ``y``'s producer from recognition and
    would make one user's affine two sites. Multiplying by the integer 1 changes neither
    value, dtype nor shape, so its readers may read ``y`` itself. Only multiplies that
    decomposition wrote are touched; returns whether any was."""
    changed = False
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


def drop_clones_of_convolutions(graph: fx.Graph) -> bool:
    """``clone(conv(...))`` with the conv's own layout is what torch 2.11 writes for a
    ``Dropout(p=0.0)`` in training (timm's ``Mlp(drop=0.)``); it hides the conv from the
    affine after it. A conv output is a fresh tensor nothing mutates in a functional graph,
    so a clone that keeps its sizes, strides and dtype holds the same values. Reading the
    conv instead is unobservable only if no reader of the clone can hand out its storage:
    every reader must compute a fresh tensor (no view, no in-place op, not a graph output),
    or two outputs that eager keeps apart would share memory. Returns whether any was dropped."""
    changed = False
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


def fold_site(graph: fx.Graph, site: Site) -> fx.Node:
    """Rewrite ``site`` in place; returns the folded producer node."""
    if isinstance(site, LinearSite):
        return fold_linear(graph, site)
    return fold_conv(graph, site)


__all__ = ["REFUSED_BATCH_NORM", "drop_addcmul_unit_factors", "drop_clones_of_convolutions", "Emitter", "fold_site", "fold_conv", "fold_linear", "normalise_batch_norm", "recompute_relu_masks"]
