"""Batch inference with PyTorch over image files, decoded by the shared preprocessing module."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from catdog import preprocessing
from catdog.training.backbones import pooled_features
from catdog.training.checkpoint import predict_proba
from catdog.training.runtime import cpu_has_bf16

Transform = Callable[[Image.Image], Image.Image]


def image_batches(
    paths: Sequence[Path],
    config: preprocessing.PreprocessConfig,
    batch_size: int,
    transform: Transform | None = None,
) -> Iterator[torch.Tensor]:
    """Normalised (N, 3, H, W) batches; `transform` (flip, crop...) acts on the decoded picture."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        yield torch.from_numpy(preprocessing.preprocess_batch(chunk, config, transform))


def predict_paths(
    model: torch.nn.Module,
    paths: Sequence[Path],
    config: preprocessing.PreprocessConfig,
    batch_size: int,
    transform: Transform | None = None,
) -> np.ndarray:
    """Class probabilities (N, classes) in full fp32 precision."""
    batches = image_batches(paths, config, batch_size, transform)
    out = [predict_proba(model, batch).numpy() for batch in batches]
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.float32)


@torch.no_grad()
def feature_paths(
    model: torch.nn.Module, paths: Sequence[Path], config: preprocessing.PreprocessConfig, batch_size: int
) -> np.ndarray:
    """Pooled backbone features (N, F); bf16 autocast and channels_last where the CPU supports bf16."""
    fast = cpu_has_bf16()
    model = model.eval().to(memory_format=torch.channels_last) if fast else model.eval()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if fast else nullcontext()
    out = []
    with context:
        for batch in image_batches(paths, config, batch_size):
            if fast:
                batch = batch.contiguous(memory_format=torch.channels_last)
            out.append(pooled_features(model, batch).float().numpy())
    return np.concatenate(out)
