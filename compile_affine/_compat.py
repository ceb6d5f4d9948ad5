"""The few torch internals whose shape changed between torch 2.11 (the oldest release
pyproject.toml accepts, and the one on the GPU machine) and 2.14. Each shim keeps the
newer API's behaviour; the rest of the package imports these names from here only.

Checked against the sources of torch 2.11.0 and 2.14.1 (the two versions tested); the
releases in between were not installed, so "newer" below means "present in 2.14.1,
absent from 2.11.0".
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch._inductor import custom_graph_pass as _cgp

# Newer torch: joint_custom_pre_pass may be a list of passes, and Inductor runs each.
# 2.11 takes exactly one CustomGraphPass (it asserts so while hashing the cache key).
PASS_LISTS = hasattr(_cgp, "get_custom_graph_passes")

if PASS_LISTS:
    from torch._inductor.custom_graph_pass import get_custom_graph_passes
else:

    def get_custom_graph_passes(custom_pass: Any) -> tuple:
        # A copy of the newer helper: None, one pass, or a list/tuple of passes.
        if custom_pass is None:
            return ()
        if isinstance(custom_pass, (list, tuple)):
            return tuple(custom_pass)
        return (custom_pass,)


class _PassChain(tuple, _cgp.CustomGraphPass):
    """Several passes that 2.11 sees as one: it calls the chain and hashes its uuid.
    A tuple too, so code written for the newer list form (``passes[-1]``) reads it alike."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for p in self:
            p(graph)

    def uuid(self) -> Any:
        ids = [p.uuid() if isinstance(p, _cgp.CustomGraphPass) else None for p in self]
        # None makes Inductor bypass its cache, as it does for a bare callable pass.
        return None if any(i is None for i in ids) else tuple(ids)


def joint_passes(passes: Sequence[Any]) -> Any:
    """The value for ``joint_custom_pre_pass`` that runs ``passes`` in order."""
    return list(passes) if PASS_LISTS else _PassChain(passes)


STOCK_INDUCTOR_CALL = torch._TorchCompileInductorWrapper.__call__
"""What ``backend="inductor"`` runs, taken before ``install()`` can route it through us."""
_WRAPPER_TAKES_PATCHES = "config_patches" in inspect.signature(STOCK_INDUCTOR_CALL).parameters


def compile_inductor(inductor: Any, gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                     config_patches: dict[str, Any]) -> Any:  # fmt: skip
    """Stock ``inductor(gm, inputs, config_patches=...)``, whether or not ``install()`` is
    active: newer wrappers take extra patches; on 2.11 call compile_fx with the wrapper's
    config and ours merged, as they do."""
    if _WRAPPER_TAKES_PATCHES:
        return STOCK_INDUCTOR_CALL(inductor, gm, example_inputs, config_patches=config_patches)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches={**inductor.config, **config_patches})


def register_user_lowering(op: torch._ops.OpOverload, fn: Any) -> None:
    """Give ``op`` an Inductor lowering that may decline (return None) to the default one.

    Newer torch has ``lowering.user_lowerings`` for exactly this. 2.11 lacks it, so the
    op gets the implicit fallback 2.11 would have made for it (same layout constraint),
    wrapped to try ``fn`` first.
    """
    from torch._inductor import lowering

    if hasattr(lowering, "user_lowerings"):
        lowering.user_lowerings.setdefault(op, fn)
        return
    if op in lowering.lowerings:
        return
    from torch._library.utils import get_layout_constraint_tag

    constraint = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
    lowering.make_fallback(op, layout_constraint=constraint, warn=False)
    fallback = lowering.lowerings[op]

    def lower(*args, **kwargs):
        out = fn(*args, **kwargs)
        return fallback(*args, **kwargs) if out is None else out

    lowering.lowerings[op] = lower


# Inductor's conv lowering in 2.11 calls freeze_layout() on the bias, which a view
# (a reshaped shift, say) does not implement; 2.14's realizes views first. Releases in
# between were not checked, so they get the 2.11 treatment.
TORCH_MINOR: tuple[int, int] = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])  # type: ignore[assignment]
"""This torch's (major, minor): what the shims below and the fold-count pins key on."""
CONV_TAKES_VIEW_BIAS = TORCH_MINOR >= (2, 14)
"""Whether Inductor's conv lowering takes a view for its bias (``rewrite.common.conv_bias``)."""


# torch 2.11's Inductor (CPU, seen on convnext_atto) can fuse the zero fill of an
# ``as_strided_scatter`` base after the scatter into it, zeroing the gradient: global
# average pooling's backward on a 1x1 channels-last output builds exactly that. Stock
# Inductor hits it at some shapes; fed straight to the folded ``convolution_backward``
# (instead of through ``g * s``) it hits more. 2.14 orders them right; the releases in
# between were not checked, so they are treated as 2.11.
SCATTER_FILL_MISORDERED = TORCH_MINOR < (2, 14)
