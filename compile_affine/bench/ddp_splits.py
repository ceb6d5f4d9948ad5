"""How many conv -> affine pairs does DDP's graph splitting cost? (issue 20)

timm's train.py wraps the model in DistributedDataParallel and then compiles it. Dynamo's
DDPOptimizer then splits the graph at gradient-bucket boundaries (``bucket_cap_mb``,
25 MB by default) so that all-reduce overlaps backward. A piece that cuts a conv from
its affine, or that starts by mutating its own input in place, loses that fold; the
table gives the report's reason for each site left unfolded.

Three ways of running the seed's ResNet-50 (BatchNorm replaced by ``x * w + b``) under
2 gloo ranks, each counting the affine layers folded with ``fold="always"`` (legality
only, so the cost rule's shape-dependent declines do not blur the count):

* ``wrap-then-compile``: ``torch.compile(DDP(model))``, timm's order, DDPOptimizer on;
* ``optimize_ddp=False``: the same order with ``torch._dynamo.config.optimize_ddp = False``
  (one graph; all-reduce no longer overlaps backward inside it);
* ``compile-then-wrap``: ``DDP(torch.compile(model))``. DDPOptimizer splits this one
  too: Dynamo sees the compiled module running under DDP's forward (measured: the same
  pieces as ``wrap-then-compile``).

    python -m compile_affine.bench.ddp_splits [--bucket-cap-mb 25] [--res 64]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .models import Affine2d, resnet50

WORLD = 2
ORDERS = ("wrap-then-compile", "optimize_ddp=False", "compile-then-wrap")
OPTIONS = {"compile_affine": {"fold": "always"}}


def _worker(rank: int, port: int, order: str, bucket_cap_mb: float, res: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import compile_affine
        from torch.nn.parallel import DistributedDataParallel as DDP

        torch._dynamo.config.optimize_ddp = order != "optimize_ddp=False"
        model = resnet50("affine")
        if order == "compile-then-wrap":
            fn = DDP(torch.compile(model, backend="compile_affine", options=OPTIONS), bucket_cap_mb=bucket_cap_mb)
        else:
            fn = torch.compile(DDP(model, bucket_cap_mb=bucket_cap_mb), backend="compile_affine", options=OPTIONS)
        fn(torch.randn(2, 3, res, res)).sum().backward()
        report = compile_affine.report()
        reasons = Counter(s.short_reason for s in report.sites if not s.folded)
        result = {"graphs": len({g.graph_name for g in report.graphs if g.training}),
                  "sites": len(report.sites), "folded": report.folded,
                  "why": "; ".join(f"{n}: {r}" for r, n in reasons.most_common())}  # fmt: skip
        with open(os.path.join(out, f"{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure(order: str, bucket_cap_mb: float, res: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(port, order, bucket_cap_mb, res, out), nprocs=WORLD, start_method="spawn")
        ranks = [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(WORLD)]
    assert ranks[0] == ranks[1], ranks  # same model, same buckets: the same split on every rank
    return ranks[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m compile_affine.bench.ddp_splits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP's bucket_cap_mb (25 is its default)")
    p.add_argument("--res", type=int, default=64, help="input px (the split depends on parameters, not on this)")
    p.add_argument("--orders", default=",".join(ORDERS))
    args = p.parse_args(argv)
    affines = sum(isinstance(m, Affine2d) for m in resnet50("affine").modules())
    print(f"ResNet-50, {affines} affine layers, 2 gloo ranks, bucket_cap_mb={args.bucket_cap_mb:g}, fold='always'")
    print("| order | training graphs | affine sites seen | folded | not folded | why not |")
    print("|---|---|---|---|---|---|")
    for order in args.orders.split(","):
        r = measure(order, args.bucket_cap_mb, args.res)
        print(f"| {order} | {r['graphs']} | {r['sites']} | {r['folded']} | {affines - r['folded']} | {r['why'] or '-'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
