"""What a record says of a site, read off its nodes before the rewrite erases them: where
the user wrote it, which module it belongs to, the shapes involved."""

from __future__ import annotations

import pathlib
import re

import torch.fx as fx

from .sites.base import Site


def site_facts(site: Site) -> dict:
    """The ``SiteRecord`` fields that describe ``site``."""
    return dict(
        location=location(site.anchor),
        module=module_of(site.anchor),
        producer_module=module_of(site.producer_node),
        kind=site.kind,
        producer=site.producer,
        output_shape=shape(site.y),
        weight_shape=shape(site.weight),
        scale_shape=shape(site.scale),
    )


def shape(n) -> tuple:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    # A symbolic size is shown as its expression (``s0``): records must outlive the graph.
    return tuple(d if isinstance(d, int) else str(d) for d in val.shape) if val is not None else ()


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def location(node: fx.Node) -> str:
    """The innermost user frame of the affine, e.g. ``model.py:42 in forward``."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    if not frames:
        return node.name
    path, line, func = frames[-1]
    return f"{pathlib.Path(path).name}:{line} in {func}"


def module_of(node: fx.Node) -> str:
    """The user's module the affine belongs to (``layer1.0.bn1``): with ``location``, which
    layer it is, the same in every graph that compiles it (a recompile, an eval graph)."""
    stack = node.meta.get("nn_module_stack") or {}
    return qualified_name(next(reversed(stack.values()))[0]) if stack else ""


_ROOT = re.compile(r"^(?:[LG]\[(['\"])[^'\"]*\1\]|self)(?:\.|$)")
_INDEX = re.compile(r"\[(['\"]?)([^\]'\"]*)\1\]")
_MODULES = re.compile(r"(?:^|(?<=\.))_modules\.")


def qualified_name(path: str) -> str:
    """Dynamo's module path as ``model.named_modules()`` names it: ``L['self'].layer1.0.bn1``
    (torch 2.14), ``L['self'].layer1[0].bn1`` or ``self._modules['layer1']`` (other
    releases) all give ``layer1.0.bn1``. The root (the compiled module, or the argument
    or global a compiled function reads it from) is dropped; the root itself is ``""``."""
    path = _INDEX.sub(lambda m: "." + m.group(2), _ROOT.sub("", path))
    return _MODULES.sub("", path).strip(".")
