"""PNG figures of an evaluation: ROC and PR curves, confusion matrix, reliability diagram, worst errors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def curve(points: Sequence[dict[str, float]], x: str, y: str, title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([p[x] for p in points], [p[y] for p in points], lw=2)
    if x == "fpr":
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel=x, ylabel=y, title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def confusion_matrix(matrix: list[list[int]], labels: Sequence[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(np.asarray(matrix), cmap="Blues")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=14)
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (test)")
    return _save(fig, path)


def reliability(bins: Sequence[dict[str, float]], path: Path) -> Path:
    """Accuracy against confidence per bin; the diagonal is perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o")
    ax.set(
        xlabel="confidence", ylabel="accuracy", title="Reliability (test)", xlim=(0.45, 1.0), ylim=(0, 1.02)
    )
    ax.grid(alpha=0.3)
    return _save(fig, path)


def gallery(items: Sequence[tuple[Path, str]], path: Path, columns: int = 4) -> Path:
    """A grid of images with captions (e.g. the worst misclassifications)."""
    rows = max(1, -(-len(items) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image_path, caption) in zip(axes.flat, items, strict=False):
        with Image.open(image_path) as img:
            ax.imshow(img.convert("RGB"))
        ax.set_title(caption, fontsize=9)
    if not items:
        axes.flat[0].text(0.5, 0.5, "no misclassifications", ha="center", va="center")
    return _save(fig, path)
