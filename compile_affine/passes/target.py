"""Which device the pass decides for. A leaf: it imports nothing from the package.

On every real run that is the device of the graph's tensors, read off their fake values;
nothing a user sets changes it. The GPU twin (``compile_affine.bench.twin``) runs
Inductor's Triton code on CPU tensors through Triton's interpreter, and must see the
graph the pass builds on a GPU for those very tensors: ``decide_as("cuda")`` is that
seam, for the benchmark and the tests only. It is not public API (docs/api.md), and it
is part of the pass's ``uuid()``, so a graph folded under it never comes back from the
FX graph cache for a real CPU compile.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

_DECIDE_AS: contextvars.ContextVar[str | None] = contextvars.ContextVar("compile_affine_decide_as", default=None)


def device_type(t: torch.Tensor) -> str:
    """The device type the pass makes its device-keyed decisions for, for a value on ``t``'s device."""
    override = _DECIDE_AS.get()
    return override if override is not None and t.device.type == "cpu" else t.device.type


def override() -> str | None:
    """The device CPU values are decided as, or None (the uuid reads it)."""
    return _DECIDE_AS.get()


@contextlib.contextmanager
def decide_as(device_type: str) -> Iterator[None]:
    """Bench/test-only: inside the block the pass decides for CPU values as it would for
    ``device_type`` values (``"cuda"``)."""
    token = _DECIDE_AS.set(device_type)
    try:
        yield
    finally:
        _DECIDE_AS.reset(token)
