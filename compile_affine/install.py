"""``compile_affine.install()``: the pass under ``backend="inductor"``.

Frameworks that accept only their own backend names (Hugging Face ``Trainer`` through
accelerate, tools that hard-code ``backend="inductor"``) and plain ``torch.compile(model)``
all reach Inductor through ``torch._TorchCompileInductorWrapper``. While installed, its
call goes through ``backend.compile_with_pass``, the named backend's own path, so folds,
fallbacks, ``report()`` and the records kept beside the cache behave alike. Inductor's
config is never written: the fold pass is patched in per compile, after any joint pass
the user set, exactly as under ``backend="compile_affine"``.

``torch.compile`` compiles on a model's first call, and again on a recompile (eval mode,
a smaller last batch), so keep it installed while the model runs, not only while
``torch.compile`` is called. Graphs compiled while installed keep what they folded after
``uninstall()``, as any compiled code keeps its compile; ``torch._dynamo.reset()`` drops
them.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ._compat import STOCK_INDUCTOR_CALL
from .settings import OPTIONS_KEY, Settings, split_options

_lock = threading.Lock()
_options: dict[str, Any] | None = None
"""The options ``install()`` was given; None while not installed."""
_replaced: Any = None
"""The call ``install()`` replaced (stock, or another library's patch), put back by ``uninstall()``."""


def _inductor_call(self: Any, model_: Any, inputs_: Any, *, config_patches: dict[str, Any] | None = None) -> Any:
    options = _options
    # Subclasses (AOTInductor's wrapper) and a concurrent uninstall() get the call that
    # was there before install(): stock, or another library's patch.
    if options is None or type(self) is not torch._TorchCompileInductorWrapper:
        kwargs = {"config_patches": config_patches} if config_patches else {}
        return (_replaced or STOCK_INDUCTOR_CALL)(self, model_, inputs_, **kwargs)
    from .backend import compile_with_pass

    # Parsed per compile, as the named backend does, so COMPILE_AFFINE=0 set later still wins.
    settings, _ = split_options({OPTIONS_KEY: options})
    return compile_with_pass(self, model_, inputs_, settings, config_patches)


class Installation:
    """What ``install()`` returns; as a context manager, leaving it restores what was
    installed before it (nothing, or the earlier options). The state is the process's,
    so blocks are expected to nest, not to interleave across threads."""

    def __init__(self, previous: dict[str, Any] | None):
        self._previous = previous

    def __enter__(self) -> "Installation":
        return self

    def __exit__(self, *exc: Any) -> None:
        global _options
        if self._previous is None:
            uninstall()
            return
        with _lock:  # already checked once: never raise here over the block's own error
            _options = self._previous


def install(**options: Any) -> Installation:
    """Fold affines under ``backend="inductor"`` (the default of ``torch.compile``) too.

    ``options`` are the plugin's own (``fold="always"``, ``min_activation_ratio=...``),
    checked now: an unknown key raises ``ValueError`` as it does in ``options=``. Calling it
    again replaces the options; ``COMPILE_AFFINE=0`` still turns folding off at compile time.
    Usable as ``with compile_affine.install(): ...``.
    """
    global _options, _replaced
    split_options({OPTIONS_KEY: options})  # unknown keys, bad values and a bad COMPILE_AFFINE raise here
    with _lock:
        previous = _options
        _options = dict(options)
        wrapper = torch._TorchCompileInductorWrapper
        if wrapper.__call__ is not _inductor_call:
            _replaced = wrapper.__call__
            wrapper.__call__ = _inductor_call
    return Installation(previous)


def uninstall() -> None:
    """Give ``backend="inductor"`` back the call it had before ``install()``. Harmless
    when not installed."""
    global _options, _replaced
    with _lock:
        _options = None
        wrapper = torch._TorchCompileInductorWrapper
        if wrapper.__call__ is _inductor_call:
            wrapper.__call__ = _replaced or STOCK_INDUCTOR_CALL
        _replaced = None


def installed() -> Settings | None:
    """The settings ``install()`` put in force (before ``COMPILE_AFFINE``), or None."""
    options = _options
    return None if options is None else Settings(**options)

