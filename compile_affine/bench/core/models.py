"""The benchmark's models: the seed's ResNet-50 with three kinds of norm layer,
conv -> norm -> relu chains over a shape matrix, transformer / ConvNeXt MLP blocks
with and without LayerScale, the one randomiser of their affines, and the zoo: timm and
torchvision models that carry affines, built as users build them (``pretrained=False``:
nothing is downloaded)."""

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


# --- the zoo ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    source: str
    """Where the model comes from, as a user would write it."""
    carries: str
    """The affines the model's own source applies, checked against that source."""
    make: Callable[..., nn.Module]
    size: int
    """Default input resolution for the benchmark."""
    kwargs: dict = dataclasses.field(default_factory=dict)
    """Benchmark-size arguments to ``make`` (reduced depth where compile time asks for it)."""
    tiny: dict | None = None
    """Arguments for the tests' tiny version; None: the tests do not build this one."""
    tiny_size: int = 32
    default: bool = True
    """In the default run (``--models`` unset)."""
    est_s: int = 60
    """Rough wall time of one entry at default sizes on the 2-core CPU, compile included."""
    sized: bool = False
    """The model is built for one input size (``img_size=``): timm's ViTs and MLPs."""

    def build(self, tiny: bool = False, size: int | None = None) -> nn.Module:
        torch.manual_seed(0)
        kwargs = dict(self.tiny if tiny else self.kwargs)
        if self.sized:
            kwargs["img_size"] = self.tiny_size if tiny else (size or self.size)
        return randomize(self.make(**kwargs))


def _timm(arch: str) -> Callable[..., nn.Module]:
    def make(**kwargs) -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)

    return make


def _resmlp(num_blocks: int = 12, **kwargs) -> nn.Module:
    # resmlp_12_224's own arguments; its factory fixes num_blocks, so build its class directly.
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    return MlpMixer(patch_size=16, num_blocks=num_blocks, embed_dim=384, mlp_ratio=4, block_layer=ResBlock,
                    norm_layer=Affine, num_classes=10, **kwargs)  # fmt: skip


def _poolformer(depths: tuple = (2, 2, 6, 2)) -> nn.Module:
    # poolformer_s12's own arguments; its factory fixes depths, so build its class directly.
    from timm.models.metaformer import GroupNorm1, MetaFormer

    return MetaFormer(depths=depths, dims=(64, 128, 320, 512), downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True,
                      norm_layers=GroupNorm1, layer_scale_init_values=1e-5, res_scale_init_values=None,
                      use_mlp_head=False, num_classes=10)  # fmt: skip


def _torchvision_resnet(arch: str, frozen: bool = True, layers: list[int] | None = None) -> nn.Module:
    import torchvision
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    from torchvision.ops import FrozenBatchNorm2d

    norm = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
    if layers is not None:  # the tests' tiny ResNet: torchvision's class with fewer blocks
        block = Bottleneck if arch in ("resnet50", "resnet101", "resnet152") else BasicBlock
        return ResNet(block, layers, norm_layer=norm, num_classes=10)
    return getattr(torchvision.models, arch)(weights=None, norm_layer=norm, num_classes=10)


