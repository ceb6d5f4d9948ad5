"""What the benchmark measures, shared with the tests: the bytes autograd saves for
backward; the bytes one compiled step moves; where a step spends its device time by
kernel class; a compiled model's outputs and gradients against a reference.

Bytes moved (docs/benchmarks.md, "Traffic", says why they matter): Inductor's
``GraphLowering.count_bytes()`` for every graph it compiles, which it logs while the
``inductor_metrics`` log artifact is at INFO; a static function of the post-grad graph,
the same on a loaded machine. Only a compile counts, so ``counting()`` turns the FX
graph and AOTAutograd caches off and gives Inductor a fresh cache directory."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections import Counter
from typing import Callable, Iterator

import torch


@dataclasses.dataclass
class Saved:
    """What autograd kept for backward during one forward."""

    bytes: int
    shapes: list[tuple[int, ...]]


def saved_for_backward(forward: Callable[[], torch.Tensor]) -> Saved:
    """Run ``forward`` and total the unique storages autograd saves (views share one)."""
    storages: dict[int, int] = {}
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return Saved(bytes=sum(storages.values()), shapes=shapes)


@dataclasses.dataclass
class Kernel:
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

    bytes = property(lambda self: sum(g.bytes for g in self.graphs))
    mib = property(lambda self: self.bytes / 2**20)


def _metrics_logger() -> logging.Logger:
    from torch._inductor import compile_fx

    return compile_fx.inductor_metrics_log


def _kind(node) -> str:
    name = type(node).__name__
    return {"ExternKernelSchedulerNode": "extern", "FusedSchedulerNode": "fused"}.get(name, name)


def _ops(node) -> str:
    origins = [o for n in node.get_nodes() for o in getattr(getattr(n, "node", None), "origins", ()) or ()]
    targets = {getattr(o.target, "__name__", str(o.target)).split(".")[0] for o in origins if o.op == "call_function"}
    return ",".join(sorted(targets))


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
            graph.kernels = [Kernel(_kind(n), n.get_read_write_buffers_sizes(), _ops(n)) for n, _ in info.get("nodes_num_elem", ())]
        self.traffic.graphs.append(graph)


@contextlib.contextmanager
def counting(kernels: bool = False) -> Iterator[Traffic]:
    """Count the bytes of every graph Inductor compiles inside the block. Enables only the
    metrics logger (not ``torch._logging.set_logs``, which would reset the user's other log
    settings), without printing, and restores it after."""
    from torch._inductor.utils import fresh_cache

    traffic, log = Traffic(), _metrics_logger()
    handler, level, propagate = _Collect(traffic, kernels), log.level, log.propagate
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


def count_step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, kernels: bool = False) -> Traffic:
    """Compile and run one training step of ``fn`` (a fresh ``torch.compile`` of a model)
    and return the bytes its forward and backward graphs move. ``fn`` must not have been
    called before: a graph compiled earlier is not counted again."""
    with counting(kernels) as traffic:
        out = fn(x)
        out.backward(torch.randn_like(out))
    return traffic


# Where a step's device time goes: the convolutions (cuDNN / CUTLASS, forward and both
# backward), Inductor's Triton pointwise and reduction kernels (where a stock affine's
# extra passes land), and the rest (GEMMs, copies).
CLASSES = ("convolution", "triton pointwise", "triton reduction", "other")
# Marks of cuDNN's convolution kernels (``sm90_xmma_fprop_implicit_gemm_...``, ``..._dgrad_...``,
# ``..._wgrad_...``) and its layout transposes; not bare ``xmma``/``cutlass``, which
# cuBLAS's GEMMs (the fc layer) share.
_CONV_MARKS = ("conv", "cudnn", "implicit_gemm", "fprop", "dgrad", "wgrad", "nchwtonhwc", "nhwctonchw")


def kernel_class(name: str) -> str:
    low = name.lower()
    if low.startswith("triton_poi"):
        return "triton pointwise"
    if low.startswith(("triton_red", "triton_per")):
        return "triton reduction"
    if any(m in low for m in _CONV_MARKS):
        return "convolution"
    return "other"


def profile_step(step: Callable[[], object], device: str) -> dict[str, float]:
    """Milliseconds of self time per kernel class over one call of ``step``, from
    ``torch.profiler``: of the device's kernels on CUDA, of the host ops on CPU (the dry
    run: there Inductor's C++ kernels are not separate events, so the split says little;
    it proves the code path)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    totals: Counter[str] = Counter({c: 0.0 for c in CLASSES})
    for event in (e for e in prof.key_averages() if e.device_type == kind):
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        totals[kernel_class(event.key)] += us / 1e3
    return {c: round(totals[c], 2) for c in CLASSES}


def outputs_and_grads(fn: Callable, model: torch.nn.Module, x: torch.Tensor, g: torch.Tensor | None) -> list:
    """The output, then every trainable parameter's gradient for output gradient ``g``
    (``g is None``: inference, the output alone)."""
    model.zero_grad(set_to_none=True)
    if g is None:
        with torch.inference_mode():
            return [fn(x).detach()]
    out = fn(x)
    out.backward(g)
    res = [out.detach()] + [p.grad for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return res


def rel_errors(actual: list, expected: list) -> tuple[float, float]:
    """``||a - e|| / ||e||`` for the output, and the max of it over parameter gradients
    (inf where only one side has a gradient). A gradient's denominator is at least 1e-3 of
    the largest gradient norm: a gradient that is zero up to rounding (CaiT's talking-heads
    ``proj_l.bias``: softmax ignores a shift) is noise on both sides, not an error."""

    def norm(t) -> float:
        return t.detach().double().norm().item()

    def err(a, e, floor: float = 0.0) -> float:
        if a is None or e is None:
            return 0.0 if a is e else math.inf
        diff = (a.detach().double().cpu() - e.detach().double().cpu()).norm().item()
        return diff / max(norm(e), floor, 1e-300)

    floor = 1e-3 * max((norm(e) for e in expected[1:] if e is not None), default=0.0)
    grads = [err(a, e, floor) for a, e in zip(actual[1:], expected[1:])]
    return err(actual[0], expected[0]), max(grads, default=0.0)
