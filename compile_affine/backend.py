"""The ``torch.compile`` backend: stock Inductor with the affine-folding pass installed."""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from typing import Any, Callable, Sequence

import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import record_store, report
from ._compat import compile_inductor, get_custom_graph_passes, joint_passes
from .passes.fold import AffineFoldError, AffineFoldPass
from .passes.mutations import mutated_inputs
from .settings import Settings, split_options

log = logging.getLogger("compile_affine")
_warned: set[str] = set()
_warned_lock = threading.Lock()


def backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    **torch_kwargs: Any,
) -> Callable:
    """``torch.compile(model, backend="compile_affine", mode=..., options=...)``.

    ``options["compile_affine"]`` holds our settings; all other options and ``mode``
    configure Inductor exactly as they would for ``backend="inductor"``. Other keyword
    arguments are what newer torch forwards to custom backends (``name=``):
    accepted and ignored, as Inductor ignores them. Our own options are checked in
    ``options`` (an unknown key there still raises).
    """
    if torch_kwargs:
        log.debug("ignoring torch.compile's %s for the backend", ", ".join(sorted(torch_kwargs)))
    settings, inductor_options = split_options(options)
    # Validates Inductor options and expands ``mode`` the same way backend="inductor" does.
    inductor = torch._TorchCompileInductorWrapper(mode, inductor_options, dynamic=None)
    return compile_with_pass(inductor, gm, example_inputs, settings)


def compile_with_pass(inductor: Any, gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                      settings: Settings, config_patches: dict[str, Any] | None = None) -> Callable:
    """Compile ``gm`` with ``inductor`` (a ``torch._TorchCompileInductorWrapper``: mode and
    options already applied) and the fold pass chained after its joint passes. The named
    backend and ``install()`` both come here, so they fold, fall back and report alike."""
    config_patches = config_patches or {}
    config = {**inductor.config, **config_patches}
    if not settings.enabled:
        return compile_inductor(inductor, gm, example_inputs, config_patches)
    fold_pass = AffineFoldPass(settings, mutated_inputs(gm))
    passes = _chain(config, fold_pass)
    patches = {**config_patches, "joint_custom_pre_pass": joint_passes(passes)}
    try:
        compiled = compile_inductor(inductor, gm, example_inputs, patches)
    except Exception as e:
        error = _fold_error(e)
        if error is None or settings.strict:
            raise
        _warn_once(error)
        report.record(report.GraphRecord(graph_name=report.next_graph_name(), training=False, fell_back=str(error)))
        return compile_inductor(inductor, gm, example_inputs, config_patches)
    key = records_key(gm, example_inputs, passes, config)
    if fold_pass.calls:
        record_store.persist(key, fold_pass.records)
    else:
        # AOTAutograd's cache served the graph, so the pass did not run this time: report
        # what the compile that made the entry recorded, if it left its records.
        restored = record_store.restore(key)
        for graph in restored or [report.GraphRecord(graph_name=report.next_graph_name(), training=False, cache_hit=True)]:
            report.record(graph)
    return compiled


def records_key(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], passes: Sequence[Any],
                inductor_config: dict[str, Any]) -> str:
    """The key the pass's records are kept under beside the cache: what AOTAutograd's
    cache key covers that can change the pass's decisions (the Dynamo graph, the inputs'
    metadata and the ranges of their symbolic sizes, grad and autocast modes, every joint
    pass's uuid, ours hashing its sources, settings and mutations, and Inductor's config
    as ``mode`` and ``options`` set it)."""

    def meta(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return (tuple(map(str, x.shape)), tuple(map(str, x.stride())), str(x.dtype), str(x.device), x.requires_grad)
        return type(x).__name__ if not isinstance(x, (int, float, bool, str)) else str(x)

    def pass_id(p: Any) -> Any:
        return p.uuid() if isinstance(p, CustomGraphPass) else repr(p)

    # Ranges of symbolic sizes: the cost rule reads their lower bounds (cost.smallest).
    ctx = torch._guards.TracingContext.try_get()
    env = ctx.fake_mode.shape_env if ctx is not None and ctx.fake_mode is not None else None
    ranges = sorted((str(k), str(v)) for k, v in env.var_to_range.items()) if env is not None else None
    autocast = [(d, torch.is_autocast_enabled(d), str(torch.get_autocast_dtype(d))) for d in ("cpu", "cuda")]
    parts = (torch.__version__, record_store.RECORDS_LAYOUT, [pass_id(p) for p in passes], gm.code,
             [meta(x) for x in example_inputs], ranges, torch.is_grad_enabled(), autocast,
             sorted((k, str(v)) for k, v in inductor_config.items() if k != "joint_custom_pre_pass"))  # fmt: skip
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _chain(config: dict[str, Any], ours: AffineFoldPass) -> list:
    """Keep any joint pre-pass the user already set (globally or in options); ours runs last."""
    existing = config.get("joint_custom_pre_pass", inductor_config.joint_custom_pre_pass)
    return [*get_custom_graph_passes(existing), ours]


def _fold_error(e: BaseException) -> AffineFoldError | None:
    """Our pass's error, however deep Inductor wrapped it."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, AffineFoldError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _warn_once(error: AffineFoldError) -> None:
    message = f"{error}; compiling this graph with stock Inductor (set options={{'compile_affine': {{'strict': True}}}} to raise)"
    with _warned_lock:
        first = message not in _warned
        _warned.add(message)
    if first:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    log.warning("%s", message)


__all__ = ["backend", "Settings"]
