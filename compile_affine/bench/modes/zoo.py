"""The zoo mode: third-party models against stock Inductor and float64 eager."""

from __future__ import annotations

import copy
import dataclasses
import time
import traceback
from collections import Counter

import torch

import compile_affine

from ..core.measure import outputs_and_grads, rel_errors
from ..core.output import ratio, table as markdown
from ..core.runner import Runner, Variant, fx_backend, progress
from ..core.zoo import ZooModel, select_zoo


def run(args, runner: Runner) -> list[dict]:
    """zoo: timm and torchvision models that carry affines (LayerScale ViTs and ConvNeXts,
    MetaFormer, NF-ResNet gains, FrozenBN and eval-BN ResNets, an FPN backbone; the
    catalogue is in core/zoo.py). For each model: what the pass found, folded, declined
    and refused (from ``report()``); saved-for-backward bytes and training-step time against
    stock Inductor, interleaved; fp32 agreement with eager, the error of both compiled runs
    and of eager itself against a float64 eager run, and a float64 run of the pass
    (``fold="always"``) executed as FX graphs against float64 eager."""
    entries = select_zoo(args.models)
    est = sum(m.est_s for m in entries)
    progress(f"zoo: {len(entries)} models ({', '.join(m.name for m in entries)}); expected about {est / 60:.0f} min "
             f"on a quiet 2-core CPU at default sizes (per-model estimates in compile_affine/bench/core/zoo.py)")  # fmt: skip
    rows, start, expected = [], time.perf_counter(), 0
    for i, m in enumerate(entries):
        t0 = time.perf_counter()
        progress(f"model {m.name}: {m.source}")
        try:
            rows.append(run_one(m, args, runner))
        except Exception as e:  # one model's failure is a result; the others still run
            progress(f"  {m.name} FAILED:\n{traceback.format_exc()}")
            rows.append({"model": m.name, "source": m.source, "error": f"{type(e).__name__}: {e}"})
        expected += m.est_s
        # Scale what is left by how this machine and these sizes compare with the estimates so far.
        left = sum(e.est_s for e in entries[i + 1:]) * (time.perf_counter() - start) / expected
        progress(f"  {m.name} done in {time.perf_counter() - t0:.0f}s (estimate {m.est_s}s); about {left / 60:.0f} min left")
    return rows


def run_one(m: ZooModel, args, runner: Runner) -> dict:
    size = args.size or m.size
    base = m.build(size=size)
    x = torch.randn(args.batch, 3, size, size)
    stock, ours = (Variant(m.name, b, copy.deepcopy(base), x) for b in ("inductor", "compile_affine"))
    runner.run([stock, ours], args.steps, args.warmup)

    base.to(runner.device).train(not runner.inference)
    x = x.to(runner.device)
    g = None if runner.inference else torch.randn_like(ours.fn(x).detach())
    eager = outputs_and_grads(base, base, x, g)
    double = copy.deepcopy(base).double()
    reference = outputs_and_grads(double, double, x.double(), None if g is None else g.double())
    got = {v.backend: outputs_and_grads(v.fn, v.model, x, g) for v in (stock, ours)}
    vs_f64 = {k: max(rel_errors(r, reference)) for k, r in (("ours", got["compile_affine"]), ("stock", got["inductor"]),
                                                             ("eager", eager))}  # fmt: skip
    row = {
        "model": m.name, "source": m.source, "carries": m.carries, "input": list(x.shape), **_sites(ours.report),
        "graphs": len(ours.report.graphs), "fell_back": [gr.fell_back for gr in ours.report.graphs if gr.fell_back],
        "step_ms_stock": round(stock.step, 2), "step_ms_ours": round(ours.step, 2),
        "step_ratio": round(ours.step / stock.step, 3),
        "saved_mib_stock": round(stock.saved_mib, 2), "saved_mib_ours": round(ours.saved_mib, 2),
        "saved_ratio": ratio(ours.saved_mib, stock.saved_mib),
        "compile_s_stock": round(stock.compile_s, 1), "compile_s_ours": round(ours.compile_s, 1),
        "traffic_bytes": {"stock": stock.traffic_bytes, "ours": ours.traffic_bytes},
        "traffic_ratio": ratio(ours.traffic_bytes, stock.traffic_bytes),
        "fp32_vs_eager_ours": rel_errors(got["compile_affine"], eager),
        "fp32_vs_eager_stock": rel_errors(got["inductor"], eager),
        "vs_float64_eager": vs_f64,
    }  # fmt: skip
    if not args.no_float64:
        row["float64_fx"] = float64_check(base, x, g)
    return row


