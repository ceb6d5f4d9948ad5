"""`make gpu-check` must work the first time it meets a GPU: its dry run (every section,
on CPU, at tiny sizes) runs here end to end and writes what the GPU run would.
Nothing here looks at the times."""

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

import compile_affine.bench.__main__ as bench
from compile_affine.bench.modes.gpu_check import plan as gpu_plan
from compile_affine.bench.modes.gpu_check import pytest_run
from compile_affine.bench.modes.gpu_check import sections as gpu_sections
from compile_affine.bench.core.measure import CLASSES, kernel_class
from compile_affine.bench.core.runner import Runner, Variant

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_section(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "compile_affine.bench", "gpu-check", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert {"gpu-check.json", "gpu-check.md", "gpu-check.png", "gpu-check-tests.log"} <= set(files)
    assert len(files) <= 8  # what comes back from the device machine
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert result["device"] == "cpu" and result["thresholds"]["time"] > result["thresholds"]["memory"] > 0
    sections = result["sections"]
    assert list(sections) == list(gpu_plan.SECTIONS)
    assert {n: s["status"] for n, s in sections.items()} == dict.fromkeys(gpu_plan.SECTIONS, "ok")
    for section, pairs in (("resnet", gpu_plan.RESNET_VARIANTS), ("resnet-fp32", gpu_plan.RESNET_VARIANTS),
                           ("finetune", gpu_plan.FINETUNE_VARIANTS)):  # fmt: skip
        rows = {r["variant"]: r for r in sections[section]["rows"]}
        assert set(rows) == {f"{n} / {b}" for n, b in pairs}
        # One profiled step per variant, split by kernel class.
        assert all(set(r) >= {f"{c} ms" for c in CLASSES} for r in rows.values())
        ours = rows[next(f"{n} / {b}" for n, b in pairs if b == "compile_affine")]
        folds = ours["folds"]
        # Under autocast an eval-mode batch norm is refused; the finetune section runs fp32.
        assert folds not in ("-", "") and not folds.startswith("0/"), (section, folds)
        assert all(r["traffic_bytes"] > 0 for r in rows.values())
    assert "bf16 autocast, channels_last" in sections["resnet"]["rows"][0]["scenario"]
    assert all(r["step_ms"] > 0 for s in ("resnet", "blocks", "max-autotune") for r in sections[s]["rows"])
    autotune = {r["variant"]: r for r in sections["max-autotune"]["rows"]}
    assert autotune["affine / compile_affine-max-autotune"]["folds"] == "1/1"
    assert {r["variant"] for r in sections["blocks"]["rows"]} == {f"{n} / {b}" for n, b in gpu_plan.BLOCK_VARIANTS}
    assert "## resnet: ok" in (tmp_path / "gpu-check.md").read_text()
    # Progress lines carry the elapsed time.
    assert "[gpu-check +" in proc.stderr


def test_without_a_gpu_one_line_and_exit_0(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["gpu-check", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]
    assert not any(tmp_path.iterdir())


def test_pytest_summary_of_a_run_cut_off():
    cut = "tests/test_a.py::test_x[cuda] PASSED [ 10%]\ntests/test_a.py::test_y[cuda] FAILED [ 20%]\n"
    assert pytest_run._pytest_summary(cut) == "1 passed, 1 failed"
    done = cut + "=========== 1 failed, 1 passed, 200 deselected in 3.00s ===========\n"
    assert pytest_run._pytest_summary(done) == "1 failed, 1 passed, 200 deselected in 3.00s"


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown section"):
        bench.main(["gpu-check", "--dry-run", "--only", "resnet,nope", "--out", str(tmp_path)])


def test_gpu_blocks_bracket_the_gpu_default():
    from compile_affine.settings import TRAFFIC_BREAK_EVEN

    ratios = [gpu_sections._act_per_weight(s, torch.bfloat16) for s in gpu_plan.GPU_BLOCKS]  # as they run
    assert min(ratios) < TRAFFIC_BREAK_EVEN / 2 and max(ratios) > 2 * TRAFFIC_BREAK_EVEN


def test_a_run_killed_mid_way_leaves_the_sections_it_finished(tmp_path):
    """SIGKILL after the first section: its JSON and table are already on disk, whole."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OUT": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "compile_affine.bench", "gpu-check", "--dry-run", "--only", "blocks,resnet"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    path, deadline = tmp_path / "gpu-check.json", time.monotonic() + 600
    try:
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have ended on its own
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result = json.loads(path.read_text())
    assert result["sections"]["blocks"]["status"] == "ok" and result["sections"]["blocks"]["rows"]
    assert "## blocks: ok" in (tmp_path / "gpu-check.md").read_text()


def test_kernel_classes():
    assert kernel_class("triton_poi_fused_add_mul_relu_0") == "triton pointwise"
    assert kernel_class("triton_red_fused_sum_1") == kernel_class("triton_per_fused_sum_2") == "triton reduction"
    assert kernel_class("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert kernel_class("cudnn::engines_precompiled::nchwToNhwcKernel") == "convolution"
    assert kernel_class("Memcpy DtoD (Device -> Device)") == "other"
    assert kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "other"  # the fc layer's GEMM


class _FakeRunner(Runner):
    """Steps that cost nothing: only the deadline logic runs."""

    def prepare(self, v, warmup, measure=True):
        v.compile_s = 0.0

    def step(self, v):
        return 1.0, 1.0


def test_runner_deadline_cuts_variants_and_rounds():
    runner = _FakeRunner("cpu", torch.float32)
    variants = [Variant("n", "inductor", torch.nn.Identity(), torch.zeros(1)) for _ in range(3)]
    ready = runner.run(variants, steps=4, warmup=0, deadline=time.monotonic() - 1)  # already past
    assert ready == variants[:1] and len(ready[0].fwd_ms) == 1  # the first variant, one round
    plan = dataclasses.replace(gpu_plan.DRY_PLAN, steps=4)
    assert gpu_sections._cut(plan, variants, ready).startswith("deadline: 1 of 4 rounds; not compiled: ")
    fresh = [Variant("n", "inductor", torch.nn.Identity(), torch.zeros(1)) for _ in range(2)]
    assert runner.run(fresh, steps=4, warmup=0, deadline=time.monotonic() + 60) == fresh
    assert gpu_sections._cut(plan, fresh, fresh) is None
    assert runner.run([], steps=4) == []


def test_the_twins_prediction_is_read_for_the_gpu_plan_only():
    """``make gpu-check`` prints the GPU twin's byte count (bench/twin/predicted.json, made
    by ``gpu-codegen --predict``) beside what it measures, for the nets, dtype, layout and
    sizes the twin compiled: the GPU plan's bf16 and eval-BN sections, not its fp32 ResNet
    nor the dry run's tiny stand-in."""
    twin = gpu_sections.predicted(gpu_plan.GPU_PLAN, "resnet bf16 channels_last")
    assert twin is not None and twin["device"] == "h200" and twin["torch"].startswith("2.11")
    variants = {f"{net}/{backend}" for net, backend in gpu_plan.RESNET_VARIANTS}
    assert set(twin["bytes"]) == variants and all(b > 0 for b in twin["bytes"].values())
    assert set(gpu_sections.predicted(gpu_plan.GPU_PLAN, "finetune fp32 channels_last")["bytes"]) == {
        f"{net}/{backend}" for net, backend in gpu_plan.FINETUNE_VARIANTS}
    assert gpu_sections.predicted(gpu_plan.GPU_PLAN, "resnet fp32 channels_last") is None
    assert gpu_sections.predicted(gpu_plan.DRY_PLAN, "resnet bf16 channels_last") is None
