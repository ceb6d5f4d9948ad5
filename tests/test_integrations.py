"""The recipes of docs/integrations.md, run: compile_affine inside timm, Hugging Face
``Trainer``, Lightning, torchvision detection and mmdet-style ``norm_eval`` fine-tuning.

Each test trains a tiny random-weight model for two steps on CPU twice, from the same
initial weights and seed: once with stock Inductor, once with compile_affine. It asserts
the exact folds the report gives and that the per-step losses agree in fp32. Counts are the
default cost rule's (``fold="auto"``, ``objective="time"``: activation at least 3.5x the
weight in bytes) at these toy sizes: on the 64 px ResNets it folds the stem and declines
the stages after it, where the weight outweighs the activation; at real batch and image
sizes more of them fold.

Each test skips on its own when its framework is missing.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compile_affine

# fp32: folding moves a multiply into the conv's weight, so the losses agree to rounding.
TOL = {"rtol": 1e-4, "atol": 1e-5}
STEPS = 2


def _fresh() -> None:
    torch._dynamo.reset()
    compile_affine.reset()


def _plain_training(model: nn.Module, backend: str, step) -> list[float]:
    """``STEPS`` SGD steps of ``loss = step(compiled_model)``, from a fresh Dynamo cache and report."""
    _fresh()
    torch.manual_seed(0)
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(STEPS):
        loss = step(compiled)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _check_report(*, graphs: int, sites: dict[tuple[str, str], tuple[int, int]]) -> None:
    """Exactly ``graphs`` graphs (no recompile), and per ``(kind, producer)`` exactly
    ``(sites, folded)``; every site left alone was declined by the cost rule."""
    rep = compile_affine.report()
    assert len(rep.graphs) == graphs, str(rep)
    assert all(g.fell_back is None and not g.cache_hit for g in rep.graphs), str(rep)
    found = Counter((s.kind, s.producer) for s in rep.sites)
    folded = Counter((s.kind, s.producer) for s in rep.sites if s.folded)
    assert {k: (found[k], folded[k]) for k in found} == sites, str(rep)
    assert all(s.declined_by_cost for s in rep.sites if not s.folded), str(rep)


# --- 1. timm ------------------------------------------------------------------------


def test_timm_frozen_batch_norm():
    timm = pytest.importorskip("timm")
    pytest.importorskip("torchvision")  # timm's FrozenBatchNorm2d is torchvision's
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    # create_model(..., norm_layer="frozenbatchnorm2d") fails inside timm 1.0.31
    # (FrozenBatchNorm2d takes no device=); converting after creation works.
    model = timm.layers.freeze_batch_norm_2d(model)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))

    def step(compiled):
        return F.cross_entropy(compiled(x), y)

    stock = _plain_training(copy.deepcopy(model), "inductor", step)
    ours = _plain_training(model, "compile_affine", step)
    # FrozenBatchNorm2d is arithmetic (x * scale + shift), so its sites are "affine"
    _check_report(graphs=1, sites={("affine", "conv2d"): (14, 3)})
    assert compile_affine.report().summary() == "14 affine layers: 3 folded, 11 not folded, across 1 graph"
    torch.testing.assert_close(ours, stock, **TOL)


# --- 2. Hugging Face Trainer ---------------------------------------------------------


def _hf_parts():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(
        num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32,
        num_labels=3,
        # set, or the loss function sets it on the first call and the second step recompiles
        problem_type="single_label_classification",
        # LayerScale starts at 1e-6 by default, where a wrong fold would not move the loss
        layer_scale_init_value=0.5,
    )
    model = transformers.ConvNextForImageClassification(config)
    data = [{"pixel_values": torch.randn(3, 32, 32), "labels": torch.tensor(i % 3)} for i in range(4)]
    return transformers, model, data


def _hf_trainer(transformers, model, data, tmp_path, **args):
    """A Trainer that records each step's loss (its own log rounds them to 4 digits)."""
    losses: list[float] = []

    class LossLog(transformers.Trainer):
        def compute_loss(self, *a, **kw):
            loss = super().compute_loss(*a, **kw)
            losses.append(loss.item())
            return loss

    training_args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, **args,
    )
    return LossLog(model=model, args=training_args, train_dataset=data), losses


def _hf_training(transformers, model, data, tmp_path, **args) -> list[float]:
    _fresh()
    trainer, losses = _hf_trainer(transformers, model, data, tmp_path, **args)
    trainer.train()
    assert len(losses) == STEPS
    return losses


# the two LayerScales (one block per stage), each after the block's second linear; the
# second stage's (2x4x4x16 against a 64x16 weight) is declined by the default cost rule
HF_SITES = {("affine", "linear"): (2, 1)}


def test_hf_trainer_with_install(tmp_path):
    transformers, model, data = _hf_parts()
    stock_model = copy.deepcopy(model)
    # TrainingArguments takes any name; accelerate's TorchDynamoPlugin, built by Trainer, does not.
    with pytest.raises(ValueError, match="'COMPILE_AFFINE' is not a valid DynamoBackend"):
        _hf_trainer(transformers, copy.deepcopy(model), data, tmp_path, torch_compile=True,
                    torch_compile_backend="compile_affine")

    stock = _hf_training(transformers, stock_model, data, tmp_path, torch_compile=True,
                         torch_compile_backend="inductor")
    assert compile_affine.report().graphs == []  # not installed: stock Inductor, the pass never ran
    with compile_affine.install():
        ours = _hf_training(transformers, model, data, tmp_path, torch_compile=True,
                            torch_compile_backend="inductor")
    assert compile_affine.installed() is None
    _check_report(graphs=1, sites=HF_SITES)
    torch.testing.assert_close(ours, stock, **TOL)


