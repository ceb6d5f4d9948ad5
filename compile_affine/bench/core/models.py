"""The benchmark's own models: the seed's ResNet-50 with three kinds of norm layer,
conv -> norm -> relu chains over a shape matrix, transformer / ConvNeXt MLP blocks
with and without LayerScale, and the one randomiser of their affines (also the zoo's,
``zoo.py``)."""

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


class Scale2d(nn.Module):
    """The forum user's exact layer: ``x * w``, "I do not add a bias"."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


NORMS: dict[str, Callable[[int], nn.Module]] = {
    "none": lambda c: nn.Identity(), "bn": nn.BatchNorm2d, "affine": Affine2d, "scale": Scale2d
}  # fmt: skip


def resnet50(norm: str, num_classes: int = 1000) -> nn.Module:
    from torchvision.models import resnet50 as tv_resnet50

    torch.manual_seed(0)
    return tv_resnet50(norm_layer=NORMS[norm], num_classes=num_classes)


class NormEval(nn.Module):
    """Fine-tuning with frozen statistics (OpenMMLab's ``norm_eval=True``): ``train()``
    trains everything but keeps every batch norm in eval mode; weight and bias still learn."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> "NormEval":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def resnet50_finetune(norm: str, num_classes: int = 1000) -> nn.Module:
    """``bn``: torchvision ResNet-50 with every BatchNorm in eval mode; ``none``: the norms
    replaced by ``nn.Identity`` (the floor). Running statistics are made non-trivial."""
    model = resnet50(norm, num_classes)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
    return NormEval(model).train()


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

    def input(self, device) -> torch.Tensor:
        return torch.randn(self.batch, self.channels, self.size, self.size, device=device)

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


class MlpBlock(nn.Module):
    """``x + ls(fc2(gelu(fc1(norm(x)))))`` on (B, N, C) tokens, or, ``nhwc``, on a
    (B, C, H, W) map as ConvNeXt does it: depthwise 7x7, permute to NHWC, the MLP,
    permute back, then the scale as ``(C, 1, 1)``."""

    def __init__(self, dim: int, norm: str, nhwc: bool):
        super().__init__()
        self.nhwc = nhwc
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim) if nhwc else nn.Identity()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5)) if norm == "affine" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(x).permute(0, 2, 3, 1) if self.nhwc else x
        h = self.fc2(nn.functional.gelu(self.fc1(self.norm(h))))
        if self.nhwc:
            h = h.permute(0, 3, 1, 2)
        if self.gamma is not None:
            h = h * (self.gamma.view(-1, 1, 1) if self.nhwc else self.gamma)
        return x + h


@dataclasses.dataclass(frozen=True)
class MlpShape:
    """``depth`` MLP blocks; ``norm="affine"`` adds LayerScale, ``"none"`` leaves it out."""

    name: str
    dim: int
    tokens: int
    batch: int
    nhwc: bool = False
    depth: int = 4

    def input(self, device) -> torch.Tensor:
        side = int(self.tokens**0.5)
        shape = (self.batch, self.dim, side, side) if self.nhwc else (self.batch, self.tokens, self.dim)
        return torch.randn(*shape, device=device)

    def build(self, norm: str) -> nn.Module:
        torch.manual_seed(0)
        return Blocks([MlpBlock(self.dim, norm, self.nhwc) for _ in range(self.depth)])


LAYERSCALE_SHAPES = [
    MlpShape("ViT-S mlp 197x384 b8", 384, 197, 8),
    MlpShape("ConvNeXt-T mlp 56x56x96 b8", 96, 56 * 56, 8, nhwc=True),
    # weight-heavy: at batch 1 a (197, 384) activation is a third of fc2's weight
    MlpShape("ViT-S mlp 197x384 b1", 384, 197, 1),
    # activation-heavy transformer: 4x the activation of b8
    MlpShape("ViT-S mlp 197x384 b32", 384, 197, 32),
]


_SCALE_NAMES = {"gamma", "gamma_1", "gamma_2", "ls1", "ls2", "scale", "gain", "skipinit_gain", "alpha"}


@torch.no_grad()
def randomize(model: nn.Module, generator: torch.Generator | None = None, conv_bias: float | None = None) -> nn.Module:
    """Give every affine non-trivial values, as training would (identity statistics make a
    frozen norm a no-op; LayerScale's 1e-5 init, a zero skip-init gain or a unit
    ``Affine2d`` make the fold the identity): batch norms' weight U(0.5, 1.5), bias, running
    mean N(0, 0.1), running var U(0.5, 2); ``Affine2d`` weight U(0.3, 0.6) (larger ones blow
    up without norms), bias N(0, 0.1); scale parameters by name U(0.5, 1.5), ResMLP's
    ``beta`` N(0, 0.1). ``conv_bias`` set: convs too, Kaiming-uniform weights and biases
    U(-conv_bias, conv_bias) (0: zero). Draws from ``generator``, else torch's own."""
    from torchvision.ops import FrozenBatchNorm2d

    g = generator
    for m in model.modules():
        if conv_bias is not None and isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=1, generator=g)
            if m.bias is not None and conv_bias:
                m.bias.uniform_(-conv_bias, conv_bias, generator=g)
            elif m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm)):
            if m.weight is not None:
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
        elif isinstance(m, Affine2d):
            m.weight.uniform_(0.3, 0.6, generator=g)
            m.bias.normal_(0, 0.1, generator=g)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _SCALE_NAMES:
            p.uniform_(0.5, 1.5, generator=g)
        elif leaf == "beta":  # ResMLP's Affine shift
            p.normal_(0, 0.1, generator=g)
    return model
