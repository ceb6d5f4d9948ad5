"""``python -m compile_affine.bench zoo``: third-party timm and torchvision models that
carry affines, built as users build them (``pretrained=False``: nothing is downloaded).

For each model: what the pass found, folded, declined and refused (from ``report()``);
saved-for-backward bytes and training-step time against stock Inductor, interleaved;
fp32 agreement with eager, the error of both compiled runs and of eager itself against
a float64 eager run, and a float64 run of the pass (``fold="always"``) executed as FX
graphs against float64 eager.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import traceback
from collections import Counter
from typing import Callable

import torch
import torch.nn as nn

import compile_affine
from compile_affine.settings import Settings

from .models import NormEval
from .runner import Runner, Variant, progress


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    source: str
    """Where the model comes from, as a user would write it."""
    carries: str
    """The affines the model's own source applies, checked against that source."""
    make: Callable[..., nn.Module]
    size: int
    """Default input resolution for the benchmark."""
    kwargs: dict = dataclasses.field(default_factory=dict)
    """Benchmark-size arguments to ``make`` (reduced depth where compile time asks for it)."""
    tiny: dict | None = None
    """Arguments for the tests' tiny version; None: the tests do not build this one."""
    tiny_size: int = 32
    default: bool = True
    """In the default run (``--models`` unset)."""
    est_s: int = 60
    """Rough wall time of one entry at default sizes on the 2-core CPU, compile included."""

    sized: bool = False
    """The model is built for one input size (``img_size=``): timm's ViTs and MLPs."""

    def build(self, tiny: bool = False, size: int | None = None) -> nn.Module:
        torch.manual_seed(0)
        kwargs = dict(self.tiny if tiny else self.kwargs)
        if self.sized:
            kwargs["img_size"] = self.tiny_size if tiny else (size or self.size)
        model = self.make(**kwargs)
        randomize_affines(model)
        return model


def _timm(arch: str) -> Callable[..., nn.Module]:
    def make(**kwargs) -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)

    return make


def _resmlp(num_blocks: int = 12, **kwargs) -> nn.Module:
    # resmlp_12_224's own arguments; its factory fixes num_blocks, so build its class directly.
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    return MlpMixer(patch_size=16, num_blocks=num_blocks, embed_dim=384, mlp_ratio=4, block_layer=ResBlock,
                    norm_layer=Affine, num_classes=10, **kwargs)  # fmt: skip


def _poolformer(depths: tuple = (2, 2, 6, 2)) -> nn.Module:
    # poolformer_s12's own arguments; its factory fixes depths, so build its class directly.
    from timm.models.metaformer import GroupNorm1, MetaFormer

    return MetaFormer(depths=depths, dims=(64, 128, 320, 512), downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True,
                      norm_layers=GroupNorm1, layer_scale_init_values=1e-5, res_scale_init_values=None,
                      use_mlp_head=False, num_classes=10)  # fmt: skip


def _torchvision_resnet(arch: str, frozen: bool = True, layers: list[int] | None = None) -> nn.Module:
    import torchvision
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    from torchvision.ops import FrozenBatchNorm2d

    norm = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
    if layers is not None:  # the tests' tiny ResNet: torchvision's class with fewer blocks
        block = Bottleneck if arch in ("resnet50", "resnet101", "resnet152") else BasicBlock
        return ResNet(block, layers, norm_layer=norm, num_classes=10)
    return getattr(torchvision.models, arch)(weights=None, norm_layer=norm, num_classes=10)


