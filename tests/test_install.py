"""``compile_affine.install()``: the pass under ``backend="inductor"``, undone exactly by
``uninstall()``. Real Inductor compiles of a one-conv net (small C++ kernels)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

import compile_affine
from compile_affine._compat import STOCK_INDUCTOR_CALL

from .nets import ConvAffine

ALWAYS = {"fold": "always"}


@pytest.fixture(autouse=True)
def _never_left_installed():
    yield
    compile_affine.uninstall()


def _step(compiled, x):
    out = compiled(x)
    out.sum().backward()
    return out


def _run(model, x, **compile_kwargs):
    torch._dynamo.reset()
    compile_affine.reset()
    out = _step(torch.compile(model, **compile_kwargs), x)
    return out, compile_affine.report()


def test_default_backend_folds_while_installed_and_not_after():
    model, x = ConvAffine(), torch.randn(2, 4, 8, 8)
    expected = model(x)
    compile_affine.install(**ALWAYS)
    out, rep = _run(model, x)
    assert rep.folded == 1 and len(rep.graphs) == 1 and rep.graphs[0].training
    torch.testing.assert_close(out, expected)
    compile_affine.uninstall()
    out, rep = _run(model, x)
    assert rep.graphs == []  # stock Inductor: the pass never ran
    torch.testing.assert_close(out, expected)


def test_uninstall_restores_inductor_exactly():
    config = torch._inductor.config.get_config_copy()
    compile_affine.install(**ALWAYS)
    compile_affine.install(fold="auto")  # twice: the options change, the patch stays one
    compile_affine.uninstall()
    compile_affine.uninstall()  # harmless when not installed
    assert torch._TorchCompileInductorWrapper.__call__ is STOCK_INDUCTOR_CALL
    assert torch._inductor.config.get_config_copy() == config


def test_context_manager_restores_what_was_before():
    with compile_affine.install(**ALWAYS):
        assert compile_affine.installed().fold == "always"
        with compile_affine.install(fold="never"):
            assert compile_affine.installed().fold == "never"
        assert compile_affine.installed().fold == "always"
    assert compile_affine.installed() is None
    assert torch._TorchCompileInductorWrapper.__call__ is STOCK_INDUCTOR_CALL


def test_options_are_checked_at_install():
    with pytest.raises(ValueError, match="unknown compile_affine option 'flod'"):
        compile_affine.install(flod="always")
    with pytest.raises(ValueError, match="'fold' must be one of"):
        compile_affine.install(fold="sometimes")
    assert compile_affine.installed() is None


def test_environment_variable_wins_at_compile_time(monkeypatch):
    compile_affine.install(**ALWAYS)
    monkeypatch.setenv("COMPILE_AFFINE", "0")
    _, rep = _run(ConvAffine(), torch.randn(2, 4, 8, 8))
    assert rep.graphs == []


class _Counting(CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return b"counting"


def test_chains_with_the_users_joint_pass():
    theirs = _Counting()
    compile_affine.install(**ALWAYS)
    with torch._inductor.config.patch(joint_custom_pre_pass=theirs):
        _, rep = _run(ConvAffine(), torch.randn(2, 4, 8, 8))
        assert torch._inductor.config.joint_custom_pre_pass is theirs  # never replaced
    assert theirs.calls == 1 and rep.folded == 1


def test_mode_and_options_reach_inductor_and_the_pass():
    compile_affine.install(**ALWAYS)
    _, rep = _run(ConvAffine(), torch.randn(2, 4, 8, 8), options={"epilogue_fusion": False})
    assert rep.folded == 1


def test_one_notice_per_process(caplog, monkeypatch):
    monkeypatch.setattr(sys.modules["compile_affine.report"], "_noticed", False)
    caplog.set_level(logging.WARNING, logger="compile_affine.notice")
    compile_affine.install(**ALWAYS)
    _run(ConvAffine(), torch.randn(2, 4, 8, 8))
    _run(ConvAffine(), torch.randn(2, 4, 8, 8))
    notices = [r.getMessage() for r in caplog.records if r.name == "compile_affine.notice"]
    assert notices == ["compile_affine: 1 affine layer in the first graph, 1 folded; compile_affine.report() "
                       "or TORCH_LOGS=+compile_affine for every graph and why"]  # fmt: skip


def test_a_warm_cache_restores_the_records_as_for_the_named_backend():
    from torch._inductor.utils import fresh_cache

    compile_affine.install(**ALWAYS)
    with fresh_cache(), torch._inductor.config.patch(fx_graph_cache=True), \
            torch._functorch.config.patch(enable_autograd_cache=True):  # fmt: skip
        for _ in range(2):
            torch._dynamo.reset()
            _step(torch.compile(ConvAffine()), torch.randn(2, 4, 8, 8))
    first, second = compile_affine.report().graphs
    assert not first.cache_hit and second.cache_hit and second.restored
    assert first.folded == second.folded == 1


def test_uninstall_puts_back_what_install_replaced(monkeypatch):
    def theirs(self, model_, inputs_, **kwargs):  # another library's patch, made first
        return STOCK_INDUCTOR_CALL(self, model_, inputs_, **kwargs)

    monkeypatch.setattr(torch._TorchCompileInductorWrapper, "__call__", theirs)
    compile_affine.install()
    compile_affine.install(**ALWAYS)
    compile_affine.uninstall()
    assert torch._TorchCompileInductorWrapper.__call__ is theirs


def test_an_error_in_the_block_is_not_masked_on_exit(monkeypatch):
    with pytest.raises(KeyError, match="from the block"):
        with compile_affine.install(**ALWAYS):
            with compile_affine.install(fold="never"):
                monkeypatch.setenv("COMPILE_AFFINE", "maybe")  # invalid now; exit must not check it
                raise KeyError("from the block")
    assert compile_affine.installed() is None
