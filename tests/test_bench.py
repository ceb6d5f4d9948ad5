"""The benchmark CLI runs end to end on a tiny configuration and writes valid JSON.
(Benchmarks are not tests: nothing here looks at the times.)"""

import json

import compile_affine.bench.__main__ as bench
from compile_affine.bench.core.runner import parse_variants
from compile_affine.bench.modes.blocks import BLOCK_VARIANTS


def test_blocks_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "blocks.json"
    plot = tmp_path / "blocks.png"
    argv = ["blocks", "--shapes", "6", "--steps", "2", "--warmup", "0", "--variants",
            "affine/inductor,affine/compile_affine-always", "--json", str(out), "--plot", str(plot)]  # fmt: skip
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["command"].startswith("python -m compile_affine.bench blocks")
    assert {"cpu", "cores", "threads", "torch"} <= set(data["machine"])
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["affine / compile_affine-always"]["folds"] == "4/4"
    assert rows["affine / inductor"]["folds"] == "-"
    # The pass's own share of the compile: timed for our variant only.
    assert 0 < rows["affine / compile_affine-always"]["pass_s"] < rows["affine / compile_affine-always"]["compile_s"] + 1
    assert rows["affine / inductor"]["pass_s"] is None
    assert all(r["step_ms"] > 0 and r["saved_mib"] > 0 for r in data["rows"])
    assert plot.stat().st_size > 0
    assert "| scenario" in capsys.readouterr().out


def test_unknown_backend_is_rejected():
    import pytest

    with pytest.raises(SystemExit, match="unknown backend"):
        parse_variants("affine/tvm", BLOCK_VARIANTS)
