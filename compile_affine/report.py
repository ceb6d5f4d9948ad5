"""What the pass did: one ``SiteRecord`` per affine layer the user wrote, grouped per
compiled graph.

Records accumulate in-process until ``reset()``, so a user can compile, run and
then ask ``compile_affine.report()`` what happened (``explain.py`` does both on a copy
of a model). Only affines the user wrote are sites: the multiplies and
adds inside another op's decomposition (GELU's ``x * 0.5``, LayerNorm's ``x * rstd``)
are counted per graph (``GraphRecord.internal``) and named at DEBUG level, not listed.

Each compile's records are also written beside Inductor's caches (``record_store.py``), so a
graph that AOTAutograd's cache serves in a later process, where the pass does not run,
still reports the sites and decisions it was compiled with.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import threading
from collections import Counter
from typing import Iterator

from . import trace

log = logging.getLogger("compile_affine")


def _rank() -> int | None:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


@dataclasses.dataclass(frozen=True)
class SiteRecord:
    location: str
    """The user's source line for the affine, from node meta, or the node name."""
    module: str
    """The module the affine belongs to (``layer1.0.bn1``)."""
    producer_module: str
    """The module of the conv or linear it follows (``layer1.0.conv1``). With ``module``
    and ``location``: which layer it is, the same in every graph that compiles it."""
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
    """What the user wrote: ``affine`` (a multiply, divide or shift) or ``batch_norm``."""
    summary_reason: str | None = None
    """The reason in user terms for the one-line summary, e.g. ``weight larger than
    activation`` for a cost decline; ``reason`` when unset."""

    @property
    def short_reason(self) -> str | None:
        return self.summary_reason or self.reason


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
    internal: dict[str, int] = dataclasses.field(default_factory=dict)
    """Multiplies/adds on a conv or linear output that a decomposition of another op
    wrote (GELU, LayerNorm...), by that op: left alone, and not affine layers."""
    restored: bool = False
    """With ``cache_hit``: the sites are the ones recorded when the cache entry was made."""
    pass_s: float = 0.0
    """Seconds the pass itself took on this graph (part of the compile time)."""
    not_affine: dict[str, int] = dataclasses.field(default_factory=dict)
    """Multiplies and adds on a conv or linear output that are no affine layer, by what
    they are: per-sample gates or masks, residual adds, training-mode batch norms."""

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
        if self.cache_hit and not self.restored:
            return (f"{self.graph_name}: served from AOTAutograd's cache; no record of its sites was found, "
                    "it folds as the compile that made the cache entry did")
        name = f"{self.graph_name} (from cache)" if self.cache_hit else self.graph_name
        kinds = Counter(s.kind for s in self.sites)
        what = " and ".join(f"{n} {_KIND_NAMES.get(k, k)}{'s' if n != 1 else ''}" for k, n in sorted(kinds.items()))
        line = f"{name}: {what or 'no affine layers'}"
        if self.sites:
            parts = [f"{self.folded} folded"]
            declined = Counter(s.short_reason for s in self.sites if s.declined_by_cost)
            if declined:
                parts.append(f"{sum(declined.values())} declined by cost ({_counted(declined)})")
            left = Counter(s.short_reason for s in self.sites if not s.folded and not s.declined_by_cost)
            if left:
                parts.append(f"{sum(left.values())} left unfolded ({_counted(left)})")
            line += ": " + ", ".join(parts)
        if self.not_affine:
            line += "; " + not_affine_text(self.not_affine) + ": not affine layers"
        if self.epilogues:
            line += f"; fused {self.fused_epilogues} of {len(self.epilogues)} conv epilogues"
            left = Counter(e.reason for e in self.epilogues if not e.fused)
            if left:
                line += " (" + ", ".join(f"{n}: {r}" for r, n in left.most_common()) + ")"
        return line


_KIND_NAMES = {"affine": "affine layer", "batch_norm": "eval-mode batch norm"}


def _layer(s: SiteRecord) -> tuple[str, ...]:
    return (s.module, s.producer_module, s.location, s.kind)


def not_affine_text(counts: dict[str, int]) -> str:
    """``22 residual adds, 5 per-sample gates or masks``."""
    return ", ".join(f"{n} {_plural(what, n)}" for what, n in sorted(counts.items()))


def _plural(what: str, n: int) -> str:
    if n == 1:
        return what
    head, sep, tail = what.partition(" or ")  # gate or mask -> gates or masks
    return f"{head}s{sep}{tail}s" if sep else f"{what}s"


