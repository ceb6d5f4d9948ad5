"""Convolution producers (``aten.convolution``: 1d/2d/3d, transposed, grouped): the
forward match and the backward walk to ``convolution_backward(g * s, x, W, ...)``."""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from ..graph import CAST, Operand, strip
from .base import Finding, Site, unscaled_grad

aten = torch.ops.aten

CONV_ARG_NAMES = ("x", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")


@dataclasses.dataclass
class ConvSite(Site):
    conv: fx.Node = None  # type: ignore[assignment]
    grad_conv_input: fx.Node | None = None
    """``mul(g, s)`` (``div(g, s)``), the gradient of the conv output, feeding ``convolution_backward``."""
    grad_cast: fx.Node | None = None
    """Under autocast, the cast of ``mul(g, s)`` down to the conv's dtype."""
    conv_backward: fx.Node | None = None

    @classmethod
    def match(cls, anchor: fx.Node, y: fx.Node, scale: Operand, extra: dict) -> ConvSite | None:
        return cls(anchor=anchor, scale=scale, conv=y, **extra) if y.target is aten.convolution.default else None

    def attach_backward(self, backward: set[fx.Node]) -> None:
        _attach_conv_backward(self, backward)

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

    def input_read_by_stock_backward(self) -> str | None:
        # ``attach_backward`` takes a ``convolution_backward`` only if it reads this x.
        return "x" if self.conv_backward is not None else None

    def backward_nodes(self) -> list[fx.Node]:
        return [n for n in (self.conv_backward, self.grad_scale_sum) if n is not None]


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
        # Under autocast the conv's gradient is ``mul(g, s)`` cast down to the conv's dtype.
        g = unscaled_grad(strip(grad_out, (CAST,), once=True), site)
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
        site.backward_finding = (Finding.TWIN_CONV, "")
        return
    if len(found) > 1:
        site.backward_finding = (Finding.SEVERAL_CONV_BACKWARDS, "")
        return
    cb = found[0]
    # ``grad_in`` may have other readers (in a chain, the previous shift's gradient sums
    # it); the rewrite stops feeding it to the conv and leaves it to them.
    grad_in = strip(cb.args[0], (CAST,), once=True)
    if site.grad is None:
        site.grad = unscaled_grad(grad_in, site)
    site.conv_backward, site.grad_conv_input = cb, grad_in
    site.grad_cast = cb.args[0] if cb.args[0] is not grad_in else None
    if any(u.target is not operator.getitem for u in cb.users):
        site.backward_finding = (Finding.CONV_BACKWARD_OTHER_USE, "")
