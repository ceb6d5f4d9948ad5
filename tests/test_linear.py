"""Linear layers followed by a per-feature scale (LayerScale), through the views and
permutes real blocks put between them, and the cases that must not fold."""

import pytest
import torch
import torch.nn as nn
from ._expect import TestCase, pinned_on_2_14  # skips where expecttest is missing

import compile_affine

from .helpers import ALWAYS, check_against_eager, check_autocast, count, graph_text, joint_graph, on_devices, pass_backend

aten = torch.ops.aten


class LinearScale(nn.Module):
    """``body(m, x)`` over a Linear(8 -> 6) and a LayerScale ``gamma`` (6,)."""

    def __init__(self, body, bias=True, cin=8):
        super().__init__()
        self.fc = nn.Linear(cin, 6, bias=bias)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.t = nn.Parameter(torch.randn(6))
        self.body = body

    def forward(self, x):
        return torch.tanh(self.body(self, x))


FORMS = {
    "x * gamma": (lambda m, x: m.fc(x) * m.gamma, (2, 5, 8)),
    "gamma * x": (lambda m, x: m.gamma * m.fc(x), (2, 5, 8)),
    "x.mul(gamma)": (lambda m, x: m.fc(x).mul(m.gamma), (2, 5, 8)),
    "x.mul_(gamma)": (lambda m, x: m.fc(x).mul_(m.gamma), (2, 5, 8)),
    "2-d input (addmm, no views)": (lambda m, x: m.fc(x[0]) * m.gamma, (2, 5, 8)),
    "4-d input": (lambda m, x: m.fc(x) * m.gamma, (2, 3, 4, 8)),
    "x / gamma": (lambda m, x: m.fc(x) / m.gamma, (2, 5, 8)),
    "x * gamma + t": (lambda m, x: m.fc(x) * m.gamma + m.t, (2, 5, 8)),
    "addcmul": (lambda m, x: torch.addcmul(m.t, m.fc(x), m.gamma), (2, 5, 8)),
    "python scalar": (lambda m, x: m.fc(x) * 0.5, (2, 5, 8)),
    "transpose, then (C, 1) scale": (lambda m, x: m.fc(x).transpose(1, 2) * m.gamma.view(-1, 1), (2, 5, 8)),
    "NHWC linear, permute to NCHW, (1, C, 1, 1) scale": (
        lambda m, x: m.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * m.gamma.reshape(1, -1, 1, 1),
        (2, 8, 3, 3),
    ),
    "reshape that keeps the features whole": (lambda m, x: m.fc(x).reshape(10, 6) * m.gamma, (2, 5, 8)),
    "chain": (lambda m, x: (m.fc(x) * m.gamma + m.t) / m.gamma * 2.0, (2, 5, 8)),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [True, False])
@on_devices
def test_layerscale_form_folds_exactly(form, bias, device):
    body, shape = FORMS[form]
    model = LinearScale(body, bias=bias).double().to(device)
    x = torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
    folded = check_against_eager(model, x, pass_backend(ALWAYS), out_tol=1e-12, grad_tol=1e-10)
    sites = compile_affine.report().graphs[0].sites
    assert folded == len(sites) == (3 if form == "chain" else 1), [s.reason for s in sites]
    assert {s.producer for s in sites} == {"linear"}


@on_devices
def test_inference_folds_too(device):
    model = LinearScale(FORMS["x * gamma + t"][0]).to(device)
    x = torch.randn(2, 5, 8, device=device)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=pass_backend(ALWAYS))(x), model(x))
    graph = compile_affine.report().graphs[0]
    assert not graph.training and graph.folded == 1


NOT_FOLDED = {
    "scale over tokens, not features": (lambda m, x: m.fc(x) * m.tokens, "scale varies along dim 1"),
    "view splits the features": (
        lambda m, x: m.fc(x).view(2, 5, 2, 3) * m.gamma.view(2, 3),
        "aten.view.default between the linear and the scale splits the feature axis",
    ),
    "linear output reused": (lambda m, x: (y := m.fc(x)) * m.gamma + y.mean(), "linear output reused"),
    "per-sample bias between linear and scale": (
        lambda m, x: (m.fc(x) + m.per_sample) * m.gamma,
        "bias varies per sample",
    ),
}


class Negative(LinearScale):
    def __init__(self, body):
        super().__init__(body)
        self.tokens = nn.Parameter(torch.rand(5, 1) + 0.5)
        self.per_sample = nn.Parameter(torch.rand(2, 1, 1) + 0.5)


