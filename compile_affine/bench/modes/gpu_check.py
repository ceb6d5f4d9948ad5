"""``python -m compile_affine.bench gpu-check [--dry-run]`` (``make gpu-check``): what a lent GPU
machine runs, as one command that fits in 8 minutes with cold caches. README.md ("GPU check and
tested torch versions") says what each section measures, how its deadline cuts it and what the run
leaves (in ``$OUT`` if set, else ``gpu-check-out/``). Without a CUDA device it says so and exits 0;
``--dry-run`` runs the same sections on CPU at tiny sizes (``make gpu-twin``, in CI).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import torch

from compile_affine import settings as ca_settings

from ..core.measure import CLASSES, profile_step
from ..core.models import NORMS, BlockShape, NormEval, resnet50, resnet50_finetune
from ..core.output import BASELINE, plot, replaced, row, table
from ..core.runner import Runner, Variant, configure_compile, machine

# Within a section, variants are compiled in this order until its deadline: the ones that
# answer the question first (stock against ours on the same net), then the references.
RESNET_VARIANTS = (("affine", "inductor"), ("affine", "compile_affine"), ("none", "inductor"), ("bn", "inductor"))
FINETUNE_VARIANTS = (("bn", "inductor"), ("bn", "compile_affine"), ("bn", "inductor-conv_bn_eval"), ("none", "inductor"))
BLOCK_VARIANTS = (("affine", "inductor"), ("affine", "compile_affine-always"))
AUTOTUNE_VARIANTS = (("affine", "inductor"), ("affine", "inductor-max-autotune"), ("affine", "compile_affine-max-autotune"))
SECTIONS = ("blocks", "resnet", "finetune", "max-autotune", "resnet-fp32", "tests")

# ResNet-50's conv shapes at batch 32, 224 px (as c -> c blocks), by conv output
# elements per weight element: 174, 21.8, 6.1, 2.7, 1.5, 0.34. The CPU matrix
# (models.BLOCK_SHAPES, batch 8) is launch-bound on a GPU.
GPU_BLOCKS = [BlockShape(f"{k}x{k} c{c} @{s} b32", c, s, k, 32) for k, c, s in
              ((3, 64, 56), (3, 128, 28), (1, 1024, 14), (3, 256, 14), (1, 1024, 7), (3, 512, 7))]  # fmt: skip
TINY_BLOCKS = [BlockShape("3x3 c8 @16 b2", 8, 16, 3, 2, depth=1)]


@dataclasses.dataclass(frozen=True)
class Plan:
    device: str
    budget_s: float
    resnet_batch: int
    resnet_res: int
    tiny_resnet: bool
    steps: int
    warmup: int
    blocks: list
    autotune: list
    share_s: dict
    """The most seconds each section may take (its deadline, at most the budget's end)."""
    start_s: dict
    """Seconds a section needs left in the budget to start at all."""
    estimate_s: dict
    """Rough seconds per section with cold caches, printed as the plan."""
    settings: dict = dataclasses.field(default_factory=dict)
    """compile_affine options for every variant: none on the GPU (the defaults are what it
    measures); the dry run's tiny sizes would have the cost rule decline every site, so
    there it folds every legal one, to rehearse the path the GPU run takes."""


# On the GPU: shares sum past the budget on purpose; the order says what gets cut. The
# estimates assume a cold bf16 ResNet-50 training compile of about 50 s per variant on the
# GPU machine's 16 cores (unmeasured: the first run will say).
GPU_PLAN = Plan("cuda", budget_s=450, resnet_batch=32, resnet_res=224, tiny_resnet=False, steps=30, warmup=5,
                blocks=GPU_BLOCKS, autotune=GPU_BLOCKS[1:2],
                share_s={"blocks": 100, "resnet": 200, "finetune": 150, "max-autotune": 80, "resnet-fp32": 150, "tests": 100},
                start_s={"blocks": 20, "resnet": 60, "finetune": 60, "max-autotune": 30, "resnet-fp32": 60, "tests": 30},
                estimate_s={"blocks": 90, "resnet": 200, "finetune": 200, "max-autotune": 60, "resnet-fp32": 150, "tests": 100})  # fmt: skip
# Every section runs to its end, whatever the time: the dry run exists to prove each works.
DRY_PLAN = Plan("cpu", budget_s=3600, resnet_batch=2, resnet_res=16, tiny_resnet=True, steps=2, warmup=0,
                blocks=TINY_BLOCKS, autotune=TINY_BLOCKS, settings={"min_activation_ratio": 0.0},
                estimate_s={"blocks": 15, "resnet": 25, "finetune": 25, "max-autotune": 50, "resnet-fp32": 20, "tests": 60},
                share_s=dict.fromkeys(SECTIONS, 3600), start_s=dict.fromkeys(SECTIONS, 0))  # fmt: skip
REPO = pathlib.Path(__file__).resolve().parents[3]


class Clock:
    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.monotonic(), budget_s

    elapsed = property(lambda self: time.monotonic() - self.t0)
    left = property(lambda self: self.budget_s - self.elapsed)

    def log(self, msg: str) -> None:
        print(f"[gpu-check +{self.elapsed:5.0f}s] {msg}", file=sys.stderr, flush=True)


def add_args(p) -> None:
    p.add_argument("--dry-run", action="store_true", help="run every section on CPU at tiny sizes")
    p.add_argument("--out", help="output folder (default: $OUT, else gpu-check-out/)")
    p.add_argument("--budget", type=float, help="seconds for the whole run (sections that no longer fit are skipped)")
    p.add_argument("--only", help=f"comma-separated sections out of {','.join(SECTIONS)}")
    p.add_argument("--ratios", action="store_true",
                   help="print how many of ResNet-50's conv sites (batch 32, 224 px) each device's default declines, and exit")  # fmt: skip


def conv_ratios(model: torch.nn.Module, x: torch.Tensor) -> list[float]:
    """Conv output elements per weight element, per conv, from one forward on the meta device."""
    ratios: list[float] = []
    hooks = [m.register_forward_hook(lambda m, i, o: ratios.append(o.numel() / m.weight.numel()))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]  # fmt: skip
    model.to("meta")(x.to("meta"))
    for h in hooks:
        h.remove()
    return ratios


def declined_by_default(ratios: list[float]) -> str:
    thresholds = ca_settings.OBJECTIVE_MIN_ACTIVATION_RATIO
    return ", ".join(f"objective={obj} ({t}): {sum(r < t for r in ratios)} of {len(ratios)} declined" for obj, t in thresholds.items())


# --- sections -----------------------------------------------------------------------


def run_tests(plan: Plan, clock: Clock, out: pathlib.Path) -> dict:
    if not (REPO / "tests").is_dir():
        return {"status": "skipped", "note": f"no tests/ folder next to the package ({REPO})"}
    log_path = out / "gpu-check-tests.log"
    # -v: one line per test, so a run cut off by the cap still says what passed.
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfEs", "-k", "cuda", "tests"]
    # The fuzzers' short profile: their CI profile's examples, each a compile, do not fit.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "gpu-check")}  # fmt: skip
    cap = max(10.0, min(plan.share_s["tests"], clock.left))
    clock.log(f"tests: {' '.join(cmd[2:])} (at most {cap:.0f} s)")
    with open(log_path, "w") as log:
        # Its own process group, so a timeout also ends Inductor's compile workers.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    summary = _pytest_summary(log_path.read_text(errors="replace"))
    if rc is None:
        return {"status": "timeout", "note": f"stopped after {cap:.0f} s; so far: {summary}"}
    # 5: pytest selected no test (a checkout whose tests have no cuda variants).
    return {"status": "ok" if rc in (0, 5) else "failed", "note": "no test selected" if rc == 5 else summary, "rc": rc}


def _pytest_summary(text: str) -> str:
    """pytest's last line, or, for a run cut off before it, the per-test outcomes so far."""
    if final := re.findall(r"^=+ (.*\d+ (?:passed|failed|skipped|deselected|errors?).*?) =+$", text, re.M):
        return final[-1]
    outcomes = re.findall(r" (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", text)
    return ", ".join(f"{outcomes.count(o)} {o.lower()}" for o in dict.fromkeys(outcomes)) or "no test finished"


def tiny_resnet(norm: str) -> torch.nn.Module:
    """The dry run's stand-in: ResNet-50's stem and one conv -> norm -> relu, same norms.
    (Even a one-block-per-stage ResNet took minutes per variant to compile on 2 CPU cores.)"""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), NORMS[norm](8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), NORMS[norm](8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip


def run_nets(plan: Plan, runner: Runner, deadline: float, finetune: bool = False) -> dict:
    """The seed's ResNet-50 (``finetune``: with eval-mode BatchNorm) under ``runner``'s
    dtype and layout, then one profiled step per variant."""
    if finetune:
        build = (lambda net: NormEval(tiny_resnet(net)).train()) if plan.tiny_resnet else resnet50_finetune
        pairs, what = FINETUNE_VARIANTS, "eval-BN "
    else:
        build, pairs, what = (tiny_resnet if plan.tiny_resnet else resnet50), RESNET_VARIANTS, ""
    dtype = "bf16 autocast" if runner.dtype == torch.bfloat16 else "fp32"
    layout = ", channels_last" if runner.channels_last else ""
    name = f"{'tiny stand-in' if plan.tiny_resnet else 'resnet50'} {what}b{plan.resnet_batch} {plan.resnet_res}px {dtype}{layout}"
    x = torch.randn(plan.resnet_batch, 3, plan.resnet_res, plan.resnet_res)
    variants = [Variant(net, backend, build(net), x) for net, backend in pairs]
    ready = runner.run(variants, plan.steps, plan.warmup, deadline)
    rows = [row(name, v, ready, peak=True) for v in ready]
    for r, v in zip(rows, ready):
        if time.monotonic() < deadline:  # step enters the runner's autocast itself
            r.update({f"{c} ms": t for c, t in profile_step(lambda: runner.step(v), plan.device).items()})
    cut = _cut(plan, variants, ready)
    notes = [cut]
    if cut and not any(v.name == BASELINE for v in ready):
        notes.append(f"'x first/none' is against {ready[0].name}: {BASELINE} was not compiled")
    if not finetune:
        notes.append("conv sites by the cost rule's defaults: " + declined_by_default(conv_ratios(build("affine"), x)))
    return {"status": "partial" if cut else "ok", "rows": rows, "note": "; ".join(filter(None, notes))}


def _cut(plan: Plan, variants: list[Variant], ready: list[Variant]) -> str | None:
    """What a deadline cut from one ``Runner.run``, or None."""
    rounds = len(ready[0].fwd_ms)
    left = [v.name for v in variants if v not in ready]
    if not left and rounds >= plan.steps:
        return None
    return f"deadline: {rounds} of {plan.steps} rounds" + (f"; not compiled: {', '.join(left)}" if left else "")


def run_blocks(plan: Plan, runner: Runner, deadline: float, shapes: list, pairs=BLOCK_VARIANTS) -> dict:
    rows, notes, slowest = [], [], 0.0
    for i, shape in enumerate(shapes):
        if rows and time.monotonic() + slowest > deadline:
            notes.append(f"deadline: {len(shapes) - i} of {len(shapes)} shapes left out")
            break
        start = time.monotonic()
        variants = [Variant(net, backend, shape.build(net), shape.input("cpu")) for net, backend in pairs]
        ready = runner.run(variants, plan.steps, plan.warmup, deadline)
        ratio = _act_per_weight(shape, runner.dtype)
        for v in ready:
            rows.append({**row(shape.name, v, ready, peak=True), "act_per_weight": round(ratio, 2),
                         "auto_would_fold": ratio >= ca_settings.Settings().activation_ratio})  # fmt: skip
        if cut := _cut(plan, variants, ready):
            notes.append(f"{shape.name}: {cut}")
        del variants, ready  # before _release, so this shape's models and their compiled code can go
        _release()
        slowest = max(slowest, time.monotonic() - start)
    return {"status": "partial" if notes else "ok", "rows": rows, "note": "; ".join(notes) or None}


def _act_per_weight(shape: BlockShape, dtype: torch.dtype = torch.float32) -> float:
    """Conv output bytes per (fp32) weight byte, as the cost rule compares them: under
    bf16 autocast the output has 2 bytes an element."""
    activation = shape.batch * shape.channels * shape.size**2 * dtype.itemsize
    weight = shape.channels * (1 if shape.depthwise else shape.channels) * shape.kernel**2 * 4
    return activation / weight


def _release() -> None:
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_facts() -> dict:
    facts = {**machine(), "thresholds": dict(ca_settings.OBJECTIVE_MIN_ACTIVATION_RATIO)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(cuda_version=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                     capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                     sms=props.multi_processor_count, cudnn_tf32=torch.backends.cudnn.allow_tf32,
                     matmul_tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark)  # fmt: skip
    return facts


# --- driver -------------------------------------------------------------------------


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
        _release()
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


# --- report -------------------------------------------------------------------------

COLUMNS = [("scenario", "scenario"), ("variant", "variant"), ("step_ms", "step ms"), ("fwd_ms", "fwd ms"),
           ("bwd_ms", "bwd ms"), ("ratio", "x first/none"), ("ratio_vs_stock_same_net", "x stock same net"),
           ("saved_mib", "saved MiB"), ("peak_mib", "step peak MiB"), ("compile_s", "compile s"),
           ("traffic_mib", "moved MiB"), ("traffic_ratio", "moved x first/none"), ("pass_s", "pass s"),
           ("folds", "folds"), ("act_per_weight", "act/weight bytes"), ("auto_would_fold", "default folds"),
           *((f"{c} ms", f"{c} ms") for c in CLASSES)]  # fmt: skip


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# gpu-check: {m.get('cuda') or m['cpu']}", "",
             f"`{result['command']}`: torch {m['torch']}, device {result['device']}, "
             f"{result['wall_s']:.0f} s in all, budget {result['budget_s']:.0f} s.", "",
             "Step times are medians of interleaved training steps; `x stock same net` is the step time over "
             "stock Inductor's on the same net. `default folds`: whether the cost rule's default "
             f"(objective=\"time\", {result['thresholds']['time']}) folds that shape.", ""]  # fmt: skip
    for name, sec in result["sections"].items():
        lines += [f"## {name}: {sec['status']} ({sec.get('seconds', 0):.0f} s)", ""]
        if sec.get("note"):
            lines += [sec["note"], ""]
        if sec.get("rows"):
            lines += [table(sec["rows"], COLUMNS, extra=True), ""]
    return "\n".join(lines)


def write(out: pathlib.Path, command: str, device: str, budget_s: float, wall_s: float, facts: dict,
          sections: dict) -> dict:  # fmt: skip
    """gpu-check.json and gpu-check.md as they stand, each replaced whole."""
    result = {"command": command, "device": device, "budget_s": budget_s, "wall_s": round(wall_s, 1),
              "machine": facts, "thresholds": dict(ca_settings.OBJECTIVE_MIN_ACTIVATION_RATIO),
              "sections": dict(sections)}  # fmt: skip
    for name, text in (("gpu-check.json", json.dumps(result, indent=2, default=str)), ("gpu-check.md", markdown(result))):
        with replaced(out / name) as tmp:
            tmp.write_text(text)
    return result
