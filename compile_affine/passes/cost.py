"""Does folding a legal site pay? Decided from static shapes only.

Folding trades activation-sized work for weight-sized work:

* it removes, per training step, the save of the conv output ``y`` (kept alive until
  backward), the ``g * s`` pass and the ``sum(g * y)`` reduction in backward (the
  forward multiply is usually fused into the next pointwise kernel, so it is nearly
  free already);
* it adds ``W * s`` in forward, its recompute in backward, ``gW' * s`` and
  ``sum(gW' * W)``: about four weight-sized passes.

So folding pays when the activation is large against the weight. Both sides are memory
passes, so they are compared in bytes: the conv output's bytes (its dtype: 2 under bf16
autocast) against the stored weight's (4 for fp32 parameters). The threshold,
``Settings.activation_ratio``, is the activation bytes required per weight byte: by
default the traffic break-even (``objective="time"``), the access-count ratio of what a
fold adds against what it removes (docs/design.md, "The cost rule's objective, and on
GPU"), or the lower ratio where CPU training steps measured time-neutral while freeing
the conv output (``objective="memory"``, docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import target
from .graph import val
from .sites.base import Site

@dataclasses.dataclass(frozen=True)
class Estimate:
    activation_bytes: int
    weight_bytes: int
    adds_weight_grad_conv: bool
    min_ratio: float
    """Activation bytes required per weight byte."""

    @property
    def ratio(self) -> float:
        return self.activation_bytes / self.weight_bytes if self.weight_bytes else math.inf

    @property
    def pays(self) -> bool:
        if self.adds_weight_grad_conv:
            return False
        return self.activation_bytes >= self.min_ratio * self.weight_bytes

    def reason(self) -> str:
        if self.adds_weight_grad_conv:
            return "cost: fold needs a weight-gradient conv the model does not compute"
        return f"cost: activation {self.activation_bytes} < {self.min_ratio} x weight {self.weight_bytes} bytes"

    def short_reason(self) -> str:
        """The reason in the user's terms, for the one-line summary, with this site's numbers."""
        if self.adds_weight_grad_conv:
            return "would add a weight-gradient conv"
        return f"activation {self.ratio:.3g}x the weight in bytes, under {self.min_ratio}"


def _numel(val: torch.Tensor) -> int:
    return math.prod(smallest(s) for s in val.shape)


def _nbytes(val: torch.Tensor) -> int:
    dtype = getattr(val, "dtype", None)
    return _numel(val) * (dtype.itemsize if isinstance(dtype, torch.dtype) else 4)


def smallest(size: int | torch.SymInt) -> int:
    """The smallest value ``size`` takes in any call the compiled graph serves.

    A dynamic graph is reused for every size its guards allow, so a fold must pay at the
    smallest of them, not at the size it was traced with: a graph traced at batch 64 and
    run at batch 2 must not keep a fold that pays only at 64. That is the lower bound of
    the symbol's range: 2 for a plain dynamic size (Dynamo specializes 0 and 1, so batch 1
    compiles a graph of its own and is costed there), or ``mark_dynamic``'s ``min``.
    Reading the range installs no guard, so the decision adds no recompile.
    """
    if isinstance(size, int):
        return size
    try:
        lower = size.node.shape_env.bound_sympy(size.node.expr).lower
    except AttributeError:  # no shape env to ask: assume the worst
        return 1
    return max(int(lower), 1) if lower.is_finite else 1


def recomputes_relu_mask(site: Site, objective: str) -> bool:
    """Whether a fold of ``site`` should keep the ReLU mask after it recomputed in backward
    (rewrite/masks.py): for time, on CPU, where the unfolded backward already saved a float
    of that size (``y``, for the scale's gradient), so the saved bytes stay no more than
    stock's. Under ``objective="memory"`` the smaller bool mask is kept."""
    y = val(site.y)
    return objective == "time" and site.grad_scale_mul is not None and y is not None and target.device_type(y) == "cpu"


def estimate(site: Site, min_ratio: float) -> Estimate:
    """``min_ratio``: activation bytes required per weight byte (``Settings.activation_ratio``)."""
    return Estimate(
        activation_bytes=_nbytes(site.y.meta["val"]),
        weight_bytes=_nbytes(site.real_weight.meta["val"]),
        adds_weight_grad_conv=site.grad_scale_sum is not None and not site.computes_weight_grad(),
        min_ratio=min_ratio,
    )
