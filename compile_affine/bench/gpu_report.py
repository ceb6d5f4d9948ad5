"""What ``make gpu-check`` leaves in ``$OUT``: the JSON, its markdown tables and a plot,
rewritten as the run goes (bench/gpu_check.py drives it)."""

from __future__ import annotations

import json
import os
import pathlib

from .. import settings as ca_settings
from .kernels import CLASSES

COLUMNS = [("scenario", "scenario"), ("variant", "variant"), ("step_ms", "step ms"), ("fwd_ms", "fwd ms"),
           ("bwd_ms", "bwd ms"), ("ratio", "x first/none"), ("ratio_vs_stock_same_net", "x stock same net"),
           ("saved_mib", "saved MiB"), ("peak_mib", "step peak MiB"), ("compile_s", "compile s"),
           ("traffic_mib", "moved MiB"), ("traffic_ratio", "moved x first/none"), ("pass_s", "pass s"),
           ("folds", "folds"), ("act_per_weight", "act/weight bytes"), ("auto_would_fold", "default folds"),
           *((f"{c} ms", f"{c} ms") for c in CLASSES)]  # fmt: skip
JSON_ONLY = {"traffic_bytes"}


def table(rows: list[dict]) -> str:
    cols = [(k, h) for k, h in COLUMNS if any(k in r for r in rows)]
    cols += [(k, k) for k in dict.fromkeys(k for r in rows for k in r) if k not in dict(cols) and k not in JSON_ONLY]
    cells = [[h for _, h in cols]] + [["-" if r.get(k) is None else str(r[k]) for k, _ in cols] for r in rows]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("---" for _ in cols) + "|")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# gpu-check: {m.get('cuda') or m['cpu']}", "",
             f"`{result['command']}`: torch {m['torch']}, device {result['device']}, "
             f"{result['wall_s']:.0f} s in all, budget {result['budget_s']:.0f} s.", "",
             "Step times are medians of interleaved training steps; `x stock same net` is the "
             "step time over stock Inductor's on the same net. `default folds`: whether the "
             f"cost rule's default (objective=\"time\", {result['thresholds']['time']}) folds that shape.",
             ""]  # fmt: skip
    for name, sec in result["sections"].items():
        lines += [f"## {name}: {sec['status']} ({sec.get('seconds', 0):.0f} s)", ""]
        if sec.get("note"):
            lines += [sec["note"], ""]
        if sec.get("rows"):
            lines += [table(sec["rows"]), ""]
    return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the plot is a convenience; the JSON and markdown carry the numbers
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for s in result["sections"].values() for r in s.get("rows", [])
            if r.get("ratio_vs_stock_same_net") is not None and "compile_affine" in r.get("variant", "")]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["ratio_vs_stock_same_net"] for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), [f"{r['scenario']}\n{r['variant']}" for r in rows], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("step time / stock Inductor, same net")
    ax.set_title(f"{result['device']}: {result['machine'].get('cuda') or 'CPU'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: pathlib.Path, command: str, device: str, budget_s: float, wall_s: float, facts: dict,
          sections: dict) -> dict:  # fmt: skip
    """gpu-check.json and gpu-check.md as they stand, each by an atomic rename."""
    result = {"command": command, "device": device, "budget_s": budget_s, "wall_s": round(wall_s, 1),
              "machine": facts, "thresholds": dict(ca_settings.OBJECTIVE_MIN_ACTIVATION_RATIO),
              "sections": dict(sections)}  # fmt: skip
    for name, text in (("gpu-check.json", json.dumps(result, indent=2, default=str)), ("gpu-check.md", markdown(result))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return result
