"""Out-of-distribution score: is the picture a cat or a dog at all?

The binary head answers cat or dog for anything (its max probability is no guide: a median of 0.96 on flower
photos). The ImageNet 1000-class classifier of the same pretrained backbone is: `pet_score` is its softmax
mass on the ImageNet cat (281-285) and dog (151-268) classes, computed from the pooled features of the SAME
forward pass as the binary head (the fine-tuned backbone's features; measured to separate as well as the
frozen pretrained ones, see params.yaml export.ood). Low score = out of distribution.

This module (torch) is shared by the export wrapper and the evaluate stage, so both compute the score the
same way; the service reads the exported graph's second output (catdog.onnx_model, no torch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from catdog.training.backbones import IMAGENET_CLASSES, PYPI_WEIGHTS, imagenet_model, pooled_features

DOG_CLASSES = tuple(range(151, 269))  # ImageNet 151 (Chihuahua) .. 268 (Mexican hairless)
CAT_CLASSES = tuple(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
PET_CLASSES = DOG_CLASSES + CAT_CLASSES
DEFINITION = (
    "sum of softmax(original ImageNet-1k classifier of the pretrained backbone applied to the model's pooled "
    f"features) over the ImageNet dog classes {DOG_CLASSES[0]}-{DOG_CLASSES[-1]} and cat classes "
    f"{CAT_CLASSES[0]}-{CAT_CLASSES[-1]}; below the threshold = does not look like a cat or a dog"
)
# Non-pet photos and pictures bundled with scikit-image (skimage.data, no download): real photos of people,
# objects, textures, space, microscopy, text. Left out: chelsea/cat (a cat), horse (an animal silhouette),
# and the images skimage fetches over the network.
SKIMAGE_NON_PETS = (
    "astronaut",
    "brick",
    "camera",
    "checkerboard",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "moon",
    "page",
    "retina",
    "rocket",
    "stereo_motorcycle",
    "text",
)


def imagenet_head(name: str) -> nn.Linear | None:
    """The original (pretrained) ImageNet classifier of backbone `name`, read offline from its PyPI weights
    package; None for models without one (simple_cnn, other timm models)."""
    if name not in PYPI_WEIGHTS:
        return None
    head = imagenet_model(name).get_classifier()
    if not isinstance(head, nn.Linear) or head.out_features != IMAGENET_CLASSES:
        return None
    return head.float().eval()


def pet_score_from_features(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """(N,) ImageNet cat+dog probability mass of pooled features (N, F). THE definition of the score."""
    probabilities = head(features).float().softmax(dim=-1)
    dogs = probabilities[:, DOG_CLASSES[0] : DOG_CLASSES[-1] + 1].sum(dim=-1)
    return dogs + probabilities[:, CAT_CLASSES[0] : CAT_CLASSES[-1] + 1].sum(dim=-1)


class ScoredClassifier(nn.Module):
    """images -> (binary logits, pet_score), from one backbone forward pass."""

    def __init__(self, classifier: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.imagenet_head = head

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = pooled_features(self.classifier, image)
        logits = self.classifier.get_classifier()(features)
        return logits, pet_score_from_features(self.imagenet_head, features)


@torch.no_grad()
def probabilities_and_scores(
    model: nn.Module, head: nn.Module, batches: Iterator[torch.Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, classes) and pet scores (N,) in fp32, from preprocessed batches."""
    scored = ScoredClassifier(model, head).eval()
    probs, scores = [], []
    for batch in batches:
        logits, score = scored(batch.float())
        probs.append(logits.float().softmax(dim=-1).numpy())
        scores.append(score.numpy())
    if not probs:
        return np.zeros((0, 2), dtype=np.float32), np.zeros(0, dtype=np.float32)
    return np.concatenate(probs), np.concatenate(scores)


def calibrate_threshold(pet_scores: np.ndarray, quantile: float, floor: float, ceiling: float) -> float:
    """The score below which a `quantile` share of real (validation) pets fall, clipped to [floor,
    ceiling]."""
    if len(pet_scores) == 0:
        return float(floor)
    return float(np.clip(np.quantile(pet_scores, quantile), floor, ceiling))


def flagged_rate(scores: np.ndarray, threshold: float) -> float | None:
    """Share of scores below the threshold (flagged out of distribution); None without scores."""
    return float((np.asarray(scores) < threshold).mean()) if len(scores) else None


def skimage_non_pets(names: Sequence[str] = SKIMAGE_NON_PETS) -> dict[str, Image.Image]:
    """The bundled non-pet images of skimage.data as RGB pictures (empty when scikit-image is missing;
    images it would have to download are skipped)."""
    try:
        from skimage import data
    except ImportError:
        return {}
    pictures = {}
    for name in names:
        try:
            array = getattr(data, name)()
        except Exception:  # not bundled (needs pooch / a download)
            continue
        array = array[0] if isinstance(array, tuple) else array
        pictures[name] = to_rgb(np.asarray(array))
    return pictures


def to_rgb(array: np.ndarray) -> Image.Image:
    """An 8-bit RGB picture of a skimage array (bool, grey, float or RGBA)."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        low, high = float(array.min()), float(array.max())
        array = ((array - low) / (high - low or 1.0) * 255).astype(np.uint8)
    picture = Image.fromarray(array)
    if picture.mode == "RGBA":
        white = Image.new("RGB", picture.size, (255, 255, 255))
        white.paste(picture, mask=picture.getchannel("A"))
        return white
    return picture.convert("RGB")


def save_pictures(pictures: dict[str, Image.Image], folder: Path) -> list[Path]:
    """Write pictures as PNG files (the service's and the preprocessing's input format)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, picture in pictures.items():
        path = folder / f"{name}.png"
        picture.save(path)
        paths.append(path)
    return paths