class FlatOutputs(nn.Module):
    """A detection backbone returns a dict of feature maps; one tensor gives one loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([f.flatten(1) for f in self.model(x).values()], dim=1)


def _fpn(backbone_name: str = "resnet18", layers: list[int] | None = None) -> nn.Module:
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    if layers is not None:  # the tests' tiny one: what resnet_fpn_backbone does, on a shorter ResNet
        return FlatOutputs(_resnet_fpn_extractor(_torchvision_resnet(backbone_name, layers=layers), 5))
    return FlatOutputs(resnet_fpn_backbone(backbone_name=backbone_name, weights=None,
                                           norm_layer=FrozenBatchNorm2d, trainable_layers=5))  # fmt: skip


def _eval_bn_resnet(arch: str = "resnet18", layers: list[int] | None = None) -> nn.Module:
    # Built in training mode with every batch norm in eval, as a fine-tuning script has it.
    return NormEval(_torchvision_resnet(arch, frozen=False, layers=layers)).train()


_SCALE_NAMES = {"gamma", "gamma_1", "gamma_2", "ls1", "ls2", "scale", "gain", "skipinit_gain", "alpha"}


@torch.no_grad()
def randomize_affines(model: nn.Module) -> None:
    """Give every affine non-trivial values, as training would: LayerScale's 1e-5 init and
    a zero skip-init gain would make the checked branch vanish, and identity statistics
    would make a frozen norm a no-op. Seeded by ``ZooModel.build``."""
    from torchvision.ops import FrozenBatchNorm2d

    for m in model.modules():
        if isinstance(m, (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm)):
            if m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _SCALE_NAMES:
            p.uniform_(0.5, 1.5)
        elif leaf == "beta":  # ResMLP's Affine shift
            p.normal_(0, 0.1)


# Sizes: batch 8 (--batch) at each model's resolution; depth cut where a full model's joint
# graph would make the two compiles alone eat the run's budget.
# est_s: two compiles at about 0.03 s per joint-graph node (the seed ResNet-50 joint graph
# has 1043 nodes and compiles in about 30 s on the 2-core machine, docs/benchmarks.md),
# node counts from tracing each model with bench.zoo.fx_backend, plus about 30 s for the
# timed rounds, the eager and the float64 runs. A rough guide, not a measurement.
ZOO = [
    # tiny at 64 px: at 32 px the last stage is 1x1, where stock Inductor of torch 2.11.0
    # (CPU, no compile_affine involved) returns wrong gradients for the last stage and all before it.
    ZooModel("convnext_atto", "timm convnext_atto", "LayerScale gamma (1,C,1,1) after the MLP's 1x1 conv (conv_mlp=True)",
             _timm("convnext_atto"), 128, tiny={"depths": (1, 1, 1, 1)}, tiny_size=64, est_s=95),
    ZooModel("deit3_small", "timm deit3_small_patch16_224, depth 4 of 12", "LayerScale gamma (C,) after attn.proj and mlp.fc2 linears",
             _timm("deit3_small_patch16_224"), 224, kwargs={"depth": 4}, tiny={"depth": 1}, sized=True, est_s=75),
    ZooModel("cait_xxs24", "timm cait_xxs24_224, depth 2 of 24, and its 2 class-attention blocks",
             "gamma_1/gamma_2 (C,) after attn.proj and mlp.fc2 linears, in both block kinds",
             _timm("cait_xxs24_224"), 224, kwargs={"depth": 2}, tiny={"depth": 1}, sized=True, est_s=90),
    ZooModel("resmlp_12", "timm MlpMixer with resmlp_12_224's arguments, 4 of 12 blocks",
             "Affine addcmul(beta, alpha, x) on the residual stream; ls1 after the token-mixing linear (scales the other axis); "
             "ls2 after mlp.fc2", _resmlp, 224, kwargs={"num_blocks": 4}, tiny={"num_blocks": 1}, sized=True, est_s=60),
    ZooModel("poolformer_s12", "timm MetaFormer with poolformer_s12's arguments, depths (1,1,3,1) of (2,2,6,2)",
             "MetaFormer Scale layer_scale2 (C,1,1) after the MLP's 1x1 conv; layer_scale1 after pooling (no producer)",
             _poolformer, 128, kwargs={"depths": (1, 1, 3, 1)}, tiny={"depths": (1, 1, 1, 1)}, est_s=105),
    ZooModel("nf_resnet26", "timm nf_resnet26, skipinit=True, depths (1,1,1,1) of (2,2,2,2)", "skip-init gain (0-d, in-place "
             "mul_) then alpha=0.2 (a Python scalar) after each block's last conv; scaled weight standardization in every conv",
             _timm("nf_resnet26"), 128, kwargs={"skipinit": True, "depths": (1, 1, 1, 1)},
             tiny={"skipinit": True, "depths": (1, 1), "channels": (32, 64)}, est_s=90),
    ZooModel("resnet50_frozenbn", "torchvision resnet50(norm_layer=FrozenBatchNorm2d)", "FrozenBatchNorm2d: scale and shift "
             "computed from buffers after every conv", lambda **kw: _torchvision_resnet("resnet50", **kw), 128,
             tiny={"layers": [1, 1, 1, 1]}, est_s=115),
    ZooModel("fpn_resnet18_frozenbn", "torchvision resnet_fpn_backbone('resnet18', FrozenBatchNorm2d, trainable_layers=5)",
             "FrozenBatchNorm2d after every backbone conv; the FPN's convs carry none", _fpn, 128,
             tiny={"layers": [1, 1, 1, 1]}, est_s=70),
    ZooModel("resnet18_evalbn", "torchvision resnet18, every BatchNorm2d in eval mode while the rest trains",
             "eval-mode BatchNorm2d (running statistics fixed, weight and bias learn) after every conv",
             lambda **kw: _eval_bn_resnet("resnet18", **kw), 128, tiny={"layers": [1, 1, 1, 1]}, est_s=85),
    ZooModel("resnet18_frozenbn", "torchvision resnet18(norm_layer=FrozenBatchNorm2d)", "FrozenBatchNorm2d after every conv",
             lambda **kw: _torchvision_resnet("resnet18", **kw), 128, tiny={"layers": [1, 1, 1, 1]}, default=False, est_s=65),
]  # fmt: skip
BY_NAME = {m.name: m for m in ZOO}


def select(spec: str | None) -> list[ZooModel]:
    if not spec:
        return [m for m in ZOO if m.default]
    if spec == "all":
        return list(ZOO)
    unknown = [n for n in spec.split(",") if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown zoo model {unknown[0]!r}; choose from {', '.join(BY_NAME)} or 'all'")
    return [BY_NAME[n] for n in spec.split(",")]


class ZooRunner(Runner):
    """Keeps each variant's ``report()``, which the next variant's compile resets."""

    def prepare(self, v: Variant, warmup: int) -> None:
        super().prepare(v, warmup)
        v.report = compile_affine.report()


def fx_backend(settings: Settings):
    """The pass under AOTAutograd with Inductor's decompositions and partitioner, the
    graphs run as FX (no C++ compile; as tests/helpers.pass_backend): a float64 check
    of the rewrite's algebra that costs seconds, not a float64 Inductor compile."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    from compile_affine.passes.fold import AffineFoldPass

    fold_pass = AffineFoldPass(settings)

    def run(gm):
        fold_pass(gm.graph)
        return gm

    return aot_autograd(
        fw_compiler=lambda gm, _: make_boxed_func(gm),
        bw_compiler=lambda gm, _: make_boxed_func(gm),
        inference_compiler=lambda gm, _: make_boxed_func(run(gm)),
        partition_fn=lambda joint, inputs, **kw: min_cut_rematerialization_partition(run(joint), inputs, **kw),
        decompositions=select_decomp_table(),
    )


