"""Does the pass's own time grow linearly with the graph? Pass seconds per joint-graph
node, for ResNet-18/50/152 with eval-mode BatchNorm (static and dynamic shapes) and a
24-block LayerScale ViT. The graphs run as FX under AOTAutograd (as tests/helpers.py):
no C++ compile, so a row costs seconds. Seconds are noisy under load; the growth shape
(sec per node flat across sizes) is what to read. Each row runs ``--repeat`` times.

    python -m compile_affine.bench.pass_time [--repeat 2] [--models resnet18,vit24]
"""

from __future__ import annotations

import argparse
import time

import torch

from compile_affine.settings import Settings


def _backend(rows: list):
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    from compile_affine.passes.fold import AffineFoldPass

    fold_pass = AffineFoldPass(Settings(strict=True))

    def partition(joint, inputs, **kw):
        nodes = len(joint.graph.nodes)
        t0 = time.perf_counter()
        fold_pass(joint.graph)
        rows.append((nodes, time.perf_counter() - t0, fold_pass.records[-1]))
        return min_cut_rematerialization_partition(joint, inputs, **kw)

    return aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=lambda gm, _: make_boxed_func(gm),
                        partition_fn=partition, decompositions=select_decomp_table())  # fmt: skip


def _resnet(arch: str):
    import torchvision

    from .models import NormEval

    torch.manual_seed(0)
    return NormEval(getattr(torchvision.models, arch)()).train()


def _vit24():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", depth=24, init_values=1e-5, img_size=64, num_classes=10)


MODELS = {
    "resnet18": (lambda: _resnet("resnet18"), 64, False),
    "resnet50": (lambda: _resnet("resnet50"), 64, False),
    "resnet152": (lambda: _resnet("resnet152"), 64, False),
    "resnet18-dynamic": (lambda: _resnet("resnet18"), 64, True),
    "resnet50-dynamic": (lambda: _resnet("resnet50"), 64, True),
    "resnet152-dynamic": (lambda: _resnet("resnet152"), 64, True),
    "vit24": (_vit24, 64, False),
}


def measure(name: str) -> tuple[int, float, int]:
    """(joint-graph nodes, pass seconds, sites) for one compile of ``name``'s training step."""
    build, size, dynamic = MODELS[name]
    torch._dynamo.reset()
    rows: list = []
    model = build()
    fn = torch.compile(model, backend=_backend(rows), dynamic=dynamic)
    fn(torch.randn(2, 3, size, size)).sum().backward()
    return sum(r[0] for r in rows), sum(r[1] for r in rows), sum(len(r[2].sites) for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m compile_affine.bench.pass_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args(argv)
    print("| model | joint nodes | sites | pass s (each run) | us per node |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        runs = [measure(name) for _ in range(args.repeat)]
        nodes, sites = runs[0][0], runs[0][2]
        secs = [r[1] for r in runs]
        per_node = min(secs) / nodes * 1e6
        print(f"| {name} | {nodes} | {sites} | {' / '.join(f'{s:.3f}' for s in secs)} | {per_node:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
