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
sum_1 = sum.dim_IntList(where, [0, 2, 3], True)
view_2 = view(sum_1, [4])
convolution_backward_default = convolution_backward(where, primals_1, mul_tensor, [4], [2, 2], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])
getitem_3 = getitem(convolution_backward_default, 1)
reshape_default_3 = reshape(sum_1, [4])
mul_tensor_2 = mul.Tensor(getitem_3, reshape_default_1)
mul_tensor_3 = mul.Tensor(reshape_default_3, reshape_default)
mul_tensor_4 = mul.Tensor(getitem_3, primals_2)
sum_dim_int_list = sum.dim_IntList(mul_tensor_4, [1, 2, 3])
mul_tensor_5 = mul.Tensor(reshape_default_3, primals_3)
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
