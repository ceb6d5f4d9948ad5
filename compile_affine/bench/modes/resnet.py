"""The seed's ResNet-50 modes: resnet (the default), finetune and traffic."""

from __future__ import annotations

import torch

from ..core.models import resnet50, resnet50_finetune
from ..core.output import row
from ..core.runner import Runner, Variant, parse_variants

RESNET_VARIANTS = ("none/eager", "bn/eager", "affine/eager", "none/inductor", "bn/inductor", "affine/inductor",
                   "affine/compile_affine")  # fmt: skip
FINETUNE_VARIANTS = ("none/inductor", "bn/inductor", "bn/inductor-conv_bn_eval", "bn/compile_affine")
TRAFFIC_VARIANTS = ("none/inductor", "affine/inductor", "affine/compile_affine")


def run_resnet(args, runner: Runner) -> list[dict]:
    """resnet (the default): ResNet-50 with BatchNorm replaced by a learnable per-channel
    affine, against the same net with no norm layer and with BatchNorm, under eager, stock
    Inductor and compile_affine."""
    return _timed(args, runner, resnet50, RESNET_VARIANTS, "resnet50")


def run_finetune(args, runner: Runner) -> list[dict]:
    """finetune: ResNet-50 with every BatchNorm in eval mode while training (net "bn"),
    against the norms replaced by nn.Identity (net "none", the floor), under stock
    Inductor, stock Inductor with efficient_conv_bn_eval_fx_passes (the anchor) and
    compile_affine."""
    return _timed(args, runner, resnet50_finetune, FINETUNE_VARIANTS, "resnet50 eval-BN")


def _timed(args, runner: Runner, build, default: tuple[str, ...], scenario: str) -> list[dict]:
    x = torch.randn(args.batch, 3, args.res, args.res)
    pairs = parse_variants(args.variants, default)
    variants = [Variant(net, backend, build(net, args.num_classes), x) for net, backend in pairs]
    runner.run(variants, args.steps, args.warmup)
    return [row(scenario, v, variants) for v in variants]


def run_traffic(args, runner: Runner) -> list[dict]:
    """traffic: no timing; one compiled training step per variant and the bytes its forward
    and backward kernels move, as Inductor counts them (core/measure.py): floor, stock and
    ours on ResNet-50 (``--finetune``: the eval-BN fine-tuning net), e.g. at a GPU user's
    ``--batch 32 --res 224``. Every other mode also reports the bytes next to step time.
    Nothing is timed: the byte count does not depend on load."""
    x = torch.randn(args.batch, 3, args.res, args.res)
    build, default = (resnet50_finetune, FINETUNE_VARIANTS) if args.finetune else (resnet50, TRAFFIC_VARIANTS)
    variants = [Variant(net, backend, build(net), x) for net, backend in parse_variants(args.variants, default)]
    for v in variants:
        runner.prepare(v, warmup=0, measure=False)
    scenario = f"resnet50{' eval-BN' if args.finetune else ''} b{args.batch} @{args.res}"
    return [row(scenario, v, variants) for v in variants]
