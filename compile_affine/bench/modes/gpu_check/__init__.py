"""``python -m compile_affine.bench gpu-check [--dry-run]`` (``make gpu-check``): what a lent GPU
machine runs, as one command that fits in 8 minutes with cold caches. README.md ("GPU check and
tested torch versions") says what each section measures, how its deadline cuts it and what the run
leaves (in ``$OUT`` if set, else ``gpu-check-out/``). Without a CUDA device it says so and exits 0;
``--dry-run`` runs the same sections on CPU at tiny sizes (``make gpu-twin``, in CI).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import time

import torch

from ...core.models import resnet50
from ...core.output import plot
from ...core.runner import Runner, configure_compile
from .plan import AUTOTUNE_VARIANTS, DRY_PLAN, GPU_PLAN, SECTIONS, Clock
from .pytest_run import run_tests
from .report import device_facts, markdown, write
from .sections import conv_ratios, declined_by_default, release, run_blocks, run_nets


def add_args(p) -> None:
    p.add_argument("--dry-run", action="store_true", help="run every section on CPU at tiny sizes")
    p.add_argument("--out", help="output folder (default: $OUT, else gpu-check-out/)")
    p.add_argument("--budget", type=float, help="seconds for the whole run (sections that no longer fit are skipped)")
    p.add_argument("--only", help=f"comma-separated sections out of {','.join(SECTIONS)}")
    p.add_argument("--ratios", action="store_true",
                   help="print how many of ResNet-50's conv sites (batch 32, 224 px) each device's default declines, and exit")  # fmt: skip


def main(args, command: str) -> int:
    if args.ratios:
        print(f"ResNet-50, batch 32, 224 px: {declined_by_default(conv_ratios(resnet50('affine'), torch.empty(32, 3, 224, 224)))}")
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}); nothing to measure. "
              "`make gpu-check ARGS=--dry-run` runs the same script on CPU at tiny sizes.")  # fmt: skip
        return 0
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.budget is not None:
        plan = dataclasses.replace(plan, budget_s=args.budget)
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    if only - set(SECTIONS):
        raise SystemExit(f"unknown section(s) {sorted(only - set(SECTIONS))}; choose from {SECTIONS}")
    out = pathlib.Path(args.out or os.environ.get("OUT") or "gpu-check-out")
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(plan.budget_s)
    clock.log(f"{command}: device {plan.device}, budget {plan.budget_s:.0f} s, output {out}")
    chosen = [n for n in SECTIONS if n in only]
    clock.log("plan: " + ", ".join(f"{n} ~{plan.estimate_s[n]} s" for n in chosen)
              + f" (about {sum(plan.estimate_s[n] for n in chosen)} s in all; each section stops at its"
              f" deadline, and those the budget no longer reaches are skipped)")  # fmt: skip
    configure_compile()
    fp32 = Runner(plan.device, torch.float32, settings=plan.settings, fresh_caches=False)
    fp32_cl = Runner(plan.device, torch.float32, settings=plan.settings, channels_last=True, fresh_caches=False)
    # bf16 autocast and channels_last: how the seed's ResNet-50 is trained on GPUs.
    bf16 = Runner(plan.device, torch.bfloat16, settings=plan.settings, channels_last=True, fresh_caches=False)
    jobs = {
        "blocks": lambda d: run_blocks(plan, bf16, d, plan.blocks),
        "resnet": lambda d: run_nets(plan, bf16, d),
        # fp32: under autocast an eval-mode batch norm computes wider than the bf16 conv
        # before it, and folding it would round differently, so it is refused (docs/design.md).
        "finetune": lambda d: run_nets(plan, fp32_cl, d, finetune=True),
        "max-autotune": lambda d: run_blocks(plan, bf16, d, plan.autotune, AUTOTUNE_VARIANTS),
        "resnet-fp32": lambda d: run_nets(plan, fp32, d),
        "tests": lambda d: run_tests(plan, clock, out),
    }
    sections: dict[str, dict] = {}
    facts = device_facts()
    for name in chosen:
        need, share = plan.start_s[name], min(plan.share_s[name], clock.left)
        if clock.left < need:
            sections[name] = {"status": "skipped", "note": f"{clock.left:.0f} s of the budget left, needs about {need} s"}
            clock.log(f"{name}: skipped ({sections[name]['note']})")
            continue
        clock.log(f"{name}: start (deadline in {share:.0f} s)")
        start = time.monotonic()
        try:
            sections[name] = jobs[name](start + share)
        except Exception as e:  # one broken section must not cost the others' numbers
            sections[name] = {"status": "failed", "note": f"{type(e).__name__}: {e}"}
        sections[name]["seconds"] = round(time.monotonic() - start, 1)
        clock.log(f"{name}: {sections[name]['status']} in {sections[name]['seconds']:.0f} s")
        release()
        # After every section: a run killed at its time limit still leaves what it finished.
        write(out, command, plan.device, plan.budget_s, clock.elapsed, facts, sections)
    result = write(out, command, plan.device, plan.budget_s, clock.elapsed, facts, sections)
    bars = [r for s in sections.values() for r in s.get("rows", [])
            if r.get("ratio_vs_stock_same_net") is not None and "compile_affine" in r.get("variant", "")]  # fmt: skip
    with contextlib.suppress(ImportError):  # the plot is a convenience; the JSON and markdown carry the numbers
        plot(bars, "ratio_vs_stock_same_net", "step time / stock Inductor, same net", out / "gpu-check.png",
             title=f"{plan.device}: {facts.get('cuda') or 'CPU'}")  # fmt: skip
    print(markdown(result))
    # The dry run proves every section works: anything short of ok fails it. On the GPU
    # a skipped or partial section is budget.
    bad = ("failed", "timeout") if not args.dry_run else tuple({s["status"] for s in sections.values()} - {"ok"})
    failed = [n for n, s in sections.items() if s["status"] in bad]
    clock.log(f"done in {clock.elapsed:.0f} s; files in {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
