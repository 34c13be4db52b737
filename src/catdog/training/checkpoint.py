"""The model checkpoint handed to evaluation and export: weights plus everything needed to rebuild them."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from catdog.errors import CatdogError
from catdog.preprocessing import PreprocessConfig
from catdog.training.backbones import build_model

KEPT_KEYS = ("state_dict", "epoch", "global_step", "pytorch-lightning_version")


def write_model_checkpoint(source: Path, target: Path) -> None:
    """Copy a Lightning checkpoint without optimizer and loop state; it loads with weights_only=True."""
    checkpoint: dict[str, Any] = torch.load(source, map_location="cpu", weights_only=False)
    slim = {key: checkpoint[key] for key in KEPT_KEYS if key in checkpoint}
    slim["hyper_parameters"] = dict(checkpoint["hyper_parameters"])
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    torch.save(slim, partial)
    partial.replace(target)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The tensors and plain values of a model checkpoint (never arbitrary pickled objects)."""
    if not path.is_file():
        raise CatdogError(f"{path} not found; run the train stage first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CatdogError(f"{path} is not a model checkpoint written by the train stage: {exc}") from exc


def load_classifier(path: Path) -> tuple[nn.Module, PreprocessConfig, list[str]]:
    """The trained network in eval mode (images -> logits), its preprocessing and its class names."""
    checkpoint = read_checkpoint(Path(path))
    hparams = checkpoint["hyper_parameters"]
    class_names = [str(name) for name in hparams["class_names"]]
    model = build_model(hparams["model_name"], num_classes=len(class_names), pretrained=False)
    weights = {
        key.removeprefix("model."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("model.")
    }
    model.load_state_dict(weights, strict=True)
    return model.eval(), PreprocessConfig.from_json(hparams["preprocess"]), class_names


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, num_classes) from a batch of preprocessed images (N, 3, H, W)."""
    return model(images).float().softmax(dim=-1)
