import pathlib

import pytest
import torch

import compile_affine
from compile_affine.passes.fold import AffineFoldPass


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test sees only its own compiles in the report and its own Dynamo cache.

    Inductor's caches are off so the pass really runs and reports; test_backend
    turns them back on to test cache behaviour. On CUDA, TF32 is off: the fp32
    tolerances are fp32's, and TF32 rounds eager and compiled differently.
    """
    torch._dynamo.reset()
    compile_affine.reset()
    torch.manual_seed(0)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        if not torch.cuda.is_available():
            yield
            return
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture(autouse=True)
def _folds_change_the_graph(monkeypatch):
    """The report records decisions, not surgery: a rewrite that silently did nothing would
    still count as folded and pass every numeric check. So every run of the pass in the
    suite (real backend and harness alike) fails if a graph the report calls folded is
    unchanged."""
    original = AffineFoldPass.__call__

    def checked(self, graph):
        before, recorded = str(graph), len(compile_affine.report().graphs)
        original(self, graph)
        graphs = compile_affine.report().graphs
        if len(graphs) > recorded and graphs[-1].folded and str(graph) == before:
            raise AssertionError(f"{graphs[-1].graph_name}: the report says folded but the graph is unchanged")

    monkeypatch.setattr(AffineFoldPass, "__call__", checked)


# What `make test-min-core` runs on torch 2.11, the oldest torch pyproject.toml accepts (and
# the GPU machine's), in CI: the tests that prove folds and numerics on every producer and
# form, and the backend's contract. A torch release that silently stops the matcher fails
# here (the fold counts), not in a user's benchmark.
CORE_MODULES = frozenset({
    "test_rewrite", "test_differential", "test_forms", "test_conv_kinds", "test_legality", "test_numerics",
    "test_batchnorm", "test_batchnorm_edges", "test_linear", "test_semantics", "test_backend", "test_cost",
    "test_compat_watch", "test_fold_watch", "test_twin_interpret", "test_twin_codegen",
})  # fmt: skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        if pathlib.Path(str(item.fspath)).stem in CORE_MODULES:
            item.add_marker(pytest.mark.core)