class FlatOutputs(nn.Module):
    """A detection backbone returns a dict of feature maps; one tensor gives one loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([f.flatten(1) for f in self.model(x).values()], dim=1)


def _fpn(backbone_name: str = "resnet18", layers: list[int] | None = None) -> nn.Module:
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    if layers is not None:  # the tests' tiny one: what resnet_fpn_backbone does, on a shorter ResNet
        return FlatOutputs(_resnet_fpn_extractor(_torchvision_resnet(backbone_name, layers=layers), 5))
    return FlatOutputs(resnet_fpn_backbone(backbone_name=backbone_name, weights=None,
                                           norm_layer=FrozenBatchNorm2d, trainable_layers=5))  # fmt: skip


def _eval_bn_resnet(arch: str = "resnet18", layers: list[int] | None = None) -> nn.Module:
    # Built in training mode with every batch norm in eval, as a fine-tuning script has it.
    return NormEval(_torchvision_resnet(arch, frozen=False, layers=layers)).train()


# Sizes: batch 8 (--batch) at each model's resolution; depth cut where a full model's joint
# graph would make the two compiles alone eat the run's budget.
# est_s: two compiles at about 0.03 s per joint-graph node (the seed ResNet-50 joint graph
# has 1043 nodes and compiles in about 30 s on the 2-core machine, docs/benchmarks.md),
# node counts from tracing each model with bench.core.runner.fx_backend, plus about 30 s for the
# timed rounds, the eager and the float64 runs. A rough guide, not a measurement.
ZOO = [
    # tiny at 64 px: at 32 px the last stage is 1x1, where stock Inductor of torch 2.11.0
    # (CPU, no compile_affine involved) returns wrong gradients for the last stage and all before it.
    ZooModel("convnext_atto", "timm convnext_atto", "LayerScale gamma (1,C,1,1) after the MLP's 1x1 conv (conv_mlp=True)",
             _timm("convnext_atto"), 128, tiny={"depths": (1, 1, 1, 1)}, tiny_size=64, est_s=95),
    ZooModel("deit3_small", "timm deit3_small_patch16_224, depth 4 of 12", "LayerScale gamma (C,) after attn.proj and mlp.fc2 linears",
             _timm("deit3_small_patch16_224"), 224, kwargs={"depth": 4}, tiny={"depth": 1}, sized=True, est_s=75),
    ZooModel("cait_xxs24", "timm cait_xxs24_224, depth 2 of 24, and its 2 class-attention blocks",
             "gamma_1/gamma_2 (C,) after attn.proj and mlp.fc2 linears, in both block kinds",
             _timm("cait_xxs24_224"), 224, kwargs={"depth": 2}, tiny={"depth": 1}, sized=True, est_s=90),
    ZooModel("resmlp_12", "timm MlpMixer with resmlp_12_224's arguments, 4 of 12 blocks",
             "Affine addcmul(beta, alpha, x) on the residual stream; ls1 after the token-mixing linear (scales the other axis); "
             "ls2 after mlp.fc2", _resmlp, 224, kwargs={"num_blocks": 4}, tiny={"num_blocks": 1}, sized=True, est_s=60),
    ZooModel("poolformer_s12", "timm MetaFormer with poolformer_s12's arguments, depths (1,1,3,1) of (2,2,6,2)",
             "MetaFormer Scale layer_scale2 (C,1,1) after the MLP's 1x1 conv; layer_scale1 after pooling (no producer)",
             _poolformer, 128, kwargs={"depths": (1, 1, 3, 1)}, tiny={"depths": (1, 1, 1, 1)}, est_s=105),
    ZooModel("nf_resnet26", "timm nf_resnet26, skipinit=True, depths (1,1,1,1) of (2,2,2,2)", "skip-init gain (0-d, in-place "
             "mul_) then alpha=0.2 (a Python scalar) after each block's last conv; scaled weight standardization in every conv",
             _timm("nf_resnet26"), 128, kwargs={"skipinit": True, "depths": (1, 1, 1, 1)},
             tiny={"skipinit": True, "depths": (1, 1), "channels": (32, 64)}, est_s=90),
    ZooModel("resnet50_frozenbn", "torchvision resnet50(norm_layer=FrozenBatchNorm2d)", "FrozenBatchNorm2d: scale and shift "
             "computed from buffers after every conv", lambda **kw: _torchvision_resnet("resnet50", **kw), 128,
             tiny={"layers": [1, 1, 1, 1]}, est_s=115),
    ZooModel("fpn_resnet18_frozenbn", "torchvision resnet_fpn_backbone('resnet18', FrozenBatchNorm2d, trainable_layers=5)",
             "FrozenBatchNorm2d after every backbone conv; the FPN's convs carry none", _fpn, 128,
             tiny={"layers": [1, 1, 1, 1]}, est_s=70),
    ZooModel("resnet18_evalbn", "torchvision resnet18, every BatchNorm2d in eval mode while the rest trains",
             "eval-mode BatchNorm2d (running statistics fixed, weight and bias learn) after every conv",
             lambda **kw: _eval_bn_resnet("resnet18", **kw), 128, tiny={"layers": [1, 1, 1, 1]}, est_s=85),
    ZooModel("resnet18_frozenbn", "torchvision resnet18(norm_layer=FrozenBatchNorm2d)", "FrozenBatchNorm2d after every conv",
             lambda **kw: _torchvision_resnet("resnet18", **kw), 128, tiny={"layers": [1, 1, 1, 1]}, default=False, est_s=65),
]  # fmt: skip
ZOO_BY_NAME = {m.name: m for m in ZOO}


def select_zoo(spec: str | None) -> list[ZooModel]:
    """``--models``: comma-separated names, "all", or (unset) those marked ``default``."""
    names = [m.name for m in ZOO if spec or m.default] if not spec or spec == "all" else spec.split(",")
    if unknown := [n for n in names if n not in ZOO_BY_NAME]:
        raise SystemExit(f"unknown zoo model {unknown[0]!r}; choose from {', '.join(ZOO_BY_NAME)} or 'all'")
    return [ZOO_BY_NAME[n] for n in names]
