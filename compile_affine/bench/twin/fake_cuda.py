"""``fake_gpu(device)``: the context manager under which torch and triton answer as one
H100, H200 or V100 at ``cuda:0`` while Inductor compiles, and the recorder it yields, which
keeps the Triton sources Inductor writes instead of compiling them (``Kernel`` and
``Graph`` are what it builds, so they live here too: ``codegen`` imports this module, never
the reverse). Apart from ``compile_step`` because this is the only code that patches torch
and triton, and so the first to break when their internals move: each stand-in names the
function it replaces, and ``missing()`` says which of them this torch lacks.

All patching happens inside ``fake_gpu()`` and is undone on exit; importing patches
nothing. What stays: Inductor's one-time pattern registration (``post_grad.lazy_init``),
made as any compile makes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import types
from collections import Counter
from typing import Any, Callable, Iterator
from unittest import mock

import torch
from torch.fx import traceback as fx_traceback

from ...passes.describe import location, qualified_name
from ...passes.graph import VIEW_OPS
from .engine import _grad

DEVICES = {  # name, compute capability, SMs, memory, L2, shared memory per block (opt-in)
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0), 132, 80 * 2**30, 50 * 2**20, 227 * 1024),
    "v100": ("Tesla V100-SXM2-32GB", (7, 0), 80, 32 * 2**30, 6 * 2**20, 96 * 1024),
    "h200": ("NVIDIA H200", (9, 0), 132, 141 * 10**9, 50 * 2**20, 227 * 1024),  # the lent GPU machine's
}
_KINDS = {"triton_poi": "pointwise", "triton_red": "reduction", "triton_per": "persistent reduction",
          "triton_tem": "template"}  # fmt: skip


class _CompiledOnly(Exception):
    """Raised where a compiled graph would run: only its code was wanted."""


@dataclasses.dataclass
class Kernel:
    name: str
    kind: str
    """``pointwise``, ``reduction``, ``persistent reduction``, ``template`` or ``other`` (name prefix)."""
    source: str
    nodes: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    """The FX nodes (Inductor's ``origins``) it computes: ``(name, op, source line, module)``."""


@dataclasses.dataclass
class Graph:
    name: str
    """``forward``, ``backward`` or ``inference``."""
    kernels: list[Kernel]
    extern: list[str]
    """Library calls in the wrapper code, in order (``extern_kernels.convolution``...)."""
    bytes: int
    """``GraphLowering.count_bytes()``, Inductor's ``num_bytes_accessed`` (what
    ``bench.core.measure.counting`` reads)."""
    wrapper: str
    saved_bytes: int = 0
    """Backward only: what the forward saved for it (its inputs but the tangents, parameters
    and the step's input included), in bytes of unique storages."""
    traffic: list = dataclasses.field(default_factory=list)
    """Inductor's byte count per scheduler node (``bench.core.measure.Kernel``: kind, bytes,
    aten ops), what ``traffic-diff`` compares: where a variant's bytes go."""
    calls: list[tuple[str, list[tuple]]] = dataclasses.field(default_factory=list)
    """Every Triton launch in the wrapper, in order: the kernel and the FX nodes (as in
    ``Kernel.nodes``) of that call. A kernel whose source repeats is defined once and
    called for each of its sites, so per-site questions read the calls, not the kernels."""

    def count(self) -> Counter:
        return Counter(k.kind for k in self.kernels)


def missing() -> str | None:
    """Which torch or triton function ``fake_gpu`` stands in for is absent here, or None
    (for tests to skip on). Present in torch 2.11, 2.14 and 2.15."""
    try:
        from torch._dynamo import device_interface
        from torch._inductor import async_compile, constant_folding
        from torch._inductor.codegen.triton import TritonScheduling
        from torch._inductor.fx_passes import fuse_attention, joint_graph, pad_mm, post_grad
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.driver import driver
    except ImportError as e:
        return f"not importable: {e}"
    needed = [(driver, "_active"), (async_compile.AsyncCompile, "triton"), (TritonScheduling, "define_kernel"),
              (constant_folding.ConstantFolder, "run"), (fuse_attention, "_sfdp_init"), (pad_mm, "_should_pad"), (joint_graph.lazy_init, "__wrapped__"),
              (joint_graph.patterns, "seen_patterns"),
              (device_interface, "caching_worker_device_properties"), (fx_traceback, "set_grad_fn_seq_nr"),
              (torch.autograd.graph.Node, "_input_metadata"), (torch._functorch.config, "force_non_lazy_backward_lowering")]  # fmt: skip
    absent = [f"{getattr(o, '__name__', type(o).__name__)}.{attr}" for o, attr in needed if not hasattr(o, attr)]
    return f"this torch/triton lacks {', '.join(absent)}" if absent else None


def _properties(device: str) -> Any:
    """What ``torch.cuda.get_device_properties`` returns, for the fields Inductor reads."""
    name, (major, minor), sms, memory, l2, smem = DEVICES[device]
    return types.SimpleNamespace(
        name=name, major=major, minor=minor, multi_processor_count=sms, total_memory=memory, L2_cache_size=l2,
        warp_size=32, max_threads_per_multi_processor=2048, max_threads_per_block=1024, regs_per_multiprocessor=65536,
        shared_memory_per_block=48 * 1024, shared_memory_per_block_optin=smem, is_integrated=False, gcnArchName="NONE",
    )  # fmt: skip


def _driver(capability: tuple[int, int]) -> Any:
    """Stands in for ``triton.backends.nvidia.driver.CudaDriver`` as
    ``triton.runtime.driver.driver.active``: the target Inductor writes Triton code for."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    return types.SimpleNamespace(
        get_current_target=lambda: target, get_current_device=lambda: 0, get_current_stream=lambda d=None: 0,
        get_active_torch_device=lambda: torch.device("cuda", 0), get_device_interface=lambda: torch.cuda,
        is_active=lambda: True,
    )  # fmt: skip


class _OnCpu(torch.utils._python_dispatch.TorchDispatchMode):
    """Constant folding (``torch._inductor.constant_folding.ConstantFolder.run``, used by
    ``joint_graph.constant_fold_uniform_value``) computes the values of the graph's
    constants for real, on their device: here on the CPU. Only values are read from them;
    the nodes that replace them take their device from the fake value."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        cpu = lambda a: torch.device("cpu") if isinstance(a, (torch.device, str)) and str(a).startswith("cuda") else a  # noqa: E731
        args, kwargs = torch.utils._pytree.tree_map(cpu, (args, kwargs or {}))
        return func(*args, **kwargs)


class _Recorder:
    """What ``fake_gpu`` collects: every Triton source, and a ``Graph`` per compiled graph."""

    def __init__(self, traffic: Any):
        self.traffic = traffic  # bench.core.measure.counting()'s: num_bytes_accessed per graph
        self.sources: list[tuple[str, str]] = []
        self.graphs: list[Graph] = []
        self.origins: dict[str, list] = {}  # kernel name -> its FX nodes, in the graph being compiled
        self.launches = 0
        self.lowering = False
        """True inside Inductor's ``compile_fx``, the only place the fake GPU says it is
        available: Dynamo, told so, asks the real device for its stream (``SymbolicStreamState``)."""

    def launch(self, *args, **kwargs):  # a Triton kernel's ``run``
        self.launches += 1
        self.refuse()

    def refuse(self, *args, **kwargs):  # stands in for CompiledFxGraph.current_callable
        raise _CompiledOnly("compiled for a fake GPU: nothing runs")

    def triton(self, async_compile, kernel_name, source_code, device_str="cuda"):
        """Stands in for ``AsyncCompile.triton``: keeps the source, compiles nothing."""
        self.sources.append((kernel_name, source_code))
        return types.SimpleNamespace(run=self.launch)

    def define_kernel(self, real: Callable) -> Callable:
        """Wraps ``TritonScheduling.define_kernel`` to note the FX nodes each kernel computes."""

        def define_kernel(scheduling, src_code, node_schedule, kernel):
            name = real(scheduling, src_code, node_schedule, kernel)
            fx_nodes = {o for n in node_schedule for o in getattr(getattr(n, "node", None), "origins", None) or ()}
            self.origins[name] = sorted(_node_facts(o) for o in fx_nodes if o.op == "call_function" and o.target not in VIEW_OPS)
            return name

        return define_kernel

    def compile_fx(self, real: Callable) -> Callable:
        """Wraps ``torch._inductor.compile_fx.compile_fx`` (which ``backend="inductor"`` and
        the plugin both call) to give it an ``inner_compile`` that records each graph."""

        def compile_fx(gm, example_inputs, inner_compile=None, **kwargs):
            from torch._inductor.compile_fx import compile_fx_inner

            inner = inner_compile or compile_fx_inner
            inner = inner if getattr(inner, "_twin", False) else self.inner_compile(inner)
            outer, self.lowering = self.lowering, True
            _clear_caches()  # answered while Dynamo traced, before the GPU was there
            try:
                return real(gm, example_inputs, inner_compile=inner, **kwargs)
            finally:
                self.lowering = outer
                _clear_caches()

        return compile_fx

    def inner_compile(self, real: Callable) -> Callable:
        def inner_compile(gm, example_inputs, **kwargs):
            first, counted = len(self.sources), len(self.traffic.graphs)
            compiled = real(gm, example_inputs, **kwargs)
            name = "backward" if kwargs.get("is_backward") else "inference" if kwargs.get("is_inference") else "forward"
            wrapper = getattr(compiled, "source_code", "") or ""
            kernels = [Kernel(k, next((v for p, v in _KINDS.items() if k.startswith(p)), "other"), src, self.origins.get(k, []))
                       for k, src in self.sources[first:]]  # fmt: skip
            extern = re.findall(r"\b((?:extern_kernels|aten|torch\.ops\.\w+)\.\w+(?:\.\w+)?)\(", wrapper)
            graph = Graph(name, kernels, extern, sum(g.bytes for g in self.traffic.graphs[counted:]), wrapper,
                          traffic=[k for g in self.traffic.graphs[counted:] for k in g.kernels], calls=_calls(wrapper, gm, self.origins))  # fmt: skip
            if name == "backward":  # what the forward saved: the inputs but the tangents, per storage
                saved = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder") if not n.name.startswith("tangents")]
                storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in saved if isinstance(t, torch.Tensor)}
                graph.saved_bytes = sum(storages.values())
            self.graphs.append(graph)
            self.origins.clear()
            compiled.current_callable = self.refuse
            return compiled

        inner_compile._twin = True
        return inner_compile


