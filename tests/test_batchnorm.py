"""Eval-mode batch norm (running statistics fixed, weight and bias learning) after a
convolution or a linear layer: recognition, the normalised and folded graphs, against
eager in float64 (to rounding) and fp32, real models, and the cases that must not fold."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ._expect import TestCase, pinned_on_2_14  # skips where expecttest is missing

import compile_affine
from compile_affine.bench.core.measure import saved_for_backward
from compile_affine.settings import Settings

from .helpers import ALWAYS, check_against_eager, count, forward_graph, graph_text, joint_graph, on_devices, pass_backend

aten = torch.ops.aten
F64 = dict(out_tol=1e-12, grad_tol=1e-10)


def randomize(model: nn.Module, eval_norms: bool = True) -> nn.Module:
    """Non-trivial running statistics and affine parameters; every norm in eval mode."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
            if m.affine:
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.normal_(m.bias)
            if eval_norms:
                m.eval()
    return model


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, affine: bool = True, act=torch.tanh):
        super().__init__()
        out = conv.out_channels
        norms = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
        self.conv = conv
        self.bn = norms[len(conv.kernel_size)](out, affine=affine)
        self.act = act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def _inputs(conv: nn.Module, batch=2, size=7):
    dims = len(conv.kernel_size)
    return torch.randn(batch, conv.in_channels, *([size] * dims))


CONVS = {
    "conv2d": lambda: nn.Conv2d(3, 6, 3, padding=1),
    "conv2d_nobias_stride2": lambda: nn.Conv2d(3, 6, 3, stride=2, bias=False),
    "conv1d": lambda: nn.Conv1d(3, 6, 3),
    "conv3d": lambda: nn.Conv3d(3, 4, 3, padding=1, bias=False),
    "conv_transpose2d": lambda: nn.ConvTranspose2d(3, 6, 3, stride=2),
    "conv_transpose2d_grouped": lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False),
    "grouped": lambda: nn.Conv2d(4, 6, 3, groups=2),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False, padding=1),
}


def _assert_folds(n: int) -> None:
    """Every graph compiled (the SGD steps recompile for an input without grad) folds ``n`` batch norms."""
    report = compile_affine.report()
    assert report.graphs and all(g.folded == n == len(g.sites) for g in report.graphs), str(report)
    assert all(s.kind == "batch_norm" for s in report), str(report)


# --- the graphs ---------------------------------------------------------------------


def bn_fn(x, w, cb, bw, bb, rm, rv):
    return F.batch_norm(F.conv2d(x, w, cb), rm, rv, bw, bb, training=False, eps=1e-5)


def bn_args(requires=(False, True, True, True, True)):
    torch.manual_seed(0)
    x, w, cb, bw, bb = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4), torch.rand(4) + 0.5, torch.randn(4)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    return [a.requires_grad_(r) for a, r in zip((x, w, cb, bw, bb), requires)] + [rm, rv]


