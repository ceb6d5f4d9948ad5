"""Compile a training step (or inference) for a fake CUDA GPU on a machine without one.

    from compile_affine.bench.twin.codegen import compile_step
    r = compile_step(Net, lambda: torch.randn(8, 3, 32, 32), "compile_affine", device="h100")
    r.graphs                 # forward and backward (or inference): Graph per compiled graph
    r.graphs[1].kernels      # Kernel(name, kind, source, nodes): Triton code Inductor wrote
    r.graphs[1].extern       # library calls: extern_kernels.convolution, aten.convolution_backward...
    r.bytes, r.saved_bytes   # Inductor's num_bytes_accessed, summed; bytes saved for backward
    r.sites                  # per plugin SiteRecord: the Triton kernels computing its nodes

``compile_step(make_model, make_input, backend, *, device="h100" | "h200" | "v100", training=True,
dtype=torch.float32, autocast_bf16=False, channels_last=False, options=None)``: backend is
``"inductor"`` or ``"compile_affine"`` (``options`` go to ``torch.compile``, e.g.
``{"compile_affine": {"fold": "always"}}``). ``fake_gpu(device)`` is the context manager
underneath, for other uses; it yields the recorder (``.graphs``, ``.sources``).

Every stage takes its GPU path because every value *is* a CUDA value: the model's
parameters and the input become FakeTensors on ``cuda:0``, so Dynamo, AOTAutograd (with
Inductor's CUDA decompositions), the plugin's pass (``passes.target.device_type``), the
min-cut partitioner, CUDA lowering, Triton scheduling and codegen all see ``cuda``, while
``torch.cuda`` and Triton's driver describe the chosen GPU. Nothing runs on a device:
Triton sources are recorded instead of compiled, and each compiled graph's callable is
replaced by one that raises ``_CompiledOnly`` (which ``compile_step`` expects).

The stand-in for the autograd engine that lets AOTAutograd trace a CUDA backward is in
``engine``; ``fake_gpu`` and its stand-ins for torch and triton are in ``fake_cuda``.

Known differences from a real GPU compile: no scaled-dot-product-attention pattern is
fused (see ``_sfdp_init`` in ``fake_cuda``); no matmul is padded (``pad_mm`` decides by
timing on the device); constants that constant folding evaluates are evaluated on the CPU.
As on the real card, Inductor refuses bfloat16 on the V100 (``_check_triton_bf16_support``).
The step must be one graph (``fullgraph=True``): the first compiled graph refuses to run,
so code after a graph break would never be compiled.

Importing patches nothing (see ``fake_cuda``); ``compile_step`` resets Dynamo before and
after.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from typing import Any, Callable

import torch

# Kernel, Graph, DEVICES, fake_gpu and missing are this module's public names too.
from .fake_cuda import DEVICES, Graph, Kernel, _CompiledOnly, fake_gpu, missing  # noqa: F401


@dataclasses.dataclass
class Site:
    record: Any
    """The plugin's ``SiteRecord`` (``.folded``, ``.location``, ``.module``...)."""
    kernels: dict[str, list[str]]
    """``graph/kernel`` -> ``node (op)``, for the Triton kernels computing the site's nodes:
    those of the affine's module (its forward, and its backward such as the shift's
    ``sum(g)``) or of the producer's (the fold's ``W * s``, ``sum(gW' * W)``, the conv's bias
    where Inductor adds it as a pointwise op)."""


@dataclasses.dataclass
class Result:
    graphs: list[Graph]
    sites: list[Site]
    device: str
    launches: int
    """Triton kernel launches attempted: 0 (each compiled graph refuses to run)."""

    bytes = property(lambda self: sum(g.bytes for g in self.graphs))
    saved_bytes = property(lambda self: sum(g.saved_bytes for g in self.graphs))

    def count(self) -> Counter:
        return sum((g.count() for g in self.graphs), Counter())


class _Autocast(torch.nn.Module):
    """The step under ``torch.autocast("cuda", torch.bfloat16)``, entered inside the compiled
    code: entered in eager, autocast would find no GPU and turn itself off."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.model(x)


def _fake_cuda(t: torch.Tensor, mode: Any) -> torch.Tensor:
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor(mode, t.detach().to("meta"), torch.device("cuda", 0)).requires_grad_(t.requires_grad)


def compile_step(make_model: Callable[[], torch.nn.Module], make_input: Callable[[], torch.Tensor], backend: str, *,
                 device: str = "h100", training: bool = True, dtype: torch.dtype = torch.float32,
                 autocast_bf16: bool = False, channels_last: bool = False, options: dict | None = None) -> Result:  # fmt: skip
    """Compile a step of ``make_model()`` on ``make_input()`` for a fake ``device`` GPU: a
    training step's forward and backward graphs (``model.train()``, gradients on), or
    with ``training=False`` the inference graph (``eval()``, ``no_grad``). Model and input
    are built on the CPU in ``dtype`` and replaced by fake CUDA tensors. Resets Dynamo
    before (a frame compiled earlier would be served from its cache, uncompiled) and after
    (dropping the frames compiled for the fake GPU): every compiled function recompiles."""
    import compile_affine  # noqa: F401  (registers backend="compile_affine")
    from compile_affine.report import capture
    from torch._subclasses.fake_tensor import FakeTensorMode

    model, x = make_model().to(dtype).train(training), make_input().to(dtype)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    mode = FakeTensorMode()
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(_fake_cuda(p, mode), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = _fake_cuda(b, mode)
    step = _Autocast(model) if autocast_bf16 else model
    torch._dynamo.reset()
    try:
        with fake_gpu(device) as rec, capture() as records, torch.set_grad_enabled(training):
            # Dynamo runs what it compiled: refused. So a graph break would leave the rest of
            # the step uncompiled; fullgraph makes it an error instead.
            with contextlib.suppress(_CompiledOnly):
                torch.compile(step, backend=backend, options=options, fullgraph=True)(_fake_cuda(x, mode))
    finally:
        torch._dynamo.reset()  # drop the frames compiled for the fake GPU
    sites = []
    for record in (s for g in records for s in g.sites):
        kernels = {f"{g.name}/{k}": hits for g in rec.graphs for k, nodes in g.calls
                   if (hits := [f"{n} ({op})" for n, op, _, mod in nodes if mod in (record.module, record.producer_module)])}
        sites.append(Site(record, kernels))
    return Result(rec.graphs, sites, device, rec.launches)
