"""Recognise affine sites: a producer (a convolution, or a linear layer reached through
views and permutes) feeding ``mul(., s)`` / ``div(., s)`` [-> ``add``/``sub(., t)``] or
``addcmul(t, ., s)``, and, in a joint graph, the backward nodes autograd derived from them.
``base`` holds the ``Site`` record, one module per producer kind (``conv``, ``linear``)
its match and backward walk, ``find`` the matcher.
"""

from .base import Finding, Site
from .conv import ConvSite
from .find import PRODUCERS, find_sites
from .linear import LinearSite

__all__ = ["ConvSite", "Finding", "LinearSite", "PRODUCERS", "Site", "find_sites"]
