"""When folding is provably exact. Every rule is a small function returning ``None``
(fine) or a short reason that ends up in the report.

The algebra ``conv(x, W, b) * s + t == conv(x, W * s, b * s + t)`` (and its linear
twin, ``(A @ B + b) * s + t == A @ (B * s) + (b * s + t)``) holds when ``s`` and ``t``
are constant over every axis but the channel (feature) axis, the producer's output has
no other reader, and the multiply neither promotes the dtype nor broadcasts to a new
shape.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from .._compat import SCATTER_FILL_MISORDERED
from .graph import VARIES_PER_SAMPLE, VIEW_OPS, operand_problem, per_channel_problem, reaches, same_shape, strip
from .graph import val as _val
from .sites.base import Finding, Site
from .sites.linear import LinearSite

aten = torch.ops.aten

PER_SAMPLE_GATE = "per-sample gate or mask"
RESIDUAL_ADD = "residual add"
TRAINING_BATCH_NORM = "training-mode batch norm"
"""What the report calls the anchors that are no affine layer (``GraphRecord.not_affine``)."""


def not_an_affine_layer(site: Site) -> str | None:
    """What the anchor is, when it is not an affine layer at all, in the report's words.
    An operand that varies per sample (an SE gate, a drop-path mask, another
    activation) makes a gate, not a layer with one learned value per channel."""
    if site.residual_add():
        return RESIDUAL_ADD
    operand = site.shift if site.shift_only else site.scale
    if isinstance(operand, fx.Node) and (problem := operand_problem(operand, site.y.meta["val"], "", site.axis)):
        if problem.endswith(VARIES_PER_SAMPLE):
            return PER_SAMPLE_GATE
    return None


# --- the rules, in the order the report should name the first failure ---------------


def has_metadata(site: Site) -> str | None:
    if _val(site.y) is None or _val(site.weight) is None or _val(site.result) is None:
        return "missing tensor metadata"
    if not all(isinstance(d, int) for d in _val(site.weight).shape):
        return "weight shape is symbolic"
    return None


WORDING = {
    Finding.EFFECTFUL_GRAPH: "graph has effectful ops: Inductor frees inputs the folded graph still needs",
    Finding.BIAS_BROADCASTS: "bias add broadcasts the linear's output",
    Finding.SPLITS_FEATURE_AXIS: "{} between the linear and the scale splits the feature axis",
    Finding.SHARED_BACKWARD: "another site claims the same backward nodes",
    Finding.SCALE_GRAD_NOT_A_SUM: "scale gradient is not a plain reduction of grad * output",
    Finding.NO_WEIGHT_GRAD: "scale gradient needs the weight gradient, which the model does not compute",
    Finding.TWIN_CONV: "another conv with the same input and weight: its backward is indistinguishable",
    Finding.SEVERAL_CONV_BACKWARDS: "several convolution_backward nodes could belong to this conv",
    Finding.CONV_BACKWARD_OTHER_USE: "convolution_backward result used other than by index",
    Finding.TWIN_LINEAR: "another linear reads the same input or weight: its backward is indistinguishable",
    Finding.SEVERAL_LINEAR_GRADS: "several gradients could belong to this linear",
    Finding.GRAD_REDUCED_OVER_FEATURES: "gradient reduced over the feature axis",
    Finding.GRAD_SPLITS_FEATURE_AXIS: "gradient {} splits the feature axis",
    Finding.GRAD_USED_ELSEWHERE: "gradient used by {}",
}
"""The reason each recognition finding gives the report."""


def _worded(noted) -> str | None:
    return WORDING[noted[0]].format(noted[1]) if noted else None


def graph_supported(site: Site) -> str | None:
    return _worded(site.graph_finding)


def producer_reaches_scale(site: Site) -> str | None:
    """A linear's output must reach the scale through views that keep the feature axis whole."""
    return _worded(site.producer_finding)


def output_not_reused(site: Site) -> str | None:
    if site.other_users:
        return f"{'linear' if isinstance(site, LinearSite) else 'conv'} output reused"
    return None


def backward_recognised(site: Site) -> str | None:
    if site.backward_readers:
        ops = ", ".join(sorted({str(n.target) for n in site.backward_readers}))
        return f"backward form not recognised ({ops} reads the {site.producer} output)"
    return _worded(site.backward_finding)


def inputs_not_mutated(site: Site) -> str | None:
    if site.mutated_operands:
        return f"graph mutates {', '.join(site.mutated_operands)}, which the folded backward would need"
    return None