class TestGraphs(TestCase):
    @pinned_on_2_14  # 2.11 writes rsqrt as reciprocal(sqrt(...)) * 1 in the forward
    def test_joint_graph(self):
        _, after = joint_graph(bn_fn, *bn_args())
        self.assertExpectedInline(graph_text(after), """\
convert_element_type = convert_element_type(primals_6, torch.float32)
convert_element_type_1 = convert_element_type(primals_7, torch.float32)
add = add.Tensor(convert_element_type_1, 1e-05)
rsqrt = rsqrt(add)
unsqueeze = unsqueeze(convert_element_type, -1)
unsqueeze_1 = unsqueeze(unsqueeze, -1)
unsqueeze_2 = unsqueeze(rsqrt, -1)
unsqueeze_3 = unsqueeze(unsqueeze_2, -1)
unsqueeze_4 = unsqueeze(primals_4, -1)
unsqueeze_5 = unsqueeze(unsqueeze_4, -1)
reshape_default = reshape(unsqueeze_1, [-1])
sub_tensor = sub.Tensor(primals_3, reshape_default)
reshape_default_1 = reshape(unsqueeze_3, [-1])
reshape_default_2 = reshape(unsqueeze_5, [-1])
mul_tensor = mul.Tensor(reshape_default_1, reshape_default_2)
reshape_default_3 = reshape(mul_tensor, [1, 4, 1, 1])
unsqueeze_6 = unsqueeze(primals_5, -1)
unsqueeze_7 = unsqueeze(unsqueeze_6, -1)
reshape_default_4 = reshape(reshape_default_3, [-1])
reshape_default_5 = reshape(reshape_default_4, [4, 1, 1, 1])
mul_tensor_2 = mul.Tensor(primals_2, reshape_default_5)
reshape_default_6 = reshape(unsqueeze_7, [-1])
mul_tensor_3 = mul.Tensor(sub_tensor, reshape_default_4)
add_tensor = add.Tensor(mul_tensor_3, reshape_default_6)
convolution_default_1 = convolution(primals_1, mul_tensor_2, add_tensor, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
add_2 = add.Tensor(primals_7, 1e-05)
rsqrt_1 = rsqrt(add_2)
convolution_backward_default = convolution_backward(tangents_1, primals_1, mul_tensor_2, [4], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, True])
getitem_3 = getitem(convolution_backward_default, 1)
getitem_4 = getitem(convolution_backward_default, 2)
reshape_default_7 = reshape(getitem_4, [4])
mul_tensor_4 = mul.Tensor(getitem_3, reshape_default_5)
mul_tensor_5 = mul.Tensor(getitem_4, reshape_default_4)
mul_tensor_6 = mul.Tensor(getitem_3, primals_2)
sum_dim_int_list = sum.dim_IntList(mul_tensor_6, [1, 2, 3])
mul_tensor_7 = mul.Tensor(getitem_4, sub_tensor)
add_tensor_1 = add.Tensor(sum_dim_int_list, mul_tensor_7)
reshape_default_9 = reshape(add_tensor_1, [4])
mul_9 = mul.Tensor(reshape_default_9, rsqrt_1)
return ['convolution_default_1', None, 'mul_tensor_4', 'mul_tensor_5', 'mul_9', 'reshape_default_7', None, None]""")
        # Nothing activation-sized reads the conv output, and there is one conv each way.
        (conv,) = [n for n in after.graph.nodes if n.target is aten.convolution.default]
        self.assertEqual([u.op for u in conv.users], ["output"])
        self.assertEqual(count(after, aten.convolution_backward.default), 1)
        _assert_folds(1)

    def test_inference_graph(self):
        _, after = forward_graph(bn_fn, *[a.detach() for a in bn_args()])
        self.assertEqual(count(after, aten.sub.Tensor), 1)  # b_conv - rm, weight-sized
        (conv,) = [n for n in after.graph.nodes if n.target is aten.convolution.default]
        self.assertEqual([u.op for u in conv.users], ["output"])
        _assert_folds(1)

    def test_never_leaves_graph_unchanged(self):
        before, after = joint_graph(bn_fn, *bn_args(), settings=Settings(fold="never"))
        self.assertEqual(before, graph_text(after))
        (record,) = compile_affine.report()
        self.assertEqual((record.kind, record.producer, record.reason), ("batch_norm", "conv2d", "fold='never'"))


# --- against eager ------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CONVS))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_conv_kinds_float64(kind, affine):
    model = randomize(ConvBN(CONVS[kind](), affine=affine)).double()
    x = _inputs(model.conv).double().requires_grad_()
    check_against_eager(model, x, pass_backend(ALWAYS), **F64)
    _assert_folds(1)


@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose2d", "depthwise"])
@on_devices
def test_conv_kinds_fp32(kind, device):
    model = randomize(ConvBN(CONVS[kind]())).to(device)
    check_against_eager(model, _inputs(model.conv).to(device).requires_grad_(), pass_backend(ALWAYS))
    _assert_folds(1)


