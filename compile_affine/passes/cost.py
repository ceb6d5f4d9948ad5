"""Does folding a legal site pay? Decided from static shapes only.

Folding trades activation-sized work for weight-sized work:

* it removes, per training step, the save of the conv output ``y`` (kept alive until
  backward), the ``g * s`` pass and the ``sum(g * y)`` reduction in backward (the
  forward multiply is usually fused into the next pointwise kernel, so it is nearly
  free already);
* it adds ``W * s`` in forward, its recompute in backward, ``gW' * s`` and
  ``sum(gW' * W)``: about four weight-sized passes.

So folding pays when the activation is large against the weight. The threshold,
``Settings.min_activation_ratio``, defaults per device: on CPU it is calibrated with
``python -m compile_affine.bench`` (docs/benchmarks.md); on CUDA it is derived from
access counts and not yet measured (docs/design.md, "On GPU").
"""

from __future__ import annotations

import dataclasses
import math

import torch
from .._compat import optimization_hint
from ..settings import default_min_activation_ratio
from .sites import Site

@dataclasses.dataclass(frozen=True)
class Estimate:
    activation_elems: int
    weight_elems: int
    adds_weight_grad_conv: bool
    min_ratio: float

    @property
    def pays(self) -> bool:
        if self.adds_weight_grad_conv:
            return False
        return self.activation_elems >= self.min_ratio * self.weight_elems

    def reason(self) -> str:
        if self.adds_weight_grad_conv:
            return "cost: fold needs a weight-gradient conv the model does not compute"
        return f"cost: activation {self.activation_elems} < {self.min_ratio} x weight {self.weight_elems} elements"


def _numel(val: torch.Tensor) -> int:
    # Size hints, not guards: a dynamic batch is costed at the size it was traced with.
    return math.prod(optimization_hint(s, fallback=8) for s in val.shape)


def estimate(site: Site, min_ratio: float | None) -> Estimate:
    """``min_ratio`` None: the default for the device the site's weight lives on."""
    weight = site.weight.meta["val"]
    if min_ratio is None:
        min_ratio = default_min_activation_ratio(weight.device.type)
    return Estimate(
        activation_elems=_numel(site.y.meta["val"]),
        weight_elems=_numel(weight),
        adds_weight_grad_conv=site.grad_scale_sum is not None and not site.computes_weight_grad(),
        min_ratio=min_ratio,
    )
