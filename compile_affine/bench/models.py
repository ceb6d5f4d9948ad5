"""The benchmark's models: the seed's ResNet-50 with three kinds of norm layer, and
conv -> norm -> relu chains over a shape matrix."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn


class Affine2d(nn.Module):
    """The forum user's layer: BatchNorm without the normalisation, ``x * w + b``."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


NORMS: dict[str, Callable[[int], nn.Module]] = {
    "none": lambda c: nn.Identity(),
    "bn": nn.BatchNorm2d,
    "affine": Affine2d,
}


def resnet50(norm: str) -> nn.Module:
    from torchvision.models import resnet50 as tv_resnet50

    torch.manual_seed(0)
    return tv_resnet50(norm_layer=NORMS[norm])


@dataclasses.dataclass(frozen=True)
class BlockShape:
    """A chain of ``depth`` identical conv -> norm -> relu blocks."""

    name: str
    channels: int
    size: int
    kernel: int
    batch: int
    depthwise: bool = False
    depth: int = 4

    def input(self, device, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(self.batch, self.channels, self.size, self.size, device=device, dtype=dtype)

    def build(self, norm: str) -> nn.Module:
        torch.manual_seed(0)
        c, k = self.channels, self.kernel
        layers = []
        for _ in range(self.depth):
            conv = nn.Conv2d(c, c, k, padding=k // 2, groups=c if self.depthwise else 1, bias=False)
            layers += [conv, NORMS[norm](c), nn.ReLU()]
        return Blocks(layers)


class Blocks(nn.Module):
    """``nn.Sequential`` with a forward of our own: under DDP, Dynamo resumes after the
    wrapper's graph break in this frame, and it does not trace a root frame in torch.nn."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


BLOCK_SHAPES = [
    # activation-heavy: the conv output dwarfs the weight
    BlockShape("3x3 c128 @28 b8", 128, 28, 3, 8),
    BlockShape("1x1 c256 @28 b8", 256, 28, 1, 8),
    BlockShape("3x3 c64 @56 b8", 64, 56, 3, 8),
    BlockShape("dw3x3 c256 @28 b8", 256, 28, 3, 8, depthwise=True),
    # in between, and weight-heavy: late ResNet stages at small batch
    BlockShape("3x3 c256 @14 b8", 256, 14, 3, 8),
    BlockShape("1x1 c1024 @7 b8", 1024, 7, 1, 8),
    BlockShape("3x3 c512 @7 b2", 512, 7, 3, 2),
]
