import pytest
import torch

import compile_affine


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test sees only its own compiles in the report and its own Dynamo cache."""
    torch._dynamo.reset()
    compile_affine.reset()
    torch.manual_seed(0)
    yield
