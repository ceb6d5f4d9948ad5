"""fp32 gradient error against float64 on torchvision's ResNet-18 FPN backbone with random
FrozenBatchNorm2d statistics, over many draws (docs/design.md, "Numerics": why one draw cannot
tell one backend from another). Each backend compiles once; every draw then loads new weights,
FrozenBN statistics and input (values only: no recompile), runs one backward of the sum of the FPN
outputs and prints, per backend, ``|g - g64| / |g64|`` of ``body.conv1.weight``, the worst layer1
gradient, the worst gradient overall and the worst output.

    python -m compile_affine.bench fpn-draws --batch 4 --res 160 --draws 12 --backends stock,ours
"""

from __future__ import annotations

import copy
import time

import torch

from ..core.models import randomize as randomize_model

BACKENDS = {
    "stock": dict(backend="inductor"), "auto": dict(backend="compile_affine"),
    "ours": dict(backend="compile_affine", options={"compile_affine": {"fold": "always", "strict": True}}),
}  # fmt: skip


def randomize(model: torch.nn.Module, seed: int, batch: int, res: int, conv_bias: float = 0.0) -> torch.Tensor:
    """The issue's draw, seeded by ``seed``: fresh conv weights (biases zero, or
    U(-conv_bias, conv_bias)) and FrozenBN values (``core.models.randomize``); returns the input."""
    g = torch.Generator().manual_seed(seed)
    randomize_model(model, g, conv_bias=conv_bias)
    return torch.randn(batch, 3, res, res, generator=g)


def _step(model, fn, x):
    model.zero_grad(set_to_none=True)
    out = fn(x)
    sum(o.sum() for o in out.values()).backward()
    grads = {n: p.grad.detach().double() for n, p in model.named_parameters()}
    return grads, {k: v.detach().double() for k, v in out.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def add_args(p) -> None:
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--res", type=int, default=160)
    p.add_argument("--draws", type=int, default=12)
    p.add_argument("--backends", default="stock,ours", help=f"comma-separated, from {', '.join(BACKENDS)}")


def main(args, command: str) -> int:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    base = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=5)
    models = {name: copy.deepcopy(base) for name in ["eager", *args.backends.split(",")]}
    fns = {name: m if name == "eager" else torch.compile(m, **BACKENDS[name]) for name, m in models.items()}
    reference = copy.deepcopy(base).double()
    print("draw", *[f"{k}:conv1 {k}:layer1 {k}:worst {k}:forward" for k in fns])
    for draw in range(args.draws):
        x = randomize(reference, draw, args.batch, args.res)
        state = reference.state_dict()
        g64, o64 = _step(reference, reference, x.double())
        row = [str(draw)]
        for name, fn in fns.items():
            models[name].load_state_dict({k: v.float() for k, v in state.items()})
            start = time.time()
            grads, outs = _step(models[name], fn, x)
            if draw == 0:
                print(f"{name}: first step {time.time() - start:.0f} s (compile)", flush=True)
            errors = {n: _rel(grads[n], g64[n]) for n in g64}
            layer1 = max(v for n, v in errors.items() if "layer1" in n)
            forward = max(_rel(outs[k], o64[k]) for k in o64)
            row.append(f"{errors['body.conv1.weight']:.1e} {layer1:.1e} {max(errors.values()):.1e} {forward:.1e}")
        print(*row, flush=True)
    return 0
