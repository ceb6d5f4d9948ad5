"""The timed sections: the seed's ResNet-50 (and its eval-BN fine-tuning net) and the
block shapes, each stopping at its deadline and saying what the deadline cut."""

from __future__ import annotations

import gc
import json
import pathlib
import time

import torch

from compile_affine import settings as ca_settings

from ...core.measure import profile_step
from ...core.models import NORMS, BlockShape, NormEval, resnet50, resnet50_finetune
from ...core.output import BASELINE, ratio, row
from ...core.runner import Runner, Variant
from .plan import BLOCK_VARIANTS, FINETUNE_VARIANTS, RESNET_VARIANTS, Plan


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
    bf16 = " bf16" if runner.dtype == torch.bfloat16 else " fp32"
    if twin := predicted(plan, ("finetune" if finetune else "resnet") + bf16 + (" channels_last" if runner.channels_last else "")):
        for r in rows:
            if (b := twin["bytes"].get(r["variant"])) is not None:
                r["twin_mib"], r["twin_ratio"] = round(b / 2**20, 1), ratio(r["traffic_bytes"], b)
        notes.append(f"twin: the bytes the GPU twin predicted (`{twin['command']}`, torch {twin['torch']}, fake {twin['device']})")
    if not finetune:
        notes.append("conv sites by the cost rule's defaults: " + declined_by_default(conv_ratios(build("affine"), x)))
    return {"status": "partial" if cut else "ok", "rows": rows, "note": "; ".join(filter(None, notes))}


def predicted(plan: Plan, section: str) -> dict | None:
    """The GPU twin's byte counts for ``section``'s nets (``"resnet bf16 channels_last"``:
    net, dtype, layout; ``gpu-codegen --predict``, committed), where they were made at this
    plan's batch and resolution; else None."""
    path = pathlib.Path(__file__).resolve().parents[2] / "twin" / "predicted.json"
    if plan.tiny_resnet or not path.exists():
        return None
    twin = json.loads(path.read_text())
    if (twin["batch"], twin["res"]) != (plan.resnet_batch, plan.resnet_res) or section not in twin["bytes"]:
        return None
    return {**twin, "bytes": twin["bytes"][section]}


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
        release()
        slowest = max(slowest, time.monotonic() - start)
    return {"status": "partial" if notes else "ok", "rows": rows, "note": "; ".join(notes) or None}


def _act_per_weight(shape: BlockShape, dtype: torch.dtype = torch.float32) -> float:
    """Conv output bytes per (fp32) weight byte, as the cost rule compares them: under
    bf16 autocast the output has 2 bytes an element."""
    activation = shape.batch * shape.channels * shape.size**2 * dtype.itemsize
    weight = shape.channels * (1 if shape.depthwise else shape.channels) * shape.kernel**2 * 4
    return activation / weight


def release() -> None:
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
