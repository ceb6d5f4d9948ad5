import pytest
import torch

import compile_affine


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test sees only its own compiles in the report and its own Dynamo cache.

    Inductor's caches are off so the pass really runs and reports; test_backend
    turns them back on to test cache behaviour.
    """
    torch._dynamo.reset()
    compile_affine.reset()
    torch.manual_seed(0)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield
