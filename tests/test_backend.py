"""The backend's contract: found by name, options and mode honoured, env var, fallback."""

import functools
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import compile_affine
from compile_affine.passes import rewrite
from compile_affine.passes.fold import AffineFoldPass
from compile_affine.settings import ENV_VAR, Settings, split_options

from .nets import ConvAffine

ALWAYS = {"compile_affine": {"fold": "always"}}


def _compile_and_run(model=None, **kwargs):
    model = model or ConvAffine()
    x = torch.randn(2, 4, 8, 8)
    out = torch.compile(model, backend="compile_affine", **kwargs)(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    return out


def test_backend_by_name_in_fresh_process():
    # No import of compile_affine: Dynamo must find it through the entry point.
    code = textwrap.dedent(
        """
        import torch
        assert "compile_affine" in torch._dynamo.list_backends()
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
        torch.compile(m, backend="compile_affine")(torch.randn(1, 3, 8, 8))
        import compile_affine
        assert torch._dynamo.lookup_backend("compile_affine") is compile_affine.backend
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_env_var_off_is_stock_inductor(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "0")
    _compile_and_run(options=ALWAYS)
    assert len(compile_affine.report().graphs) == 0


def test_env_var_on(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    _compile_and_run(options=ALWAYS)
    assert compile_affine.report().folded == 1


@pytest.mark.parametrize("value", ["yes", "", "2", "off"])
def test_env_var_invalid_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(ValueError, match=f"{ENV_VAR}=.*accepted values are '0', '1'"):
        split_options(None)
    with pytest.raises(Exception, match=ENV_VAR):
        _compile_and_run()


def test_unknown_option_names_key_and_accepted_keys():
    with pytest.raises(ValueError, match="unknown compile_affine option 'folding'; accepted keys are enabled, strict, fold"):
        split_options({"compile_affine": {"folding": "always"}})
    with pytest.raises(Exception, match="folding"):
        _compile_and_run(options={"compile_affine": {"folding": "always"}})


def test_bad_option_values():
    with pytest.raises(ValueError, match="'fold' must be one of"):
        Settings(fold="sometimes")
    with pytest.raises(TypeError, match="'strict' must be a bool"):
        Settings(strict="yes")


def test_options_split_keeps_inductor_options():
    settings, inductor = split_options({"compile_affine": {"strict": True}, "epilogue_fusion": False})
    assert settings == Settings(strict=True)
    assert inductor == {"epilogue_fusion": False}


def test_uuid_stable_and_setting_sensitive():
    assert AffineFoldPass(Settings()).uuid() == AffineFoldPass(Settings()).uuid()
    assert AffineFoldPass(Settings()).uuid() != AffineFoldPass(Settings(fold="never")).uuid()
    assert AffineFoldPass(Settings()).uuid() != AffineFoldPass(Settings(strict=True)).uuid()


def _break_rewrite(monkeypatch):
    def broken(graph, site):
        raise RuntimeError("injected")

    monkeypatch.setattr(rewrite, "fold_site", broken)


def test_pass_error_falls_back_with_one_warning(monkeypatch):
    _break_rewrite(monkeypatch)
    with pytest.warns(RuntimeWarning, match="injected.*stock Inductor"):
        _compile_and_run(options=ALWAYS)
    (graph,) = compile_affine.report().graphs
    assert graph.fell_back and "injected" in graph.fell_back
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same error warns once per process
        _compile_and_run(options=ALWAYS)


def test_strict_reraises(monkeypatch):
    _break_rewrite(monkeypatch)
    with pytest.raises(Exception, match="AffineFoldError: compile_affine pass failed: RuntimeError: injected"):
        _compile_and_run(options={"compile_affine": {"fold": "always", "strict": True}})
    assert not compile_affine.report().graphs  # no silent fallback happened


class _Recorder(torch._inductor.custom_graph_pass.CustomGraphPass):
    calls = 0

    def __call__(self, graph):
        type(self).calls += 1

    def uuid(self):
        return "recorder"


@pytest.mark.parametrize("where", ["options", "config"])
def test_user_joint_pass_is_chained(where):
    _Recorder.calls = 0
    if where == "options":
        _compile_and_run(options={**ALWAYS, "joint_custom_pre_pass": _Recorder()})
    else:
        with torch._inductor.config.patch(joint_custom_pre_pass=_Recorder()):
            _compile_and_run(options=ALWAYS)
    assert _Recorder.calls == 1
    assert compile_affine.report().folded == 1


def test_mode_and_options_reach_inductor(monkeypatch):
    seen = {}
    import torch._inductor.compile_fx as compile_fx_module

    def fake_compile_fx(gm, inputs, config_patches=None, **kwargs):
        seen.update(config_patches or {})
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    _compile_and_run(mode="max-autotune-no-cudagraphs")
    assert seen["max_autotune"] is True
    assert isinstance(seen["joint_custom_pre_pass"][-1], AffineFoldPass)
    seen.clear()
    torch._dynamo.reset()
    _compile_and_run(options={"epilogue_fusion": False, **ALWAYS})
    assert seen["epilogue_fusion"] is False and "max_autotune" not in seen
    # torch.compile refuses mode= together with options=; a partial carries both.
    seen.clear()
    torch._dynamo.reset()
    backend = functools.partial(compile_affine.backend, mode="max-autotune-no-cudagraphs", options=ALWAYS)
    model = ConvAffine()
    torch.compile(model, backend=backend)(torch.randn(2, 4, 8, 8))
    assert seen["max_autotune"] is True and seen["joint_custom_pre_pass"][-1].settings.fold == "always"


def test_fx_graph_cache_keeps_working():
    """Our uuid() lets Inductor cache the compiled forward/backward. The joint pass
    runs before that cache (on the joint graph), so the report stays complete."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    counters.clear()
    with fresh_cache(), torch._inductor.config.patch(fx_graph_cache=True):
        _compile_and_run(options=ALWAYS)
        torch._dynamo.reset()
        _compile_and_run(options=ALWAYS)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1
    assert "Unsupported joint custom pass" not in str(dict(counters["inductor"]))
    assert [g.folded for g in compile_affine.report().graphs] == [1, 1]


def test_backend_accepts_what_newer_torch_forwards_and_still_rejects_our_unknown_options():
    """torch forwards ``name=`` (and may add more) to custom backends."""
    import functools

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    x = torch.randn(1, 3, 4, 4)
    out = torch.compile(model, backend=functools.partial(compile_affine.backend, name="x", future_kwarg=1))(x)
    torch.testing.assert_close(out, model(x))
    torch._dynamo.reset()
    bad = functools.partial(compile_affine.backend, name="x", options={"compile_affine": {"bogus": 1}})
    with pytest.raises(Exception, match="unknown compile_affine option 'bogus'"):
        torch.compile(model, backend=bad)(x)


def test_backend_name_resolves_from_a_checkout_without_the_entry_point():
    """The GPU machine runs a plain checkout on PYTHONPATH with nothing installed: importing
    the package registers the name, and twice is harmless. (Where the entry point is
    installed, every other test compiles by name through it.)"""
    root = pathlib.Path(compile_affine.__file__).resolve().parent.parent
    code = "\n".join([
        "import importlib.metadata as md, torch",
        "md.entry_points = lambda **kw: md.EntryPoints(())  # as if the package were not installed",
        "try:",
        "    torch.compile(torch.nn.Linear(2, 2), backend='compile_affine')(torch.randn(1, 2)); print('found without import')",
        "except Exception as e:",
        "    print(type(e).__name__)",
        "import compile_affine, importlib; importlib.reload(compile_affine)",
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))",
        "torch.compile(m, backend='compile_affine')(torch.randn(1, 3, 4, 4)).sum().backward()",
        "print('compiled', compile_affine.__file__)",
    ])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(root), timeout=600)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "InvalidBackend" in lines[0] or "BackendCompilerFailed" in lines[0], lines
    assert lines[-1].startswith("compiled ") and str(root) in lines[-1], lines


