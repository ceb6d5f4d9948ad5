"""Differential fuzzing: random small conv -> affine and linear -> views -> affine
models, legal and illegal, checked against eager (forward and every gradient) and
against the expected fold decision.

The models run in float64: the fold is exact algebra, so in float64 it must agree with
eager to ~1e-12 whatever the conditioning (fp32 comparisons of tiny, cancelling
gradients, e.g. behind a saturated tanh, measure rounding, not the fold). fp32, bf16
and fp16 numerics are tested in test_differential.py and test_coverage.py.

Profiles: ``ci`` (default, 100 examples, derandomized) and ``long`` (2,000 examples):
    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import compile_affine

from .helpers import ALWAYS, assert_close_rel, compare_gradients, on_devices, pass_backend

settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
# make gpu-check runs the cuda variants inside a time budget: a few examples each.
settings.register_profile(
    "gpu-check", max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

LEGAL_SCALES = ("channel", "flat", "python", "zero_dim", "one", "channel_buffer")
ILLEGAL_SCALES = ("per_sample", "spatial", "last_axis")


@st.composite
def configs(draw):
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cfg = dict(
        dims=dims,
        transposed=transposed,
        groups=groups,
        cin=groups * draw(st.integers(1, 2)),
        cout=groups * draw(st.integers(1, 3)),
        k=draw(st.integers(1, 3)),
        stride=draw(st.integers(1, 2)),
        padding=draw(st.integers(0, 2)),
        dilation=draw(st.integers(1, 2)),
        bias=draw(st.booleans()),
        scale=draw(st.sampled_from(LEGAL_SCALES + ILLEGAL_SCALES)),
        shift=draw(st.sampled_from(["none", "channel", "per_sample", "python"])),
        sub=draw(st.booleans()),
        chain=draw(st.sampled_from(["none", "none", "channel", "python"])),
        scale_first=draw(st.booleans()),
        op=draw(st.sampled_from(["mul", "mul", "div", "addcmul", "shift_only"])),
        extra_user=draw(st.integers(0, 5)) == 0,
        requires=draw(st.lists(st.booleans(), min_size=5, max_size=5)),  # x, W, b, s, t
        inference=draw(st.integers(0, 4)) == 0,
        size=draw(st.integers(4, 7)),
    )
    cfg["output_padding"] = draw(st.integers(0, max(cfg["stride"], cfg["dilation"]) - 1)) if transposed else 0
    return cfg


class Fuzzed(torch.nn.Module):
    def __init__(self, cfg, out_shape):
        super().__init__()
        self.cfg = cfg
        wshape = (cfg["cin"], cfg["cout"] // cfg["groups"]) if cfg["transposed"] else (cfg["cout"], cfg["cin"] // cfg["groups"])
        req = cfg["requires"]
        self.weight = torch.nn.Parameter(torch.randn(*wshape, *(cfg["k"],) * cfg["dims"]) * 0.5, requires_grad=req[1])
        self.bias = torch.nn.Parameter(torch.randn(cfg["cout"]), requires_grad=req[2]) if cfg["bias"] else None
        self.scale = _operand(cfg["scale"], out_shape, req[3], self)
        self.shift = _operand(cfg["shift"], out_shape, req[4], self) if cfg["shift"] != "none" else None
        self.chain = _operand(cfg["chain"], out_shape, req[3], self) if cfg["chain"] != "none" else None

    def forward(self, x):
        c = self.cfg
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[c["dims"]]
        if c["transposed"]:
            conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[c["dims"]]
            y = conv(x, self.weight, self.bias, c["stride"], c["padding"], c["output_padding"], c["groups"], c["dilation"])
        else:
            y = conv(x, self.weight, self.bias, c["stride"], c["padding"], c["dilation"], c["groups"])
        s = self.scale() if callable(self.scale) else self.scale
        t = self.shift() if callable(self.shift) else self.shift
        if c["op"] == "addcmul" and isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor):
            z = torch.addcmul(t, y, s)
            t = None
        elif c["op"] == "shift_only" and t is not None:
            z = y
        elif c["op"] == "div":
            z = y / s
        else:
            z = s * y if c["scale_first"] else y * s
        if t is not None:
            z = z - t if c["sub"] else z + t
        if self.chain is not None:
            z = z * self.chain
        if c["extra_user"]:
            z = z + y.mean()
        return torch.tanh(z)


def _operand(kind, out_shape, requires_grad, module):
    n, ch, spatial = out_shape[0], out_shape[1], out_shape[2:]
    ones = (1,) * len(spatial)
    if kind == "python":
        return 1.7
    shape = {
        "channel": (1, ch, *ones),
        "flat": (ch,),
        "zero_dim": (),
        "one": (1,) * len(out_shape),
        "channel_buffer": (1, ch, *ones),
        "per_sample": (n, 1, *ones),
        "spatial": (1, 1, *spatial),
        "last_axis": (spatial[-1],),
    }[kind]
    value = torch.rand(shape) + 0.5
    if kind == "channel_buffer":
        module.register_buffer(f"buf{len(module._buffers)}", value)
        return value
    p = torch.nn.Parameter(value, requires_grad=requires_grad)
    module.register_parameter(f"p{len(module._parameters)}", p)
    if kind == "flat":
        return lambda: p.view(1, -1, *ones)
    return p


def is_gate(cfg) -> bool:
    """The operand that makes the anchor varies per sample (the batch is 2)."""
    if cfg["op"] == "shift_only" and cfg["shift"] != "none":
        return cfg["shift"] == "per_sample"
    return cfg["scale"] == "per_sample"


def expected_fold(cfg, out_shape) -> bool:
    if cfg["op"] == "shift_only" and cfg["shift"] != "none":
        return cfg["shift"] != "per_sample" and not cfg["extra_user"]
    if cfg["extra_user"] or cfg["scale"] in ILLEGAL_SCALES:
        # A size-1 axis makes a "spatial" or "last axis" scale per-channel after all.
        legal_by_size = cfg["scale"] in ("spatial", "last_axis") and all(s == 1 for s in out_shape[2:])
        return legal_by_size and not cfg["extra_user"]
    return True


@on_devices
@given(configs())
def test_fuzz_against_eager(device, cfg):
    torch._dynamo.reset()
    compile_affine.reset()
    torch.manual_seed(0)
    with _default_dtype(torch.float64):
        _check(cfg, device)


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _check(cfg, device):
    c = cfg
    x = torch.randn(2, c["cin"], *(c["size"],) * c["dims"], device=device, requires_grad=c["requires"][0] and not c["inference"])
    wshape = (c["cin"], c["cout"] // c["groups"]) if c["transposed"] else (c["cout"], c["cin"] // c["groups"])
    probe = torch.randn(*wshape, *(c["k"],) * c["dims"], device=device)
    try:
        if c["transposed"]:
            conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[c["dims"]]
            out_shape = conv(x.detach(), probe, None, c["stride"], c["padding"], c["output_padding"], c["groups"], c["dilation"]).shape
        else:
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[c["dims"]]
            out_shape = conv(x.detach(), probe, None, c["stride"], c["padding"], c["dilation"], c["groups"]).shape
    except RuntimeError:
        assume(False)
    assume(all(size > 0 for size in out_shape))  # eager allows empty outputs that compile rejects
    with torch.device(device):
        model = Fuzzed(c, out_shape)
    compiled = torch.compile(model, backend=pass_backend(ALWAYS))
    with torch.inference_mode(c["inference"]):
        out_c = compiled(x)
        out_e = model(x)
    assert_close_rel(out_c, out_e, 1e-10, "forward")
    graph = compile_affine.report().graphs[0]
    if is_gate(c):  # not an affine layer: counted, not a site
        assert graph.sites == [] and graph.not_affine == {"per-sample gate or mask": 1}, c
    else:
        site, *chained = graph.sites
        assert site.folded == expected_fold(c, out_shape), (site.reason, c)
        # A chained "* s2" becomes a site once the first fold made its input a conv.
        # (only if the shift joined the first fold: a per-sample shift stays as an add).
        chain_site = site.folded and c["chain"] != "none" and c["shift"] != "per_sample"
        assert [s.folded for s in chained] == ([True] if chain_site else []), c
    if c["inference"] or not out_e.requires_grad:
        return
    compare_gradients(out_c, out_e, [t for t in (x, *model.parameters()) if t.requires_grad], 1e-8)


# --- linear layers -------------------------------------------------------------------

LINEAR_CHAINS = ("none", "to_channels_first", "transpose", "flatten", "split")
LINEAR_SCALES = ("feature", "python", "zero_dim", "per_sample", "token")


@st.composite
def linear_configs(draw):
    return dict(
        lead=draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)),
        cin=draw(st.integers(2, 5)),  # Inductor turns a K=1 mm into a multiply: no linear left
        # out=1 makes the input-gradient mm K=1, which Inductor decomposes into a multiply
        # that the backward walk refuses (safe, but not the fold this oracle expects).
        cout=draw(st.sampled_from([2, 4, 6])),
        bias=draw(st.booleans()),
        producer=draw(st.sampled_from(["linear", "linear", "matmul", "matmul_in_out", "einsum"])),
        chain=draw(st.sampled_from(LINEAR_CHAINS)),
        scale=draw(st.sampled_from(LINEAR_SCALES)),
        op=draw(st.sampled_from(["mul", "mul", "mul_", "div", "addcmul"])),
        shift=draw(st.sampled_from(["none", "feature", "python"])),
        scale_first=draw(st.booleans()),
        extra_user=draw(st.integers(0, 5)) == 0,
        requires=draw(st.lists(st.booleans(), min_size=5, max_size=5)),  # x, W, b, s, t
        inference=draw(st.integers(0, 4)) == 0,
    )


def _chain(y, kind, cout):
    """Views between the linear and the scale; returns the view and its feature axis."""
    last = y.ndim - 1
    if kind == "to_channels_first" and y.ndim >= 3:
        return y.permute(0, last, *range(1, last)), 1
    if kind == "transpose" and y.ndim >= 2:
        return y.transpose(-1, -2), last - 1
    if kind == "flatten":
        return y.reshape(-1, cout), 1
    if kind == "split" and cout % 2 == 0 and cout > 2:
        return y.reshape(*y.shape[:-1], 2, cout // 2), None
    return y, last


class FuzzedLinear(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        req = c["requires"]
        self.fc = torch.nn.Linear(c["cin"], c["cout"], bias=c["bias"])
        self.fc.weight.requires_grad_(req[1])
        if c["bias"]:
            self.fc.bias.requires_grad_(req[2])
        self.s = torch.nn.Parameter(torch.rand(c["cout"]) + 0.5, requires_grad=req[3])
        self.t = torch.nn.Parameter(torch.randn(c["cout"]), requires_grad=req[4])
        self.per_sample = torch.nn.Parameter(torch.rand(1) + 0.5, requires_grad=req[3])

    def operand(self, kind, param, z, axis):
        if kind == "python":
            return 0.6
        if kind == "zero_dim":
            return param[0]
        shape = [1] * z.ndim
        if kind == "per_sample":
            shape[0] = z.shape[0]
            return torch.linspace(0.5, 1.5, z.shape[0], dtype=param.dtype, device=param.device).reshape(shape) * self.per_sample.mean()
        if kind == "token":
            other = next((d for d in range(z.ndim) if d != axis and z.shape[d] > 1), None)
            if other is None:
                return param.mean()
            shape[other] = z.shape[other]
            return torch.linspace(0.5, 1.5, z.shape[other], dtype=param.dtype, device=param.device).reshape(shape) * param.mean()
        if axis is None:  # split: one value per feature, as the split shape
            return param.reshape(z.shape[-2:])
        shape[axis] = z.shape[axis]
        return param.reshape(shape)

    def forward(self, x):
        c = self.c
        if c["producer"] == "matmul":
            y = torch.matmul(x, self.fc.weight.t())
        elif c["producer"] == "matmul_in_out":  # an (in, out) weight: autograd writes mm(A.t(), G)
            y = torch.matmul(x, self.fc.weight.t().contiguous())
        elif c["producer"] == "einsum":  # bmm in the graph
            y = torch.einsum("...i,oi->...o", x, self.fc.weight)
        else:
            y = self.fc(x)
        if c["producer"] != "linear" and self.fc.bias is not None:
            y = y + self.fc.bias
        z, axis = _chain(y, c["chain"], c["cout"])
        s = self.operand(c["scale"], self.s, z, axis)
        t = None if c["shift"] == "none" else self.operand(c["shift"], self.t, z, axis)
        if c["op"] == "addcmul" and isinstance(s, torch.Tensor) and t is not None and isinstance(t, torch.Tensor):
            out = torch.addcmul(t, z, s)
        else:
            if c["op"] == "div":
                out = z / s
            elif c["op"] == "mul_":
                out = z.mul_(s)  # the extra user below then reads the scaled values
            else:
                out = s * z if c["scale_first"] else z * s
            if t is not None:
                out = out + t
        if c["extra_user"]:
            out = out + z.mean()
        return torch.tanh(out)


def expected_linear_fold(c, x_shape) -> bool:
    if c["extra_user"] and c["op"] != "mul_":
        return False
    z, axis = _chain(torch.empty(*x_shape[:-1], c["cout"]), c["chain"], c["cout"])
    if axis is None:
        return False  # the view splits the features
    if c["scale"] == "per_sample" and z.shape[0] > 1 and axis != 0:  # a 2-d transpose puts features first
        return False
    if c["scale"] == "token" and any(z.shape[d] > 1 for d in range(z.ndim) if d != axis):
        return False
    # The scale's gradient is rebuilt from the weight's: with a frozen weight the
    # multiply stays.
    scale_needs_grad = c["scale"] != "python" and c["requires"][3] and not c["inference"]
    return not (scale_needs_grad and not c["requires"][1])


@on_devices
@given(linear_configs())
def test_fuzz_linear_against_eager(device, cfg):
    torch._dynamo.reset()
    compile_affine.reset()
    torch.manual_seed(0)
    with _default_dtype(torch.float64):
        c = cfg
        x = torch.randn(*c["lead"], 3, c["cin"], device=device, requires_grad=c["requires"][0] and not c["inference"])
        with torch.device(device):
            model = FuzzedLinear(c)
        compiled = torch.compile(model, backend=pass_backend(ALWAYS))
        with torch.inference_mode(c["inference"]):
            out_c = compiled(x)
            out_e = model(x)
        assert_close_rel(out_c, out_e, 1e-10, "forward")
        if not c["inference"] and out_e.requires_grad:
            compare_gradients(out_c, out_e, [t for t in (x, *model.parameters()) if t.requires_grad], 1e-8)
        graph = compile_affine.report().graphs[0]
        linear_sites = [s for s in graph.sites if s.producer == "linear"]
        # A scale over the first dim (per sample, or the tokens of a 2-d input) is a gate:
        # counted, not a site.
        if c["scale"] in ("per_sample", "token") and not linear_sites:
            assert graph.not_affine == {"per-sample gate or mask": 1} and not expected_linear_fold(c, x.shape), c
            return
        first = linear_sites[0]
        assert first.folded == expected_linear_fold(c, x.shape), (first.reason, c)


# --- fp32 accuracy of the fold --------------------------------------------------------------

_FP32_EXAMPLES = 25 if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci" else 500


@settings(max_examples=_FP32_EXAMPLES)
@given(configs())
def test_fuzz_fp32_error_within_a_factor_of_the_unfolded_graph(cfg):
    """A legal conv site in fp32: every gradient's error against float64 stays within 4x
    the unfolded graph's (floored at 1e-5: cancelling gradients behind a saturated tanh
    are rounding noise either way)."""
    from .test_numerics import NEVER, fp32_errors

    c = dict(cfg, extra_user=False, inference=False, requires=[True] * 5)
    assume(c["scale"] in LEGAL_SCALES and c["shift"] != "per_sample")
    x = torch.randn(2, c["cin"], *(c["size"],) * c["dims"])
    probe = torch.zeros(*(c["cin"], c["cout"] // c["groups"]) if c["transposed"] else (c["cout"], c["cin"] // c["groups"]), *(c["k"],) * c["dims"])
    try:
        if c["transposed"]:
            conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[c["dims"]]
            out_shape = conv(x, probe, None, c["stride"], c["padding"], c["output_padding"], c["groups"], c["dilation"]).shape
        else:
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[c["dims"]]
            out_shape = conv(x, probe, None, c["stride"], c["padding"], c["dilation"], c["groups"]).shape
    except RuntimeError:
        assume(False)
    assume(all(size > 0 for size in out_shape))
    torch.manual_seed(0)
    model = Fuzzed(c, out_shape)
    compile_affine.reset()
    unfolded = fp32_errors(model, x, NEVER)
    compile_affine.reset()
    folded = fp32_errors(model, x, ALWAYS)
    assert compile_affine.report().graphs[0].sites[0].folded, c
    bad = [f"{k}: folded {folded[k]:.2e} unfolded {unfolded[k]:.2e}" for k in unfolded if folded[k] > 4 * max(unfolded[k], 1e-5)]
    assert not bad, (bad, c)
