"""The GPU twin's codegen half (``compile_affine.bench.twin.codegen``): a training step of
conv -> affine -> ReLU compiled for a fake H100 on a machine without one, by stock Inductor
and by the plugin, launching nothing: Triton kernels written, the site folded, Inductor's
byte count lower folded than stock, every patch undone. And the stand-in for the autograd
engine (the way round the C++ engine's CUDA check) traces what the engine traces."""

from unittest import mock

import pytest
import torch
import torch.nn as nn

from compile_affine.bench.twin import codegen
from compile_affine.bench.twin import engine as twin_engine

_MISSING = codegen.missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"GPU twin codegen: {_MISSING}")

OPTIONS = {"compile_affine": {"fold": "always"}}


class Net(nn.Module):
    def __init__(self, affine: bool = True):
        super().__init__()
        self.affine = affine
        self.conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.s = nn.Parameter(torch.rand(16) + 0.5)
        self.t = nn.Parameter(torch.randn(16))

    def forward(self, x):
        y = self.conv(x)
        if self.affine:
            y = y * self.s.view(1, -1, 1, 1) + self.t.view(1, -1, 1, 1)
        return torch.relu(y)


def _input():
    return torch.randn(4, 8, 16, 16)


def _patched_state():
    """What fake_gpu patches, as seen from outside: must be the same before and after."""
    from torch._dynamo import device_interface
    from torch._inductor import async_compile, compile_fx, constant_folding
    from torch._inductor.codegen.triton import TritonScheduling
    from torch._inductor.fx_passes import fuse_attention, joint_graph, pad_mm, post_grad
    from triton.runtime.driver import driver

    return dict(
        available=torch.cuda.is_available(), is_available=torch.cuda.is_available, count=torch.cuda.device_count(),
        grad=torch.autograd.grad, cuda_props=torch.cuda.get_device_properties,
        interface=device_interface.CudaInterface.is_available, driver=driver._active,
        triton=async_compile.AsyncCompile.triton, define=TritonScheduling.define_kernel, compile_fx=compile_fx.compile_fx,
        fold=constant_folding.ConstantFolder.run, sfdp=fuse_attention._sfdp_init, pad=pad_mm._should_pad,
        lazy=(joint_graph.lazy_init, post_grad.lazy_init), patterns=len(joint_graph.patterns.patterns),
        threads=torch._inductor.config.compile_threads,
    )  # fmt: skip


@pytest.fixture(scope="module")
def steps():
    before = _patched_state()
    results = {
        "stock": codegen.compile_step(Net, _input, "inductor"),
        "folded": codegen.compile_step(Net, _input, "compile_affine", options=OPTIONS),
        "no affine": codegen.compile_step(lambda: Net(affine=False), _input, "inductor"),
    }
    return results, before, _patched_state()


def test_kernels_written_for_the_fake_gpu(steps):
    results, _, _ = steps
    for name, r in results.items():
        assert [g.name for g in r.graphs] == ["forward", "backward"], name
        assert r.launches == 0, name
        assert r.graphs[0].count()["pointwise"] >= 1, (name, r.count())
        assert "extern_kernels.convolution" in r.graphs[0].extern, name
        for k in (k for g in r.graphs for k in g.kernels):
            assert k.kind != "other" and "@triton.jit" in k.source, k.name
            assert "DeviceProperties(type='cuda'" in k.source and "multi_processor_count=132" in k.source, k.name
    # Stock: the affine's backward (sum(g), sum(g * y)) is one reduction kernel; without
    # the affine, the backward has none.
    stock, bare = results["stock"].graphs[1].count(), results["no affine"].graphs[1].count()
    assert stock["reduction"] + stock["persistent reduction"] >= 1, stock
    assert bare["reduction"] + bare["persistent reduction"] == 0, bare


def test_folded_site_and_its_kernels(steps):
    folded = steps[0]["folded"]
    assert len(folded.sites) == 1 and folded.sites[0].record.folded, folded.sites
    # The GPU branch of the pass: the shift's gradient is a sum(g), which Inductor fuses
    # into the kernel that writes g (ReLU's backward), not a second reduction re-reading g.
    site_kernels = folded.sites[0].kernels
    shift_sum = [k for k, nodes in site_kernels.items() if k.startswith("backward/") and any("(sum." in n for n in nodes)]
    assert shift_sum, site_kernels
    backward = {k.name: k for k in folded.graphs[1].kernels}
    ops = {n[1] for k in shift_sum for n in backward[k.split("/", 1)[1]].nodes}
    assert {"where", "sum"} <= {op.split(".")[0] for op in ops}, ops


def test_bytes(steps):
    results, _, _ = steps
    for name, r in results.items():
        assert all(g.bytes > 0 for g in r.graphs), name
        assert r.saved_bytes > 0, name
    stock, folded, bare = (results[k] for k in ("stock", "folded", "no affine"))
    assert bare.bytes < folded.bytes < stock.bytes, (bare.bytes, folded.bytes, stock.bytes)
    assert folded.saved_bytes < stock.saved_bytes, (folded.saved_bytes, stock.saved_bytes)


def test_another_gpu_in_the_same_process(steps):
    """A V100 after the H100: Inductor asks the device again (its answers are cached per
    process), and writes for 80 SMs and compute capability 7.0."""
    v100 = codegen.compile_step(Net, _input, "compile_affine", options=OPTIONS, device="v100")
    sources = [k.source for g in v100.graphs for k in g.kernels]
    assert sources and all("multi_processor_count=80, cc=70" in s for s in sources)
    assert v100.sites[0].record.folded


def test_everything_undone(steps):
    _, before, after = steps
    assert after == before
    assert torch.cuda.is_available() == before["available"]


def test_python_engine_traces_what_the_cpp_engine_traces():
    """On CPU, where the C++ engine runs: the same forward and backward graphs, with the
    same strides, stack traces and (relative) sequence numbers."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    ran = []

    def graphs(python: bool) -> list[str]:
        out = []

        def grab(gm, example_inputs):
            seqs = [n.meta["seq_nr"] for n in gm.graph.nodes if isinstance(n.meta.get("seq_nr"), int)]
            meta = [(n.name, n.meta.get("seq_nr", 0) - min(seqs, default=0) if "seq_nr" in n.meta else None,
                     n.meta.get("stack_trace")) for n in gm.graph.nodes]  # fmt: skip
            out.append((gm.print_readable(print_output=False, include_stride=True), meta))
            return make_boxed_func(gm)

        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(Net(), nn.Flatten(), nn.Linear(16 * 16 * 16, 4))  # a broadcast bias: sum_to
        engine = [mock.patch.object(twin_engine, "_python_engine", lambda outputs: not ran.append(1)),
                  mock.patch.object(torch.autograd, "grad", twin_engine._grad(torch.autograd.grad))] if python else []  # fmt: skip
        for p in engine:
            p.start()
        try:
            torch.compile(model, backend=aot_autograd(fw_compiler=grab, bw_compiler=grab))(_input()).sum().backward()
        finally:
            for p in engine:
                p.stop()
        return out

    cpp, python = graphs(False), graphs(True)
    assert ran, "AOTAutograd did not call the stand-in"
    assert len(cpp) == 2 and python == cpp
