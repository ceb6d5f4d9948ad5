"""The normalisations, in order: each ``fn(gm, facts, settings, record)`` turns a form the
generic recognition cannot see into the generic one, value for value, and says whether
it changed the graph. They only serve a fold: ``fold.run`` restores the graph as it came
if none follows (docs/design.md, "What stays as stock").
"""

from __future__ import annotations

import logging
from typing import Callable

import torch.fx as fx

from ... import report
from ...settings import EXCLUDED, Settings
from .. import legality
from ..describe import location, module_of, shape
from ..graph import ALREADY_JUDGED, GraphFacts
from .batchnorm import EvalBatchNorm, find_eval_batch_norms, normalise
from .forms import addcmul_unit_factors, clones_of_convolutions

log = logging.getLogger("compile_affine")


def eval_batch_norms(gm: fx.GraphModule, facts: GraphFacts, settings: Settings, record: report.GraphRecord) -> bool:
    """Eval-mode batch norms become generic sites (``batchnorm.normalise``); those that may
    not are recorded here, and their ``sub(y, rm)`` is not judged again as a bare shift."""
    normalised = False
    for bn in find_eval_batch_norms(gm, facts):
        fields = _batch_norm_facts(bn)
        reason = legality.batch_norm_problem(bn)
        if reason != legality.TRAINING_MODE_BATCH_NORM:  # not a site at all, excluded or not
            selected = settings.selects(fields["module"], fields["producer_module"])
            reason = (None if selected else EXCLUDED) or reason or ("fold='never'" if settings.fold == "never" else None)
        if reason is None:
            anchor = normalise(gm.graph, bn)
            # The normalised conv is emitted with the batch norm's module stack; give it
            # back its own, so the report (and ``exclude``) name the conv as its producer.
            if bn.linear is None and "nn_module_stack" in bn.y.meta:
                anchor.args[0].meta["nn_module_stack"] = bn.y.meta["nn_module_stack"]
            normalised = True
            continue
        for sub in (bn.sub, *bn.backward_subs):
            sub.meta[ALREADY_JUDGED] = True
        log.debug("batch norm %s: %s", location(bn.norm), reason)
        if reason == legality.TRAINING_MODE_BATCH_NORM:
            # Normalised by its batch's statistics: no fixed affine to fold, so not a site.
            what = legality.TRAINING_BATCH_NORM
            record.not_affine[what] = record.not_affine.get(what, 0) + 1
            continue
        record.sites.append(report.SiteRecord(**fields, folded=False, reason=reason))
    return normalised


def _batch_norm_facts(bn: EvalBatchNorm) -> dict:
    """The ``SiteRecord`` fields that describe a batch norm that stays as it is."""
    weight = bn.linear.weight if bn.linear is not None else bn.y.args[1]
    return dict(location=location(bn.norm), module=module_of(bn.norm), producer_module=module_of(bn.producer_node),
                producer=bn.producer, output_shape=shape(bn.y), weight_shape=shape(weight),
                scale_shape=(bn.channels,), kind="batch_norm")


Step = Callable[[fx.GraphModule, GraphFacts, Settings, report.GraphRecord], bool]


def _form(fn: Callable[[fx.GraphModule, GraphFacts], bool]) -> Step:
    """A normalisation that needs neither the settings nor the record."""
    return lambda gm, facts, settings, record: fn(gm, facts)


STEPS: tuple[Step, ...] = (
    eval_batch_norms,
    _form(addcmul_unit_factors),
    _form(clones_of_convolutions),
)
"""Run in this order, each on the graph the one before left."""
