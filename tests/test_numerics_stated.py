"""What the fold changes in numerics, pinned so a change is noticed (docs/design.md,
"What stays as stock" and "Numerics")."""

from __future__ import annotations

import copy

import torch

import compile_affine

from .helpers import ALWAYS, joint_graph, pass_backend
from .nets import Chain


def test_divide_by_a_zero_scale_is_inf_in_eager_and_nan_folded():
    """``conv(x) / s`` with ``s = 0`` in one channel: eager divides the conv output, ±inf
    per element; the fold divides the weight, ``W / 0`` is ±inf per weight element, and
    the conv sums infinities of both signs: NaN. Not refused: ``s`` is a runtime value."""
    x = torch.tensor([2.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 3, 3).contiguous()
    w = torch.tensor([[1.0, -1.0], [1.0, 1.0]]).view(2, 2, 1, 1).requires_grad_()
    s = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1).requires_grad_()

    def fn(x, w, s):
        return torch.nn.functional.conv2d(x, w) / s

    eager = fn(x, w, s)
    assert (eager[0, 0] == torch.inf).all()  # (2 - 1) / 0
    _, after = joint_graph(fn, x, w, s)
    assert compile_affine.report().folded == 1
    compiled = torch.compile(fn, backend=pass_backend(ALWAYS))(x, w, s)
    assert compiled[0, 0].isnan().all()  # conv(x, [inf, -inf]) = inf - inf
    torch.testing.assert_close(compiled[0, 1], eager[0, 1])


def test_unstable_training_matches_eager_in_float64():
    """An unnormalised conv/affine chain trained with a large learning rate: the loss
    grows each step (to ~1e15 by the third). In float64 the fold follows eager to
    rounding all the way: the drift such a run shows in fp32 is the conditioning of
    the run amplifying a reassociation, not an error in the rewrite."""
    torch.manual_seed(0)
    eager = Chain(widths=(3, 8, 8, 8, 8)).double()
    folded = copy.deepcopy(eager)
    compiled = torch.compile(folded, backend=pass_backend(ALWAYS))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    opts = [torch.optim.SGD(m.parameters(), lr=3.0) for m in (eager, folded)]
    losses = []
    for _ in range(3):
        pair = []
        for model, opt in zip((eager, compiled), opts):
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            pair.append(loss.item())
        losses.append(pair)
    assert compile_affine.report().folded == 4
    assert losses[0][0] < losses[1][0] < losses[2][0] and losses[2][0] > 1e12  # unstable
    for loss_eager, loss_folded in losses:
        assert abs(loss_folded - loss_eager) <= 1e-10 * abs(loss_eager)
    for (name, p_e), p_c in zip(eager.named_parameters(), folded.parameters(), strict=True):
        err = ((p_c - p_e).abs().max() / p_e.abs().max()).item()
        assert err <= 1e-10, f"{name}: {err:.3g}"
