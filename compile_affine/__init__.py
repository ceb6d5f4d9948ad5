"""compile_affine: a torch.compile backend that folds per-channel affines into the
convolution that produces them, in training and inference.

    model = torch.compile(model, backend="compile_affine")
"""

from .backend import backend
from .report import Report, report, reset
from .settings import Settings

__version__ = "0.1.0"
__all__ = ["backend", "report", "reset", "Report", "Settings", "__version__"]
