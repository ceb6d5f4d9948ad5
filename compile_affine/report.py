"""What the pass did: one ``SiteRecord`` per affine site, grouped per compiled graph.

Records accumulate in-process until ``reset()``, so a user can compile, run and
then ask ``compile_affine.report()`` what happened.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter
from typing import Iterator

log = logging.getLogger("compile_affine")


def _rank() -> int | None:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


@dataclasses.dataclass(frozen=True)
class SiteRecord:
    location: str
    """The user's source line for the affine, from node meta, or the node name."""
    producer: str
    """``conv2d``, ``conv_transpose1d``... the op the affine would fold into."""
    output_shape: tuple
    weight_shape: tuple
    scale_shape: tuple
    folded: bool
    reason: str | None
    """Why the site was left alone; None when folded."""
    declined_by_cost: bool = False
    """True when the site was legal but the cost model said folding would not pay."""
    kind: str = "affine"
    """What the user wrote: ``"affine"`` or ``"batch_norm"`` (an eval-mode batch norm)."""


@dataclasses.dataclass(frozen=True)
class EpilogueRecord:
    """A ``conv -> (+bias) -> activation`` the epilogue pass looked at (``epilogue="auto"``)."""

    location: str
    activation: str
    output_shape: tuple
    fused: bool
    reason: str | None
    """Why it was left to Inductor; None when fused."""


@dataclasses.dataclass
class GraphRecord:
    graph_name: str
    training: bool
    sites: list[SiteRecord] = dataclasses.field(default_factory=list)
    fell_back: str | None = None
    """Set when the pass raised and the graph was compiled by stock Inductor."""
    rank: int | None = dataclasses.field(default_factory=_rank)
    """The torch.distributed rank that compiled the graph, when a process group is up."""
    cache_hit: bool = False
    """A cache (AOTAutograd's, which sits before the joint passes) served the graph: the
    pass did not run, and the compiled code folds whatever the compile that filled the
    cache folded. Inductor's FX graph cache sits after the pass and does not cause this."""
    epilogues: list[EpilogueRecord] = dataclasses.field(default_factory=list)
    """Conv epilogues considered for fusion (empty unless ``epilogue="auto"``)."""

    @property
    def folded(self) -> int:
        return sum(s.folded for s in self.sites)

    @property
    def fused_epilogues(self) -> int:
        return sum(e.fused for e in self.epilogues)

    def summary(self) -> str:
        return ("" if self.rank is None else f"[rank {self.rank}] ") + self._summary()

    def _summary(self) -> str:
        if self.fell_back:
            return f"{self.graph_name}: pass failed ({self.fell_back}); compiled with stock Inductor"
        if self.cache_hit:
            return f"{self.graph_name}: served from Inductor's cache; folds as when the cache entry was made"
        skipped = Counter(s.reason for s in self.sites if not s.folded)
        line = f"{self.graph_name}: folded {self.folded} of {len(self.sites)} affine sites"
        if skipped:
            detail = ", ".join(f"{n}: {r}" for r, n in skipped.most_common())
            line += f" ({sum(skipped.values())} skipped: {detail})"
        if self.epilogues:
            line += f"; fused {self.fused_epilogues} of {len(self.epilogues)} conv epilogues"
            left = Counter(e.reason for e in self.epilogues if not e.fused)
            if left:
                line += " (" + ", ".join(f"{n}: {r}" for r, n in left.most_common()) + ")"
        return line


class Report:
    """Everything recorded since the last ``reset()``. ``str()`` gives a table."""

    def __init__(self, graphs: list[GraphRecord]):
        self.graphs = graphs

    @property
    def sites(self) -> list[SiteRecord]:
        return [s for g in self.graphs for s in g.sites]

    @property
    def folded(self) -> int:
        return sum(s.folded for s in self.sites)

    @property
    def skipped(self) -> int:
        return len(self.sites) - self.folded

    @property
    def epilogues(self) -> list[EpilogueRecord]:
        return [e for g in self.graphs for e in g.epilogues]

    @property
    def fused_epilogues(self) -> int:
        return sum(e.fused for e in self.epilogues)

    def reasons(self) -> Counter:
        return Counter(s.reason for s in self.sites if not s.folded)

    def __iter__(self) -> Iterator[SiteRecord]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __str__(self) -> str:
        header = ("graph", "location", "op", "output", "weight", "scale", "folded", "reason")
        rows = [
            (
                g.graph_name,
                s.location,
                s.producer,
                _shape(s.output_shape),
                _shape(s.weight_shape),
                _shape(s.scale_shape),
                "yes" if s.folded else "no",
                s.reason or "",
            )
            for g in self.graphs
            for s in g.sites
        ]
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in (header, *rows)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        epilogues = f", {self.fused_epilogues} of {len(self.epilogues)} epilogues fused" if self.epilogues else ""
        lines.append(f"{self.folded} folded, {self.skipped} skipped{epilogues}, {len(self.graphs)} graphs")
        lines += [g.summary() for g in self.graphs if g.fell_back or g.cache_hit]
        return "\n".join(lines)

    def __repr__(self) -> str:
        epilogues = f", epilogues={self.fused_epilogues}" if self.epilogues else ""
        return f"Report(graphs={len(self.graphs)}, folded={self.folded}, skipped={self.skipped}{epilogues})"


def _shape(shape: tuple) -> str:
    return "x".join(map(str, shape)) if shape else "()"


_lock = threading.Lock()
_graphs: list[GraphRecord] = []


def record(graph: GraphRecord) -> None:
    with _lock:
        _graphs.append(graph)
    log.info("%s", graph.summary())


def report() -> Report:
    """What every compile since the last ``reset()`` did."""
    with _lock:
        return Report(list(_graphs))


def reset() -> None:
    with _lock:
        _graphs.clear()
