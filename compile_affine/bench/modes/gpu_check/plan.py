"""What gpu-check runs: the sections in order, their variants and shapes, the GPU plan and
the dry run's, and the clock that holds them to the budget."""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

from ...core.models import BlockShape

# Within a section, variants are compiled in this order until its deadline: the ones that
# answer the question first (stock against ours on the same net), then the references.
RESNET_VARIANTS = (("affine", "inductor"), ("affine", "compile_affine"), ("none", "inductor"), ("bn", "inductor"))
FINETUNE_VARIANTS = (("bn", "inductor"), ("bn", "compile_affine"), ("bn", "inductor-conv_bn_eval"), ("none", "inductor"))
BLOCK_VARIANTS = (("affine", "inductor"), ("affine", "compile_affine-always"))
AUTOTUNE_VARIANTS = (("affine", "inductor"), ("affine", "inductor-max-autotune"), ("affine", "compile_affine-max-autotune"))
SECTIONS = ("blocks", "resnet", "finetune", "max-autotune", "resnet-fp32", "tests")

# ResNet-50's conv shapes at batch 32, 224 px (as c -> c blocks), by conv output
# elements per weight element: 174, 21.8, 6.1, 2.7, 1.5, 0.34. The CPU matrix
# (models.BLOCK_SHAPES, batch 8) is launch-bound on a GPU.
GPU_BLOCKS = [BlockShape(f"{k}x{k} c{c} @{s} b32", c, s, k, 32) for k, c, s in
              ((3, 64, 56), (3, 128, 28), (1, 1024, 14), (3, 256, 14), (1, 1024, 7), (3, 512, 7))]  # fmt: skip
TINY_BLOCKS = [BlockShape("3x3 c8 @16 b2", 8, 16, 3, 2, depth=1)]


@dataclasses.dataclass(frozen=True)
class Plan:
    device: str
    budget_s: float
    resnet_batch: int
    resnet_res: int
    tiny_resnet: bool
    steps: int
    warmup: int
    blocks: list
    autotune: list
    share_s: dict
    """The most seconds each section may take (its deadline, at most the budget's end)."""
    start_s: dict
    """Seconds a section needs left in the budget to start at all."""
    estimate_s: dict
    """Rough seconds per section with cold caches, printed as the plan."""
    settings: dict = dataclasses.field(default_factory=dict)
    """compile_affine options for every variant: none on the GPU (the defaults are what it
    measures); the dry run's tiny sizes would have the cost rule decline every site, so
    there it folds every legal one, to rehearse the path the GPU run takes."""


# On the GPU: shares sum past the budget on purpose; the order says what gets cut. The
# estimates assume a cold bf16 ResNet-50 training compile of about 50 s per variant on the
# GPU machine's 16 cores (unmeasured: the first run will say).
GPU_PLAN = Plan("cuda", budget_s=450, resnet_batch=32, resnet_res=224, tiny_resnet=False, steps=30, warmup=5,
                blocks=GPU_BLOCKS, autotune=GPU_BLOCKS[1:2],
                share_s={"blocks": 100, "resnet": 200, "finetune": 150, "max-autotune": 80, "resnet-fp32": 150, "tests": 100},
                start_s={"blocks": 20, "resnet": 60, "finetune": 60, "max-autotune": 30, "resnet-fp32": 60, "tests": 30},
                estimate_s={"blocks": 90, "resnet": 200, "finetune": 200, "max-autotune": 60, "resnet-fp32": 150, "tests": 100})  # fmt: skip
# Every section runs to its end, whatever the time: the dry run exists to prove each works.
DRY_PLAN = Plan("cpu", budget_s=3600, resnet_batch=2, resnet_res=16, tiny_resnet=True, steps=2, warmup=0,
                blocks=TINY_BLOCKS, autotune=TINY_BLOCKS, settings={"min_activation_ratio": 0.0},
                estimate_s={"blocks": 15, "resnet": 25, "finetune": 25, "max-autotune": 50, "resnet-fp32": 20, "tests": 60},
                share_s=dict.fromkeys(SECTIONS, 3600), start_s=dict.fromkeys(SECTIONS, 0))  # fmt: skip
REPO = pathlib.Path(__file__).resolve().parents[4]


class Clock:
    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.monotonic(), budget_s

    elapsed = property(lambda self: time.monotonic() - self.t0)
    left = property(lambda self: self.budget_s - self.elapsed)

    def log(self, msg: str) -> None:
        print(f"[gpu-check +{self.elapsed:5.0f}s] {msg}", file=sys.stderr, flush=True)