# Which of x, W, conv bias, w (BN weight), b (BN bias) require grad.
SUBSETS = ["xWcwb", "Wcwb", "x", "W", "c", "w", "b", "wb", "xw", "Wb", "none"]


@pytest.mark.parametrize("subset", SUBSETS)
def test_requires_grad_subsets_float64(subset):
    model = randomize(ConvBN(nn.Conv2d(3, 6, 3))).double()
    flags = dict(W=model.conv.weight, c=model.conv.bias, w=model.bn.weight, b=model.bn.bias)
    for key, p in flags.items():
        p.requires_grad_(key in subset)
    x = _inputs(model.conv).double().requires_grad_("x" in subset)
    if subset == "none":
        with torch.no_grad():
            out = torch.compile(model, backend=pass_backend(ALWAYS))(x)
        torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-12)
    else:
        check_against_eager(model, x, pass_backend(ALWAYS), **F64)
    _assert_folds(1)


class Functional(nn.Module):
    """``F.batch_norm(..., training=False)`` called directly, weight and bias optional."""

    def __init__(self, weight: bool, bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.register_buffer("rm", torch.randn(5))
        self.register_buffer("rv", torch.rand(5) + 0.5)
        self.w = nn.Parameter(torch.rand(5) + 0.5) if weight else None
        self.b = nn.Parameter(torch.randn(5)) if bias else None

    def forward(self, x):
        return torch.relu(F.batch_norm(self.conv(x), self.rm, self.rv, self.w, self.b, training=False, eps=1e-3))


@pytest.mark.parametrize("weight,bias", [(True, True), (True, False), (False, True), (False, False)])
@on_devices
def test_functional_batch_norm(weight, bias, device):
    model = Functional(weight, bias).double().to(device)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device, requires_grad=True)
    check_against_eager(model, x, pass_backend(ALWAYS), **F64)
    _assert_folds(1)


def test_inference_float64():
    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)))
    model = model.double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        out = torch.compile(model, backend=pass_backend(ALWAYS))(x)
    torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-12)
    _assert_folds(2)


def test_sync_batch_norm_in_eval():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.SyncBatchNorm(6), nn.ReLU())
    model = randomize(model).double()
    check_against_eager(model, torch.randn(2, 3, 8, 8, dtype=torch.float64), pass_backend(ALWAYS), **F64)
    _assert_folds(1)


class LinearBN(nn.Module):
    """BatchNorm1d after a linear layer: on (N, C) (an MLP head), on LeViT's flattened
    (B * N, C) tokens reshaped back, or on (N, C, L) with the features moved to dim 1."""

    def __init__(self, form: str, bias: bool = True):
        super().__init__()
        self.form = form
        self.fc = nn.Linear(6, 5, bias=bias)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        if self.form == "NC":
            return torch.tanh(self.bn(self.fc(x)))
        y = self.fc(x)
        if self.form == "levit":
            return torch.tanh(self.bn(y.flatten(0, 1)).reshape_as(y))
        return torch.tanh(self.bn(y.transpose(1, 2)))  # (N, L, C) -> (N, C, L)


