"""Does the pass's own time grow linearly with the graph? Pass seconds per joint-graph
node, for ResNet-18/50/152 with eval-mode BatchNorm (static and dynamic shapes) and a
24-block LayerScale ViT. The graphs run as FX under AOTAutograd (as tests/helpers.py):
no C++ compile, so a row costs seconds. Seconds are noisy under load; the growth shape
(sec per node flat across sizes) is what to read. Each row runs ``--repeat`` times.

    python -m compile_affine.bench pass-time [--repeat 2] [--models resnet18,vit24]
"""

from __future__ import annotations

import functools
import time

import torch

from compile_affine.passes.fold import AffineFoldPass
from compile_affine.settings import Settings

from ..core.models import NormEval
from ..core.runner import fx_backend


def _backend(rows: list):
    """The FX backend, each pass run timed: (joint-graph nodes, seconds, its record) into ``rows``."""
    fold_pass = AffineFoldPass(Settings(strict=True))

    def run(gm):
        nodes = len(gm.graph.nodes)
        t0 = time.perf_counter()
        fold_pass(gm.graph)
        rows.append((nodes, time.perf_counter() - t0, fold_pass.records[-1]))
        return gm

    return fx_backend(run=run)


def _resnet(arch: str):
    import torchvision

    torch.manual_seed(0)
    return NormEval(getattr(torchvision.models, arch)()).train()


def _vit24():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", depth=24, init_values=1e-5, img_size=64, num_classes=10)


MODELS = {f"{arch}{suffix}": (functools.partial(_resnet, arch), 64, bool(suffix))
          for suffix in ("", "-dynamic") for arch in ("resnet18", "resnet50", "resnet152")}  # fmt: skip
MODELS["vit24"] = (_vit24, 64, False)


def measure(name: str) -> tuple[int, float, int]:
    """(joint-graph nodes, pass seconds, sites) for one compile of ``name``'s training step."""
    build, size, dynamic = MODELS[name]
    torch._dynamo.reset()
    rows: list = []
    model = build()
    fn = torch.compile(model, backend=_backend(rows), dynamic=dynamic)
    fn(torch.randn(2, 3, size, size)).sum().backward()
    return sum(r[0] for r in rows), sum(r[1] for r in rows), sum(len(r[2].sites) for r in rows)


def add_args(p) -> None:
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--repeat", type=int, default=2)


def main(args, command: str) -> int:
    print("| model | joint nodes | sites | pass s (each run) | us per node |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        runs = [measure(name) for _ in range(args.repeat)]
        (nodes, _, sites), secs = runs[0], [r[1] for r in runs]
        per_node = min(secs) / nodes * 1e6
        print(f"| {name} | {nodes} | {sites} | {' / '.join(f'{s:.3f}' for s in secs)} | {per_node:.1f} |", flush=True)
    return 0
