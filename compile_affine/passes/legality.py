"""When folding is provably exact. Every rule is a small function returning ``None``
(fine) or a short reason that ends up in the report.

The algebra ``conv(x, W, b) * s + t == conv(x, W * s, b * s + t)`` holds when ``s`` and
``t`` are constant over the batch and spatial axes, the conv output has no other
reader, and the multiply neither promotes the dtype nor broadcasts to a new shape.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .sites import Operand, Site, reaches

CHANNEL_AXIS = 1  # aten.convolution output is (N, C, *spatial)


def _val(node: fx.Node) -> torch.Tensor | None:
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def _known_one(size) -> bool:
    # statically_known_true never installs a guard, so fold decisions add no recompiles.
    return statically_known_true(size == 1)


def _known_equal(a, b) -> bool:
    return statically_known_true(a == b)


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(_known_equal(x, y) for x, y in zip(a, b))


def operand_problem(operand: Operand, out: torch.Tensor, what: str) -> str | None:
    """Is ``operand`` one value per output channel (or one value overall)?"""
    if isinstance(operand, bool) or not isinstance(operand, (int, float, fx.Node)):
        return f"{what} is not a tensor or a real number"
    if not isinstance(operand, fx.Node):
        return None
    val = _val(operand)
    if val is None:
        return f"{what} has no tensor metadata"
    if val.ndim > out.ndim:
        return f"{what} has more dims than the conv output"
    shape = (1,) * (out.ndim - val.ndim) + tuple(val.shape)
    for dim, size in enumerate(shape):
        if _known_one(size):
            continue
        if dim == CHANNEL_AXIS:
            if _known_equal(size, out.shape[CHANNEL_AXIS]):
                continue
            return f"{what} size {size} does not match {out.shape[CHANNEL_AXIS]} channels"
        if dim == 0:
            return f"{what} varies per sample"
        return f"{what} varies along spatial dim {dim}, not the channel axis"
    return None


# --- the rules, in the order the report should name the first failure ---------------


def conv_has_metadata(site: Site) -> str | None:
    if _val(site.conv) is None or _val(site.conv_args["weight"]) is None or _val(site.tail) is None:
        return "missing tensor metadata"
    if not all(isinstance(d, int) for d in _val(site.conv_args["weight"]).shape):
        return "weight shape is symbolic"
    return None


def graph_supported(site: Site) -> str | None:
    return site.graph_problem


def conv_output_not_reused(site: Site) -> str | None:
    return "conv output reused" if site.other_conv_users else None


def backward_recognised(site: Site) -> str | None:
    return site.backward_problem


def inputs_not_mutated(site: Site) -> str | None:
    if site.mutated_operands:
        return f"graph mutates {', '.join(site.mutated_operands)}, which the folded backward would need"
    return None


def scale_per_channel(site: Site) -> str | None:
    return operand_problem(site.scale, _val(site.conv), "scale")


def scale_independent_of_conv(site: Site) -> str | None:
    return "scale is computed from the conv output" if reaches(site.scale, {site.conv}) else None


def autocast_promotion(conv: torch.dtype, out: torch.dtype) -> bool:
    """A 16-bit conv output times an fp32 scale is fp32, as under autocast. The fold keeps
    that dtype by casting the folded conv's output up; any other change is refused."""
    return conv in (torch.bfloat16, torch.float16) and out == torch.float32


def result_unchanged(site: Site) -> str | None:
    conv, out = _val(site.conv), _val(site.tail)
    if out.dtype != conv.dtype and not autocast_promotion(conv.dtype, out.dtype):
        return f"fold would change result dtype ({conv.dtype} -> {out.dtype})"
    if not _same_shape(out.shape, conv.shape):
        return "fold would change result shape"
    return None


RULES: tuple[Callable[[Site], str | None], ...] = (
    graph_supported,
    conv_has_metadata,
    conv_output_not_reused,
    backward_recognised,
    inputs_not_mutated,
    scale_per_channel,
    scale_independent_of_conv,
    result_unchanged,
)


def check(site: Site) -> str | None:
    """The first rule ``site`` breaks, as a reason string; None when folding is exact."""
    for rule in RULES:
        reason = rule(site)
        if reason:
            return reason
    return None


def shift_problem(site: Site) -> str | None:
    """Whether the absorbed add/sub may join the fold. If not, only the multiply folds."""
    if site.shift is None:
        return None
    out = _val(site.conv)
    problem = operand_problem(site.shift, out, "shift")
    if problem is None and reaches(site.shift, {site.conv}):
        problem = "shift is computed from the conv output"
    tail, product = _val(site.shift_node), _val(site.mul)
    if problem is None and (tail is None or tail.dtype != product.dtype or not _same_shape(tail.shape, out.shape)):
        problem = "shift would change result dtype or shape"
    return problem