def _counted(reasons: Counter) -> str:
    if len(reasons) == 1:
        return next(iter(reasons))
    return ", ".join(f"{n}: {r}" for r, n in reasons.most_common())


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
        """How many sites were left unfolded for each reason (``SiteRecord.reason``), e.g.
        ``Counter({"fold='never'": 3})``; empty when every site folded. One count per
        site in each graph, as ``skipped`` counts them."""
        return Counter(s.reason for s in self.sites if not s.folded)

    def layers(self) -> dict[tuple[str, ...], list[SiteRecord]]:
        """Each affine layer the user wrote, once however many graphs compiled it (a
        recompile, a training and an eval graph), with its record in each."""
        layers: dict[tuple[str, ...], list[SiteRecord]] = {}
        for s in self.sites:
            layers.setdefault(_layer(s), []).append(s)
        return layers

    def summary(self) -> str:
        """``4 affine layers: 4 folded, across 3 graphs (2 compile layers compiled before)``."""
        layers = self.layers()
        folded = sum(all(s.folded for s in records) for records in layers.values())
        some = sum(any(s.folded for s in records) for records in layers.values()) - folded
        seen: set = set()
        repeats = 0
        for g in self.graphs:
            keys = {_layer(s) for s in g.sites}
            repeats += bool(keys) and keys <= seen
            seen |= keys
        text = f"{len(layers)} affine layer{'s' if len(layers) != 1 else ''}: {folded} folded"
        if some:
            text += f", {some} folded in some graphs only"
        text += f", {len(layers) - folded - some} not folded, across {len(self.graphs)} graph{'s' if len(self.graphs) != 1 else ''}"
        if repeats:
            text += f" ({repeats} of them compile{'s' if repeats == 1 else ''} layers compiled before: recompiles or another mode)"
        return text

    def __iter__(self) -> Iterator[SiteRecord]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __str__(self) -> str:
        header = ("graph", "location", "layer", "into", "output", "weight", "scale", "folded", "reason")
        rows = [
            (
                g.graph_name + (" (cached)" if g.cache_hit else ""),
                s.location,
                s.kind,
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
        lines.append(self.summary())
        lines += [g.summary() for g in self.graphs if g.fell_back or (g.cache_hit and not g.restored)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        epilogues = f", epilogues={self.fused_epilogues}" if self.epilogues else ""
        return f"Report(graphs={len(self.graphs)}, folded={self.folded}, skipped={self.skipped}{epilogues})"


def _shape(shape: tuple) -> str:
    return "x".join(map(str, shape)) if shape else "()"


_lock = threading.Lock()
_graphs: list[GraphRecord] = []
_graph_count = 0
_captures: contextvars.ContextVar[tuple[list[GraphRecord], ...]] = contextvars.ContextVar(
    "compile_affine_captures", default=()
)


def next_graph_name() -> str:
    """``graph N``, unique in this process (also across ``reset()`` and threads)."""
    global _graph_count
    with _lock:
        _graph_count += 1
        return f"graph {_graph_count - 1}"


def record(graph: GraphRecord) -> None:
    with _lock:
        _graphs.append(graph)
    for captured in _captures.get():
        captured.append(graph)
    log.info("%s", graph.summary())
    _notice(graph)
    trace.record(graph)  # the record as a TORCH_TRACE artifact (tlparse)
    if graph.internal:
        log.debug("%s: left out %d multiplies/adds written by decompositions of other ops (%s)",
                  graph.graph_name, sum(graph.internal.values()),
                  ", ".join(f"{op}: {n}" for op, n in sorted(graph.internal.items())))


notice_log = logging.getLogger("compile_affine.notice")
"""The one line a user sees by default (WARNING reaches stderr with logging unconfigured).
Off: ``logging.getLogger("compile_affine.notice").disabled = True``."""
_noticed = False


def _notice(graph: GraphRecord) -> None:
    """Once per process, on the first graph with sites: how many folded, and where to
    look. Without it, HF, Lightning and plain scripts (no logging set up) show nothing."""
    global _noticed
    with _lock:
        if _noticed or not graph.sites:
            return
        _noticed = True
    n, rank = len(graph.sites), "" if graph.rank is None else f"[rank {graph.rank}] "
    notice_log.warning("%scompile_affine: %d affine layer%s in the first graph, %d folded; compile_affine.report() "
                       "or TORCH_LOGS=+compile_affine for every graph and why", rank, n, "s" if n != 1 else "",
                       graph.folded)  # fmt: skip


@contextlib.contextmanager
def capture() -> Iterator[list[GraphRecord]]:
    """The graphs recorded inside the block, by this thread (and what it calls)."""
    graphs: list[GraphRecord] = []
    token = _captures.set((*_captures.get(), graphs))
    try:
        yield graphs
    finally:
        _captures.reset(token)


def report() -> Report:
    """What every compile since the last ``reset()`` did."""
    with _lock:
        return Report(list(_graphs))


def reset() -> None:
    with _lock:
        _graphs.clear()