def outputs_and_grads(fn: Callable, model: nn.Module, x: torch.Tensor, g: torch.Tensor | None) -> list:
    """The output, then every trainable parameter's gradient for output gradient ``g``
    (``g is None``: inference, the output alone)."""
    for p in model.parameters():
        p.grad = None
    if g is None:
        with torch.inference_mode():
            return [fn(x).detach()]
    out = fn(x)
    out.backward(g)
    res = [out.detach()] + [p.grad for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.grad = None
    return res


def rel_errors(actual: list, expected: list) -> tuple[float, float]:
    """``||a - e|| / ||e||`` for the output, and the max of it over parameter gradients
    (inf where only one side has a gradient). A gradient's denominator is at least 1e-3 of
    the largest gradient norm: a gradient that is zero up to rounding (CaiT's talking-heads
    ``proj_l.bias``: softmax ignores a shift) is noise on both sides, not an error."""

    def norm(t) -> float:
        return t.detach().double().norm().item()

    def err(a, e, floor: float = 0.0) -> float:
        if a is None or e is None:
            return 0.0 if a is e else math.inf
        diff = (a.detach().double().cpu() - e.detach().double().cpu()).norm().item()
        return diff / max(norm(e), floor, 1e-300)

    floor = 1e-3 * max((norm(e) for e in expected[1:] if e is not None), default=0.0)
    grads = [err(a, e, floor) for a, e in zip(actual[1:], expected[1:])]
    return err(actual[0], expected[0]), max(grads, default=0.0)


def run(args, runner: ZooRunner) -> list[dict]:
    entries = select(args.models)
    est = sum(m.est_s for m in entries)
    progress(f"zoo: {len(entries)} models ({', '.join(m.name for m in entries)}); expected about {est / 60:.0f} min "
             f"on a quiet 2-core CPU at default sizes (per-model estimates in compile_affine/bench/zoo.py)")  # fmt: skip
    rows = []
    start, expected = time.perf_counter(), 0
    for i, m in enumerate(entries):
        t0 = time.perf_counter()
        progress(f"model {m.name}: {m.source}")
        try:
            rows.append(run_one(m, args, runner))
        except Exception as e:  # one model's failure is a result; the others still run
            progress(f"  {m.name} FAILED:\n{traceback.format_exc()}")
            rows.append({"model": m.name, "source": m.source, "error": f"{type(e).__name__}: {e}"})
        expected += m.est_s
        # Scale what is left by how this machine and these sizes compare with the estimates so far.
        left = sum(e.est_s for e in entries[i + 1:]) * (time.perf_counter() - start) / expected
        progress(f"  {m.name} done in {time.perf_counter() - t0:.0f}s (estimate {m.est_s}s); about {left / 60:.0f} min left")
    return rows


def run_one(m: ZooModel, args, runner: ZooRunner) -> dict:
    size = args.size or m.size
    base = m.build(size=size)
    x = torch.randn(args.batch, 3, size, size)
    stock, ours = (Variant(m.name, b, copy.deepcopy(base), x) for b in ("inductor", "compile_affine"))
    runner.run([stock, ours], args.steps, args.warmup)

    device = runner.device
    base.to(device).train(not runner.inference)
    x = x.to(device)
    g = None if runner.inference else torch.randn_like(ours.fn(x).detach())
    eager = outputs_and_grads(base, base, x, g)
    double = copy.deepcopy(base).double()
    reference = outputs_and_grads(double, double, x.double(), None if g is None else g.double())
    got = {v.backend: outputs_and_grads(v.fn, v.model, x, g) for v in (stock, ours)}
    vs_f64 = {k: max(rel_errors(r, reference)) for k, r in (("ours", got["compile_affine"]), ("stock", got["inductor"]),
                                                             ("eager", eager))}  # fmt: skip
    row = {"model": m.name, "source": m.source, "carries": m.carries, "input": list(x.shape)}
    row.update(_sites(ours.report))
    row.update({
        "graphs": len(ours.report.graphs),
        "fell_back": [gr.fell_back for gr in ours.report.graphs if gr.fell_back],
        "step_ms_stock": round(stock.step, 2), "step_ms_ours": round(ours.step, 2),
        "step_ratio": round(ours.step / stock.step, 3),
        "saved_mib_stock": round(stock.saved_mib, 2), "saved_mib_ours": round(ours.saved_mib, 2),
        "saved_ratio": round(ours.saved_mib / stock.saved_mib, 3) if stock.saved_mib else None,
        "compile_s_stock": round(stock.compile_s, 1), "compile_s_ours": round(ours.compile_s, 1),
        "traffic_bytes": {"stock": stock.traffic_bytes, "ours": ours.traffic_bytes},
        "traffic_ratio": round(ours.traffic_bytes / stock.traffic_bytes, 3) if stock.traffic_bytes else None,
        "fp32_vs_eager_ours": rel_errors(got["compile_affine"], eager),
        "fp32_vs_eager_stock": rel_errors(got["inductor"], eager),
        "vs_float64_eager": vs_f64,
    })  # fmt: skip
    if not args.no_float64:
        row["float64_fx"] = float64_check(base, x, g)
    return row


def _sites(report) -> dict:
    sites = report.sites
    refused = Counter(s.reason for s in sites if not s.folded and not s.declined_by_cost)
    return {
        "sites": len(sites),
        "folded": sum(s.folded for s in sites),
        "declined": sum(s.declined_by_cost for s in sites),
        "refused": sum(refused.values()),
        "refused_reasons": dict(refused.most_common()),
        "site_records": [dataclasses.asdict(s) for s in sites],
    }


def float64_check(base: nn.Module, x: torch.Tensor, g: torch.Tensor | None) -> dict:
    """The pass in float64 on the same model, executed as FX, against float64 eager.
    ``fold="always"``: every legal site is rewritten, the ones the cost rule declines too."""
    model = copy.deepcopy(base).double()
    eager = copy.deepcopy(base).double()
    gd = None if g is None else g.double()
    compile_affine.reset()
    fn = torch.compile(model, backend=fx_backend(Settings(fold="always", strict=True)))
    try:
        got = outputs_and_grads(fn, model, x.double(), gd)
    except Exception as e:
        return {"fold": "always", "error": f"{type(e).__name__}: {e}"}
    report = compile_affine.report()
    out_err, grad_err = rel_errors(got, outputs_and_grads(eager, eager, x.double(), gd))
    return {"fold": "always", "out": out_err, "grad": grad_err, "folded": report.folded, "sites": len(report.sites)}


def _e(v: float) -> str:
    return f"{v:.0e}" if v else "0"


COLUMNS = ("model", "input", "affine sites", "folded", "declined (cost)", "refused: top reasons", "saved ours/stock",
           "step ours/stock", "moved ours/stock", "fp32 vs eager, out/grad: ours; stock", "vs float64 eager: ours / stock / eager",
           "float64 pass as FX (fold=always): out/grad, folded")  # fmt: skip


def table(rows: list[dict]) -> str:
    """Markdown; the errors are ``||a - e|| / ||e||``, grad = max over parameters."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | FAILED: {r['error'][:200]} |" + " |" * (len(COLUMNS) - 2))
            continue
        refused = str(r["refused"])
        if r["refused"]:
            refused += " (" + "; ".join(f"{n}: {why}" for why, n in list(r["refused_reasons"].items())[:2]) + ")"
        if r["fell_back"]:
            refused = f"PASS FAILED, stock Inductor ran {len(r['fell_back'])} graphs; {refused}"
        o, s = r["fp32_vs_eager_ours"], r["fp32_vs_eager_stock"]
        f = r["vs_float64_eager"]
        fx = r.get("float64_fx")
        if fx is None:
            fx_cell = "-"
        elif "error" in fx:
            fx_cell = f"FAILED: {fx['error'][:120]}"
        else:
            fx_cell = f"{_e(fx['out'])}/{_e(fx['grad'])}, {fx['folded']} of {fx['sites']}"
        cells = [
            r["model"], "x".join(map(str, r["input"])), r["sites"], r["folded"], r["declined"], refused,
            "-" if r["saved_ratio"] is None else f"{r['saved_ratio']:.3f}", f"{r['step_ratio']:.3f}",
            "-" if r.get("traffic_ratio") is None else f"{r['traffic_ratio']:.3f}",
            f"{_e(o[0])}/{_e(o[1])}; {_e(s[0])}/{_e(s[1])}", f"{_e(f['ours'])} / {_e(f['stock'])} / {_e(f['eager'])}",
            fx_cell,
        ]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)
