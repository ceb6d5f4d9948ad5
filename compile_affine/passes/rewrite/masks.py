"""What the partitioner saves for the ReLU after a folded site, on CPU.

Unfolded, a learnable affine's backward reads the conv output ``y`` (the scale's
gradient ``sum(g * y)``), so the min-cut partitioner saves that float and recomputes the
ReLU's mask ``relu(.) <= 0`` inside the backward kernel that reads it. Folded, nothing
else needs a float there, and where the ReLU's output is not saved for another reader (a
ResNet stem: conv, norm, ReLU, max-pool) the cheapest cut becomes the mask itself, a
bool the forward must store. Inductor's CPU code stores a float comparison to bool far
slower than it reads or writes floats (``torch.compile(lambda x: x <= 0)`` on 2M floats:
35.7 ms against eager's 1.8 ms, on the AVX-512 EPYC of docs/benchmarks.md), which cost
the eval-BN ResNet-18 7% of its step at its stem alone.

Tagging the mask ``PREFER_RECOMPUTE`` (the activation-checkpoint policy the partitioner
honours) gives the partitioner stock's choice back: it saves a float no larger than the
``y`` stock saved, and the mask is recomputed where it is read. The values are the same
either way; only what is kept between forward and backward changes.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

aten = torch.ops.aten
_PASS_THROUGH = (aten.alias.default, aten.detach.default)


def recompute_relu_masks(folded: fx.Node) -> int:
    """Tag the backward's ``relu(folded) <= 0`` masks for recompute; returns how many.
    A mask a user's activation checkpoint already tagged keeps its tag."""
    tagged = 0
    for relu in [u for u in folded.users if u.target is aten.relu.default]:
        for mask in _masks_of(relu):
            if "recompute" not in mask.meta:
                mask.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
                tagged += 1
    return tagged


def _masks_of(relu: fx.Node) -> list[fx.Node]:
    masks, stack = [], [relu]
    while stack:
        for user in stack.pop().users:
            if user.target in _PASS_THROUGH:
                stack.append(user)
            elif user.target is aten.le.Scalar and user.args[1] == 0:
                masks.append(user)
    return masks