def _sites(report) -> dict:
    sites = report.sites
    refused = Counter(s.reason for s in sites if not s.folded and not s.declined_by_cost)
    return {"sites": len(sites), "folded": sum(s.folded for s in sites),
            "declined": sum(s.declined_by_cost for s in sites), "refused": sum(refused.values()),
            "refused_reasons": dict(refused.most_common()),
            "site_records": [dataclasses.asdict(s) for s in sites]}  # fmt: skip


def float64_check(base: torch.nn.Module, x: torch.Tensor, g: torch.Tensor | None) -> dict:
    """The pass in float64 on the same model, executed as FX, against float64 eager.
    ``fold="always"``: every legal site is rewritten, the ones the cost rule declines too."""
    model, eager = copy.deepcopy(base).double(), copy.deepcopy(base).double()
    gd = None if g is None else g.double()
    compile_affine.reset()
    fn = torch.compile(model, backend=fx_backend(compile_affine.Settings(fold="always", strict=True)))
    try:
        got = outputs_and_grads(fn, model, x.double(), gd)
    except Exception as e:
        return {"fold": "always", "error": f"{type(e).__name__}: {e}"}
    report = compile_affine.report()
    out_err, grad_err = rel_errors(got, outputs_and_grads(eager, eager, x.double(), gd))
    return {"fold": "always", "out": out_err, "grad": grad_err, "folded": report.folded, "sites": len(report.sites)}


COLUMNS = ("model", "input", "affine sites", "folded", "declined (cost)", "refused: top reasons", "saved ours/stock",
           "step ours/stock", "moved ours/stock", "fp32 vs eager, out/grad: ours; stock", "vs float64 eager: ours / stock / eager",
           "float64 pass as FX (fold=always): out/grad, folded")  # fmt: skip


def table(rows: list[dict]) -> str:
    """Markdown; the errors are ``||a - e|| / ||e||``, grad = max over parameters."""
    return markdown([dict(zip(COLUMNS, _cells(r))) for r in rows], [(c, c) for c in COLUMNS])


def _cells(r: dict) -> list:
    if "error" in r:
        return [r["model"], f"FAILED: {r['error'][:200]}"]
    refused = str(r["refused"])
    if r["refused"]:
        refused += " (" + "; ".join(f"{n}: {why}" for why, n in list(r["refused_reasons"].items())[:2]) + ")"
    if r["fell_back"]:
        refused = f"PASS FAILED, stock Inductor ran {len(r['fell_back'])} graphs; {refused}"
    o, s, f, fx = r["fp32_vs_eager_ours"], r["fp32_vs_eager_stock"], r["vs_float64_eager"], r.get("float64_fx")
    if fx is not None:
        fx = f"FAILED: {fx['error'][:120]}" if "error" in fx else f"{_e(fx['out'])}/{_e(fx['grad'])}, {fx['folded']} of {fx['sites']}"
    return [
        r["model"], "x".join(map(str, r["input"])), r["sites"], r["folded"], r["declined"], refused,
        _f3(r["saved_ratio"]), _f3(r["step_ratio"]), _f3(r.get("traffic_ratio")),
        f"{_e(o[0])}/{_e(o[1])}; {_e(s[0])}/{_e(s[1])}", f"{_e(f['ours'])} / {_e(f['stock'])} / {_e(f['eager'])}", fx,
    ]  # fmt: skip


def _e(v: float) -> str:
    return f"{v:.0e}" if v else "0"


def _f3(v: float | None) -> str | None:
    return None if v is None else f"{v:.3f}"
