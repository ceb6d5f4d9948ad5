"""fp32 gradient error against float64 on torchvision's ResNet-18 FPN backbone with
random FrozenBatchNorm2d statistics, over many draws (docs/design.md, "Numerics").

    python -m compile_affine.bench.fpn_draws --batch 4 --res 160 --draws 12 --backends stock,ours

Each backend compiles once; every draw then loads new weights, FrozenBN statistics and
input (values only: no recompile), runs one backward of the sum of the FPN outputs and
prints, per backend, the relative error ``|g - g64| / |g64|`` of ``body.conv1.weight``,
the worst layer1 gradient, the worst gradient overall and the worst output. One ReLU or
max-pool decision that fp32 and float64 take differently moves the upstream gradients
by 1e-4 to 1e-3; a single draw cannot tell one backend from another.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

BACKENDS = {
    "stock": dict(backend="inductor"),
    "auto": dict(backend="compile_affine"),
    "ours": dict(backend="compile_affine", options={"compile_affine": {"fold": "always", "strict": True}}),
}


def randomize(model: torch.nn.Module, seed: int, batch: int, res: int, conv_bias: float = 0.0) -> torch.Tensor:
    """The issue's draw: fresh conv weights (biases zero, or U(-conv_bias, conv_bias)),
    FrozenBN weight U(0.5,1.5), bias N(0,0.1), running mean N(0,0.1), running var
    U(0.5,2); returns the input."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_uniform_(m.weight, a=1, generator=g)
                if m.bias is not None and conv_bias:
                    m.bias.uniform_(-conv_bias, conv_bias, generator=g)
                elif m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
    return torch.randn(batch, 3, res, res, generator=g)


def _step(model, fn, x):
    for p in model.parameters():
        p.grad = None
    out = fn(x)
    sum(o.sum() for o in out.values()).backward()
    grads = {n: p.grad.detach().double() for n, p in model.named_parameters()}
    return grads, {k: v.detach().double() for k, v in out.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main(argv: list[str] | None = None) -> None:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--res", type=int, default=160)
    ap.add_argument("--draws", type=int, default=12)
    ap.add_argument("--backends", default="stock,ours", help=f"comma-separated, from {', '.join(BACKENDS)}")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    base = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=5)
    models, fns = {"eager": copy.deepcopy(base)}, {}
    fns["eager"] = models["eager"]
    for name in args.backends.split(","):
        models[name] = copy.deepcopy(base)
        fns[name] = torch.compile(models[name], **BACKENDS[name])
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


if __name__ == "__main__":
    main()
