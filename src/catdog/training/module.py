"""The Lightning module: 2-class softmax classifier with a frozen-backbone phase, then fine-tuning."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryF1Score

from catdog.config import CLASSES
from catdog.preprocessing import PreprocessConfig
from catdog.training.backbones import SIMPLE_CNN, build_model, classify_features, pooled_features

log = logging.getLogger(__name__)

Phase = Literal["frozen", "unfrozen"]
Batch = tuple[torch.Tensor, torch.Tensor]


def lr_factor(step: int, total: int, warmup_fraction: float, kind: str = "cosine") -> float:
    """Multiplier of the base LR at `step` of a phase of `total` steps: linear warmup, then cosine to ~0."""
    if kind == "constant" or total <= 0:
        return 1.0
    warmup = math.ceil(warmup_fraction * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _metrics(prefix: str) -> MetricCollection:
    return MetricCollection(
        {"acc": BinaryAccuracy(), "f1": BinaryF1Score(), "auroc": BinaryAUROC()}, prefix=f"{prefix}/"
    )


class ClassifierModule(L.LightningModule):
    """Cross-entropy over softmax logits; class index 1 ("dog") is the positive class of the metrics.

    With pretrained weights, the first `epochs_frozen` epochs train only the head (backbone frozen,
    BatchNorm in eval, batches may be cached pooled features), then `epochs_unfrozen` epochs train
    everything at `lr_backbone` (BatchNorm statistics stay frozen with `freeze_batchnorm`). Without
    pretrained weights every epoch trains everything at `lr_head`.
    The hyperparameters stored in checkpoints are enough to rebuild the network without params.yaml.
    """

    def __init__(
        self,
        model_name: str = "tf_efficientnet_lite0",
        preprocess: str = PreprocessConfig().to_json(),
        class_names: Sequence[str] = CLASSES,
        pretrained: bool = True,
        epochs_frozen: int = 1,
        epochs_unfrozen: int = 1,
        lr_head: float = 3e-3,
        lr_backbone: float = 3e-5,
        weight_decay: float = 1e-2,
        optimizer: str = "adamw",
        scheduler: str = "cosine",
        warmup_fraction: float = 0.1,
        freeze_batchnorm: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams["class_names"] = list(class_names)
        self.model = build_model(model_name, num_classes=len(class_names), pretrained=pretrained)
        self.pretrained_backbone = pretrained and model_name != SIMPLE_CNN
        self.frozen_epochs = epochs_frozen if self.pretrained_backbone else 0
        self.freeze_batchnorm = freeze_batchnorm and self.pretrained_backbone
        self.total_epochs = epochs_frozen + epochs_unfrozen
        self.backbone_frozen = False
        self.train_acc = BinaryAccuracy()
        self.val_metrics = _metrics("val")
        self.test_metrics = _metrics("test")
        self._feature_work = (0, 0.0)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_json(self.hparams["preprocess"])

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams["class_names"])

    @property
    def feature_images_per_second(self) -> float | None:
        """Throughput of all feature caching so far (images through the frozen backbone per second)."""
        images, seconds = self._feature_work
        return round(images / seconds, 2) if seconds > 0 else None

    def phase(self, epoch: int) -> Phase:
        return "frozen" if epoch < self.frozen_epochs else "unfrozen"

    def _head_parameters(self) -> list[nn.Parameter]:
        return list(self.model.get_classifier().parameters())

    def _backbone_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self._head_parameters()}
        return [p for p in self.model.parameters() if id(p) not in head]

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Freeze or unfreeze everything but the classifier; a frozen backbone keeps BatchNorm in eval."""
        self.backbone_frozen = frozen
        for param in self._backbone_parameters():
            param.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> ClassifierModule:
        """Train mode, except a frozen backbone (all eval) and, with freeze_batchnorm, every BatchNorm."""
        super().train(mode)
        if mode and self.backbone_frozen:
            self.model.eval()
        elif mode and self.freeze_batchnorm:
            for layer in self.model.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.eval()
        return self

    def _as_input(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams["channels_last"]:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from images (N, 3, H, W), or from cached pooled features (N, num_features)."""
        if x.ndim == 2:
            return classify_features(self.model, x, training=self.training)
        x = self._as_input(x)
        if self.training and self.backbone_frozen:
            with torch.no_grad():
                features = pooled_features(self.model, x)
            return classify_features(self.model, features, training=True)
        return self.model(x)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, num_classes), in eval mode."""
        was_training = self.training
        self.eval()
        probs = self(x).float().softmax(dim=-1)
        self.train(was_training)
        return probs

    @torch.no_grad()
    def extract_features(self, loader: DataLoader) -> Batch:
        """Pooled features (float32, CPU) and labels of every batch of `loader`, backbone in eval mode."""
        was_training = self.training
        self.eval()
        attached = self._trainer is not None
        context = self.trainer.precision_plugin.forward_context() if attached else nullcontext()
        features: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        start = time.perf_counter()
        with context:
            for images, targets in loader:
                batch = self._as_input(images.to(self.device, non_blocking=True))
                features.append(pooled_features(self.model, batch).float().cpu())
                labels.append(targets)
        self.train(was_training)
        count = sum(len(t) for t in labels)
        seconds = time.perf_counter() - start
        self._feature_work = (self._feature_work[0] + count, self._feature_work[1] + seconds)
        log.info("cached backbone features of %d images in %.1f s", count, seconds)
        return torch.cat(features), torch.cat(labels)

    def _step(self, batch: Batch) -> Batch:
        x, y = batch
        logits = self(x).float()
        return F.cross_entropy(logits, y), logits.softmax(dim=-1)[:, 1]

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, probs = self._step(batch)
        size = len(batch[1])
        self.train_acc(probs, batch[1])
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=size)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=size)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def _evaluate(self, batch: Batch, prefix: str, metrics: MetricCollection) -> None:
        loss, probs = self._step(batch)
        metrics.update(probs, batch[1])
        self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=len(batch[1]))
        self.log_dict(metrics, batch_size=len(batch[1]))

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def predict_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).float().softmax(dim=-1)

    def on_train_epoch_start(self) -> None:
        self.set_backbone_frozen(self.phase(self.current_epoch) == "frozen")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Set each group's LR for this step: cosine within the phase (steps differ between phases)."""
        epoch = self.current_epoch
        frozen = self.phase(epoch) == "frozen"
        start = 0 if frozen else self.frozen_epochs
        length = self.frozen_epochs if frozen else self.total_epochs - self.frozen_epochs
        batches = int(self.trainer.num_training_batches)
        factor = lr_factor(
            (epoch - start) * batches + batch_idx,
            length * batches,
            self.hparams["warmup_fraction"],
            self.hparams["scheduler"],
        )
        rates = self.learning_rates(frozen)
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = rates[group["name"]] * factor
        self.log("lr/head", rates["head"] * factor, on_step=True, on_epoch=False, batch_size=1)

    def learning_rates(self, frozen: bool) -> dict[str, float]:
        """Base LR per parameter group: a head trained in a frozen phase then fine-tunes at lr_backbone
        with the backbone; a backbone without pretrained weights trains at lr_head like the head."""
        lr_head, lr_backbone = self.hparams["lr_head"], self.hparams["lr_backbone"]
        if frozen:
            return {"head": lr_head, "backbone": 0.0}
        if not self.pretrained_backbone:
            return {"head": lr_head, "backbone": lr_head}
        return {"head": lr_backbone if self.frozen_epochs else lr_head, "backbone": lr_backbone}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [
            {"params": self._head_parameters(), "name": "head", "lr": self.hparams["lr_head"]},
            {"params": self._backbone_parameters(), "name": "backbone", "lr": self.hparams["lr_backbone"]},
        ]
        decay = self.hparams["weight_decay"]
        if self.hparams["optimizer"] == "sgd":
            return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=decay)
        return torch.optim.AdamW(groups, weight_decay=decay)
