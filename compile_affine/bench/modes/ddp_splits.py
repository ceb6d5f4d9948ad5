"""How many conv -> affine pairs does DDP's graph splitting cost? (issues 20, 29; docs/benchmarks.md,
"How many sites DDP's graph splits cost", says why it matters and has the results.) The seed's ResNet-50
(BatchNorm replaced by ``x * w + b``) on 2 gloo ranks with ``fold="always"`` (legality only), in four
orders: ``wrap-then-compile`` (``torch.compile(DDP(model))``, timm's order), ``optimize_ddp=False`` (one
graph, so one row whatever the bucket size), ``compile-then-wrap`` (``DDP(torch.compile(model))``) and
``python_reducer`` (compiled autograd compiles the step, backward included: one forward graph, one row).
Each row also trains the compiled wrapper and eager DDP for ``--steps`` float64 SGD steps (each rank its
own data, the affines drawn so that folding them is not the identity) and gives the largest difference
of any parameter, relative to eager's update of it: a wrong gradient shows at its own size.

    python -m compile_affine.bench ddp-splits [--bucket-cap-mb 25,1] [--res 64] [--steps 3]
"""

from __future__ import annotations

import copy
import json
import os
import socket
import tempfile
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..core.models import Affine2d, randomize, resnet50

WORLD = 2
ORDERS = ("wrap-then-compile", "optimize_ddp=False", "compile-then-wrap", "python_reducer")
OPTIONS = {"compile_affine": {"fold": "always"}}


def _worker(rank: int, port: int, order: str, bucket_cap_mb: float, res: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import compile_affine
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Before DDP is built: its constructor picks the python reducer.
        torch._dynamo.config.optimize_ddp = {"optimize_ddp=False": False, "python_reducer": "python_reducer"}.get(order, True)
        model = resnet50("affine")
        if steps:  # the affine layers drawn, the same on every rank; float64
            model = randomize(model, torch.Generator().manual_seed(1)).double()
        eager = DDP(copy.deepcopy(model), bucket_cap_mb=bucket_cap_mb)
        if order == "compile-then-wrap":
            trained = fn = DDP(torch.compile(model, backend="compile_affine", options=OPTIONS), bucket_cap_mb=bucket_cap_mb)
        else:
            trained = DDP(model, bucket_cap_mb=bucket_cap_mb)
            fn = torch.compile(trained, backend="compile_affine", options=OPTIONS)

        def step(f, x):
            f(x).square().mean().backward()

        train_step = step
        if order == "python_reducer":
            # Compiled autograd traces the backward, DDP's all-reduces included, inside the
            # compiled step; the forward is one graph.
            torch._dynamo.config.compiled_autograd = True
            train_step = torch.compile(step, backend="compile_affine", options=OPTIONS)
            fn = trained
        dtype = next(model.parameters()).dtype
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, trained)]
        before = [p.detach().clone() for p in eager.parameters()]
        runs = ((train_step, fn, opts[1]), (step, eager, opts[0]))[: 2 if steps else 1]  # 0 steps: no eager run
        for _ in range(max(steps, 1)):
            x = torch.randn(2, 3, res, res, generator=gen, dtype=dtype)
            for run, f, opt in runs:
                opt.zero_grad()
                run(f, x)
                opt.step()
        err = None
        if steps:
            # Of the updates, not the parameters: a wrong gradient shows at its own size.
            err = max(((p - q).abs().max() / (q - p0).abs().max().clamp_min(1e-30)).item()
                      for p, q, p0 in zip(trained.parameters(), eager.parameters(), before, strict=True))  # fmt: skip
        report = compile_affine.report()
        sites = [s for g in report.graphs if g.training for s in g.sites]
        reasons = Counter(s.short_reason for s in sites if not s.folded)
        result = {"graphs": len({g.graph_name for g in report.graphs if g.training}),
                  "sites": len(sites), "folded": sum(s.folded for s in sites),
                  "err": err, "why": "; ".join(f"{n}: {r}" for r, n in reasons.most_common())}  # fmt: skip
        with open(os.path.join(out, f"{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure(order: str, bucket_cap_mb: float, res: int, steps: int = 0) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(port, order, bucket_cap_mb, res, steps, out), nprocs=WORLD, start_method="spawn")
        ranks = [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(WORLD)]
    # Same model, same buckets: the same split on every rank (the errors may differ).
    assert [{**r, "err": None} for r in ranks][0] == {**ranks[1], "err": None}, ranks
    return {**ranks[0], "err": max((r["err"] for r in ranks if r["err"] is not None), default=None)}


def add_args(p) -> None:
    p.add_argument("--bucket-cap-mb", default="25,1",
                   help="DDP's bucket_cap_mb, comma-separated: one row per value and order (25 is DDP's default)")
    p.add_argument("--res", type=int, default=64, help="input px (the split depends on parameters, not on this)")
    p.add_argument("--orders", default=",".join(ORDERS))
    p.add_argument("--steps", type=int, default=3,
                   help="float64 SGD steps compared with eager DDP (0: count the folds only, in fp32)")


def main(args, command: str) -> int:
    affines = sum(isinstance(m, Affine2d) for m in resnet50("affine").modules())
    caps = [float(c) for c in args.bucket_cap_mb.split(",")]
    print(f"ResNet-50, {affines} affine layers, 2 gloo ranks, fold='always', {args.res} px"
          + (f", parameters after {args.steps} float64 SGD steps against eager DDP" if args.steps else ""))
    print("| order | bucket_cap_mb | training graphs | affine sites seen | folded | not folded | why not | max param err / eager's update |")
    print("|---|---|---|---|---|---|---|---|")
    for order in args.orders.split(","):
        for cap in caps[:1] if order in ("optimize_ddp=False", "python_reducer") else caps:
            r = measure(order, cap, args.res, args.steps)
            err = "-" if r["err"] is None else f"{r['err']:.1e}"
            print(f"| {order} | {cap:g} | {r['graphs']} | {r['sites']} | {r['folded']} | {affines - r['folded']} "
                  f"| {r['why'] or '-'} | {err} |", flush=True)  # fmt: skip
    return 0
