"""Measurements shared by the benchmark and the tests."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch


@dataclasses.dataclass
class Saved:
    """What autograd kept for backward during one forward."""

    bytes: int
    shapes: list[tuple[int, ...]]

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


def saved_for_backward(forward: Callable[[], torch.Tensor]) -> Saved:
    """Run ``forward`` and total the unique storages autograd saves (views share one)."""
    storages: dict[int, int] = {}
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return Saved(bytes=sum(storages.values()), shapes=shapes)
