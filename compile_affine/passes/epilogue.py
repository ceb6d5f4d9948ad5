"""Send ``convolution -> (+ bias) -> relu`` to one fused op (``compile_affine::conv_act``).

After folding, what remains of ``relu(conv(x, W) * s + t)`` is ``relu(conv(x, W', b'))``.
Stock Inductor runs the conv as an extern kernel and the relu as a separate pass over
its output, in training and inference alike (its oneDNN post-op fusion is only for
frozen inference graphs). On CPU the fused op runs the relu as a oneDNN post-op.

In a joint graph only the forward changes: ``relu(convolution(x, W, b))`` (or
``relu(add(convolution(x, W, None), b_view))``) becomes ``conv_act(x, W, b, ...)``.
Autograd's backward already reads only the relu output (``le(relu, 0)``/``where``,
threshold_backward decomposed), ``x`` and ``W``, so it is left in aten, and the
pre-activation conv output is no longer materialised.

Only CPU tensors: on GPU Inductor fuses the epilogue itself (Triton pointwise, or
templates under max-autotune).

Lowering. A custom op would reach Inductor as a ``FallbackKernel`` that keeps the
layouts it was traced with (contiguous), while Inductor runs CPU convs channels_last
(``layout_optimization``): converting around every fused op cost more than the fusion
saved. So on CPU (2-d, float32/bfloat16) the op is lowered to Inductor's own oneDNN
extern kernel, ``mkldnn_ir.ConvolutionUnary`` (``mkldnn._convolution_pointwise`` with
the relu post-op, channels_last in and out, plain weights), the node Inductor's frozen
inference path emits; anything else returns None and gets the ordinary
``FallbackKernel`` running the op's own implementation.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import ops
from .._compat import register_user_lowering
from ..report import EpilogueRecord
from . import target
from .rewrite import Emitter

log = logging.getLogger("compile_affine")
aten = torch.ops.aten

_RELU = (aten.relu.default,)
CONV_ACT = torch.ops.compile_affine.conv_act.default


class _Candidate:
    def __init__(self, act: fx.Node, conv: fx.Node, add: fx.Node | None, bias: fx.Node | None):
        self.act, self.conv, self.add, self.bias = act, conv, add, bias

    @property
    def pre(self) -> fx.Node:
        """The pre-activation value: the conv output, or the conv output plus the bias."""
        return self.add if self.add is not None else self.conv


def _is_conv(node) -> bool:
    return isinstance(node, fx.Node) and node.target is aten.convolution.default and len(node.args) == 9 and not node.kwargs


def _candidates(graph: fx.Graph) -> list[_Candidate]:
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _RELU:
            continue
        pre = node.args[0]
        if not isinstance(pre, fx.Node):
            continue
        if _is_conv(pre):
            found.append(_Candidate(node, pre, None, pre.args[2]))
        elif pre.target is aten.add.Tensor and not pre.kwargs and len(pre.args) == 2:
            a, b = pre.args
            for conv, bias in ((a, b), (b, a)):
                if _is_conv(conv):
                    found.append(_Candidate(node, conv, pre, bias))
                    break
    return found


def _val(node) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _reason(c: _Candidate) -> str | None:
    """Why ``c`` may not be fused; None when fusing is exact (and on CPU, pays)."""
    conv, act = c.conv, c.act
    x, weight, conv_bias, stride, padding, dilation, transposed, output_padding, groups = conv.args
    vals = {"conv input": _val(x), "weight": _val(weight), "conv output": _val(conv), "activation": _val(act)}
    if c.add is not None:
        vals["bias"], vals["pre-activation"] = _val(c.bias), _val(c.add)
    if any(not isinstance(v, torch.Tensor) for v in vals.values()):
        return "missing tensor metadata"
    y = vals["conv output"]
    if (device := target.device_type(y)) != "cpu":
        return f"{device} tensors: the epilogue is left to Inductor"
    if transposed:
        return "transposed conv: no oneDNN post-op path"
    if y.dim() != 4:
        return f"conv{y.dim() - 2}d: the oneDNN post-op path is 2-d only"
    if not ops.onednn_available():
        return "oneDNN (mkldnn) is not available or disabled"
    if y.dtype not in ops.onednn_dtypes():
        return f"dtype {y.dtype} has no oneDNN path on this CPU"
    if len(conv.users) != 1 or (c.add is not None and len(c.add.users) != 1):
        return "conv output reused"
    if c.add is not None:
        reason = _bias_problem(c, vals)
        if reason:
            return reason
    bias = vals.get("bias") if c.add is not None else _val(conv_bias)
    dtypes = {v.dtype for v in (vals["conv input"], vals["weight"], vals["activation"], y, bias) if v is not None}
    if len(dtypes) != 1:
        return f"mixed dtypes {sorted(map(str, dtypes))}"
    if any(isinstance(v, torch.SymInt) for v in (*stride, *padding, *dilation, groups)):
        return "symbolic conv configuration"
    if not all(isinstance(n, int) for n in y.shape):
        return "symbolic shapes"
    viewer = _strided_view_user(act)
    if viewer is not None:
        return f"activation output is read by {viewer}, which depends on its layout (channels_last)"
    return None


_LAYOUT_DEPENDENT = {aten.view.default, aten._unsafe_view.default, aten.as_strided.default}
_ALIASES = {aten.alias.default, aten.detach.default}


def _strided_view_user(node: fx.Node) -> str | None:
    """The fused op's output is channels_last where the relu's may have been contiguous:
    a ``view`` that reshapes it would fail in eager, and a graph output would hand the
    caller other strides than eager's. (Inside the graph Inductor re-derives layouts.)"""
    for user in node.users:
        if user.op == "output":
            return "the graph output"
        if user.target in _LAYOUT_DEPENDENT:
            return str(user.target).removeprefix("aten.")
        if user.target in _ALIASES:
            found = _strided_view_user(user)
            if found:
                return found
    return None