def _node_facts(o: Any) -> tuple:
    return (o.name, getattr(o.target, "__name__", str(o.target)), location(o), _module(o))


def _calls(wrapper: str, gm: Any, origins: dict[str, list]) -> list[tuple[str, list[tuple]]]:
    """Each ``triton_*.run(`` in the wrapper with the FX nodes of the ``# Topologically Sorted
    Source Nodes: [...]`` comment Inductor writes before it. Inductor leaves that comment empty
    where no node carries ``original_aten`` (the pass's own ``W * s``); there the kernel's
    origins stand in for the launch that defined it, and a repeat launch names no node."""
    nodes, calls, sources = {n.name: n for n in gm.graph.nodes}, [], None
    for line in wrapper.splitlines():
        if m := _SOURCES.match(line):
            sources = [nodes[n] for n in m.group(1).split(", ") if n in nodes] or None
        elif m := _LAUNCH.match(line):
            kernel = m.group(1)
            if sources is not None:
                facts = [_node_facts(o) for o in sources if o.op == "call_function" and o.target not in VIEW_OPS]
            else:  # a kernel's origins are its first launch's: a later one would be misnamed
                facts = [] if any(k == kernel for k, _ in calls) else origins.get(kernel, [])
            calls.append((kernel, facts))
            sources = None
    return calls


