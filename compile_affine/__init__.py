"""compile_affine: a torch.compile backend that folds per-channel affines into the
convolution that produces them, in training and inference.

    model = torch.compile(model, backend="compile_affine")

or, for code that compiles with the default backend (frameworks that accept only their
own backend names):

    compile_affine.install()
    model = torch.compile(model)
"""

import torch._dynamo
import torch._logging._internal

from .backend import backend
from .explain import explain
from .install import install, installed, uninstall
from .report import Report, report, reset
from .settings import Settings

# ``TORCH_LOGS="+compile_affine"`` (DEBUG: every site's decision) and
# ``torch._logging.set_logs(modules={"compile_affine": logging.DEBUG})`` work as for
# Inductor's own logs. Torch parses TORCH_LOGS when it is imported, before this line,
# and enables a log named after an importable module, so the env var works either way;
# registering makes the name a known alias.
torch._logging._internal.register_log("compile_affine", "compile_affine")
# ``TORCH_LOGS="compile_affine_graphs"``: each graph before and after the pass (trace.py
# says why a log named after a stub module rather than an artifact).
torch._logging._internal.register_log("compile_affine_graphs", "compile_affine_graphs")


def _register_by_name() -> None:
    """``backend="compile_affine"`` by name from a plain checkout on PYTHONPATH, where no
    entry point is installed (the GPU machine installs nothing): importing the package
    registers it, once. Where the entry point is installed, torch registers it on first
    lookup, and a name registered here too would make that lookup fail as a duplicate."""
    from importlib.metadata import entry_points

    if any(ep.name == "compile_affine" for ep in entry_points(group="torch_dynamo_backends")):
        return
    if "compile_affine" not in torch._dynamo.backends.registry._COMPILER_FNS:
        torch._dynamo.register_backend(backend, name="compile_affine")


_register_by_name()

__version__ = "0.2.0"
__all__ = ["backend", "explain", "install", "installed", "uninstall", "report", "reset", "Report", "Settings", "__version__"]