def _bias_problem(c: _Candidate, vals: dict) -> str | None:
    """The added operand must be one value per output channel, broadcast as (1, C, 1, 1)."""
    if c.conv.args[2] is not None:
        return "conv already has a bias and another is added"
    if not isinstance(c.bias, fx.Node):
        return "added operand is not a tensor"
    y, b, pre = vals["conv output"], vals["bias"], vals["pre-activation"]
    channels = y.shape[1]
    shape = list(b.shape)
    if len(shape) > y.dim() or len(shape) < y.dim() - 1:
        return "added operand is not one value per channel"
    expected = [channels, 1, 1] if len(shape) == y.dim() - 1 else [1, channels, 1, 1]
    if not all(statically_known_true(s == e) for s, e in zip(shape, expected)):
        return "added operand is not one value per channel"
    if b.dtype != y.dtype or pre.dtype != y.dtype:
        return f"add would change dtype ({y.dtype} + {b.dtype})"
    if not statically_known_true(pre.numel() == y.numel()):
        return "add changes the shape"
    return None


def _fuse(graph: fx.Graph, c: _Candidate) -> str | None:
    conv, act = c.conv, c.act
    x, weight, conv_bias, stride, padding, dilation = conv.args[:6]
    groups = conv.args[8]
    emit = Emitter(graph, act)
    with graph.inserting_before(act):
        bias = conv_bias
        if c.add is not None:
            bias = emit(aten.reshape.default, c.bias, [_val(conv).shape[1]])
        fused = emit(CONV_ACT, x, weight, bias, list(stride), list(padding), list(dilation), groups, "relu")
    new, old = fused.meta["val"], act.meta["val"]
    if tuple(new.shape) != tuple(old.shape) or new.dtype != old.dtype:  # never, by _reason; a guard
        graph.erase_node(fused)
        if bias is not conv_bias and not bias.users:
            graph.erase_node(bias)
        return f"fused op gives {new.dtype}{tuple(new.shape)}, the relu {old.dtype}{tuple(old.shape)}"
    act.replace_all_uses_with(fused)
    for node in (act, c.add, conv):
        if node is not None and not node.users:
            graph.erase_node(node)
    return None


def _lower_conv_act(x, weight, bias, stride, padding, dilation, groups, activation):
    """Inductor lowering of ``conv_act`` (registered in ``user_lowerings``: None = fall back)."""
    try:
        from torch._inductor import ir, mkldnn_ir
    except ImportError:  # a build without mkldnn
        return None
    tensors = [t for t in (x, weight, bias) if t is not None]
    if not (
        torch._C._has_mkldnn
        and ops.onednn_available()
        and activation in ops.ACTIVATIONS
        and all(t.get_device() is not None and t.get_device().type == "cpu" for t in tensors)
        and len(x.get_size()) == 4
        and x.get_dtype() in ops.onednn_dtypes()
        and all(t.get_dtype() == x.get_dtype() for t in tensors)
    ):
        return None
    node = mkldnn_ir.ConvolutionUnary.create(
        x, weight, bias, list(padding), list(stride), list(dilation), groups, activation, [], ""
    )
    return ir.TensorBox.create(node)


register_user_lowering(CONV_ACT, _lower_conv_act)


def fuse_epilogues(gm: fx.GraphModule, location: Callable[[fx.Node], str]) -> list[EpilogueRecord]:
    """Fuse every legal CPU ``conv -> (+bias) -> relu`` in ``gm``; one record per candidate."""
    records = []
    for c in _candidates(gm.graph):
        out = _val(c.act)
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
        where = location(c.act)
        reason = _reason(c)
        if reason is None:
            reason = _fuse(gm.graph, c)
        log.debug("epilogue %s: %s", where, reason or "fused")
        records.append(EpilogueRecord(location=where, activation="relu", output_shape=shape,
                                      fused=reason is None, reason=reason))  # fmt: skip
    if any(r.fused for r in records):
        gm.graph.lint()
        gm.recompile()
    return records
