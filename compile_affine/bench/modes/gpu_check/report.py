"""What gpu-check leaves: the device's facts, gpu-check.json and gpu-check.md, each
rewritten whole after every section."""

from __future__ import annotations

import json
import pathlib

import torch

from compile_affine import settings as ca_settings

from ...core.measure import CLASSES
from ...core.output import replaced, table
from ...core.runner import machine


def device_facts() -> dict:
    facts = {**machine(), "thresholds": dict(ca_settings.OBJECTIVE_MIN_ACTIVATION_RATIO)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(cuda_version=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                     capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                     sms=props.multi_processor_count, cudnn_tf32=torch.backends.cudnn.allow_tf32,
                     matmul_tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark)  # fmt: skip
    return facts


COLUMNS = [("scenario", "scenario"), ("variant", "variant"), ("step_ms", "step ms"), ("fwd_ms", "fwd ms"),
           ("bwd_ms", "bwd ms"), ("ratio", "x first/none"), ("ratio_vs_stock_same_net", "x stock same net"),
           ("saved_mib", "saved MiB"), ("peak_mib", "step peak MiB"), ("compile_s", "compile s"),
           ("traffic_mib", "moved MiB"), ("traffic_ratio", "moved x first/none"), ("twin_mib", "twin MiB"),
           ("twin_ratio", "moved x twin"), ("pass_s", "pass s"),
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
