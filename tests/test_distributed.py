"""compile_affine under real process groups: 2 gloo ranks on 127.0.0.1, DDP (both
wrapping orders, with DDPOptimizer splitting the graph at bucket boundaries, and
wrap-then-compile with ``optimize_ddp=False``, the remedy docs/benchmarks.md recommends)
and FSDP2, against the same wrapper in eager for 3 SGD steps."""

from __future__ import annotations

import copy
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT_S = 240
OPTIONS = {"compile_affine": {"fold": "always", "strict": True}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wrap(model, mode):
    from torch.nn.parallel import DistributedDataParallel as DDP

    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    # A 1 MB bucket cap puts every large layer in its own bucket, so DDPOptimizer splits the
    # compiled graph between blocks, and some conv -> affine pairs straddle a split.
    return DDP(model, bucket_cap_mb=1)


def _worker(rank: int, mode: str, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    # As in conftest: the pass must really run (not be served from a cache) to report.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    try:
        import compile_affine
        from tests.nets import Chain

        torch._dynamo.config.optimize_ddp = mode != "ddp_unsplit"
        torch.manual_seed(0)
        base = Chain(widths=(4, 192, 192, 192, 8))  # 1.3 MB per 3x3 conv: one bucket each
        eager = _wrap(copy.deepcopy(base), mode)
        if mode == "ddp_inner":
            from torch.nn.parallel import DistributedDataParallel as DDP

            inner = copy.deepcopy(base)
            trained = DDP(torch.compile(inner, backend="compile_affine", options=OPTIONS), bucket_cap_mb=1)
            compiled = trained
        else:
            trained = _wrap(copy.deepcopy(base), "fsdp2" if mode == "fsdp2" else "ddp")
            compiled = torch.compile(trained, backend="compile_affine", options=OPTIONS)
        opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (eager, trained)]
        torch.manual_seed(1 + rank)  # each rank its own data
        for _ in range(3):
            x = torch.randn(2, 4, 12, 12)
            for fn, opt in ((eager, opts[0]), (compiled, opts[1])):
                opt.zero_grad()
                fn(x).square().mean().backward()
                opt.step()
        errs = []
        for p_e, p_c in zip(eager.parameters(), trained.parameters()):
            full_e = p_e.full_tensor() if hasattr(p_e, "full_tensor") else p_e
            full_c = p_c.full_tensor() if hasattr(p_c, "full_tensor") else p_c
            errs.append(((full_c - full_e).abs().max() / full_e.abs().max()).item())
        report = compile_affine.report()
        result = {"max_rel_err": max(errs), "folded": report.folded, "sites": len(report.sites),
                  "summaries": [g.summary() for g in report.graphs], "graphs": len(report.graphs)}  # fmt: skip
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        # Tear down together: once, under load, a rank aborted in gloo ("terminate called
        # without an active exception") while the other was still finishing.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(mode: str, tmp_path) -> list[dict]:
    ctx = mp.start_processes(_worker, args=(mode, _free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")  # fmt: skip
    import time

    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{mode}: ranks did not finish in {TIMEOUT_S}s")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("mode", ["ddp_outer", "ddp_inner", "ddp_unsplit", "fsdp2"])
def test_distributed_matches_eager(mode, tmp_path):
    results = _run(mode, tmp_path)
    for rank, r in enumerate(results):
        assert r["max_rel_err"] <= 1e-4, (rank, r)
        assert r["folded"] >= 1, (rank, r)
        assert all(s.startswith(f"[rank {rank}] ") for s in r["summaries"]), r["summaries"]
    if mode == "ddp_outer":
        # DDPOptimizer really split the graph; sites cut by a split are not seen as sites
        # (the conv is in one subgraph, the multiply in the next) and stay unfolded.
        assert results[0]["graphs"] > 1
    if mode in ("ddp_inner", "ddp_unsplit"):
        # One graph: every conv -> affine pair is a site, and folds (fold="always").
        assert results[0]["folded"] == 4, results[0]