def test_hf_trainer_with_compiled_model(tmp_path):
    transformers, model, data = _hf_parts()
    stock_model = copy.deepcopy(model)
    # A compiled model's forward is (*args, **kwargs): with remove_unused_columns=True (the
    # default) Trainer keeps only the columns named args, kwargs, label or label_ids.
    with pytest.raises(ValueError, match="The batch received was empty"):
        _hf_training(transformers, torch.compile(copy.deepcopy(model), backend="compile_affine"), data, tmp_path)

    stock = _hf_training(transformers, torch.compile(stock_model, backend="inductor"), data, tmp_path,
                         remove_unused_columns=False)
    ours = _hf_training(transformers, torch.compile(model, backend="compile_affine"), data, tmp_path,
                        remove_unused_columns=False)
    _check_report(graphs=1, sites=HF_SITES)
    torch.testing.assert_close(ours, stock, **TOL)


# --- 3. Lightning -------------------------------------------------------------------


class _Affine(nn.Module):
    """A learnable per-channel affine in place of a norm (the README's user)."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.bias = nn.Parameter(torch.randn(1, c, 1, 1) * 0.1)

    def forward(self, x):
        return x * self.weight + self.bias


def _lightning_module(L, backend: str | None):
    class Classifier(L.LightningModule):
        def __init__(self, backend: str | None = None):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), _Affine(16), nn.ReLU(),
                nn.Conv2d(16, 16, 3, padding=1), _Affine(16), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
            )
            self.backend = backend

        def configure_model(self):
            # Lightning calls this hook at every fit, validate, test and predict: compile once
            if self.backend is not None and not isinstance(self.net, torch._dynamo.OptimizedModule):
                self.net = torch.compile(self.net, backend=self.backend)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Classifier(backend)


def _lightning_training(L, module) -> list[float]:
    losses: list[float] = []

    class LossLog(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    _fresh()
    torch.manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[LossLog()],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    assert len(losses) == STEPS
    return losses


LIGHTNING_SITES = {("affine", "conv2d"): (2, 2)}


def test_lightning_compile_inside():
    L = pytest.importorskip("lightning")
    torch.manual_seed(0)
    module = _lightning_module(L, "compile_affine")
    stock_module = copy.deepcopy(module)
    stock_module.backend = "inductor"
    stock = _lightning_training(L, stock_module)
    ours = _lightning_training(L, module)
    _check_report(graphs=1, sites=LIGHTNING_SITES)
    torch.testing.assert_close(ours, stock, **TOL)


def test_lightning_compile_outside():
    L = pytest.importorskip("lightning")
    torch.manual_seed(0)
    module = _lightning_module(L, None)
    stock_module = copy.deepcopy(module)
    # Lightning unwraps the compiled module and compiles forward and training_step with
    # its backend: one graph holds the net and the loss.
    stock = _lightning_training(L, torch.compile(stock_module, backend="inductor"))
    ours = _lightning_training(L, torch.compile(module, backend="compile_affine"))
    _check_report(graphs=1, sites=LIGHTNING_SITES)
    torch.testing.assert_close(ours, stock, **TOL)


# --- 4. torchvision detection --------------------------------------------------------


def test_torchvision_faster_rcnn_frozen_backbone():
    pytest.importorskip("torchvision")
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    model = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 10.0, 60.0, 30.0]]), "labels": torch.tensor([2])}]

    def train(model, backend):
        _fresh()
        torch.manual_seed(0)  # the RPN and ROI heads sample anchors and proposals at random
        model.train()
        model.backbone = torch.compile(model.backbone, backend=backend)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        losses = []
        for _ in range(STEPS):
            loss = sum(model(images, targets).values())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    stock = train(copy.deepcopy(model), "inductor")
    ours = train(model, "compile_affine")
    # 20 FrozenBatchNorm2d in the ResNet-18 body; conv1 and layer1 are frozen
    # (trainable_layers=3) and fold all the same
    _check_report(graphs=1, sites={("affine", "conv2d"): (20, 1)})
    torch.testing.assert_close(ours, stock, **TOL)


def test_fasterrcnn_resnet50_fpn_ignores_norm_layer():
    """Why the recipe builds the backbone itself: without pretrained weights the builder
    uses trainable BatchNorm2d, and ``norm_layer=`` is swallowed by ``**kwargs``."""
    pytest.importorskip("torchvision")
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3,
                                    norm_layer=FrozenBatchNorm2d)
    norms = {type(m) for m in model.backbone.body.modules() if "Norm" in type(m).__name__}
    assert norms == {nn.BatchNorm2d}


# --- 5. mmdet-style norm_eval --------------------------------------------------------


def train_with_norm_eval(model: nn.Module) -> nn.Module:
    """What mmdet's ``norm_eval=True`` does in its ``train()`` override."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def test_norm_eval_fine_tuning():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    for m in model.modules():  # statistics as a pretrained net carries them, not 0 and 1
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    train_with_norm_eval(model)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))

    def step(compiled):
        return F.cross_entropy(compiled(x), y)

    stock = _plain_training(copy.deepcopy(model), "inductor", step)
    running_var = [m.running_var.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    ours = _plain_training(model, "compile_affine", step)
    _check_report(graphs=1, sites={("batch_norm", "conv2d"): (20, 1)})
    torch.testing.assert_close(ours, stock, **TOL)
    # eval-mode BatchNorm: training steps leave the statistics alone
    after = [m.running_var for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(after, running_var))