def test_a_cpu_zero_d_scale_for_a_cuda_site_is_moved_to_the_site_device():
    """``self.alpha = torch.tensor(.5)`` kept on the CPU beside a CUDA conv: eager allows a
    0-d CPU tensor with any device's, so the folded weight's per-channel vector must be on
    the conv's device (it would mix devices and raise). Checked on fake CUDA tensors, which
    need no GPU; the cuda differential tests cover it on a GPU."""
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from compile_affine.passes.rewrite.common import Emitter, per_channel

    graph = fx.Graph()
    conv, alpha = graph.placeholder("conv"), graph.placeholder("alpha")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        conv.meta["val"] = torch.empty(2, 4, 3, 3, device="cuda")
        alpha.meta["val"] = torch.empty((), device="cpu")
    with graph.inserting_after(alpha):
        s_c = per_channel(Emitter(graph, conv), alpha, 4, torch.device("cuda", 0), torch.float32)
    assert s_c.meta["val"].device.type == "cuda" and tuple(s_c.meta["val"].shape) == (4,)
    assert any(n.target is torch.ops.aten._to_copy.default for n in graph.nodes)
    assert mode is not None


def test_the_gpu_twins_seam_is_part_of_the_pass_uuid():
    """A graph folded with GPU decisions for CPU values (``passes.target.decide_as``, the
    GPU twin's bench/test-only seam) must never come back from the FX graph cache for a
    real CPU compile, nor the other way round."""
    from compile_affine.passes import target

    p = AffineFoldPass(Settings())
    with target.decide_as("cuda"):
        inside = p.uuid()
    assert inside != p.uuid() and target.override() is None
