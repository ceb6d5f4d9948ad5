"""Pattern and rewrite unit tests on joint and forward graphs traced by AOTAutograd
(no Dynamo, no model): the rewritten graph text is pinned with expect-tests."""

import torch
from ._expect import TestCase  # skips where expecttest is missing

from compile_affine.settings import Settings

from .helpers import count, forward_graph, graph_text, joint_graph

aten = torch.ops.aten


def affine(x, w, b, s, t):
    y = torch.nn.functional.conv2d(x, w, b, stride=2, padding=1)
    return torch.relu(y * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1))


def inputs(requires=(False, True, True, True, True)):
    torch.manual_seed(0)
    x, w, b, s, t = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4), torch.rand(4) + 0.5, torch.randn(4)
    return [a.requires_grad_(r) for a, r in zip((x, w, b, s, t), requires)]


def users_of_conv_outputs(gm):
    return [u.target for n in gm.graph.nodes if n.target is aten.convolution.default for u in n.users]


class TestJointRewrite(TestCase):
    def test_joint_graph_before_and_after(self):
        before, after = joint_graph(affine, *inputs())
        self.assertExpectedInline(before, """\
convolution = convolution(primals_1, primals_2, primals_3, [2, 2], [1, 1], [1, 1], False, [0, 0], 1)
view = view(primals_4, [1, -1, 1, 1])
mul = mul.Tensor(convolution, view)
view_1 = view(primals_5, [1, -1, 1, 1])
add = add.Tensor(mul, view_1)
relu = relu(add)
alias = alias(relu)
alias_1 = alias(alias)
le = le.Scalar(alias_1, 0)
scalar_tensor = scalar_tensor(0, dtype=torch.float32, layout=torch.strided, device=cpu)
where = where.self(le, scalar_tensor, tangents_1)
sum_1 = sum.dim_IntList(where, [0, 2, 3], True)
view_2 = view(sum_1, [4])
mul_1 = mul.Tensor(where, convolution)
mul_2 = mul.Tensor(where, view)
sum_2 = sum.dim_IntList(mul_1, [0, 2, 3], True)
view_3 = view(sum_2, [4])
convolution_backward = convolution_backward(mul_2, primals_1, primals_2, [4], [2, 2], [1, 1], [1, 1], False, [0, 0], 1, [False, True, True])
getitem_1 = getitem(convolution_backward, 1)
getitem_2 = getitem(convolution_backward, 2)
return ['relu', None, 'getitem_1', 'getitem_2', 'view_3', 'view_2']""")
        self.assertExpectedInline(graph_text(after), """\
view = view(primals_4, [1, -1, 1, 1])
view_1 = view(primals_5, [1, -1, 1, 1])
reshape_default = reshape(view, [-1])
reshape_default_1 = reshape(reshape_default, [4, 1, 1, 1])
mul_tensor = mul.Tensor(primals_2, reshape_default_1)
reshape_default_2 = reshape(view_1, [-1])
mul_tensor_1 = mul.Tensor(primals_3, reshape_default)
add_tensor = add.Tensor(mul_tensor_1, reshape_default_2)
convolution_default = convolution(primals_1, mul_tensor, add_tensor, [2, 2], [1, 1], [1, 1], False, [0, 0], 1)
relu = relu(convolution_default)
alias = alias(relu)
alias_1 = alias(alias)
le = le.Scalar(alias_1, 0)
scalar_tensor = scalar_tensor(0, dtype=torch.float32, layout=torch.strided, device=cpu)
where = where.self(le, scalar_tensor, tangents_1)
convolution_backward_default = convolution_backward(where, primals_1, mul_tensor, [4], [2, 2], [1, 1], [1, 1], False, [0, 0], 1, [False, True, True])
getitem_3 = getitem(convolution_backward_default, 1)
getitem_4 = getitem(convolution_backward_default, 2)
reshape_default_3 = reshape(getitem_4, [1, 4, 1, 1])
view_2 = view(reshape_default_3, [4])
mul_tensor_2 = mul.Tensor(getitem_3, reshape_default_1)
mul_tensor_3 = mul.Tensor(getitem_4, reshape_default)
mul_tensor_4 = mul.Tensor(getitem_3, primals_2)
sum_dim_int_list = sum.dim_IntList(mul_tensor_4, [1, 2, 3])
mul_tensor_5 = mul.Tensor(getitem_4, primals_3)
add_tensor_1 = add.Tensor(sum_dim_int_list, mul_tensor_5)
reshape_default_5 = reshape(add_tensor_1, [1, 4, 1, 1])
view_3 = view(reshape_default_5, [4])
return ['relu', None, 'mul_tensor_2', 'mul_tensor_3', 'view_3', 'view_2']""")
        # The affine is gone from both halves: no mul reads a conv output, and the
        # backward conv runs on the folded weight.
        self.assertEqual(users_of_conv_outputs(after), [aten.relu.default])
        (cb,) = [n for n in after.graph.nodes if n.target is aten.convolution_backward.default]
        (conv,) = [n for n in after.graph.nodes if n.target is aten.convolution.default]
        self.assertIs(cb.args[2], conv.args[1])

    def test_forward_graph_inference(self):
        before, after = forward_graph(affine, *inputs(requires=(False,) * 5))
        self.assertExpectedInline(graph_text(after), """\
view = view(arg3_1, [1, -1, 1, 1])
view_1 = view(arg4_1, [1, -1, 1, 1])
reshape_default = reshape(view, [-1])
reshape_default_1 = reshape(reshape_default, [4, 1, 1, 1])
mul_tensor = mul.Tensor(arg1_1, reshape_default_1)
reshape_default_2 = reshape(view_1, [-1])
mul_tensor_1 = mul.Tensor(arg2_1, reshape_default)
add_tensor = add.Tensor(mul_tensor_1, reshape_default_2)
convolution_default = convolution(arg0_1, mul_tensor, add_tensor, [2, 2], [1, 1], [1, 1], False, [0, 0], 1)
relu = relu(convolution_default)
return ('relu',)""")
        self.assertEqual(count(after, aten.mul.Tensor), 2)  # W*s and b*s only: weight-sized
        self.assertEqual(users_of_conv_outputs(after), [aten.relu.default])

    def test_scale_first_operand_order(self):
        def fn(x, w, s):
            return s.view(1, -1, 1, 1) * torch.nn.functional.conv2d(x, w)

        x, w, _, s, _ = inputs()
        _, after = joint_graph(fn, x, w, s)
        self.assertEqual(users_of_conv_outputs(after), ["output"])  # the folded conv is the result
        self.assertEqual(count(after, aten.convolution_backward.default), 1)

    def test_never_leaves_graph_unchanged(self):
        before, after = joint_graph(affine, *inputs(), settings=Settings(fold="never"))
        self.assertEqual(before, graph_text(after))


