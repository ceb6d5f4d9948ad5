"""The report's records kept beside Inductor's caches, so a graph that AOTAutograd's
cache serves in a later process, where the pass does not run, still reports the sites
and decisions it was compiled with (docs/design.md, "The report and AOTAutograd's cache")."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
from typing import Any

from .report import EpilogueRecord, GraphRecord, SiteRecord, _rank, next_graph_name

log = logging.getLogger("compile_affine")


def _records_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.path.join(cache_dir(), "compile_affine")


def persist(key: str, graphs: list[GraphRecord]) -> None:
    """Keep what this compile recorded beside Inductor's caches under ``key`` (see
    ``backend.records_key``). Best effort: a read-only cache dir only costs the report."""
    payload = [dataclasses.asdict(g) for g in graphs]
    path = os.path.join(_records_dir(), f"{key}.json")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, default=str)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("could not keep the report beside the cache: %s", e)
        return
    prune_records(os.path.dirname(path))


MAX_RECORDS = 2000
"""Record files ``persist`` keeps (each a few KiB): the newest by mtime. A pruned record
only costs the report of a later cache hit ("served from cache; no records")."""


def prune_records(folder: str, keep: int | None = None) -> int:
    """Delete all but the ``keep`` (default ``MAX_RECORDS``) newest ``*.json`` records in
    ``folder``; returns how many went. Best effort and race-tolerant: another process may
    prune or write alongside."""
    keep = MAX_RECORDS if keep is None else keep
    try:
        with os.scandir(folder) as entries:
            records = [(e.stat().st_mtime, e.path) for e in entries if e.name.endswith(".json") and e.is_file()]
    except OSError:
        return 0
    if len(records) <= keep:
        return 0
    records.sort(reverse=True)
    removed = 0
    for _, path in records[keep:]:
        with contextlib.suppress(OSError):
            os.remove(path)
            removed += 1
    return removed


def restore(key: str) -> list[GraphRecord] | None:
    """The records ``persist`` kept under ``key``, renamed for this process; None if absent."""
    path = os.path.join(_records_dir(), f"{key}.json")
    try:
        with open(path) as f:
            payload = json.load(f)
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: pruning keeps the most recently used records
        graphs = []
        for g in payload:
            g = dict(g, graph_name=next_graph_name(), cache_hit=True, restored=True, rank=_rank(), pass_s=0.0)
            g["sites"] = [SiteRecord(**_tuples(s)) for s in g["sites"]]
            g["epilogues"] = [EpilogueRecord(**_tuples(e)) for e in g["epilogues"]]
            graphs.append(GraphRecord(**g))
    except FileNotFoundError:
        return None
    except Exception as e:  # unreadable or from another layout: the report says it has none
        log.debug("ignoring the kept report %s: %s: %s", path, type(e).__name__, e)
        return None
    return graphs


RECORDS_LAYOUT = tuple(f.name for cls in (GraphRecord, SiteRecord, EpilogueRecord) for f in dataclasses.fields(cls))
"""Part of the key the records are kept under: a changed record layout never reads old files."""


def _tuples(fields: dict[str, Any]) -> dict[str, Any]:
    """JSON gives lists where the records hold shape tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
