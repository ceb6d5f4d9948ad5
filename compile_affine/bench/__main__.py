"""``python -m compile_affine.bench [resnet|blocks]``: the seed's question, measured.

resnet (default): ResNet-50 with BatchNorm replaced by a learnable per-channel affine,
    against the same net with no norm layer and with BatchNorm, under eager, stock
    Inductor and compile_affine.
blocks: conv -> affine -> relu chains over a shape matrix, activation-heavy to
    weight-heavy, to show where folding pays and that the cost model picks right.
layerscale: transformer and ConvNeXt MLP blocks with LayerScale (net "affine") and
    without it (net "none"): the linear -> per-feature scale fold.
finetune: ResNet-50 with every BatchNorm in eval mode while training (net "bn"), against
    the norms replaced by nn.Identity (net "none", the floor), under stock Inductor, stock
    Inductor with efficient_conv_bn_eval_fx_passes (the anchor) and compile_affine.
traffic: no timing; one compiled training step per variant and the bytes its forward and
    backward kernels move, as Inductor counts them (bench/traffic.py): floor, stock and
    ours on ResNet-50 (``--finetune``: the eval-BN fine-tuning net), e.g. at a GPU user's
    ``--batch 32 --res 224``. Every other mode also reports the bytes next to step time.
zoo: timm and torchvision models that carry affines (LayerScale ViTs and ConvNeXts,
    MetaFormer, NF-ResNet gains, FrozenBN and eval-BN ResNets, an FPN backbone): sites
    found, folded, declined, refused; saved bytes and step time against stock Inductor;
    fp32 and float64 agreement with eager (bench/zoo.py).

Under ``torchrun --nproc-per-node N -m compile_affine.bench ...`` every variant is
wrapped in DistributedDataParallel (gloo on CPU, NCCL on CUDA) and each rank prints
its own table; ``--json`` then writes one file per rank (``PATH.rankR``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from . import zoo
from .models import BLOCK_SHAPES, LAYERSCALE_SHAPES, resnet50, resnet50_finetune
from .runner import BACKENDS, Runner, Variant, init_distributed, machine, progress

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESNET_VARIANTS = (
    "none/eager", "bn/eager", "affine/eager",
    "none/inductor", "bn/inductor", "affine/inductor",
    "affine/compile_affine",
)  # fmt: skip
FINETUNE_VARIANTS = ("none/inductor", "bn/inductor", "bn/inductor-conv_bn_eval", "bn/compile_affine")
TRAFFIC_VARIANTS = ("none/inductor", "affine/inductor", "affine/compile_affine")
TRAFFIC_FINETUNE_VARIANTS = ("none/inductor", "bn/inductor", "bn/inductor-conv_bn_eval", "bn/compile_affine")
BLOCK_VARIANTS = ("none/inductor", "affine/inductor", "affine/compile_affine", "affine/compile_affine-always")
BASELINE = "none / inductor"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m compile_affine.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("mode", nargs="?", default="resnet", choices=("resnet", "blocks", "layerscale", "finetune", "zoo", "traffic"))
    p.add_argument("--device", default="cpu", help="cpu (default, also where CUDA exists) or cuda")
    p.add_argument("--batch", type=int, default=8, help="resnet and zoo batch (blocks use their own)")
    p.add_argument("--res", type=int, default=160, help="resnet input resolution")
    p.add_argument("--steps", type=int, default=10, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="autocast dtype (float32: no autocast)")
    p.add_argument("--inference", action="store_true", help="time the forward under inference_mode instead of a training step")
    p.add_argument("--min-activation-ratio", type=float, help="compile_affine's cost threshold (default: the plugin's)")
    p.add_argument("--objective", choices=("time", "memory"), help="compile_affine's objective (default: the plugin's)")
    p.add_argument("--sgd-lr", type=float, help="end each timed step with an SGD step at this rate (default: none)")
    p.add_argument("--num-classes", type=int, default=1000, help="resnet, finetune: the classifier's outputs")
    p.add_argument("--finetune", action="store_true", help="traffic: the eval-BN fine-tuning net (nets bn, none)")
    p.add_argument("--variants", help="comma-separated net/backend pairs, e.g. none/inductor,affine/compile_affine")
    p.add_argument("--shapes", help="blocks, layerscale: comma-separated indices into the shape matrix")
    p.add_argument("--models", help=f"zoo: comma-separated names or 'all' (default: all but the extras); {', '.join(zoo.BY_NAME)}")
    p.add_argument("--size", type=int, help="zoo: input resolution for every model (default: each model's own)")
    p.add_argument("--no-float64", action="store_true", help="zoo: skip the float64 run of the pass")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a bar chart of step-time ratios (matplotlib)")
    return p.parse_args(argv)


def _variants(spec: str, default: tuple[str, ...]) -> list[tuple[str, str]]:
    pairs = [tuple(v.split("/")) for v in (spec.split(",") if spec else default)]
    for net, backend in pairs:
        if backend not in BACKENDS:
            raise SystemExit(f"unknown backend {backend!r} in --variants; choose from {BACKENDS}")
    return pairs


def run_resnet(args, runner: Runner) -> list[dict]:
    x = torch.randn(args.batch, 3, args.res, args.res)
    pairs = _variants(args.variants, RESNET_VARIANTS)
    variants = [Variant(net, backend, resnet50(net, args.num_classes), x) for net, backend in pairs]
    runner.run(variants, args.steps, args.warmup)
    return [_row("resnet50", v, variants) for v in variants]


def run_finetune(args, runner: Runner) -> list[dict]:
    x = torch.randn(args.batch, 3, args.res, args.res)
    pairs = _variants(args.variants, FINETUNE_VARIANTS)
    variants = [Variant(net, backend, resnet50_finetune(net, args.num_classes), x) for net, backend in pairs]
    runner.run(variants, args.steps, args.warmup)
    return [_row("resnet50 eval-BN", v, variants) for v in variants]


def run_traffic(args, runner: Runner) -> list[dict]:
    """One step per variant, nothing timed: the byte count does not depend on load."""
    x = torch.randn(args.batch, 3, args.res, args.res)
    build, default = (resnet50_finetune, TRAFFIC_FINETUNE_VARIANTS) if args.finetune else (resnet50, TRAFFIC_VARIANTS)
    variants = [Variant(net, backend, build(net), x) for net, backend in _variants(args.variants, default)]
    for v in variants:
        runner.prepare(v, warmup=0, measure=False)
    scenario = f"resnet50{' eval-BN' if args.finetune else ''} b{args.batch} @{args.res}"
    return [_row(scenario, v, variants) for v in variants]


def run_blocks(args, runner: Runner) -> list[dict]:
    matrix = LAYERSCALE_SHAPES if args.mode == "layerscale" else BLOCK_SHAPES
    shapes = [matrix[int(i)] for i in args.shapes.split(",")] if args.shapes else matrix
    rows = []
    for shape in shapes:
        progress(f"shape {shape.name}")
        variants = [
            Variant(net, backend, shape.build(net), shape.input(args.device))
            for net, backend in _variants(args.variants, BLOCK_VARIANTS)
        ]
        runner.run(variants, args.steps, args.warmup)
        rows += [_row(shape.name, v, variants) for v in variants]
    return rows


def _ratio(a: int | None, b: int | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _row(scenario: str, v: Variant, group: list[Variant]) -> dict:
    base = next((b for b in group if b.name == BASELINE), group[0])
    stock_same_net = next((b for b in group if b.net == v.net and b.backend == "inductor"), None)
    timed = bool(v.fwd_ms)  # traffic mode times nothing
    return {
        "scenario": scenario,
        "variant": v.name,
        "step_ms": round(v.step, 2) if timed else None,
        "fwd_ms": round(v.fwd, 2) if timed else None,
        "bwd_ms": round(v.bwd, 2) if timed else None,
        "ratio": round(v.step / base.step, 3) if timed else None,
        "ratio_vs_stock_same_net": round(v.step / stock_same_net.step, 3) if timed and stock_same_net else None,
        "traffic_bytes": v.traffic_bytes,
        "traffic_mib": None if v.traffic_bytes is None else round(v.traffic_bytes / 2**20, 1),
        "traffic_ratio": _ratio(v.traffic_bytes, base.traffic_bytes),
        "saved_mib": round(v.saved_mib, 1) if timed else None,
        "compile_s": round(v.compile_s, 1) if timed else None,
        "pass_s": None if v.pass_s is None else round(v.pass_s, 2),
        "folds": v.folds,
    }


COLUMNS = [
    ("scenario", "scenario"), ("variant", "variant"), ("step_ms", "step ms"), ("fwd_ms", "fwd ms"),
    ("bwd_ms", "bwd ms"), ("ratio", "x none/inductor"), ("ratio_vs_stock_same_net", "x stock same net"),
    ("traffic_mib", "moved MiB"), ("traffic_ratio", "moved x none/inductor"),
    ("saved_mib", "saved MiB"), ("compile_s", "compile s"), ("pass_s", "pass s"), ("folds", "folds"),
]  # fmt: skip


def table(rows: list[dict]) -> str:
    cells = [[h for _, h in COLUMNS]] + [["-" if r.get(k) is None else str(r[k]) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['scenario']}\n{r['variant']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["ratio"] for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("training step time / none+inductor")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot and args.mode == "zoo":
        raise SystemExit("--plot draws the resnet and blocks tables; zoo writes a markdown table (and --json)")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Compile time is part of what we measure, so nothing may come from a warm cache.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    # Variants share forward code objects (nn.Sequential, torchvision blocks): each is a
    # recompile of the same frame. Keep every one compiled, each with static shapes.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    torch._dynamo.config.automatic_dynamic_shapes = False
    settings = {} if args.min_activation_ratio is None else {"min_activation_ratio": args.min_activation_ratio}
    if args.objective:
        settings["objective"] = args.objective
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if ddp:
        args.device = init_distributed(args.device)
    runner = (zoo.ZooRunner if args.mode == "zoo" else Runner)(args.device, DTYPES[args.dtype], args.inference, settings, ddp=ddp,
                                                               sgd_lr=args.sgd_lr)  # fmt: skip
    modes = {"resnet": run_resnet, "finetune": run_finetune, "zoo": zoo.run, "traffic": run_traffic}
    rows = modes.get(args.mode, run_blocks)(args, runner)
    info = machine()
    command = "python -m compile_affine.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    rank = f"# rank {info['rank']} of {info['world_size']} (DDP)\n" if ddp else ""
    print(f"{rank}# {command}\n# {info['cpu']}, {info['cores']} cores, {info['threads']} threads, torch {info['torch']}, "
          f"device {args.device}, dtype {args.dtype}, batch {args.batch}, "
          f"res {'per model' if args.mode == 'zoo' else args.res}, {args.steps} rounds")  # fmt: skip
    print(zoo.table(rows) if args.mode == "zoo" else table(rows))
    if args.json:
        with open(f"{args.json}.rank{info['rank']}" if ddp else args.json, "w") as f:
            json.dump({"command": command, "machine": info, "args": vars(args), "rows": rows}, f, indent=2)
    if args.plot and info["rank"] == 0:
        plot(rows, args.plot)
    if ddp:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
