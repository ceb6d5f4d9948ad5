"""What every fold shares: an emitter that keeps fake-tensor metadata, per-channel
vectors in at least fp32, shifts, the scale-gradient replacement, dead-node cleanup."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from ..._compat import CONV_TAKES_VIEW_BIAS
from ..graph import ALREADY_JUDGED, VIEW_OPS, Operand
from ..sites.base import Site

aten = torch.ops.aten
prims = torch.ops.prims

class Emitter:
    """Adds nodes with fake-tensor ``val`` metadata, as later Inductor passes require."""

    def __init__(self, graph: fx.Graph, like: fx.Node):
        self.graph = graph
        self.fake_mode = like.meta["val"].fake_mode
        self.meta = {k: like.meta[k] for k in ("stack_trace", "nn_module_stack") if k in like.meta}
        self.recompute = False

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        fake_args, fake_kwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
        with self.fake_mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        node.meta.update(self.meta)
        if self.recompute:
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        return node

    def cast(self, node: fx.Node, dtype: torch.dtype) -> fx.Node:
        if node.meta["val"].dtype == dtype:
            return node
        return self(prims.convert_element_type.default, node, dtype)

    def upcast(self, node: fx.Node) -> fx.Node:
        """At least fp32: 16-bit floats are upcast, fp32 and fp64 kept as they are."""
        dtype = node.meta["val"].dtype
        return self.cast(node, torch.float32) if dtype.is_floating_point and dtype.itemsize < 4 else node


def reshape(emit: Emitter, node: fx.Node, shape: list) -> fx.Node:
    if list(node.meta["val"].shape) == list(shape):
        return node
    return emit(aten.reshape.default, node, shape)


def per_channel(emit: Emitter, operand: Operand, channels: int, device: torch.device, dtype: torch.dtype) -> fx.Node:
    """``operand`` as a vector of one value per channel, in at least fp32."""
    if not isinstance(operand, fx.Node):
        return emit(aten.full.default, [channels], float(operand), dtype=dtype, device=device, pin_memory=False)
    flat = emit(aten.reshape.default, operand, [-1])
    if flat.meta["val"].device != device:
        # Only a 0-d CPU tensor may meet another device's tensor in eager (``self.alpha =
        # torch.tensor(.5)`` on a CUDA model); the folded weight needs it on that device.
        flat = emit(aten._to_copy.default, flat, device=device)
    if flat.meta["val"].shape[0] != channels:
        flat = emit(aten.expand.default, flat, [channels])
    return emit.upcast(flat)


def conv_bias(emit: Emitter, bias: fx.Node | None) -> fx.Node | None:
    """``bias`` as the folded conv may take it: on older Inductor, never a bare view
    (``_compat.CONV_TAKES_VIEW_BIAS``). ``neg(neg(b))`` is exact and lowers to a buffer
    (``clone`` would be dropped as a no-op)."""
    if CONV_TAKES_VIEW_BIAS or bias is None or getattr(bias, "target", None) not in VIEW_OPS:
        return bias
    return emit(aten.neg.default, emit(aten.neg.default, bias))


def first_in_graph(graph: fx.Graph, nodes: list[fx.Node]) -> fx.Node:
    wanted = set(nodes)
    return next(n for n in graph.nodes if n in wanted)


# Pure ops the fold leaves dead behind it; their dead inputs of these kinds go too.
_PURE = {
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.neg.default, aten.add.Tensor, aten.sub.Tensor,
    aten.addcmul.default, aten.rsqrt.default, aten.sqrt.default, aten.reciprocal.default, aten.unsqueeze.default,
    aten.sum.dim_IntList, aten.sum.default, aten.convolution.default,
    aten.convolution_backward.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.view.default,
    aten._unsafe_view.default, aten.reshape.default, aten.permute.default, aten.transpose.int, aten.t.default,
    aten.clone.default, aten.alias.default, prims.convert_element_type.default, operator.getitem,
}  # fmt: skip


def erase_dead(graph: fx.Graph, nodes: list[fx.Node | None]) -> None:
    pending = [n for n in nodes if n is not None]
    while pending:
        node = pending.pop()
        if not node._erased and not node.users and node.op == "call_function" and node.target in _PURE:
            pending += node.all_input_nodes
            graph.erase_node(node)


def scale_vector(emit: Emitter, site: Site, channels: int, device: torch.device, dtype: torch.dtype) -> fx.Node:
    """What multiplies each channel: ``s``, or ``1 / s`` for a division."""
    s_c = per_channel(emit, site.scale, channels, device, dtype)
    return emit(aten.reciprocal.default, s_c) if site.divide else s_c


def finish_result(emit: Emitter, site: Site, result: fx.Node) -> fx.Node:
    """addcmul's shift, when it could not join the fold, is added back as it was."""
    if site.unfolded_shift is None:
        return result
    add = emit(aten.add.Tensor, site.unfolded_shift, result)
    add.meta[ALREADY_JUDGED] = True  # reported with its addcmul: not a new site
    return add


def add_shift(emit: Emitter, value: fx.Node | None, shift: fx.Node, sign: int) -> fx.Node:
    if value is None:
        return shift if sign > 0 else emit(aten.neg.default, shift)
    return emit(aten.add.Tensor if sign > 0 else aten.sub.Tensor, value, shift)


def replace_scale_grad(emit: Emitter, site: Site, dot: fx.Node, s_c: fx.Node, axis: int) -> None:
    """``dot`` is ``sum(g * y)`` per channel. For ``y * s`` that is the scale's gradient;
    for ``y / s`` it is ``-sum(g * y) / s**2``, with ``s_c`` already ``1 / s``."""
    if site.divide:
        dot = emit(aten.neg.default, emit(aten.mul.Tensor, dot, emit(aten.mul.Tensor, s_c, s_c)))
    old = site.grad_scale_sum
    old.replace_all_uses_with(_like_scale_sum(emit, dot, old, axis))
    erase_dead(emit.graph, [old])


def _like_scale_sum(emit: Emitter, grad_s: fx.Node, old_sum: fx.Node, axis: int) -> fx.Node:
    """Shape the per-channel ``gs`` like autograd's ``sum(g * y, dims)`` it replaces.

    If that reduction also summed the channel axis, the scale was one value for all
    channels, and its gradient is the total.
    """
    out = old_sum.meta["val"]
    ndim = old_sum.args[0].meta["val"].ndim
    dims = old_sum.args[1] if old_sum.target is aten.sum.dim_IntList else None
    if not dims or axis in [d % ndim for d in dims]:
        grad_s = emit(aten.sum.default, grad_s)
    return emit.cast(emit(aten.reshape.default, grad_s, list(out.shape)), out.dtype)


def feature_view(emit: Emitter, vector: fx.Node, ndim: int, axis: int) -> fx.Node:
    """A (C,) vector shaped to broadcast along ``axis`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return emit(aten.reshape.default, vector, shape)


def feature_sum(g: fx.Node | None, axis: int, exclude: frozenset[fx.Node] = frozenset()) -> fx.Node | None:
    """An existing ``sum(g)`` over every dim but ``axis``, in ``g``'s dtype, other than
    ``exclude``: a shift's gradient, which is also the folded producer's bias gradient (one
    read of ``g`` serves both)."""
    if g is None:
        return None
    ndim = g.meta["val"].ndim
    for user in g.users:
        if (user not in exclude and user.target is aten.sum.dim_IntList and user.args[0] is g and user.kwargs.get("dtype") is None
                and sorted(d % ndim for d in user.args[1]) == [d for d in range(ndim) if d != axis % ndim]):  # fmt: skip
            return user
    return None

