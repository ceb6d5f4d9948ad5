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

from typing import Callable

import torch.fx as fx

from ..sites.base import Site
from ..sites.conv import ConvSite
from ..sites.linear import LinearSite
from .common import Emitter
from .conv import fold_conv
from .linear import fold_linear
from .masks import recompute_relu_masks

FOLDS: dict[type[Site], Callable[[fx.Graph, Site], fx.Node]] = {ConvSite: fold_conv, LinearSite: fold_linear}
"""Each producer kind's fold (``sites.find.PRODUCERS`` lists the kinds)."""


def fold_site(graph: fx.Graph, site: Site) -> fx.Node:
    """Rewrite ``site`` in place; returns the folded producer node."""
    return FOLDS[type(site)](graph, site)


__all__ = ["Emitter", "FOLDS", "fold_site", "fold_conv", "fold_linear", "recompute_relu_masks"]
