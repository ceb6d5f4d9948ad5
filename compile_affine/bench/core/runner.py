"""Compiling and running the variants. Timing method: every variant compiled first, then
steps interleaved across variants (rotating the order each round), medians reported.
Ratios between variants measured in one process are what we quote; absolute times drift
with the machine. Also the one FX backend (the pass, graphs run as FX) and the compile
settings every mode uses."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import statistics
import sys
import time
from typing import Callable

import torch
from torch._inductor.utils import fresh_cache

import compile_affine

from .measure import counting, saved_for_backward

BACKENDS = ("eager", "inductor", "inductor-conv_bn_eval", "compile_affine", "compile_affine-memory",
            "compile_affine-always", "compile_affine-epilogue", "inductor-max-autotune", "compile_affine-max-autotune")  # fmt: skip
# Without CUDA graphs, so that against the default mode only autotuning (Triton conv
# templates, with the affine in their epilogue) differs, not the launch overhead.
MAX_AUTOTUNE = "max-autotune-no-cudagraphs"


@dataclasses.dataclass
class Variant:
    net: str
    backend: str
    model: torch.nn.Module
    x: torch.Tensor
    fn: Callable = None
    grad: torch.Tensor | None = None
    fwd_ms: list[float] = dataclasses.field(default_factory=list)
    bwd_ms: list[float] = dataclasses.field(default_factory=list)
    compile_s: float = 0.0
    saved_mib: float = 0.0
    folds: str = ""
    pass_s: float | None = None
    """Seconds compile_affine's pass took in the compile (None for the stock variants)."""
    opt: torch.optim.Optimizer | None = None
    """With the runner's ``sgd_lr``: the optimizer whose step each timed step includes."""
    peak_mib: float | None = None
    """CUDA: the step's peak allocation above what was allocated before it."""
    traffic_bytes: int | None = None
    """Bytes the compiled forward and backward kernels read and write in one step, as
    Inductor counts them (core/measure.py); None for eager."""
    report: compile_affine.Report | None = None
    """``compile_affine.report()`` after this variant's compile (the next one resets it)."""

    name = property(lambda self: f"{self.net} / {self.backend}")
    fwd = property(lambda self: statistics.median(self.fwd_ms))
    bwd = property(lambda self: statistics.median(self.bwd_ms))
    step = property(lambda self: statistics.median(f + b for f, b in zip(self.fwd_ms, self.bwd_ms)))


def compiled(model: torch.nn.Module, backend: str, settings: dict) -> Callable:
    if backend == "eager":
        return model
    mode = MAX_AUTOTUNE if backend.endswith("-max-autotune") else None
    if backend == "inductor-conv_bn_eval":  # stock Inductor's own eval-BN rewrite: the anchor
        return torch.compile(model, options={"efficient_conv_bn_eval_fx_passes": True})
    if backend.startswith("inductor"):
        return torch.compile(model, mode=mode)
    ours = {"compile_affine": {**settings, "fold": "always" if backend.endswith("-always") else "auto",
                               "epilogue": "auto" if backend.endswith("-epilogue") else "off"}}  # fmt: skip
    if backend.endswith("-memory"):
        ours["compile_affine"]["objective"] = "memory"
    if mode:  # torch.compile refuses mode= with options=; the backend takes both
        return torch.compile(model, backend=functools.partial(compile_affine.backend, mode=mode, options=ours))
    return torch.compile(model, backend="compile_affine", options=ours)


def parse_variants(spec: str | None, default: tuple[str, ...]) -> list[tuple[str, str]]:
    """``--variants none/inductor,affine/compile_affine`` (else ``default``) as (net, backend) pairs."""
    pairs = [tuple(v.split("/")) for v in (spec.split(",") if spec else default)]
    if unknown := [backend for _, backend in pairs if backend not in BACKENDS]:
        raise SystemExit(f"unknown backend {unknown[0]!r} in --variants; choose from {BACKENDS}")
    return pairs


