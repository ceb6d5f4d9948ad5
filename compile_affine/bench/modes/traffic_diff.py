"""Where do the bytes go? One training step of two ResNet-50 variants, counted per graph
(forward, backward) and per kernel class, and the difference.

A kernel's class is the set of aten ops it came from (``convolution``, ``mul,sum``...),
so the kernels that one variant runs and the other does not stand out, e.g. the fine-tuning
floor against compile_affine on eval-mode BatchNorm:

    python -m compile_affine.bench traffic-diff --finetune none/inductor bn/compile_affine

Counts only (core/measure.py): deterministic, nothing timed.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..core.measure import Traffic, count_step
from ..core.models import resnet50, resnet50_finetune
from ..core.runner import compiled, configure_compile

MIB = 2**20


def count(name: str, finetune: bool, batch: int, res: int, settings: dict) -> Traffic:
    net, backend = name.split("/")
    model = (resnet50_finetune if finetune else resnet50)(net).train()
    x = torch.randn(batch, 3, res, res)
    torch._dynamo.reset()
    return count_step(compiled(model, backend, settings), x, kernels=True)


def by_class(traffic: Traffic) -> dict[tuple[str, str], tuple[int, int]]:
    """(graph, kernel class) -> (kernels, bytes); graph is ``fwd`` or ``bwd`` (compile order)."""
    out: dict = defaultdict(lambda: (0, 0))
    for i, graph in enumerate(traffic.graphs):
        part = "fwd" if i % 2 == 0 else "bwd"
        for k in graph.kernels:
            n, b = out[part, f"{k.kind}:{k.ops}"]
            out[part, f"{k.kind}:{k.ops}"] = (n + 1, b + k.bytes)
    return dict(out)


def add_args(p) -> None:
    p.add_argument("a", help="net/backend, e.g. none/inductor")
    p.add_argument("b", help="net/backend, e.g. bn/compile_affine")
    p.add_argument("--finetune", action="store_true", help="the eval-BN fine-tuning nets (bn, none)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--res", type=int, default=160)
    p.add_argument("--min-activation-ratio", type=float, default=None)
    p.add_argument("--top", type=int, default=12, help="kernel classes shown, largest difference first")


def main(args, command: str) -> int:
    torch.set_num_threads(2)
    configure_compile()
    settings = {} if args.min_activation_ratio is None else {"min_activation_ratio": args.min_activation_ratio}
    ta, tb = (count(n, args.finetune, args.batch, args.res, settings) for n in (args.a, args.b))
    ca, cb = by_class(ta), by_class(tb)
    print(f"resnet50{' eval-BN' if args.finetune else ''} b{args.batch} @{args.res}: {args.a} vs {args.b}, MiB per step")
    print(f"| graph | {args.a} | {args.b} | difference |\n|---|---|---|---|")
    for part in ("fwd", "bwd"):
        a, b = (sum(n for (g, _), (_, n) in c.items() if g == part) / MIB for c in (ca, cb))
        print(f"| {part} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    print(f"| step | {ta.mib:.1f} | {tb.mib:.1f} | {tb.mib - ta.mib:+.1f} ({tb.bytes / ta.bytes:.3f}x) |")
    print("\n| graph | kernel class | kernels a / b | MiB a / b | difference |\n|---|---|---|---|---|")
    keys = sorted(set(ca) | set(cb), key=lambda k: -abs(cb.get(k, (0, 0))[1] - ca.get(k, (0, 0))[1]))
    for key in keys[: args.top]:
        (na, ba), (nb, bb) = ca.get(key, (0, 0)), cb.get(key, (0, 0))
        print(f"| {key[0]} | {key[1]} | {na} / {nb} | {ba / MIB:.1f} / {bb / MIB:.1f} | {(bb - ba) / MIB:+.1f} |")
    return 0
