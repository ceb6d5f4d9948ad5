"""Small models for the tests: conv -> per-channel affine -> activation, in the forms users write."""

from __future__ import annotations

import torch
import torch.nn as nn


class ConvAffine(nn.Module):
    """``act(conv(x) * s + t)`` with ``s``/``t`` stored as ``(1,C,1,1)`` or ``(C,)`` parameters."""

    def __init__(
        self,
        cin=4,
        cout=8,
        k=3,
        *,
        stride=1,
        padding=1,
        dilation=1,
        groups=1,
        bias=True,
        shift=True,
        flat_params=False,
        scale_first=False,
        act=torch.relu,
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
        shape = (cout,) if flat_params else (1, cout, 1, 1)
        self.scale = nn.Parameter(torch.rand(shape) + 0.5)
        self.shift = nn.Parameter(torch.randn(shape)) if shift else None
        self.flat_params, self.scale_first, self.act = flat_params, scale_first, act

    def _view(self, p):
        return p.view(1, -1, 1, 1) if self.flat_params else p

    def forward(self, x):
        y = self.conv(x)
        y = self._view(self.scale) * y if self.scale_first else y * self._view(self.scale)
        if self.shift is not None:
            y = y + self._view(self.shift)
        return self.act(y)


class FrozenAffine(nn.Module):
    """torchvision's FrozenBatchNorm2d arithmetic: the scale is computed from buffers."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.rand(c) + 0.5)
        self.register_buffer("bias", torch.randn(c))
        self.register_buffer("running_mean", torch.randn(c))
        self.register_buffer("running_var", torch.rand(c) + 0.1)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class ConvFrozen(nn.Module):
    def __init__(self, cin=4, cout=8):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = FrozenAffine(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Chain(nn.Module):
    """Several conv -> affine -> relu blocks, the way a plain net stacks them."""

    def __init__(self, widths=(4, 8, 8, 16), stride=1):
        super().__init__()
        self.blocks = nn.Sequential(
            *[ConvAffine(a, b, stride=stride) for a, b in zip(widths[:-1], widths[1:])]
        )

    def forward(self, x):
        return self.blocks(x)


class WithExtraUser(nn.Module):
    """The conv output is read again after the affine: folding would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)

    def forward(self, x):
        y = self.conv(x)
        return y * self.scale + y.mean()


class WithScale(nn.Module):
    """``conv(x) * scale_fn(conv_output_shape_inputs)`` for arbitrary (maybe illegal) scales."""

    def __init__(self, scale: torch.Tensor, cout=8, k=3, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(4, cout, k, padding=padding)
        self.scale = nn.Parameter(scale)

    def forward(self, x):
        return self.conv(x) * self.scale


class SqueezeExcite(nn.Module):
    """SE block: the scale is computed per sample from the conv output itself."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(4, c, 3, padding=1)
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.conv(x)
        return y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))


class PerSampleScale(nn.Module):
    """A per-sample scale that does not depend on the conv output: still must not fold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x) * x.mean((1, 2, 3), keepdim=True)


class ConvNdAffine(nn.Module):
    """Any conv kind: ``act(conv(x) * s + t)`` with the scale shaped for ``dims`` spatial dims."""

    def __init__(self, dims=2, transposed=False, cin=4, cout=6, k=3, stride=1, padding=1, dilation=1, groups=1,
                 output_padding=0, bias=True, shift=True):  # fmt: skip
        super().__init__()
        kind = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
                (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}  # fmt: skip
        extra = dict(output_padding=output_padding) if transposed else {}
        self.conv = kind[dims, transposed](cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                                           groups=groups, bias=bias, **extra)  # fmt: skip
        shape = (1, cout) + (1,) * dims
        self.scale = nn.Parameter(torch.rand(shape) + 0.5)
        self.shift = nn.Parameter(torch.randn(shape)) if shift else None

    def forward(self, x):
        y = self.conv(x) * self.scale
        if self.shift is not None:
            y = y - self.shift
        return torch.relu(y)


class TinyResNet(nn.Module):
    """torchvision's basic block in miniature, with a projection shortcut in every block and
    the seed's ``x * w + b`` affine for BatchNorm and ``ReLU(inplace=True)``. As in
    torchvision, the shortcut is computed after the block's last affine; when its conv
    fills a DDP bucket (in float64 at ``bucket_cap_mb=1``, each 3x3 conv fills one, the
    1x1 ``conv1`` does not), DDPOptimizer starts a graph piece there, and that piece updates
    its own input in place (``out += identity``, then the in-place ReLU) before the next
    block's conv reads it (ResNet-50's pieces start so)."""

    def __init__(self, width=128, blocks=2):
        from compile_affine.bench.core.models import Affine2d

        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_affine = Affine2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            self.blocks.append(nn.ModuleDict({
                name: module for k, size in (("1", 1), ("2", 3), ("_shortcut", 3))
                for name, module in ((f"conv{k}", nn.Conv2d(width, width, size, padding=size // 2, bias=False)),
                                     (f"affine{k}", Affine2d(width)))
            }))  # fmt: skip
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, Affine2d):  # drawn, so that folding them is not the identity
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.normal_(0, 0.1, generator=gen)

    def forward(self, x):
        x = self.relu(self.stem_affine(self.stem(x)))
        for b in self.blocks:
            out = self.relu(b["affine1"](b["conv1"](x)))
            out = b["affine2"](b["conv2"](out))
            out += b["affine_shortcut"](b["conv_shortcut"](x))
            x = self.relu(out)
        return x.mean((2, 3))


class LayerScaleBlock(nn.Module):
    """A ViT MLP block with LayerScale: ``x + fc2(gelu(fc1(x))) * gamma``."""

    def __init__(self, dim=16, hidden=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x))) * self.gamma


class LayerScaleStack(nn.Module):
    def __init__(self, dim=16, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(LayerScaleBlock(dim) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x
