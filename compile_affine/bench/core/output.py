"""What the modes write: one result row per variant, markdown tables, a bar chart, and
files replaced whole (a run killed mid-write leaves the previous version)."""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Iterator

from .runner import Variant

BASELINE = "none / inductor"
"""The variant every ``ratio`` is against (the group's first where it is missing)."""
COLUMNS = [
    ("scenario", "scenario"), ("variant", "variant"), ("step_ms", "step ms"), ("fwd_ms", "fwd ms"),
    ("bwd_ms", "bwd ms"), ("ratio", "x none/inductor"), ("ratio_vs_stock_same_net", "x stock same net"),
    ("traffic_mib", "moved MiB"), ("traffic_ratio", "moved x none/inductor"),
    ("saved_mib", "saved MiB"), ("compile_s", "compile s"), ("pass_s", "pass s"), ("folds", "folds"),
]  # fmt: skip
JSON_ONLY = {"traffic_bytes"}


def row(scenario: str, v: Variant, group: list[Variant], peak: bool = False) -> dict:
    """``v``'s measurements, its ratios against ``BASELINE`` and stock Inductor on the same net;
    ``peak`` (gpu-check): the step's peak memory too."""
    base = next((b for b in group if b.name == BASELINE), group[0])
    stock_same_net = next((b for b in group if b.net == v.net and b.backend == "inductor"), None)
    timed = bool(v.fwd_ms)  # traffic mode times nothing
    return {
        "scenario": scenario, "variant": v.name, "step_ms": round(v.step, 2) if timed else None,
        "fwd_ms": round(v.fwd, 2) if timed else None, "bwd_ms": round(v.bwd, 2) if timed else None,
        "ratio": round(v.step / base.step, 3) if timed else None,
        "ratio_vs_stock_same_net": round(v.step / stock_same_net.step, 3) if timed and stock_same_net else None,
        "traffic_bytes": v.traffic_bytes,
        "traffic_mib": None if v.traffic_bytes is None else round(v.traffic_bytes / 2**20, 1),
        "traffic_ratio": ratio(v.traffic_bytes, base.traffic_bytes),
        "saved_mib": round(v.saved_mib, 1) if timed else None, "compile_s": round(v.compile_s, 1) if timed else None,
        "pass_s": None if v.pass_s is None else round(v.pass_s, 2), "folds": v.folds,
        **({"peak_mib": None if v.peak_mib is None else round(v.peak_mib, 1)} if peak else {}),
    }  # fmt: skip


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def table(rows: list[dict], columns: list[tuple[str, str]], pad: bool = False, extra: bool = False) -> str:
    """Markdown, one column per (key, header), "-" where a row has no value. ``pad``: cells
    padded to their column's width; ``extra``: only the columns some row has, then every
    other key the rows carry (but ``JSON_ONLY``'s)."""
    if extra:
        columns = [(k, h) for k, h in columns if any(k in r for r in rows)]
        columns += [(k, k) for k in dict.fromkeys(k for r in rows for k in r) if k not in dict(columns) and k not in JSON_ONLY]
    cells = [[h for _, h in columns]] + [["-" if r.get(k) is None else str(r[k]) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) if pad else 0 for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) if pad else "---" for w in widths) + "|")
    return "\n".join(lines)


def plot(rows: list[dict], key: str, ylabel: str, path: str | pathlib.Path, title: str | None = None) -> None:
    """A bar per row of ``row[key]``, labelled by scenario and variant, against a line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    ax.bar(range(len(rows)), [r[key] for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), [f"{r['scenario']}\n{r['variant']}" for r in rows], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with replaced(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


@contextlib.contextmanager
def replaced(path: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """A path beside ``path`` (same suffix) to write; renamed onto ``path`` after, in one step."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    yield tmp
    os.replace(tmp, path)