@pytest.mark.parametrize("case", NOT_FOLDED)
def test_illegal_linear_site_is_left_alone(case):
    body, reason = NOT_FOLDED[case]
    x = torch.randn(2, 5, 8, requires_grad=True)
    assert check_against_eager(Negative(body), x, pass_backend(ALWAYS), out_tol=1e-6, grad_tol=1e-6) == 0
    sites = compile_affine.report().graphs[0].sites
    assert sites and not any(s.folded for s in sites)
    assert any(s.reason.startswith(reason) for s in sites), [s.reason for s in sites]


def test_a_per_sample_scale_on_a_linear_is_a_gate_not_a_site():
    x = torch.randn(2, 5, 8, requires_grad=True)
    model = Negative(lambda m, x: m.fc(x) * m.per_sample)
    assert check_against_eager(model, x, pass_backend(ALWAYS), out_tol=1e-6, grad_tol=1e-6) == 0
    graph = compile_affine.report().graphs[0]
    assert graph.sites == [] and graph.not_affine == {"per-sample gate or mask": 1}


class TimmLayerScale(nn.Module):
    """As timm writes it (timm/layers/layer_scale.py)."""

    def __init__(self, dim, init_values=1e-5, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class ViTBlock(nn.Module):
    """A DeiT-III / DINOv2-style pre-norm transformer block with LayerScale on both branches."""

    def __init__(self, dim=16, heads=2, inplace=False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.ls1, self.ls2 = TimmLayerScale(dim, 0.5, inplace), TimmLayerScale(dim, 0.5, inplace)
        self.heads = heads

    def attn(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(*qkv.unbind(0))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.fc2(nn.functional.gelu(self.fc1(self.norm2(x)))))


@pytest.mark.parametrize("inplace", [False, True])
@on_devices
def test_vit_block_with_timm_layerscale(inplace, device):
    with torch.no_grad():
        model = ViTBlock(inplace=inplace).double().to(device)
        for ls in (model.ls1, model.ls2):
            ls.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 16, dtype=torch.float64, device=device, requires_grad=True)
    assert check_against_eager(model, x, pass_backend(ALWAYS), out_tol=1e-12, grad_tol=1e-10) == 2
    _assert_only_layerscales_fold(compile_affine.report().graphs[0], 2)


def _assert_only_layerscales_fold(graph, layerscales):
    # GELU's own multiplies of the fc1 output are candidates too, refused because that
    # output has other readers.
    assert graph.folded == layerscales
    assert {s.reason for s in graph.sites if not s.folded} <= {"linear output reused"}


@on_devices
def test_torchvision_convnext_block(device):
    """torchvision's ConvNeXt block: depthwise conv, NHWC LayerNorm and MLP, permute back,
    then ``layer_scale (C, 1, 1) * x``."""
    convnext = pytest.importorskip("torchvision.models.convnext")
    torch.manual_seed(0)
    model = nn.Sequential(*(convnext.CNBlock(8, layer_scale=0.5, stochastic_depth_prob=0.0) for _ in range(2))).double()
    model = model.to(device)
    with torch.no_grad():
        for block in model:
            block.layer_scale.uniform_(0.5, 1.5)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, device=device, requires_grad=True)
    assert check_against_eager(model, x, pass_backend(ALWAYS), out_tol=1e-12, grad_tol=1e-10) == 2
    graph = compile_affine.report().graphs[0]
    _assert_only_layerscales_fold(graph, 2)
    assert {s.producer for s in graph.sites if s.folded} == {"linear"}


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@on_devices
def test_autocast_layerscale_through_inductor(dtype, tol, device):
    def backend(gm, inputs):
        return compile_affine.backend(gm, inputs, options={"compile_affine": {"fold": "always", "strict": True}})

    check_autocast(LinearScale(FORMS["x * gamma"][0]).to(device), torch.randn(4, 5, 8, device=device), backend, dtype, tol)
    assert compile_affine.report().graphs[0].folded == 1


def layerscale(x, w, b, gamma):
    return torch.nn.functional.linear(x, w, b) * gamma


