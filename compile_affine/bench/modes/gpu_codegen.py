"""gpu-codegen: the GPU twin. Compiles training steps of the seed's nets for a fake CUDA GPU
on this CPU and launches nothing (bench/twin/codegen.py): Inductor's CUDA decompositions,
the plugin's GPU decisions (read off the graph's cuda values), the min-cut partitioner,
CUDA lowering, Triton scheduling and codegen. Per variant it prints the Triton kernels by
kind, the extern kernels, the bytes Inductor counts (``num_bytes_accessed``, the counter
``count_step`` reads) and the bytes saved for backward; for compile_affine, the cost rule's
decisions at this size; with ``--sites``, the kernels each folded site's per-channel work
landed in. A byte count of generated code, not a time: ``make gpu-check`` measures.

    python -m compile_affine.bench gpu-codegen                        # every section, H100, 32 x 224
    python -m compile_affine.bench gpu-codegen --only resnet --device v100
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import time
from collections import Counter
from typing import Callable

import torch

from ..core.models import resnet50, resnet50_finetune
from ..core.output import replaced
from ..core.zoo import ZOO, ZOO_BY_NAME
from .gpu_check.plan import FINETUNE_VARIANTS, RESNET_VARIANTS

MIB = 2**20
KINDS = ("pointwise", "reduction", "persistent reduction", "template", "other")


@dataclasses.dataclass(frozen=True)
class Case:
    section: str
    net: str
    backend: str
    """``inductor``, ``inductor-conv_bn_eval`` (stock's eval-BN rewrite) or ``compile_affine``."""
    build: Callable[[], torch.nn.Module]
    res: int
    bf16: bool = False
    base: str | None = None
    """The ``net/backend`` this row's bytes are divided by (the floor; stock for the zoo)."""
    target: float | None = None
    """The issue's bound on that ratio, in moved bytes."""


def _resnet_cases(section: str, bf16: bool, res: int) -> list[Case]:
    floor = "none/inductor"
    cases = [Case(section, "none", "inductor", lambda: resnet50("none"), res, bf16)]
    for net, target in (("affine", 1.02), ("scale", 1.01)):
        build = lambda net=net: resnet50(net)  # noqa: E731
        cases += [Case(section, net, "inductor", build, res, bf16, floor),
                  Case(section, net, "compile_affine", build, res, bf16, floor, target)]  # fmt: skip
    return cases


def cases(only: set[str], res: int, models: list[str]) -> list[Case]:
    out: list[Case] = []
    if "resnet" in only:
        out += _resnet_cases("resnet fp32", False, res)
    if "resnet-bf16" in only:
        out += _resnet_cases("resnet bf16 channels_last", True, res)
    if "finetune" in only:
        floor = "none/inductor"
        out += [Case("finetune fp32 channels_last", "none", "inductor", lambda: resnet50_finetune("none"), res)]
        for backend in ("inductor", "inductor-conv_bn_eval", "compile_affine"):
            target = 1.03 if backend == "compile_affine" else None
            out.append(Case("finetune fp32 channels_last", "bn", backend, lambda: resnet50_finetune("bn"), res,
                            base=floor, target=target))  # fmt: skip
    if "gpu-check" in only:  # what ``make gpu-check`` runs and counts, to print beside it (--predict)
        for section, bf16, build, pairs in (("resnet", True, resnet50, RESNET_VARIANTS),
                                            ("finetune", False, resnet50_finetune, FINETUNE_VARIANTS)):  # fmt: skip
            name = f"gpu-check {section} {'bf16' if bf16 else 'fp32'} channels_last"
            out += [Case(name, net, backend, lambda b=build, n=net: b(n), res, bf16) for net, backend in pairs]
    if "zoo" in only:
        for name in models:
            entry = ZOO_BY_NAME[name]
            build = lambda entry=entry: entry.build(size=entry.size)  # noqa: E731
            out += [Case("zoo", name, "inductor", build, entry.size),
                    Case("zoo", name, "compile_affine", build, entry.size, base=f"{name}/inductor", target=1.0)]  # fmt: skip
    return out


def _compile(case: Case, batch: int, device: str, settings: dict, training: bool = True):
    from ..twin.codegen import compile_step

    backend, options = case.backend, None
    if backend == "inductor-conv_bn_eval":
        backend, options = "inductor", {"efficient_conv_bn_eval_fx_passes": True}
    elif backend == "compile_affine":
        options = {"compile_affine": settings}
    channels_last = case.section != "zoo" and "channels_last" in case.section
    return compile_step(case.build, lambda: torch.randn(batch, 3, case.res, case.res), backend, device=device,
                        autocast_bf16=case.bf16, channels_last=channels_last, options=options, training=training)  # fmt: skip


def _decisions(result) -> str:
    """The cost rule's (and legality's) decisions at this size, in the report's words: how
    many folded, how many the cost rule declined (the range of their activation/weight byte
    ratios against the threshold), and any other reason a site was left alone."""
    records = [s.record for s in result.sites]
    if not records:
        return ""
    declined = [r for r in records if not r.folded and r.declined_by_cost]
    other = Counter(r.short_reason for r in records if not r.folded and not r.declined_by_cost)
    words = [f"{sum(r.folded for r in records)} of {len(records)} folded"]
    ratios = [m.groups() for r in declined if (m := _RATIO.search(r.short_reason or ""))]
    if ratios:
        low, high = min(float(a) for a, _ in ratios), max(float(a) for a, _ in ratios)
        words.append(f"{len(declined)} declined by cost (activation {low:.3g}x to {high:.3g}x the weight in bytes, "
                     f"under {ratios[0][1]})")  # fmt: skip
    elif declined:
        words.append(f"{len(declined)} declined by cost")
    words += [f"{n} {reason}" for reason, n in other.most_common()]
    return "; ".join(words)


_RATIO = re.compile(r"activation ([0-9.e+-]+)x the weight in bytes, under ([0-9.]+)")


def run_case(case: Case, batch: int, device: str, settings: dict, training: bool = True) -> dict:
    t0 = time.perf_counter()
    result = _compile(case, batch, device, settings, training)
    kinds = result.count()
    graphs = {g.name: g for g in result.graphs}
    return {
        "section": case.section, "variant": f"{case.net}/{case.backend}", "base": case.base, "target": case.target,
        "kernels": {k: kinds.get(k, 0) for k in KINDS},
        "extern": sum(len(g.extern) for g in result.graphs),
        "fwd_bytes": sum(g.bytes for g in result.graphs if g.name != "backward"),
        "bwd_bytes": graphs["backward"].bytes if "backward" in graphs else 0,
        "bytes": result.bytes, "saved_bytes": result.saved_bytes,
        "decisions": _decisions(result) if case.backend == "compile_affine" else "",
        "by_class": _by_class(result),
        "sites": [{"site": f"{s.record.module} ({s.record.location})", "folded": s.record.folded, "kernels": s.kernels}
                  for s in result.sites],  # fmt: skip
        "compile_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip


def _by_class(result) -> dict[str, int]:
    """Bytes per graph and class of scheduler node: library calls (``extern``: convolutions
    and their backward), Triton code holding a reduction, other Triton code. Finer classes
    (the aten ops a node came from) relabel between variants more than they differ."""
    out: Counter = Counter()
    for g in result.graphs:
        for k in g.traffic:
            ops = set(k.ops.split(","))
            kind = "extern" if k.kind == "extern" else "Triton, reducing" if ops & _REDUCTIONS else "Triton, pointwise"
            out[f"{g.name} {kind}"] += k.bytes
    return dict(out)


_REDUCTIONS = {"sum", "mean", "amax", "max", "var_mean", "_native_batch_norm_legit_functional", "native_layer_norm"}


def misses(rows: list[dict], top: int = 6) -> str:
    """For each missed target, the node classes whose bytes differ most from its base's."""
    by_name = {(r["section"], r["variant"]): r for r in rows}
    out = []
    for r in (r for r in rows if r["met"] is False):
        base = by_name[(r["section"], r["base"])]
        a, b = base["by_class"], r["by_class"]
        keys = sorted(set(a) | set(b), key=lambda k: -abs(b.get(k, 0) - a.get(k, 0)))[:top]
        out += [f"\n{r['section']}, {r['variant']} against {r['base']}: {(r['bytes'] - base['bytes']) / MIB:+.1f} MiB; "
                "by graph and class of node", "| graph, class | base MiB | this MiB | difference |", "|---|---|---|---|"]  # fmt: skip
        out += [f"| {k} | {a.get(k, 0) / MIB:.1f} | {b.get(k, 0) / MIB:.1f} | {(b.get(k, 0) - a.get(k, 0)) / MIB:+.1f} |" for k in keys]
    return "\n".join(out)


def with_ratios(rows: list[dict]) -> list[dict]:
    by_name = {(r["section"], r["variant"]): r for r in rows}
    for r in rows:
        base = by_name.get((r["section"], r["base"])) if r["base"] else None
        r["moved_x"] = r["bytes"] / base["bytes"] if base else None
        r["saved_x"] = r["saved_bytes"] / base["saved_bytes"] if base and base["saved_bytes"] else None
        # the zoo's target holds for saved bytes too (no more than stock)
        saved_ok = r["section"] != "zoo" or r["saved_x"] is None or r["saved_x"] <= 1.0
        r["met"] = None if r["target"] is None or r["moved_x"] is None else (r["moved_x"] <= r["target"] and saved_ok)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| section | variant | Triton poi / red / per / tmpl / other | extern | fwd MiB | bwd MiB | step MiB "
            "| x base | saved MiB | saved x base | target | cost rule's decisions |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        k = r["kernels"]
        target = "" if r["target"] is None else f"<= {r['target']}: {'met' if r['met'] else 'MISSED'}"
        lines.append(
            f"| {r['section']} | {r['variant']} | {' / '.join(str(k[x]) for x in KINDS)} | {r['extern']} "
            f"| {r['fwd_bytes'] / MIB:.1f} | {r['bwd_bytes'] / MIB:.1f} | {r['bytes'] / MIB:.1f} | {fmt(r['moved_x'])} "
            f"| {r['saved_bytes'] / MIB:.1f} | {fmt(r['saved_x'])} | {target} | {r['decisions']} |"
        )
    return "\n".join(lines)


def site_lines(rows: list[dict]) -> str:
    out = []
    for r in rows:
        folded = [s for s in r["sites"] if s["folded"]]
        if not folded:
            continue
        out.append(f"\n{r['section']}, {r['variant']}: where each folded site's per-channel work landed")
        for s in folded:
            where = "; ".join(f"{k}: {', '.join(v)}" for k, v in s["kernels"].items()) or "(no Triton kernel: extern only)"
            out.append(f"- {s['site']}: {where}")
    return "\n".join(out)


SECTIONS = ("resnet", "resnet-bf16", "finetune", "zoo", "gpu-check")
DEFAULT_SECTIONS = SECTIONS[:4]


def add_args(p) -> None:
    p.add_argument("--device", default="h100", choices=("h100", "h200", "v100"), help="the GPU described to Inductor")
    p.add_argument("--batch", type=int, default=32, help="per-GPU batch (default 32)")
    p.add_argument("--res", type=int, default=224, help="the ResNet-50 sections' resolution (default 224)")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated sections: {', '.join(SECTIONS)} (default: all but gpu-check)")
    p.add_argument("--models", help="zoo: comma-separated names (default: the zoo's default set)")
    p.add_argument("--min-activation-ratio", type=float, help="compile_affine's cost threshold (default: the plugin's)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="an Inductor config setting for every compile, e.g. split_reductions=False (repeatable)")
    p.add_argument("--inference", action="store_true", help="compile the forward under no_grad (eval) instead of a training step")
    p.add_argument("--sites", action="store_true", help="list the kernels each folded site's work landed in")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON (with every site's kernels)")
    p.add_argument("--predict", metavar="PATH", help="write the gpu-check section's bytes where make gpu-check reads "
                   f"them (it prints them beside what it measures): {PREDICTED}")  # fmt: skip


def main(args, command: str) -> int:
    from ..twin.codegen import missing

    reason = missing()
    if reason:
        print(f"gpu-codegen: the GPU twin cannot run with this torch: {reason}")
        return 1
    only = {s.strip() for s in args.only.split(",")}
    unknown = only - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.predict and "gpu-check" not in only:
        raise SystemExit("--predict writes the gpu-check section's counts: add gpu-check to --only")
    models = args.models.split(",") if args.models else [m.name for m in ZOO if m.default]
    settings = {} if args.min_activation_ratio is None else {"min_activation_ratio": args.min_activation_ratio}
    patches = {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in args.inductor)}
    rows = []
    for case in cases(only, args.res, models):
        with torch._inductor.config.patch(patches):
            rows.append(run_case(case, args.batch, args.device, settings, not args.inference))
        print(f"# {case.section}: {case.net}/{case.backend} compiled in {rows[-1]['compile_s']} s", flush=True)
    rows = with_ratios(rows)
    step = "inference" if args.inference else "training step"
    print(f"\n# {command}\n# fake {args.device}, {step}, batch {args.batch}, ResNet-50 at {args.res} px (zoo: each model's size), "
          f"torch {torch.__version__}; compile-only: bytes Inductor counts, nothing timed")  # fmt: skip
    print(table(rows))
    print(misses(rows))
    if args.sites:
        print(site_lines(rows))
    if args.json:
        with replaced(args.json) as tmp:
            tmp.write_text(json.dumps({"command": command, "rows": rows}, indent=1, default=str))
    if args.predict:
        predicted = {"command": command, "torch": torch.__version__, "device": args.device, "batch": args.batch,
                     "res": args.res, "bytes": {}}  # fmt: skip
        for r in (r for r in rows if r["section"].startswith("gpu-check ")):
            predicted["bytes"].setdefault(r["section"].removeprefix("gpu-check "), {})[r["variant"]] = r["bytes"]
        with replaced(args.predict) as tmp:
            tmp.write_text(json.dumps(predicted, indent=1) + "\n")
    return 0


PREDICTED = "compile_affine/bench/twin/predicted.json"
"""The twin's byte counts for gpu-check's nets, committed: ``make gpu-check`` runs on a
machine that cannot run the twin (real CUDA there), so the prediction travels as data."""
