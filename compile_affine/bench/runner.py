"""Timing method: every variant compiled first, then steps interleaved across variants
(rotating the order each round), medians reported. Ratios between variants measured
in one process are what we quote; absolute times drift with the machine."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import time
from typing import Callable

import torch
from torch._inductor.utils import fresh_cache

import compile_affine

from .measure import saved_for_backward

BACKENDS = ("eager", "inductor", "inductor-conv_bn_eval", "compile_affine", "compile_affine-always",
            "compile_affine-epilogue")  # fmt: skip


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

    @property
    def name(self) -> str:
        return f"{self.net} / {self.backend}"

    @property
    def fwd(self) -> float:
        return statistics.median(self.fwd_ms)

    @property
    def bwd(self) -> float:
        return statistics.median(self.bwd_ms)

    @property
    def step(self) -> float:
        return statistics.median(f + b for f, b in zip(self.fwd_ms, self.bwd_ms))


def compiled(model: torch.nn.Module, backend: str, settings: dict) -> Callable:
    if backend == "eager":
        return model
    if backend == "inductor":
        return torch.compile(model)
    if backend == "inductor-conv_bn_eval":  # stock Inductor's own eval-BN rewrite: the anchor
        return torch.compile(model, options={"efficient_conv_bn_eval_fx_passes": True})
    fold = "always" if backend.endswith("-always") else "auto"
    epilogue = "auto" if backend.endswith("-epilogue") else "off"
    ours = {**settings, "fold": fold, "epilogue": epilogue}
    return torch.compile(model, backend="compile_affine", options={"compile_affine": ours})


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Runner:
    def __init__(self, device: str, dtype: torch.dtype, inference: bool = False, settings: dict | None = None,
                 ddp: bool = False):  # fmt: skip
        self.settings = settings or {}
        self.ddp = ddp
        self.device = torch.device(device)
        self.dtype = dtype
        self.inference = inference

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _fwd_bwd(self, v: Variant) -> tuple[float, float]:
        t0 = time.perf_counter()
        with self.autocast(), torch.inference_mode(self.inference):
            out = v.fn(v.x)
        self.sync()
        t1 = time.perf_counter()
        if self.inference:
            return (t1 - t0) * 1e3, 0.0
        if v.grad is None:
            v.grad = torch.randn_like(out)
        out.backward(v.grad)
        self.sync()
        t2 = time.perf_counter()
        for p in v.model.parameters():
            p.grad = None
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def prepare(self, v: Variant, warmup: int) -> None:
        progress(f"compiling {v.name} ...")
        compile_affine.reset()
        v.model.to(self.device).train(not self.inference)
        v.x = v.x.to(self.device)
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            v.model = DistributedDataParallel(v.model, device_ids=ids)
        v.fn = compiled(v.model, v.backend, self.settings)
        # A fresh cache per variant: no variant reuses kernels another compiled.
        with fresh_cache():
            t0 = time.perf_counter()
            self._fwd_bwd(v)
            v.compile_s = time.perf_counter() - t0
        report = compile_affine.report()
        v.folds = f"{report.folded}/{len(report.sites)}" if v.backend.startswith("compile_affine") else "-"
        if report.epilogues:
            v.folds += f" +{report.fused_epilogues}/{len(report.epilogues)} epi"
        for _ in range(warmup):
            self._fwd_bwd(v)
        if not self.inference:
            with self.autocast():
                v.saved_mib = saved_for_backward(lambda: v.fn(v.x)).mib
        progress(f"  {v.name}: first step {v.compile_s:.1f}s, folds {v.folds}")

    def run(self, variants: list[Variant], steps: int, warmup: int = 2) -> None:
        for v in variants:
            self.prepare(v, warmup)
        progress(f"timing {len(variants)} variants, {steps} interleaved rounds")
        for i in range(steps):
            order = variants[i % len(variants):] + variants[: i % len(variants)]
            for v in order:
                f, b = self._fwd_bwd(v)
                v.fwd_ms.append(f)
                v.bwd_ms.append(b)
        # First-call time minus a steady step approximates compile time.
        for v in variants:
            v.compile_s = max(0.0, v.compile_s - v.step / 1e3)


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
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "rank": int(os.environ.get("RANK", 0)),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
    }