@pytest.mark.parametrize("form", ["NC", "levit", "NCL"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@on_devices
def test_linear_batch_norm_1d_float64(form, bias, device):
    model = randomize(LinearBN(form, bias)).double().to(device)
    shape = (4, 6) if form == "NC" else (2, 3, 6)
    x = torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
    check_against_eager(model, x, pass_backend(ALWAYS), **F64)
    _assert_folds(1)


# --- real models --------------------------------------------------------------------


def test_torchvision_resnet18_eval_bn_float64():
    torchvision = pytest.importorskip("torchvision")
    model = randomize(torchvision.models.resnet18(num_classes=10)).double()
    check_against_eager(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), pass_backend(ALWAYS), lr=1e-3, **F64)
    graph = compile_affine.report().graphs[0]
    assert graph.training and graph.folded == 20 == len(graph.sites), str(compile_affine.report())


def test_torchvision_resnet18_eval_bn_through_inductor():
    """The issue's case end to end, with the plugin's own defaults (fold="auto")."""
    torchvision = pytest.importorskip("torchvision")
    model = randomize(torchvision.models.resnet18(num_classes=10)).double()
    # 64 px: the stem's output is 14x its weight in bytes, so the default (objective="time") folds it.
    check_against_eager(model, torch.randn(2, 3, 64, 64, dtype=torch.float64), "compile_affine", steps=3, lr=1e-3,
                        out_tol=1e-10, grad_tol=1e-8)  # fmt: skip
    graph = compile_affine.report().graphs[0]
    assert graph.training and len(graph.sites) == 20
    assert graph.folded >= 1 and all(s.folded or s.declined_by_cost for s in graph.sites), str(compile_affine.report())


def test_timm_model_eval_bn_float64():
    timm = pytest.importorskip("timm")
    model = randomize(timm.create_model("resnet10t", num_classes=10, pretrained=False)).double()
    check_against_eager(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), pass_backend(ALWAYS), lr=1e-3, **F64)
    graph = compile_affine.report().graphs[0]
    assert graph.folded == len(graph.sites) > 0, str(compile_affine.report())


def test_saved_bytes_lower_than_stock():
    model = randomize(ConvBN(nn.Conv2d(4, 8, 3, padding=1)))
    x = torch.randn(2, 4, 10, 10)

    def saved(settings):
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend=pass_backend(settings))
        compiled(x)
        return saved_for_backward(lambda: compiled(x))

    stock, folded = saved(Settings(fold="never", strict=True)), saved(ALWAYS)
    conv_out = (2, 8, 10, 10)
    assert (stock.shapes.count(conv_out), folded.shapes.count(conv_out)) == (2, 1)  # conv output gone, tanh's kept
    assert folded.bytes < stock.bytes


# --- never folded -------------------------------------------------------------------


REAL = {"compile_affine": {"fold": "always", "strict": True}}


def _exact_run(model, x, backend, **kwargs):
    """Output, parameter gradients and buffers after one step."""
    torch._dynamo.reset()
    model = copy.deepcopy(model)
    out = torch.compile(model, backend=backend, **kwargs)(x)
    out.sum().backward()
    return [out, *(p.grad for p in model.parameters()), *model.buffers()]


def _assert_exact(model, x, stock, ours, grads_as_eager=True):
    """Nothing folds; the results equal, bit for bit, those of ``stock`` (the same
    compiler without the fold), and match eager."""
    stock = stock()
    compile_affine.reset()
    ours = ours()
    assert compile_affine.report().folded == 0, str(compile_affine.report())
    for a, b in zip(ours, stock, strict=True):
        assert torch.equal(a, b)
    eager = copy.deepcopy(model)
    ref = eager(x)
    ref.sum().backward()
    expected = [ref, *(p.grad for p in eager.parameters()), *eager.buffers()]
    for i, (a, b) in enumerate(zip(ours, expected, strict=True)):
        if grads_as_eager or i == 0 or i > len(list(model.parameters())):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_training_mode_batch_norm_never_folds():
    model = randomize(ConvBN(nn.Conv2d(3, 6, 3)), eval_norms=False).double()
    x = torch.randn(4, 3, 7, 7, dtype=torch.float64)
    _assert_exact(model, x, lambda: _exact_run(model, x, pass_backend(Settings(fold="never", strict=True))),
                  lambda: _exact_run(model, x, pass_backend(ALWAYS)))  # fmt: skip
    graphs = compile_affine.report().graphs
    # Not an affine layer at all: counted by name, never listed as a refused site.
    assert graphs and all(g.sites == [] and g.not_affine == {"training-mode batch norm": 1} for g in graphs)