class TestLinearRewrite(TestCase):
    @pinned_on_2_14
    def test_joint_graph_after(self):
        torch.manual_seed(0)
        args = [torch.randn(2, 5, 8), torch.randn(6, 8), torch.randn(6), torch.rand(6) + 0.5]
        _, after = joint_graph(layerscale, *[a.requires_grad_() for a in args])
        # No multiply by gamma on a (10, 6) activation is left, forward or backward:
        # gamma meets only the (8, 6) weight, the (6,) bias and their gradients.
        self.assertExpectedInline(graph_text(after), """\
view = view(primals_1, [10, 8])
permute = permute(primals_2, [1, 0])
reshape_default = reshape(primals_4, [-1])
reshape_default_1 = reshape(reshape_default, [1, 6])
mul_tensor = mul.Tensor(permute, reshape_default_1)
reshape_default_2 = reshape(primals_3, [-1])
mul_tensor_1 = mul.Tensor(reshape_default_2, reshape_default)
reshape_default_3 = reshape(mul_tensor_1, [1, -1])
addmm_default = addmm(reshape_default_3, view, mul_tensor)
view_default = view(addmm_default, [2, 5, 6])
view_3 = view(tangents_1, [10, 6])
permute_default = permute(mul_tensor, [1, 0])
mm = mm(view_3, permute_default)
permute_2 = permute(view_3, [1, 0])
mm_1 = mm(permute_2, view)
reshape_default_4 = reshape(reshape_default, [-1, 1])
mul_tensor_2 = mul.Tensor(mm_1, reshape_default_4)
permute_3 = permute(mul_tensor_2, [1, 0])
sum_2 = sum.dim_IntList(view_3, [0], True)
reshape_default_5 = reshape(reshape_default, [1, -1])
mul_tensor_3 = mul.Tensor(sum_2, reshape_default_5)
view_4 = view(mul_tensor_3, [6])
permute_4 = permute(permute_3, [1, 0])
view_5 = view(mm, [2, 5, 8])
permute_default_1 = permute(permute, [1, 0])
mul_tensor_4 = mul.Tensor(mm_1, permute_default_1)
sum_dim_int_list = sum.dim_IntList(mul_tensor_4, [1])
reshape_default_6 = reshape(sum_2, [6])
reshape_default_7 = reshape(primals_3, [-1])
mul_tensor_5 = mul.Tensor(reshape_default_6, reshape_default_7)
add_tensor = add.Tensor(sum_dim_int_list, mul_tensor_5)
reshape_default_8 = reshape(add_tensor, [1, 1, 6])
view_2 = view(reshape_default_8, [6])
return ['view_default', 'view_5', 'permute_4', 'view_4', 'view_2']""")
        activation_muls = [n for n in after.graph.nodes if n.target is aten.mul.Tensor
                           and n.meta["val"].numel() >= 10 * 6]  # fmt: skip
        assert not activation_muls
        assert count(after, aten.addmm.default) == 1


@pytest.mark.parametrize("input_grad", [True, False])
def test_weight_shared_by_a_second_linear_call(input_grad):
    """The same nn.Linear applied twice, only once scaled: the other call's input
    gradient must keep reading the unscaled weight (``W.t()`` may be one shared node)."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 6)
            self.gamma = nn.Parameter(torch.rand(6) + 0.5)

        def forward(self, x):
            return torch.tanh(self.fc(x) * self.gamma + self.fc(x * 2))

    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=input_grad)
    assert check_against_eager(Tied().double(), x, pass_backend(ALWAYS), out_tol=1e-12, grad_tol=1e-10) == 1
    assert compile_affine.report().graphs[0].folded == 1


class TwoHeads(nn.Module):
    """Two linears on one 2-D input (one ``A`` node), the first frozen: found in review,
    the first site took the second's ``g * s`` for its own and both rewrote it."""

    def __init__(self, scale):
        super().__init__()
        self.fc1 = nn.Linear(8, 6, bias=False).requires_grad_(False)
        self.fc2 = nn.Linear(8, 6)
        self.g = nn.Parameter(torch.rand(6) + 0.5)
        self.scale = scale

    def forward(self, x):
        if self.scale == "python":
            return self.fc1(x) * 0.5 + self.fc2(x) * 0.5
        if self.scale == "flattened once":
            h = x.reshape(-1, 8)
            return self.fc1(h) * 0.5 + self.fc2(h) * 0.5
        g = self.g if self.scale == "parameter" else self.g.detach()
        return self.fc1(x) * g + self.fc2(x) * g


@pytest.mark.parametrize("scale", ["parameter", "buffer", "python", "flattened once"])
def test_two_linears_on_one_input_do_not_share_a_backward(scale):
    x = torch.randn(5, 8, dtype=torch.float64)
    assert check_against_eager(TwoHeads(scale).double(), x, pass_backend(ALWAYS), out_tol=1e-12, grad_tol=1e-10) == 0
    # Both sites seen and refused (a pass that saw nothing would leave none).
    reasons = [s.reason for s in compile_affine.report().graphs[0].sites]
    assert len(reasons) == 2 and all(r.startswith(_SHARED) for r in reasons), reasons


