"""What every rule, the cost model and the rewrite read about a site (``Site``): the
record each producer kind (``conv``, ``linear``) fills in with its own ``match`` and
``attach_backward``, and the pure tests both producers share. A leaf of recognition:
it imports only ``graph``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch
import torch.fx as fx

from ..graph import Operand, other_operand

aten = torch.ops.aten

USER_AFFINE_OPS = frozenset(str(op) for op in (
    aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.div.Tensor, aten.div_.Tensor,
    aten.addcmul.default, aten.addcmul_.default, aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor,
))  # fmt: skip
"""The ops a user writes as an affine, by name (the meta can hold an equal but distinct
overload object). A node whose ``original_aten`` meta (the op it was decomposed from) is
another op is arithmetic inside that op, not a layer the user wrote."""


class Finding(enum.Enum):
    """Something recognition saw that the fold's algebra does not cover. Recognition only
    notes it on the site (with a detail, e.g. the op); ``legality`` decides from it and
    words the reason (``legality.WORDING``)."""

    EFFECTFUL_GRAPH = enum.auto()
    BIAS_BROADCASTS = enum.auto()
    SPLITS_FEATURE_AXIS = enum.auto()
    SHARED_BACKWARD = enum.auto()
    SCALE_GRAD_NOT_A_SUM = enum.auto()
    NO_WEIGHT_GRAD = enum.auto()
    TWIN_CONV = enum.auto()
    SEVERAL_CONV_BACKWARDS = enum.auto()
    CONV_BACKWARD_OTHER_USE = enum.auto()
    TWIN_LINEAR = enum.auto()
    SEVERAL_LINEAR_GRADS = enum.auto()
    GRAD_REDUCED_OVER_FEATURES = enum.auto()
    GRAD_SPLITS_FEATURE_AXIS = enum.auto()
    GRAD_USED_ELSEWHERE = enum.auto()


Noted = tuple  # (Finding, detail: str)


@dataclasses.dataclass
class Site:
    """A producer's output ``y`` feeding a per-channel affine, plus its backward.

    Subclasses say what the producer is (``ConvSite``, ``LinearSite``); everything the
    rules and the cost model read is defined here.
    """

    anchor: fx.Node
    """The affine's anchor: ``mul(y, s)``, ``div(y, s)`` or ``addcmul(t, y, s)``."""
    scale: Operand
    shift: Operand | None = None
    shift_node: fx.Node | None = None
    """The add/sub absorbed into the site; ``result`` is what the folded producer replaces."""
    shift_sign: int = 1
    divide: bool = False
    """``y / s``: the fold multiplies by ``1 / s``."""
    unfolded_shift: Operand | None = None
    """``addcmul``'s shift when it cannot join the fold: the rewrite adds it back."""
    # Backward (joint graphs only).
    grad: fx.Node | None = None
    """``g``: the gradient flowing into the affine's output."""
    grad_scale_mul: fx.Node | None = None
    """The node that multiplies ``g`` by ``y`` (for ``y / s``, by ``y / s / s``)."""
    grad_scale_sum: fx.Node | None = None
    """Its reduction: the scale's gradient (for ``y / s``, already negated and divided)."""
    grad_scale_nodes: list[fx.Node] = dataclasses.field(default_factory=list)
    """The nodes between ``y`` and ``grad_scale_sum``, erased with it."""
    other_users: list[fx.Node] = dataclasses.field(default_factory=list)
    """Users of the producer's values that are neither the affine nor its recognised backward."""
    backward_readers: list[fx.Node] = dataclasses.field(default_factory=list)
    """Backward nodes reading the producer's output in a form the walk does not know (a
    torch upgrade that changed a decomposition, a custom autograd.Function)."""
    backward_finding: Noted | None = None
    """Set when backward nodes exist but do not have the shape autograd gives them."""
    mutated_operands: list[str] = dataclasses.field(default_factory=list)
    """Operands that are, view, or are computed from inputs the graph mutates (training);
    for the input of ``input_read_by_stock_backward``, only one that is or views one."""
    graph_finding: Noted | None = None
    """Set when something about the whole graph rules folding out."""
    producer_finding: Noted | None = None
    """Set when the producer's output reaches the affine in a way the fold cannot map."""
    kind: str = "affine"
    """What the user wrote: ``"affine"``, or ``"batch_norm"`` for a normalised eval-mode batch norm."""

    # --- what subclasses define ---------------------------------------------------
    @classmethod
    def match(cls, anchor: fx.Node, y: fx.Node, scale: Operand, extra: dict) -> Site | None:
        """This producer kind's site for ``anchor`` reading ``y`` (``extra``: the affine's
        form, ``Site`` fields), or None when ``y`` is not this kind's output."""
        raise NotImplementedError

    def attach_backward(self, backward: set[fx.Node]) -> None:
        """Find the producer's own backward nodes (in ``backward``) that the fold edits."""
        raise NotImplementedError

    @property
    def y(self) -> fx.Node:
        """The value the affine reads."""
        raise NotImplementedError

    axis: int = 1
    """The channel (feature) axis of ``y``."""

    @property
    def weight(self) -> fx.Node:
        raise NotImplementedError

    @property
    def producer(self) -> str:
        raise NotImplementedError

    @property
    def producer_node(self) -> fx.Node:
        """The conv or matmul node the affine folds into."""
        return self.y

    @property
    def real_weight(self) -> fx.Node:
        """The weight as stored, which the fold scales (``weight`` may be a broadcast of it)."""
        return self.weight

    @property
    def produced(self) -> set[fx.Node]:
        """Every node computing ``y``: nothing the affine's operands depend on may be one."""
        return {self.y}

    def operands(self) -> dict[str, Any]:
        """Every graph value the fold reads, by name (for the mutated-input rule)."""
        raise NotImplementedError

    def computes_weight_grad(self) -> bool:
        """Whether the model already computes the weight's gradient (the fold reuses it)."""
        raise NotImplementedError

    def input_read_by_stock_backward(self) -> str | None:
        """The operand (by ``operands()`` name) that is the producer's activation input,
        when autograd's own backward already reads that very node: the conv's
        ``convolution_backward``, the linear's weight-gradient matmul. The folded backward
        reads it there and nowhere else, so only a mutation that reaches the saved
        storage (the input is, or views, a mutated graph input) is a hazard the fold adds;
        a fresh value computed from a mutated input (``conv(x.relu_())``) is read as stock
        reads it. None when the fold would add the only backward read."""
        return None

    def backward_nodes(self) -> list[fx.Node]:
        """The backward nodes the rewrite will edit: no two sites may share one."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------
    @property
    def decomposed_from(self) -> str | None:
        """The op whose decomposition wrote the anchor (GELU's ``x * 0.5``), when the user
        did not write it. Nodes without the meta (our own, older graphs) count as the user's."""
        origin = self.anchor.meta.get("original_aten")
        if origin is None or str(origin) in USER_AFFINE_OPS:
            return None
        return str(getattr(origin, "_overloadpacket", origin))

    def residual_add(self) -> bool:
        """Whether an add between the producer and the affine is a residual, not its bias."""
        return False

    @property
    def shift_only(self) -> bool:
        """``y + t`` / ``y - t`` with no scale: only the bias changes."""
        return self.anchor.target in (aten.add.Tensor, aten.sub.Tensor)

    @property
    def fused_shift(self) -> bool:
        """The anchor itself adds the shift (``addcmul``, or a bare add/sub)."""
        return self.anchor.target is aten.addcmul.default or self.shift_only

    @property
    def result(self) -> fx.Node:
        return self.shift_node or self.anchor

    def refresh(self) -> None:
        """Re-read scale and shift from the live graph: folding an earlier site in the same
        round may have replaced the node one of them was (e.g. a shift that is another
        site's output)."""
        if self.shift_only:
            self.shift = other_operand(self.anchor, self.y)
            return
        if self.fused_shift:  # addcmul(t, y, s) or addcmul(t, s, y)
            self.scale = self.anchor.args[2] if self.anchor.args[1] is self.y else self.anchor.args[1]
            if self.shift is not None:
                self.shift = self.anchor.args[0]
            return
        self.scale = self.anchor.args[1] if self.divide else other_operand(self.anchor, self.y)
        if self.shift_node is not None:
            self.shift = other_operand(self.shift_node, self.anchor)

    def drop_shift(self) -> None:
        """Fold the scale alone; the shift is added as before."""
        if self.fused_shift and not self.shift_only:
            self.unfolded_shift = self.anchor.args[0]
        self.shift = self.shift_node = None


def is_scale(node: Any, site: Site) -> bool:
    """``s`` itself, or ``s * 1`` as autograd writes addcmul's backward."""
    if not isinstance(site.scale, fx.Node):  # a Python number, equal but maybe not the same object
        return not isinstance(node, (fx.Node, bool)) and node == site.scale
    if node is site.scale:
        return True
    return isinstance(node, fx.Node) and node.target is aten.mul.Scalar and node.args == (site.scale, 1)


def unscaled_grad(node: Any, site: Site) -> fx.Node | None:
    """``g`` if ``node`` is ``g * s`` (``g / s`` for a division site)."""
    if not isinstance(node, fx.Node):
        return None
    if site.divide:
        if node.target is aten.div.Tensor and is_scale(node.args[1], site) and isinstance(node.args[0], fx.Node):
            return node.args[0]
        return None
    if node.target is aten.mul.Tensor:
        a, b = node.args[:2]
        if is_scale(b, site) and isinstance(a, fx.Node):
            return a
        if is_scale(a, site) and isinstance(b, fx.Node):
            return b
    return None
