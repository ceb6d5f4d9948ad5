"""Bytes moved per training step, from Inductor's own count (bench/core/measure.py): a
deterministic stand-in for step time on a GPU, so it can be pinned without timing."""

import logging

import torch

from compile_affine.bench.core.measure import _metrics_logger, count_step
from compile_affine.bench.core.models import BlockShape

# The 2-conv 64-channel block at 56 px, batch 8, scaled down; the order is the
# same (there: floor 133.1, ours 154.5, stock 166.9 MB).
SHAPE = BlockShape("2 x 3x3 c32 @28 b4", 32, 28, 3, 4, depth=2)


def _traffic(net: str, backend: str, kernels: bool = False):
    torch._dynamo.reset()
    model = SHAPE.build(net)
    fn = torch.compile(model) if backend == "inductor" else torch.compile(model, backend="compile_affine")
    return count_step(fn, SHAPE.input("cpu"), kernels=kernels)


def test_traffic_order_floor_ours_stock():
    floor = _traffic("none", "inductor")
    stock = _traffic("affine", "inductor")
    ours = _traffic("affine", "compile_affine", kernels=True)
    # One forward and one backward graph each, counted.
    assert len(floor.graphs) == len(stock.graphs) == len(ours.graphs) == 2
    assert floor.bytes <= ours.bytes < stock.bytes, (floor.bytes, ours.bytes, stock.bytes)
    # Per-kernel bytes add up to the graph's count, and ours calls two convolutions forward.
    for graph in ours.graphs:
        assert sum(k.bytes for k in graph.kernels) == graph.bytes
    assert sum("convolution" in k.ops and k.kind == "extern" for k in ours.graphs[0].kernels) == 2


def test_count_is_deterministic_and_leaves_logging_alone():
    log = _metrics_logger()
    before = (log.level, log.propagate, list(log.handlers))
    first = _traffic("affine", "compile_affine")
    again = _traffic("affine", "compile_affine")  # the caches are off: recompiled, recounted
    assert first.bytes == again.bytes > 0
    assert (log.level, log.propagate, list(log.handlers)) == before
    assert not log.isEnabledFor(logging.INFO) or before[0] == logging.INFO
