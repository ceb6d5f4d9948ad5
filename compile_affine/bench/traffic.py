"""Bytes moved per training step, as Inductor counts them.

The affine's cost is memory traffic, not FLOPs, and Inductor already counts the bytes each
scheduler node (a fused kernel, or an extern call such as a convolution) reads and writes:
``GraphLowering.count_bytes()``, which ``compile_fx`` runs for every graph it compiles when
the ``inductor_metrics`` log artifact is enabled at INFO. The count is a static function of
the post-grad graph and its shapes: no wall time, so it is the same on a loaded machine.

It is taken at compile time only, so a graph served from the FX graph cache or the
AOTAutograd cache would not be counted; ``counting()`` turns both caches off and gives
Inductor a fresh cache directory for its duration.

``count_step(fn, x)`` is the one-call entry point (for gpu_check and the benchmark).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable, Iterator

import torch


@dataclasses.dataclass
class Kernel:
    name: str
    """The scheduler node's name (``op12``, or ``op3_op4`` for a fusion)."""
    kind: str
    """``extern`` (a library call, e.g. a convolution), ``fused``, or the node's class."""
    bytes: int
    ops: str
    """The aten ops the kernel came from, for reading (``convolution``, ``mul,sum``)."""


@dataclasses.dataclass
class GraphTraffic:
    bytes: int
    kernels: list[Kernel] = dataclasses.field(default_factory=list)
    """Filled only with ``counting(kernels=True)``: computing it costs a second walk."""


@dataclasses.dataclass
class Traffic:
    graphs: list[GraphTraffic] = dataclasses.field(default_factory=list)
    """In compile order: for a training step, forward then backward per compiled region."""

    @property
    def bytes(self) -> int:
        return sum(g.bytes for g in self.graphs)

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


def _metrics_logger() -> logging.Logger:
    from torch._inductor import compile_fx

    return compile_fx.inductor_metrics_log


def _kind(node) -> str:
    name = type(node).__name__
    return {"ExternKernelSchedulerNode": "extern", "FusedSchedulerNode": "fused"}.get(name, name)


def _ops(node) -> str:
    targets = set()
    for n in node.get_nodes():
        for origin in getattr(getattr(n, "node", None), "origins", ()) or ():
            if origin.op == "call_function":
                targets.add(getattr(origin.target, "__name__", str(origin.target)).split(".")[0])
    return ",".join(sorted(targets))


def _kernel(node) -> Kernel:
    return Kernel(node.get_name(), _kind(node), node.get_read_write_buffers_sizes(), _ops(node))


class _Collect(logging.Handler):
    def __init__(self, traffic: Traffic, kernels: bool):
        super().__init__(logging.INFO)
        self.traffic, self.kernels = traffic, kernels

    def emit(self, record: logging.LogRecord) -> None:
        # compile_fx logs ("Graph Metrics:\n%s", {...}) once per compiled graph.
        info = record.args if isinstance(record.args, dict) else None
        if not info or "num_bytes_accessed" not in info:
            return
        graph = GraphTraffic(int(info["num_bytes_accessed"]))
        if self.kernels:
            graph.kernels = [_kernel(node) for node, _ in info.get("nodes_num_elem", ())]
        self.traffic.graphs.append(graph)


@contextlib.contextmanager
def counting(kernels: bool = False) -> Iterator[Traffic]:
    """Count the bytes of every graph Inductor compiles inside the block.

    Enables only the metrics logger (not ``torch._logging.set_logs``, which would reset
    the user's other log settings), without printing, and restores it after.
    """
    from torch._inductor.utils import fresh_cache

    traffic = Traffic()
    log = _metrics_logger()
    handler = _Collect(traffic, kernels)
    level, propagate = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(handler)
    try:
        with (
            torch._inductor.config.patch(fx_graph_cache=False),
            torch._functorch.config.patch(enable_autograd_cache=False),
            fresh_cache(),
        ):
            yield traffic
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def count_step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor | None = None,
               kernels: bool = False, autocast: contextlib.AbstractContextManager | None = None) -> Traffic:  # fmt: skip
    """Compile and run one training step of ``fn`` (a fresh ``torch.compile`` of a model)
    and return the bytes its forward and backward graphs move. ``fn`` must not have been
    called before: a graph compiled earlier is not counted again."""
    with counting(kernels) as traffic:
        with autocast or contextlib.nullcontext():
            out = fn(x)
        out.backward(torch.randn_like(out) if grad is None else grad)
    return traffic