_SOURCES = re.compile(r"^\s*# Topologically Sorted Source Nodes: \[([^\]]*)\]")
_LAUNCH = re.compile(r"^\s*(triton_\w+)\.run\(")


def _module(node: Any) -> str:
    """The user's module an FX node computes for (``layer1.0.conv1``): its own
    ``nn_module_stack``, or for a backward node the forward's, which AOTAutograd copies to
    ``fwd_nn_module_stack``. A source line is no key: one ``Affine2d.forward`` line serves
    all 53 of a ResNet's affines."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    return qualified_name(next(reversed(stack.values()))[0]) if stack else ""


def _clear_caches() -> None:
    """Forgets the answers torch remembers per process about the device (functools caches:
    ``torch.utils._triton.has_triton``...; ``torch._inductor.utils.get_max_num_sms``,
    ``is_big_gpu``, ``get_gpu_dram_gbps``...; ``DeviceProperties.create``), so that they are
    asked again of the fake GPU inside, and of the real machine after."""
    from torch._inductor import utils
    from torch._inductor.runtime import hints
    from torch.utils import _triton

    for module in (utils, _triton):
        for fn in list(vars(module).values()):
            if isinstance(fn, functools._lru_cache_wrapper) and fn.__module__ == module.__name__:
                fn.cache_clear()
    hints.DeviceProperties.create.cache_clear()


def _with(context, fn, *args, **kwargs):
    with context:
        return fn(*args, **kwargs)


@contextlib.contextmanager
def fake_gpu(device: str = "h100") -> Iterator[_Recorder]:
    """Inside the block, while Inductor compiles, torch and triton answer as one ``device``
    GPU (``h100``, ``h200`` or ``v100``) at ``cuda:0``; yields the recorder of what Inductor wrote.
    Graphs are compiled afresh (caches off: a cache hit writes no kernels) and counted."""
    from torch._dynamo import device_interface
    from torch._inductor import async_compile, constant_folding
    from torch._inductor import compile_fx as compile_fx_module
    from torch._inductor.codegen.triton import TritonScheduling
    from torch._inductor.fx_passes import fuse_attention, joint_graph, pad_mm, post_grad
    from triton.runtime.driver import driver as triton_driver

    from ..core.measure import counting

    props = _properties(device)
    capability = (props.major, props.minor)
    cuda = {  # torch.cuda function -> its answer for one ``device`` at index 0
        "is_available": lambda: rec.lowering,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "set_device": lambda d: None,
        "_lazy_init": lambda: None,
        "synchronize": lambda d=None: None,
        "_exchange_device": lambda d: 0,
        "_maybe_exchange_device": lambda d: 0,
        "get_device_properties": lambda d=None: props,
        "get_device_capability": lambda d=None: capability,
        "get_device_name": lambda d=None: props.name,
        "is_bf16_supported": lambda including_emulation=True: including_emulation or capability >= (8, 0),
        "get_rng_state": lambda d="cuda": torch.zeros(16, dtype=torch.uint8),
        "set_rng_state": lambda s, d="cuda": None,
        "is_current_stream_capturing": lambda: False,
    }
    # Inductor's one-time registration, as any compile makes it, and before the tables are
    # saved below: a second run would raise "Duplicate pattern".
    post_grad.lazy_init()
    with contextlib.ExitStack() as stack:
        stack.callback(_clear_caches)  # last on exit: they answered for the fake GPU
        rec = _Recorder(stack.enter_context(counting(kernels=True)))
        patch = lambda *a: stack.enter_context(mock.patch.object(*a))  # noqa: E731
        for name, fn in cuda.items():
            patch(torch.cuda, name, fn)
            if hasattr(device_interface.CudaInterface, name):  # it bound torch.cuda's functions at import
                patch(device_interface.CudaInterface, name, staticmethod(fn))
        patch(device_interface.CudaInterface, "get_compute_capability", staticmethod(lambda d=None: props.major * 10 + props.minor))
        for cache in (device_interface.caching_worker_device_properties, device_interface.caching_worker_current_devices):
            stack.enter_context(mock.patch.dict(cache))  # CudaInterface.Worker's: none in, none out
            cache.pop("cuda", None)
        patch(triton_driver, "_active", _driver(capability))
        patch(async_compile.AsyncCompile, "triton", lambda self, *a, **k: rec.triton(self, *a, **k))
        patch(TritonScheduling, "define_kernel", rec.define_kernel(TritonScheduling.define_kernel))
        patch(compile_fx_module, "compile_fx", rec.compile_fx(compile_fx_module.compile_fx))
        patch(torch.autograd, "grad", _grad(torch.autograd.grad))
        folder = constant_folding.ConstantFolder
        patch(folder, "run", lambda self, *a, _run=folder.run, **k: _with(_OnCpu(), _run, self, *a, **k))
        # Stands in for pad_mm._should_pad, which times a padded against an unpadded matmul
        # on the device (misaligned, compute-bound ones): without one, no matmul is padded.
        patch(pad_mm, "_should_pad", lambda *a, **k: False)
        # Stands in for fuse_attention._sfdp_init: its patterns start from torch.tensor(2.0,
        # device="cuda"), which initialises CUDA even under FakeTensorMode. No SDPA fusion here.
        patch(fuse_attention, "_sfdp_init", lambda *a, **k: None)
        # Inductor registers its patterns once per process (``post_grad.lazy_init``, run above)
        # and once per device (``joint_graph.lazy_init``, cached): for cuda here through a
        # fresh cache, and the pattern tables it fills are put back as they were on exit.
        patch(joint_graph, "lazy_init", functools.cache(joint_graph.lazy_init.__wrapped__))
        for passes in (joint_graph.early_patterns, joint_graph.patterns, *joint_graph.pass_patterns, *post_grad.pass_patterns):
            for table in (passes.patterns, passes.seen_patterns):
                saved = {k: list(v) for k, v in table.items()}
                stack.callback(lambda t=table, saved=saved: (t.clear(), t.update(saved)))
        # One process, no compile workers; the backward compiled with the forward (the
        # forward never runs, so a lazily compiled backward never would be).
        stack.enter_context(torch._inductor.config.patch(compile_threads=1))
        stack.enter_context(torch._functorch.config.patch(force_non_lazy_backward_lowering=True))
        _clear_caches()  # they answered for this machine
        yield rec
