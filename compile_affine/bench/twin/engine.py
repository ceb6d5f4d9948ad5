"""The stand-in for ``torch.autograd.grad`` that ``fake_gpu`` installs: a Python autograd
engine that runs the backward's autograd nodes itself, for CUDA values only. It is a leaf
module (torch only) so that ``fake_cuda`` can install it and tests can check it on the CPU
against the C++ engine, apart from the rest of the twin.

The wall, and the way round it: AOTAutograd traces the backward with
``torch.autograd.grad``. The C++ engine (``Engine::compute_dependencies``, engine.cpp) sees a
node on the accelerator and calls ``GraphTask::stash_current_streams``, which loops over
the CUDA device guard's ``deviceCount()`` (1: ``FakeTensorMode.__enter__`` installs
``NoOpDeviceGuardImpl<CUDA>`` through ``torch._C._ensureCUDADeviceGuardSet``) and asks
``CUDAHooks::hasPrimaryContext(0)`` (CUDAHooks.cpp), which checks the real device count, 0:
"hasPrimaryContext expects a valid device index". Nothing in Python reaches that loop, so
``_grad`` replaces ``torch.autograd.grad`` for CUDA values and runs the same autograd
nodes itself. On CPU it traces graphs identical to the C++ engine's (nodes, strides,
stack traces, sequence numbers), checked on a ResNet-50, a small ResNet and a ViT block.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch
from torch.fx import traceback as fx_traceback


@contextlib.contextmanager
def _backward_meta(node) -> Iterator[None]:
    """What the hooks of AOTAutograd's ``setup_stacktrace_preservation_hooks`` set around
    each node (only the C++ engine runs them): its forward stack trace and sequence number,
    which the backward's FX nodes take (``copy_fwd_metadata_to_bw_nodes`` reads them)."""
    stack = node.metadata.get("traceback_", [])
    fx_traceback.set_stack_trace(stack)
    fx_traceback.set_grad_fn_seq_nr(node._sequence_nr())
    getattr(fx_traceback, "_mark_autograd_backward", lambda: None)()  # newer torch (2.14) marks it too
    try:
        yield
    finally:
        fx_traceback.set_stack_trace([*stack, fx_traceback.GRADIENT_ACC_SPECIAL_STACK])
        fx_traceback.reset_grad_fn_seq_nr()
        getattr(fx_traceback, "_reset_autograd_backward", lambda: None)()


def _python_engine(outputs: list[torch.Tensor]) -> bool:
    """Whether ``_grad`` runs the backward itself: inside ``fake_gpu`` every CUDA value is
    fake (seen through functionalization's wrappers in AOTAutograd's trace)."""
    return any(t.device.type == "cuda" for t in outputs)


def _reach(start: list, step: Callable) -> set:
    """Every node reachable from ``start`` through ``step(node)``."""
    seen, todo = set(), list(start)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(step(node))
    return seen


def _grad(real_grad: Callable) -> Callable:
    """Stand-in for ``torch.autograd.grad`` (AOTAutograd's joint trace calls it, in
    ``_functorch/_aot_autograd/graph_capture_wrappers.py``): for CUDA outputs, run the
    backward here instead of in the C++ engine, as ``Engine::execute`` does for ``grad()``:
    only nodes that lead to an input run (its ``exec_info``), the ready node with the
    highest sequence number first; each node's gradients reduced and cast to their slot's
    shape and dtype (``validate_outputs``), then summed per slot (``InputBuffer::add``);
    grad mode off. Tensor hooks are not run (AOTAutograd's trace registers none)."""

    def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, allow_unused=None, **kw):
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
        if kw or not _python_engine(outputs):
            return real_grad(outputs, inputs, grad_outputs, retain_graph, create_graph, allow_unused=allow_unused, **kw)
        from torch.autograd.graph import get_gradient_edge

        if grad_outputs is None or isinstance(grad_outputs, torch.Tensor):
            grad_outputs = [grad_outputs] * len(outputs)
        roots = [get_gradient_edge(t) for t in outputs]
        targets: dict[tuple, list[int]] = defaultdict(list)  # (node, input slot) -> indices in ``inputs``
        for i, t in enumerate(inputs):
            e = get_gradient_edge(t)
            targets[(e.node, e.output_nr)].append(i)
        parents: dict[Any, list] = defaultdict(list)
        seen = _reach([e.node for e in roots], lambda node: [n for n, _ in node.next_functions if n is not None])
        for node in seen:
            for n, _ in node.next_functions:
                parents[n].append(node)
        leads = _reach([node for node, _ in targets if node in seen], parents.__getitem__)  # an input's gradient flows through
        runs = {n for n in leads if any(m in leads for m, _ in n.next_functions)}
        deps: dict[Any, int] = defaultdict(int)
        for node in runs:
            for n, _ in node.next_functions:
                deps[n] += n in runs
        buffers: dict[Any, dict[int, torch.Tensor]] = defaultdict(dict)
        results: list[torch.Tensor | None] = [None] * len(inputs)

        def fit(node, nr, g):
            if g is None or node not in leads:
                return None
            meta = node._input_metadata[nr]
            g = g if tuple(g.shape) == tuple(meta.shape) else g.sum_to_size(meta.shape)
            return g if g.dtype == meta.dtype else g.to(meta.dtype)

        def add(node, nr, g):
            if g is not None:
                for i in targets.get((node, nr), ()):
                    results[i] = g if results[i] is None else results[i] + g
                slot = buffers[node]
                slot[nr] = g if nr not in slot else slot[nr] + g

        for e, out, g in zip(roots, outputs, grad_outputs):
            add(e.node, e.output_nr, fit(e.node, e.output_nr, torch.ones_like(out) if g is None else g))
        ready = [n for n in buffers if n in runs and deps[n] == 0]
        outer_stack = fx_traceback.format_stack()
        with torch.set_grad_enabled(create_graph):
            while ready:
                ready.sort(key=lambda n: n._sequence_nr())
                node = ready.pop()
                slot = buffers.pop(node)
                with _backward_meta(node):
                    grads = node(*[slot.get(i) for i in range(len(node._input_metadata))])
                    grads = (grads,) if isinstance(grads, torch.Tensor) else grads
                    grads = [fit(n, nr, g) for (n, nr), g in zip(node.next_functions, grads)]
                for (n, nr), g in zip(node.next_functions, grads):
                    add(n, nr, g)
                    if n in runs:
                        deps[n] -= 1
                        if deps[n] == 0:
                            ready.append(n)
        fx_traceback.set_stack_trace(outer_stack)
        return tuple(results)

    return grad
