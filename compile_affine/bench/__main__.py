"""``python -m compile_affine.bench [MODE] [flags]``: the seed's question, measured; without
a MODE, resnet. ``python -m compile_affine.bench MODE --help`` says what each does.

The timed modes (resnet, blocks, layerscale, finetune, zoo) and traffic print one markdown
table and take the same flags. Under ``torchrun --nproc-per-node N -m compile_affine.bench ...``
every variant is wrapped in DistributedDataParallel (gloo on CPU, NCCL on CUDA), each rank
prints its own table and ``--json`` writes one file per rank (``PATH.rankR``). The other modes
are tools with flags of their own: traffic-diff (where two variants' bytes go), ddp-splits (the
folds DDP's graph splitting costs), fpn-draws (gradient error over random draws), pass-time (the
pass's own time against graph size), gpu-check (what a lent GPU machine runs, ``make gpu-check``) and
gpu-codegen (the GPU twin: Inductor's CUDA code for each variant, compiled on this CPU, counted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .core.zoo import ZOO_BY_NAME
from .core.output import COLUMNS, plot, replaced, table
from .core.runner import Runner, configure_compile, init_distributed, machine
from .modes import blocks, ddp_splits, fpn_draws, gpu_check, gpu_codegen, pass_time, resnet, traffic_diff, zoo

PROG = "python -m compile_affine.bench"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TABLES = {"resnet": resnet.run_resnet, "blocks": blocks.run_blocks, "layerscale": blocks.run_layerscale,
          "finetune": resnet.run_finetune, "zoo": zoo.run, "traffic": resnet.run_traffic}  # fmt: skip
TOOLS = {"traffic-diff": traffic_diff, "ddp-splits": ddp_splits, "fpn-draws": fpn_draws, "pass-time": pass_time,
         "gpu-check": gpu_check, "gpu-codegen": gpu_codegen}  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=raw)
    modes = p.add_subparsers(dest="mode")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cpu", help="cpu (default, also where CUDA exists) or cuda")
    common.add_argument("--batch", type=int, default=8, help="resnet and zoo batch (blocks use their own)")
    common.add_argument("--res", type=int, default=160, help="resnet input resolution")
    common.add_argument("--steps", type=int, default=10, help="timed interleaved rounds")
    common.add_argument("--warmup", type=int, default=2)
    common.add_argument("--dtype", default="float32", choices=DTYPES, help="autocast dtype (float32: no autocast)")
    common.add_argument("--inference", action="store_true", help="time the forward under inference_mode instead of a training step")
    common.add_argument("--min-activation-ratio", type=float, help="compile_affine's cost threshold (default: the plugin's)")
    common.add_argument("--objective", choices=("time", "memory"), help="compile_affine's objective (default: the plugin's)")
    common.add_argument("--sgd-lr", type=float, help="end each timed step with an SGD step at this rate (default: none)")
    common.add_argument("--num-classes", type=int, default=1000, help="resnet, finetune: the classifier's outputs")
    common.add_argument("--finetune", action="store_true", help="traffic: the eval-BN fine-tuning net (nets bn, none)")
    common.add_argument("--variants", help="comma-separated net/backend pairs, e.g. none/inductor,affine/compile_affine")
    common.add_argument("--shapes", help="blocks, layerscale: comma-separated indices into the shape matrix")
    common.add_argument("--models", help=f"zoo: comma-separated names or 'all' (default: all but the extras); {', '.join(ZOO_BY_NAME)}")
    common.add_argument("--size", type=int, help="zoo: input resolution for every model (default: each model's own)")
    common.add_argument("--no-float64", action="store_true", help="zoo: skip the float64 run of the pass")
    common.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    common.add_argument("--json", metavar="PATH", help="write the results as JSON")
    common.add_argument("--plot", metavar="PATH", help="write a bar chart of step-time ratios (matplotlib)")
    for name, run in TABLES.items():
        modes.add_parser(name, parents=[common], description=run.__doc__, formatter_class=raw)
    for name, tool in TOOLS.items():
        tool.add_args(modes.add_parser(name, description=tool.__doc__, formatter_class=raw))
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["resnet", *argv]  # the default mode
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = " ".join([PROG, *argv])
    if args.mode in TOOLS:
        return TOOLS[args.mode].main(args, command)
    if args.plot and args.mode == "zoo":
        raise SystemExit("--plot draws the resnet and blocks tables; zoo writes a markdown table (and --json)")
    if args.threads:
        torch.set_num_threads(args.threads)
    configure_compile()
    settings = {k: getattr(args, k) for k in ("min_activation_ratio", "objective") if getattr(args, k) is not None}
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if ddp:
        args.device = init_distributed(args.device)
    runner = Runner(args.device, DTYPES[args.dtype], args.inference, settings, ddp=ddp, sgd_lr=args.sgd_lr)
    rows = TABLES[args.mode](args, runner)
    info = machine()
    rank = f"# rank {info['rank']} of {info['world_size']} (DDP)\n" if ddp else ""
    print(f"{rank}# {command}\n# {info['cpu']}, {info['cores']} cores, {info['threads']} threads, torch {info['torch']}, "
          f"device {args.device}, dtype {args.dtype}, batch {args.batch}, "
          f"res {'per model' if args.mode == 'zoo' else args.res}, {args.steps} rounds")  # fmt: skip
    print(zoo.table(rows) if args.mode == "zoo" else table(rows, COLUMNS, pad=True))
    if args.json:
        with replaced(f"{args.json}.rank{info['rank']}" if ddp else args.json) as tmp:
            tmp.write_text(json.dumps({"command": command, "machine": info, "args": vars(args), "rows": rows}, indent=2))
    if args.plot and info["rank"] == 0:
        plot(rows, "ratio", "training step time / none+inductor", args.plot)
    if ddp:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