_SHARED = ("another site claims the same backward nodes", "another linear reads the same input or weight")


def test_whisper_style_scaled_q_and_k_with_a_frozen_q_projection():
    class Attn(nn.Module):
        def __init__(self, d=8):
            super().__init__()
            self.q = nn.Linear(d, d).requires_grad_(False)
            self.k = nn.Linear(d, d, bias=False)
            self.d = d

        def forward(self, x):
            q, k = self.q(x) * self.d**-0.25, self.k(x) * self.d**-0.25
            return (q @ k.t()).softmax(-1)

    x = torch.randn(5, 8, dtype=torch.float64)
    assert check_against_eager(Attn().double(), x, pass_backend(ALWAYS), out_tol=1e-12, grad_tol=1e-10) == 0
    reasons = [s.reason for s in compile_affine.report().graphs[0].sites]
    assert len(reasons) == 2 and all(r.startswith(_SHARED) for r in reasons), reasons


def test_recognition_visits_a_dag_of_adds_once():
    """``h = h + h`` forty times: walking both operands of every add without memory
    took 4x longer per two adds (found in review); this must finish at once."""

    def fn(x, g):
        h = x.sin()
        for _ in range(40):
            h = h + h
        return h * g

    joint_graph(fn, torch.randn(3, 4, requires_grad=True), torch.rand(4, requires_grad=True))
    assert compile_affine.report().graphs[0].sites == []


@pytest.mark.parametrize("producer", ["matmul", "x @ W.t()", "x @ W, W stored (in, out)", "einsum (bmm)", "bmm with an expanded weight"])
def test_linear_written_as_a_matrix_product(producer):
    class MatrixProduct(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 8))
            self.bias = nn.Parameter(torch.randn(6))
            self.gamma = nn.Parameter(torch.rand(6) + 0.5)
            self.weight_in_out = nn.Parameter(torch.randn(8, 6))

        def forward(self, x):
            if producer == "matmul":
                y = torch.matmul(x, self.weight.t()) + self.bias
            elif producer == "x @ W.t()":
                y = x @ self.weight.t()
            elif producer == "x @ W, W stored (in, out)":  # autograd writes mm(A.t(), G)
                y = x @ self.weight_in_out
            elif producer == "einsum (bmm)":
                y = torch.einsum("btc,oc->bto", x, self.weight) + self.bias
            else:
                y = torch.bmm(x, self.weight.t().expand(x.shape[0], 8, 6))
            return torch.tanh(y * self.gamma)

    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert check_against_eager(MatrixProduct().double(), x, pass_backend(ALWAYS), out_tol=1e-12, grad_tol=1e-10) == 1
    (site,) = compile_affine.report().graphs[0].sites
    assert site.folded, site.reason


@pytest.mark.parametrize("lead", [(2, 5), (4,)], ids=["3d", "2d"])
@pytest.mark.parametrize("bias_grad", [True, False])
def test_a_shifted_layerscale_reduces_its_gradient_once(bias_grad, lead):
    """``linear(x) * s + t``: the shift's ``sum(g)`` and the linear bias's ``sum(G)`` are one
    value over two views of ``g``; the folded backward computes it once (for ``t``, ``b``
    and the scale's bias term), where stock computes both. Exact against eager in float64.
    (2-d: the bias's sum reads ``g`` itself, and must not be taken for the shift's.)"""

    def fn(x, w, b, s, t):
        return torch.nn.functional.linear(x, w, b) * s + t

    torch.manual_seed(0)
    x = torch.randn(*lead, 8, dtype=torch.float64)
    w, b = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    s, t = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    args = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_(bias_grad), s.requires_grad_(), t.requires_grad_()]
    before, after = joint_graph(fn, *args)

    assert before.count("sum.dim_IntList") == 2 + bias_grad  # t's, s's sum(g * y), b's
    assert graph_text(after).count("sum.dim_IntList") == 2  # t's (serving b), and sum(gW' * W) for s
    compiled = torch.compile(fn, backend=pass_backend(ALWAYS))
    out, expected = compiled(*args), fn(*args)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.sum(), [a for a in args if a.requires_grad])
    expected_grads = torch.autograd.grad(expected.sum(), [a for a in args if a.requires_grad])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