def activation_sums(gm):
    """Per-channel ``sum`` nodes over an activation (every dim but the channel's)."""
    return [n for n in gm.graph.nodes if n.target is aten.sum.dim_IntList and sorted(n.args[1]) == [0, 2, 3]]


def test_the_shifts_gradient_comes_from_the_conv_backward_on_cpu():
    """One read of ``g`` per site: on CPU the shift's ``sum(g)`` (and gb', and the scale's
    bias term) is convolution_backward's bias output, computed inside the weight-gradient
    primitive that reads ``g`` anyway. Stock has two activation sums (the shift's and the
    scale's ``sum(g * y)``); the folded graph has none."""
    before, after = joint_graph(affine, *inputs())
    assert before.count("sum.dim_IntList") == 2
    assert activation_sums(after) == []
    (cb,) = [n for n in after.graph.nodes if n.target is aten.convolution_backward.default]
    assert cb.args[-1] == [False, True, True]


def test_the_shifts_sum_stays_where_no_conv_backward_runs():
    """A frozen conv on an input without gradient has no convolution_backward to
    compute it: the shift's lone ``sum(g)`` stays (adding a conv backward would cost more)."""
    _, after = joint_graph(affine, *inputs(requires=(False, False, False, False, True)))
    assert len(activation_sums(after)) == 1
    assert count(after, aten.convolution_backward.default) == 0


def test_the_shifts_sum_stays_in_fp32_under_autocast():
    """Under autocast the conv sees ``g`` cast down to bf16; the shift's gradient stays the
    fp32 ``sum(g)`` eager computes, and serves gb' too (one reduction, none in the conv)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, after = joint_graph(affine, *inputs())
    (sum_g,) = activation_sums(after)
    assert sum_g.args[0].meta["val"].dtype == torch.float32
    (cb,) = [n for n in after.graph.nodes if n.target is aten.convolution_backward.default]
    assert cb.args[-1][2] is False