def scale_per_channel(site: Site) -> str | None:
    return operand_problem(site.scale, _val(site.y), "scale", site.axis)


def scale_independent_of_output(site: Site) -> str | None:
    return "scale is computed from the output it scales" if reaches(site.scale, site.produced) else None


def bias_per_feature(site: Site) -> str | None:
    """A linear's bias is scaled with the weight: it must be one value per feature too."""
    for host, index, axis in getattr(site, "biases", ()):
        bias = host.args[index]
        problem = operand_problem(bias, _val(host), "bias", axis)
        if problem is None and reaches(bias, site.produced):
            problem = "bias is computed from the linear's output"
        if problem:
            return problem
    return None


def autocast_promotion(conv: torch.dtype, out: torch.dtype) -> bool:
    """A 16-bit conv output times an fp32 scale is fp32, as under autocast. The fold keeps
    that dtype by casting the folded conv's output up; any other change is refused."""
    return conv in (torch.bfloat16, torch.float16) and out == torch.float32


def result_unchanged(site: Site) -> str | None:
    conv, out = _val(site.y), _val(site.result)
    if out.dtype != conv.dtype and not autocast_promotion(conv.dtype, out.dtype):
        return f"fold would change result dtype ({conv.dtype} -> {out.dtype})"
    if not same_shape(out.shape, conv.shape):
        return "fold would change result shape"
    return None


# Ops a gradient passes through on its way from a scatter without being materialised.
_THROUGH = VIEW_OPS | {aten.div.Scalar, aten.mul.Scalar, aten.clone.default, torch.ops.prims.convert_element_type.default}


def gradient_not_from_scatter(site: Site) -> str | None:
    """On torch < 2.14 the folded backward must not read ``g`` straight from an
    ``as_strided_scatter`` (see ``_compat.SCATTER_FILL_MISORDERED``)."""
    g = strip(site.grad, _THROUGH)
    if SCATTER_FILL_MISORDERED and isinstance(g, fx.Node) and g.target is aten.as_strided_scatter.default:
        return "gradient comes from as_strided_scatter, which Inductor before torch 2.14 can zero"
    return None


RULES: tuple[Callable[[Site], str | None], ...] = (
    graph_supported,
    has_metadata,
    producer_reaches_scale,
    bias_per_feature,
    output_not_reused,
    backward_recognised,
    inputs_not_mutated,
    scale_per_channel,
    scale_independent_of_output,
    result_unchanged,
    gradient_not_from_scatter,
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
    out = _val(site.y)
    problem = operand_problem(site.shift, out, "shift", site.axis)
    if problem is None and reaches(site.shift, site.produced):
        problem = "shift is computed from the output it shifts"
    result = _val(site.result)
    # The add must not promote: for addcmul, the result has the shift's dtype.
    product = _val(site.shift) if site.fused_shift and isinstance(site.shift, fx.Node) else _val(site.anchor)
    if problem is None and (result is None or product is None or result.dtype != product.dtype
                            or not same_shape(result.shape, out.shape)):  # fmt: skip
        problem = "shift would change result dtype or shape"
    if problem is None and site.shift_only and result.dtype != out.dtype:
        problem = "shift promotes the result dtype"  # the bias would have to be wider than the conv
    return problem


TRAINING_MODE_BATCH_NORM = "batch norm uses batch statistics (training mode)"


def batch_norm_problem(bn: Any) -> str | None:
    """Whether an eval-mode batch norm (a ``normalise.batchnorm.EvalBatchNorm``, not
    imported: normalisation asks legality, so it sits above it) may become a generic
    affine site (``normalise.batchnorm.normalise``)."""
    produced = {bn.y, *(bn.linear.produced if bn.linear else ())}
    if reaches(bn.running_mean, produced) or reaches(bn.invstd, produced):
        return TRAINING_MODE_BATCH_NORM
    for what, operand in (("running mean", bn.running_mean), ("invstd", bn.invstd)):
        problem = per_channel_problem(operand, bn.y, what)
        if problem:
            return problem
    y_val, out = _val(bn.y), _val(bn.result)
    if out is None or out.dtype != y_val.dtype or _val(bn.sub).dtype != y_val.dtype:
        return "batch norm computes in a wider dtype than its producer"
    if not same_shape(tuple(out.shape), tuple(y_val.shape)):
        return "batch norm would change the result shape"
    if any(reaches(operand, bn.mutated) for operand in (bn.running_mean, bn.invstd, bn.weight)):
        return "graph mutates the batch norm's running statistics or weight"
    if bn.other_readers:
        return f"{'linear' if bn.linear else 'conv'} output reused"
    return None