class MutatesStats(nn.Module):
    """An eval-mode batch norm whose running mean the graph updates in place."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "momentum":
            self.bn.running_mean.mul_(0.9).add_(0.1)
        else:
            self.bn.running_var.copy_(self.bn.running_var * 1.5)
        return torch.tanh(self.bn(y))


@pytest.mark.parametrize("how", ["momentum", "copy_"])
def test_mutated_running_stats_never_fold(how, monkeypatch):
    """Through the real backend: it is the one that tells the pass which inputs the graph mutates."""
    model = randomize(MutatesStats(how)).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)

    def stock():
        monkeypatch.setenv("COMPILE_AFFINE", "0")
        return _exact_run(model, x, "compile_affine")

    def ours():
        monkeypatch.setenv("COMPILE_AFFINE", "1")
        return _exact_run(model, x, "compile_affine", options=REAL)

    # Stock Inductor's parameter gradients differ from eager's here (seen with this test;
    # its backward seems to read the buffer after the graph's epilogue updated it). The
    # pass must leave exactly stock's graph; outputs and buffers match eager.
    _assert_exact(model, x, stock, ours, grads_as_eager=False)
    (site,) = compile_affine.report()
    assert site.kind == "batch_norm" and site.reason.startswith("graph mutates"), site.reason


class ReluInPlaceConvBN(nn.Module):
    """``bn(conv(x.relu_()))``, x a graph input: a DDPOptimizer piece that starts before
    ``ReLU(inplace=True)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.tanh(self.bn(self.conv(x.relu_())))


def test_mutated_conv_input_still_folds_the_batch_norm():
    """Only the running statistics and the weight matter to ``batch_norm_problem``; the
    conv input, updated in place before the conv, is read by the folded backward exactly
    where stock's ``convolution_backward`` reads it (issue 29)."""
    model = randomize(ReluInPlaceConvBN()).double()
    results = []
    for backend in (None, "compile_affine"):
        torch._dynamo.reset()
        m = copy.deepcopy(model)
        torch.manual_seed(1)
        leaf = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
        x = leaf * 1.5  # a non-leaf that requires grad, as the previous piece's activation
        out = (m if backend is None else torch.compile(m, backend=backend, options=REAL))(x)
        out.backward(torch.randn_like(out))
        results.append([out, leaf.grad, *(p.grad for p in m.parameters()), *m.buffers(), x])
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-10, atol=1e-10, msg=lambda m: f"{i}: {m}")
    (site,) = compile_affine.report()
    assert site.kind == "batch_norm" and site.folded, site.reason


def test_mode_switch_recompiles_without_the_fold():
    model = randomize(ConvBN(nn.Conv2d(3, 6, 3))).double()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=pass_backend(ALWAYS))
    x = torch.randn(4, 3, 7, 7, dtype=torch.float64)
    for train in (False, True, False):
        model.bn.train(train)
        eager.bn.train(train)
        out, ref = compiled(x), eager(x)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        out.sum().backward()
        ref.sum().backward()
        for p, q in zip(model.parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model.bn.running_mean, eager.bn.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model.bn.running_var, eager.bn.running_var, rtol=1e-12, atol=1e-12)
    graphs = compile_affine.report().graphs
    assert [g.folded for g in graphs] == [1, 0], str(compile_affine.report())  # the eval graph is reused on switching back


# --- the benchmark's fine-tuning mode (not timed here) ------------------------------


def test_finetune_bench_keeps_norms_in_eval_and_runs(tmp_path):
    import json

    pytest.importorskip("torchvision", reason="the benchmark's ResNet-50 is torchvision's")

    import compile_affine.bench.__main__ as bench
    from compile_affine.bench.core.models import resnet50_finetune
    from compile_affine.bench.core.runner import BACKENDS
    from compile_affine.bench.modes.resnet import FINETUNE_VARIANTS

    model = resnet50_finetune("bn").train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 53 and not any(m.training for m in norms) and model.training
    out = tmp_path / "finetune.json"
    argv = ["finetune", "--batch", "1", "--res", "32", "--steps", "1", "--warmup", "0",
            "--variants", "none/eager,bn/eager", "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"none / eager", "bn / eager"} and all(r["step_ms"] > 0 for r in rows.values())
    assert "inductor-conv_bn_eval" in BACKENDS and "bn/inductor-conv_bn_eval" in FINETUNE_VARIANTS
