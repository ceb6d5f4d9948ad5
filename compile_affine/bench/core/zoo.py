"""The zoo: timm and torchvision models that carry affines, built as users build them
(``pretrained=False``: nothing is downloaded), each with its benchmark and test sizes."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn

from .models import NormEval, randomize


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
