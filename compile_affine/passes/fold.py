"""The ``CustomGraphPass`` Inductor runs on each joint (or inference) graph:
find sites, decide per site, rewrite, record."""

from __future__ import annotations

import logging
import pathlib
import time
from collections import Counter

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import stable_topological_sort

from .. import report, trace
from ..settings import EXCLUDED, Settings
from . import cost, legality, rewrite, target
from .describe import location, site_facts
from .epilogue import fuse_epilogues
from .graph import ALREADY_JUDGED
from .mutations import InputMutations, graph_facts
from .normalise.steps import STEPS
from .sites.base import Site
from .sites.find import find_sites

log = logging.getLogger("compile_affine")

_PACKAGE = pathlib.Path(__file__).resolve().parent.parent
# Every module of the package but the benchmark's is hashed into the uuid: any of them
# may shape what the pass emits (``_compat`` does), and one added later is covered
# without anyone remembering to list it. A stale FX-cache hit is a silent miscompile.
_SOURCES = tuple(sorted(str(p) for p in _PACKAGE.rglob("*.py") if p.relative_to(_PACKAGE).parts[0] != "bench"))


class AffineFoldError(RuntimeError):
    """The pass itself failed (a bug on our side). The backend falls back on it."""


class AffineFoldPass(CustomGraphPass):
    def __init__(self, settings: Settings, mutations: InputMutations = InputMutations()):
        self.settings = settings
        self.mutations = mutations
        """Which inputs of the graph being compiled it mutates (``mutations.mutated_inputs``)."""
        self.calls = 0
        self.records: list[report.GraphRecord] = []
        """What this pass recorded (one backend call), for the copy kept beside the cache."""

    def uuid(self) -> bytes:
        return get_hash_for_files(_SOURCES, extra=f"{self.settings!r} {self.mutations!r} {target.override()!r}")

    def __call__(self, graph: fx.Graph) -> None:
        self.calls += 1
        gm = graph.owning_module
        before = trace.graph_text(gm) if trace.graphs_wanted() else None  # the pass edits in place
        t0 = time.perf_counter()
        try:
            record = run(gm, self.settings, self.mutations)
        except Exception as e:
            raise AffineFoldError(f"compile_affine pass failed: {type(e).__name__}: {e}") from e
        record.pass_s = time.perf_counter() - t0
        self.records.append(record)
        report.record(record)
        if before is not None:
            trace.graphs(record.graph_name, before, gm)


def run(gm: fx.GraphModule, settings: Settings, mutations: InputMutations = InputMutations()) -> report.GraphRecord:
    # Normalising (a batch norm into the generic form, a unit factor or a clone dropped)
    # only serves a fold. If none follows, Inductor must get the graph exactly as it came:
    # same nodes, same rounding, same aliasing (docs/design.md, "What stays as stock").
    original = copy_graph(gm.graph)
    facts = graph_facts(gm, mutations)
    record = report.GraphRecord(graph_name=report.next_graph_name(), training=bool(facts.backward))
    normalised = False
    for step in STEPS:
        normalised |= step(gm, facts, settings, record)
    # A fold turns ``conv * s1 + t1`` into a conv, which makes a following ``* s2`` a new
    # site (with the backward shape autograd would have given it): repeat until a round
    # folds nothing, so chains of affines fold into one conv.
    judged: set[fx.Node] = set()
    internal: Counter[str] = Counter()
    while True:
        found = [site for site in find_sites(gm, graph_facts(gm, mutations))
                 if site.anchor not in judged and not site.anchor.meta.get(ALREADY_JUDGED)]  # fmt: skip
        # A shift judged with its multiply (and left as an add) is not a new site later.
        judged.update(n for site in found for n in (site.anchor, site.shift_node) if n is not None)
        # GELU's ``y * 0.5`` on a linear output is not an affine layer: never folded
        # (its output is always reused), never listed, only counted. Nor are gates,
        # masks and residual adds: counted in the user's words.
        internal.update(site.decomposed_from for site in found if site.decomposed_from)
        new_sites = []
        for site in found:
            if site.decomposed_from:
                continue
            if what := legality.not_an_affine_layer(site):
                record.not_affine[what] = record.not_affine.get(what, 0) + 1
                log.debug("%s %s: not an affine layer", what, location(site.anchor))
                continue
            new_sites.append(site)
        records = [_decide_and_fold(gm.graph, site, settings) for site in new_sites]
        record.sites += records
        if not any(r.folded for r in records):
            break
    record.internal = dict(internal)
    if record.folded:
        stable_topological_sort(gm.graph)  # a linear fold emits nodes where their inputs are not all defined yet
        gm.graph.lint()
        gm.recompile()
    elif normalised:
        gm.graph = original  # the setter recompiles
    if settings.epilogue == "auto":
        record.epilogues = fuse_epilogues(gm, location)
    return record


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A node-for-node copy (same names, meta, order and codegen) of ``graph``."""
    twin = fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls,
                    tracer_extras=graph._tracer_extras)  # fmt: skip
    twin._codegen = graph._codegen
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        env[node] = twin.node_copy(node, env.__getitem__)
    return twin


def _decide_and_fold(graph: fx.Graph, site: Site, settings: Settings) -> report.SiteRecord:
    site.refresh()
    shift_problem = legality.shift_problem(site)
    if shift_problem and not site.shift_only:
        site.drop_shift()  # fold the multiply alone; the add stays
    facts = site_facts(site)  # before the rewrite erases the nodes
    # ``modules``/``exclude`` first: the user's word, reported as such even where a
    # legality rule would also have refused the site.
    reason = None if settings.selects(facts["module"], facts["producer_module"]) else EXCLUDED
    reason = reason or (shift_problem if site.shift_only else None)
    reason = reason or legality.check(site)
    declined, summary_reason = False, None
    if reason is None and settings.fold == "never":
        reason = "fold='never'"
    if reason is None and settings.fold == "auto":
        estimate = cost.estimate(site, settings.activation_ratio)
        if not estimate.pays:
            reason, summary_reason, declined = estimate.reason(), estimate.short_reason(), True
    if reason is None:
        keep_mask_float = cost.recomputes_relu_mask(site, settings.objective)  # before the rewrite erases g * y
        folded = rewrite.fold_site(graph, site)
        if keep_mask_float:
            rewrite.recompute_relu_masks(folded)
    log.debug("site %s: %s", facts["location"], reason or "folded")
    return report.SiteRecord(**facts, folded=reason is None, reason=reason, declined_by_cost=declined,
                             summary_reason=summary_reason)
