"""``explain(model, *inputs)``: compile a copy of a model, run it once, and return what the
pass did, like ``torch._dynamo.explain``. Kept apart from ``report``, which only records:
this module compiles and runs models."""

from __future__ import annotations

import copy
import logging
from typing import Any

from .report import Report, capture

log = logging.getLogger("compile_affine")


def explain(model: Any, *inputs: Any, **compile_kwargs: Any) -> Report:
    """What compile_affine does to ``model`` on ``inputs``, like ``torch._dynamo.explain``.

    Compiles a deep copy with ``backend="compile_affine"`` (``compile_kwargs`` go to
    ``torch.compile``: ``mode``, ``options``, ``dynamic``), runs one forward and, when
    grad is enabled and an output requires grad, one backward of the outputs' sum so the
    training graph is compiled too; under ``torch.no_grad()`` only the inference graph.
    The caller's model, its parameters and their ``.grad``, the inputs and the RNG
    state are left as they were. Returns the report of those compiles alone.
    """
    import torch
    import torch.utils._pytree as pytree

    original = getattr(model, "_orig_mod", model)  # a torch.compile'd module: explain its module
    twin = copy.deepcopy(original)
    compiled = torch.compile(twin, backend="compile_affine", **compile_kwargs)

    def own(t: Any) -> Any:  # inputs the backward must not accumulate into
        return t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t

    inputs = pytree.tree_map(own, inputs)
    devices = sorted({t.device.index or 0 for t in pytree.tree_leaves(inputs)
                      if isinstance(t, torch.Tensor) and t.device.type == "cuda"})  # fmt: skip
    with capture() as graphs, torch.random.fork_rng(devices=devices):
        outputs = compiled(*inputs)
        if torch.is_grad_enabled():
            grads = [t.sum() for t in pytree.tree_leaves(outputs)
                     if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()]  # fmt: skip
            if grads:
                torch.autograd.backward(grads)
    if not graphs:
        log.warning("explain: nothing was compiled (Dynamo ran the model eagerly, or it hit its recompile limit)")
    return Report(graphs)