def fx_backend(settings: compile_affine.Settings | None = None, run: Callable | None = None):
    """The pass under AOTAutograd with Inductor's decompositions and min-cut partitioner,
    the graphs run as FX (no C++ compile): a check of the rewrite's algebra, in float64
    too, that costs seconds. ``run(gm) -> gm`` replaces the pass on each joint or
    inference graph (to time it, capture the graphs, or switch it off)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    from compile_affine.passes.fold import AffineFoldPass

    if run is None:
        fold_pass = AffineFoldPass(settings)

        def run(gm):
            fold_pass(gm.graph)
            return gm

    return aot_autograd(
        fw_compiler=lambda gm, _: make_boxed_func(gm),
        bw_compiler=lambda gm, _: make_boxed_func(gm),
        inference_compiler=lambda gm, _: make_boxed_func(run(gm)),
        partition_fn=lambda joint, inputs, **kw: min_cut_rematerialization_partition(run(joint), inputs, **kw),
        decompositions=select_decomp_table(),
    )


def configure_compile() -> None:
    """What the timed modes, traffic-diff and gpu-check set before they compile."""
    # Compile time is part of what we measure, so nothing may come from a warm cache.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    # Variants share forward code objects (nn.Sequential, torchvision blocks): each is a
    # recompile of the same frame. Keep every one compiled, each with static shapes.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    torch._dynamo.config.automatic_dynamic_shapes = False


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Runner:
    def __init__(self, device: str, dtype: torch.dtype, inference: bool = False, settings: dict | None = None,
                 ddp: bool = False, channels_last: bool = False, fresh_caches: bool = True,
                 sgd_lr: float | None = None):  # fmt: skip
        self.sgd_lr = sgd_lr
        """Set: each step ends with an SGD step at this rate (timed with the backward), as a
        training loop runs; None: forward and backward only."""
        self.channels_last = channels_last
        self.fresh_caches = fresh_caches
        """False: variants share Inductor's and Triton's caches, so a kernel two variants
        both need compiles once (the GPU check's cold-compile budget); compile times are
        then not comparable between variants."""
        self.device, self.dtype, self.inference = torch.device(device), dtype, inference
        self.settings, self.ddp = settings or {}, ddp

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, v: Variant) -> tuple[float, float]:
        """One training step of ``v`` (a forward alone under ``inference``): its forward and
        backward milliseconds, from CUDA events (the stream, host launch gaps included;
        one sync per step) or the wall clock."""
        marks = [torch.cuda.Event(enable_timing=True) if self.device.type == "cuda" else _Clock() for _ in range(3)]
        marks[0].record()
        with self.autocast(), torch.inference_mode(self.inference):
            out = v.fn(v.x)
        marks[1].record()
        if not self.inference:
            if v.grad is None:
                v.grad = torch.randn_like(out)
            out.backward(v.grad)
            if v.opt is not None:
                v.opt.step()
        marks[2].record()
        marks[2].synchronize()
        v.model.zero_grad(set_to_none=True)
        return marks[0].elapsed_time(marks[1]), 0.0 if self.inference else marks[1].elapsed_time(marks[2])

    def prepare(self, v: Variant, warmup: int, measure: bool = True) -> None:
        """Compile ``v`` with its first step; ``measure`` False (traffic mode) stops there,
        skipping the warmup, peak and saved-bytes steps."""
        progress(f"compiling {v.name} ...")
        compile_affine.reset()
        v.model.to(self.device).train(not self.inference)
        v.x = v.x.to(self.device)
        if self.channels_last and v.x.dim() == 4:  # how GPU users train convnets
            v.model.to(memory_format=torch.channels_last)
            v.x = v.x.contiguous(memory_format=torch.channels_last)
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            v.model = DistributedDataParallel(v.model, device_ids=ids)
        v.fn = compiled(v.model, v.backend, self.settings)
        if self.sgd_lr is not None and not self.inference:
            v.opt = torch.optim.SGD(v.model.parameters(), lr=self.sgd_lr)
        # A fresh cache per variant: no variant reuses kernels another compiled.
        # Counting bytes is part of every variant's first step alike (Inductor walks its
        # scheduler nodes once more per graph), so compile times stay comparable.
        with fresh_cache() if self.fresh_caches else contextlib.nullcontext(), counting() as traffic:
            t0 = time.perf_counter()
            self.step(v)
            v.compile_s = time.perf_counter() - t0
        v.traffic_bytes = traffic.bytes if v.backend != "eager" else None
        report = compile_affine.report()
        if v.backend.startswith("compile_affine"):
            v.folds = f"{report.folded}/{len(report.sites)}"
            v.pass_s = sum(g.pass_s for g in report.graphs)
        else:
            v.folds = "-"
        if report.epilogues:
            v.folds += f" +{report.fused_epilogues}/{len(report.epilogues)} epi"
        if not measure:
            v.report = report
            progress(f"  {v.name}: folds {v.folds}, {(v.traffic_bytes or 0) / 2**20:.1f} MiB moved")
            return
        for _ in range(warmup):
            self.step(v)
        if self.device.type == "cuda":  # the step's peak above what was allocated before it
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step(v)
            v.peak_mib = (torch.cuda.max_memory_allocated(self.device) - before) / 2**20
        if not self.inference:
            with self.autocast():
                v.saved_mib = saved_for_backward(lambda: v.fn(v.x)).bytes / 2**20
        v.report = compile_affine.report()
        own = "" if v.pass_s is None else f" (pass {v.pass_s:.2f}s)"
        moved = "" if v.traffic_bytes is None else f", {v.traffic_bytes / 2**20:.1f} MiB moved"
        progress(f"  {v.name}: first step {v.compile_s:.1f}s{own}, folds {v.folds}{moved}")

    def run(self, variants: list[Variant], steps: int, warmup: int = 2, deadline: float | None = None) -> list[Variant]:
        """Compile every variant, then time ``steps`` interleaved rounds. With a
        ``deadline`` (``time.monotonic()``), the next variant is compiled only if the
        slowest preparation so far, plus ``MIN_ROUNDS`` rounds of every variant, still ends
        before it; rounds stop at it (after the first). The first variant is always
        compiled. Returns the variants timed, each with as many rounds as the others."""
        ready: list[Variant] = []
        slowest = step_s = 0.0
        for v in variants:
            reserve = MIN_ROUNDS * (len(ready) + 1) * step_s
            if deadline is not None and ready and time.monotonic() + slowest + reserve > deadline:
                progress(f"deadline: {len(variants) - len(ready)} variants left out")
                break
            t0 = time.monotonic()
            self.prepare(v, warmup)
            slowest = max(slowest, time.monotonic() - t0)
            if deadline is not None:  # one untimed step: what a round of this variant costs
                t0 = time.monotonic()
                self.step(v)
                step_s = max(step_s, time.monotonic() - t0)
            ready.append(v)
        if not ready:
            return ready
        progress(f"timing {len(ready)} variants, {steps} interleaved rounds")
        for i in range(steps):
            if deadline is not None and i and time.monotonic() > deadline:
                progress(f"deadline: {i} of {steps} rounds timed")
                break
            for v in ready[i % len(ready):] + ready[: i % len(ready)]:  # the order rotates each round
                f, b = self.step(v)
                v.fwd_ms.append(f)
                v.bwd_ms.append(b)
        # First-call time minus a steady step approximates compile time.
        for v in ready:
            v.compile_s = max(0.0, v.compile_s - v.step / 1e3)
        return ready


class _Clock:
    """The wall clock, read as ``torch.cuda.Event`` is."""

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "_Clock") -> float:
        return (end.t - self.t) * 1e3


MIN_ROUNDS = 5
"""Timed rounds a deadline leaves room for before it admits one more variant."""


def init_distributed(device: str) -> str:
    """Join the process group ``torchrun`` describes; returns this rank's device."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "rank": int(os.environ.get("RANK", 0)), "world_size": int(os.environ.get("WORLD_SIZE", 1))}  # fmt: skip
