"""What the pass did, in PyTorch's own trace and logs.

* Every ``GraphRecord`` becomes a structured-trace artifact ``compile_affine_report``
  (JSON, the record as ``dataclasses.asdict`` gives it), so ``TORCH_TRACE=dir`` and
  tlparse show it beside Inductor's artifacts, under the compile that made it.
* ``TORCH_LOGS="compile_affine_graphs"`` logs each graph the pass sees before and after
  it ran; with ``TORCH_TRACE`` they are also the artifacts ``compile_affine_graph_before``
  and ``compile_affine_graph_after`` (strings, the graph's readable code).

Torch parses ``TORCH_LOGS`` when it is imported, before any plugin can register a name,
and accepts a name it does not know only if it is an importable module. So the graphs go
to a log named after the top-level stub module ``compile_affine_graphs`` (shipped beside
the package), not to an artifact of the ``compile_affine`` log: ``TORCH_LOGS=+compile_affine``
then does not dump whole graphs, as Inductor's graph artifacts are off by default.

Tracing is best effort: a torch whose ``trace_structured`` differs costs the artifact,
never the compile.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable

from torch._logging import trace_structured

log = logging.getLogger("compile_affine")
GRAPHS_LOG = "compile_affine_graphs"
graphs_log = logging.getLogger(GRAPHS_LOG)

REPORT_ARTIFACT = "compile_affine_report"
BEFORE_ARTIFACT = "compile_affine_graph_before"
AFTER_ARTIFACT = "compile_affine_graph_after"


def tracing() -> bool:
    """Whether ``TORCH_TRACE`` (structured tracing) is on: its handler has a folder.
    Torch's own test, "the trace log has a handler", holds in any process until the
    first artifact (and under pytest, whose capture handlers sit there too)."""
    try:
        from torch._logging._internal import LazyTraceHandler, trace_log

        return any(isinstance(h, LazyTraceHandler) and bool(h.root_dir or h.stream) for h in trace_log.handlers)
    except Exception:  # another torch's internals: no graph dumps in the trace
        return False


def graphs_logged() -> bool:
    """Whether ``TORCH_LOGS`` (or ``torch._logging.set_logs(compile_affine_graphs=...)``)
    asked for the graphs. Torch's log state, not the logger's level: a root logger at
    INFO (``logging.basicConfig``, pytest) must not dump every graph."""
    try:
        from torch._logging import _internal

        return GRAPHS_LOG in dict(_internal.log_state.get_log_level_pairs())
    except Exception:  # another torch's internals: fall back to the logger's own level
        return graphs_log.isEnabledFor(logging.INFO)


def graphs_wanted() -> bool:
    """Whether the graph before the pass must be kept as text for a dump."""
    return graphs_logged() or tracing()


def artifact(name: str, encoding: str, payload_fn: Callable[[], Any]) -> None:
    """One ``trace_structured`` artifact, as Inductor writes its own (the payload is
    made lazily, only when tracing is on)."""
    try:
        trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": encoding}, payload_fn=payload_fn)
    except Exception as e:  # another torch's signature or a trace handler's error: no artifact
        log.debug("could not write the %s artifact to the trace: %s: %s", name, type(e).__name__, e)


def record(graph: Any) -> None:
    """A ``GraphRecord`` into the trace, with its ``folded`` count (a property)."""
    artifact(REPORT_ARTIFACT, "json", lambda: json.dumps({**dataclasses.asdict(graph), "folded": graph.folded}, default=str))


def graph_text(gm: Any) -> str:
    try:
        return gm.print_readable(print_output=False, include_stride=True, include_device=True)
    except Exception as e:  # a dump must never fail the compile
        return f"<could not print the graph: {type(e).__name__}: {e}>"


def graphs(name: str, before: str, gm: Any) -> None:
    """The graph ``name`` before the pass (``before``, kept as text) and after it (``gm``)."""
    if graphs_logged():
        graphs_log.info("%s before compile_affine:\n%s", name, before)
        graphs_log.info("%s after compile_affine:\n%s", name, graph_text(gm))
    artifact(BEFORE_ARTIFACT, "string", lambda: f"# {name} before compile_affine\n{before}")
    artifact(AFTER_ARTIFACT, "string", lambda: f"# {name} after compile_affine\n{graph_text(gm)}")
