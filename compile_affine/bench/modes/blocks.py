"""The block modes: blocks (conv -> affine -> relu chains) and layerscale (MLP blocks)."""

from __future__ import annotations

from ..core.models import BLOCK_SHAPES, LAYERSCALE_SHAPES
from ..core.output import row
from ..core.runner import Runner, Variant, parse_variants, progress

BLOCK_VARIANTS = ("none/inductor", "affine/inductor", "affine/compile_affine", "affine/compile_affine-always")


def run_blocks(args, runner: Runner) -> list[dict]:
    """blocks: conv -> affine -> relu chains over a shape matrix, activation-heavy to
    weight-heavy, to show where folding pays and that the cost model picks right."""
    return _run(args, runner, BLOCK_SHAPES)


def run_layerscale(args, runner: Runner) -> list[dict]:
    """layerscale: transformer and ConvNeXt MLP blocks with LayerScale (net "affine") and
    without it (net "none"): the linear -> per-feature scale fold."""
    return _run(args, runner, LAYERSCALE_SHAPES)


def _run(args, runner: Runner, matrix: list) -> list[dict]:
    shapes = [matrix[int(i)] for i in args.shapes.split(",")] if args.shapes else matrix
    pairs, rows = parse_variants(args.variants, BLOCK_VARIANTS), []
    for shape in shapes:
        progress(f"shape {shape.name}")
        variants = [Variant(net, backend, shape.build(net), shape.input(args.device)) for net, backend in pairs]
        runner.run(variants, args.steps, args.warmup)
        rows += [row(shape.name, v, variants) for v in variants]
    return rows
