"""The ``CustomGraphPass`` Inductor runs on each joint (or inference) graph:
find sites, decide per site, rewrite, record."""

from __future__ import annotations

import logging
import pathlib
import re
import time
from collections import Counter

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import stable_topological_sort

from .. import report, trace
from ..settings import EXCLUDED, Settings
from . import cost, legality, rewrite
from .epilogue import fuse_epilogues
from .sites import TRAINING_BATCH_NORM, BatchNorm, InputMutations, Site, backward_region, find_batch_norms, find_sites

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
        """Which inputs of the graph being compiled it mutates (see backend.mutated_inputs)."""
        self.calls = 0
        self.records: list[report.GraphRecord] = []
        """What this pass recorded (one backend call), for the copy kept beside the cache."""

    def uuid(self) -> bytes:
        return get_hash_for_files(_SOURCES, extra=f"{self.settings!r} {self.mutations!r}")

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
    training = bool(backward_region(gm.graph))
    record = report.GraphRecord(graph_name=report.next_graph_name(), training=training)
    # Normalising (a batch norm into the generic form, a unit factor or a clone dropped)
    # only serves a fold. If none follows, Inductor must get the graph exactly as it came:
    # same nodes, same rounding, same aliasing (docs/design.md, "What stays as stock").
    original = copy_graph(gm.graph)
    normalised = _normalise_batch_norms(gm, settings, mutations, record)
    normalised |= rewrite.drop_addcmul_unit_factors(gm.graph)
    normalised |= rewrite.drop_clones_of_convolutions(gm.graph)
    # A fold turns ``conv * s1 + t1`` into a conv, which makes a following ``* s2`` a new
    # site (with the backward shape autograd would have given it): repeat until a round
    # folds nothing, so chains of affines fold into one conv.
    judged: set[fx.Node] = set()
    internal: Counter[str] = Counter()
    while True:
        found = [site for site in find_sites(gm, mutations)
                 if site.anchor not in judged and not site.anchor.meta.get(rewrite.REFUSED_BATCH_NORM)]  # fmt: skip
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
            if what := site.not_an_affine_layer():
                record.not_affine[what] = record.not_affine.get(what, 0) + 1
                log.debug("%s %s: not an affine layer", what, _location(site.anchor))
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
        record.epilogues = fuse_epilogues(gm, _location)
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


def _normalise_batch_norms(gm: fx.GraphModule, settings: Settings, mutations: InputMutations,
                           record: report.GraphRecord) -> bool:
    """Eval-mode batch norms become generic sites (``rewrite.batchnorm``); those that may
    not are recorded here, and their ``sub(y, rm)`` is not judged again as a bare shift."""
    normalised = False
    for bn in find_batch_norms(gm, mutations):
        facts = _batch_norm_facts(bn)
        reason = legality.batch_norm_problem(bn)
        if reason != legality.TRAINING_MODE_BATCH_NORM:  # not a site at all, excluded or not
            selected = settings.selects(facts["module"], facts["producer_module"])
            reason = (None if selected else EXCLUDED) or reason or ("fold='never'" if settings.fold == "never" else None)
        if reason is None:
            anchor = rewrite.normalise_batch_norm(gm.graph, bn)
            # The normalised conv is emitted with the batch norm's module stack; give it
            # back its own, so the report (and ``exclude``) name the conv as its producer.
            if bn.linear is None and "nn_module_stack" in bn.y.meta:
                anchor.args[0].meta["nn_module_stack"] = bn.y.meta["nn_module_stack"]
            normalised = True
            continue
        for sub in (bn.sub, *bn.backward_subs):
            sub.meta[rewrite.REFUSED_BATCH_NORM] = True
        log.debug("batch norm %s: %s", _location(bn.norm), reason)
        if reason == legality.TRAINING_MODE_BATCH_NORM:
            # Normalised by its batch's statistics: no fixed affine to fold, so not a site.
            record.not_affine[TRAINING_BATCH_NORM] = record.not_affine.get(TRAINING_BATCH_NORM, 0) + 1
            continue
        record.sites.append(report.SiteRecord(**facts, folded=False, reason=reason))
    return normalised


def _batch_norm_facts(bn: BatchNorm) -> dict:
    weight = bn.linear.weight if bn.linear is not None else bn.y.args[1]
    return dict(location=_location(bn.norm), module=_module(bn.norm), producer_module=_module(bn.producer_node),
                producer=bn.producer, output_shape=_shape(bn.y), weight_shape=_shape(weight),
                scale_shape=(bn.channels,), kind="batch_norm")


def _decide_and_fold(graph: fx.Graph, site: Site, settings: Settings) -> report.SiteRecord:
    site.refresh()
    shift_problem = legality.shift_problem(site)
    if shift_problem and not site.shift_only:
        site.drop_shift()  # fold the multiply alone; the add stays
    facts = _facts(site)  # before the rewrite erases the nodes
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


def _facts(site: Site) -> dict:
    return dict(
        location=_location(site.anchor),
        module=_module(site.anchor),
        producer_module=_module(site.producer_node),
        kind=site.kind,
        producer=site.producer,
        output_shape=_shape(site.y),
        weight_shape=_shape(site.weight),
        scale_shape=_shape(site.scale),
    )


def _shape(n) -> tuple:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    # A symbolic size is shown as its expression (``s0``): records must outlive the graph.
    return tuple(d if isinstance(d, int) else str(d) for d in val.shape) if val is not None else ()


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _location(node: fx.Node) -> str:
    """The innermost user frame of the affine, e.g. ``model.py:42 in forward``."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    if not frames:
        return node.name
    path, line, func = frames[-1]
    return f"{pathlib.Path(path).name}:{line} in {func}"


def _module(node: fx.Node) -> str:
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
