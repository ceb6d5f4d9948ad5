"""Where one compiled training step spends its device time, by kernel class: the
convolutions (cuDNN / CUTLASS, forward and both backward), Inductor's Triton pointwise and
reduction kernels (where a stock affine's extra passes land), and the rest (GEMMs,
copies). Read from
``torch.profiler``: self time of the device's kernels (CUDA), or of the host ops on CPU
(the dry run: there Inductor's C++ kernels are not separate events, so the split says
little; it proves the code path)."""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

CLASSES = ("convolution", "triton pointwise", "triton reduction", "other")
# Marks of cuDNN's convolution kernels (``sm90_xmma_fprop_implicit_gemm_...``, ``..._dgrad_...``,
# ``..._wgrad_...``) and its layout transposes; not bare ``xmma``/``cutlass``, which
# cuBLAS's GEMMs (the fc layer) share.
_CONV_MARKS = ("conv", "cudnn", "implicit_gemm", "fprop", "dgrad", "wgrad", "nchwtonhwc", "nhwctonchw")


def kernel_class(name: str) -> str:
    low = name.lower()
    if low.startswith("triton_poi"):
        return "triton pointwise"
    if low.startswith(("triton_red", "triton_per")):
        return "triton reduction"
    if any(m in low for m in _CONV_MARKS):
        return "convolution"
    return "other"


def profile_step(step: Callable[[], object], device: str) -> dict[str, float]:
    """Milliseconds of self time per kernel class over one call of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    totals: Counter[str] = Counter({c: 0.0 for c in CLASSES})
    for event in prof.key_averages():
        if event.device_type != kind:
            continue
        us = _self_device_us(event) if cuda else event.self_cpu_time_total
        totals[kernel_class(event.key)] += us / 1e3
    return {c: round(totals[c], 2) for c in CLASSES}


def _self_device_us(event) -> float:
    # ``self_device_time_total`` in newer torch; ``self_cuda_time_total`` before it.
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
