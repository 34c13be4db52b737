"""Cheap per-image properties and their reference distributions, for data-drift monitoring.

Pillow and NumPy only: the prediction service imports it to compare live traffic with the training data.
Compute the properties on the model-sized picture (catdog.preprocessing.decode with the model's size) and
pass the original width and height, exactly as the export stage does for the reference statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from catdog.preprocessing import to_rgb

ANALYSIS_SIDE = 128
QUANTILES: tuple[float, ...] = (0, 1, 5, 10, 25, 50, 75, 90, 95, 99, 100)
HISTOGRAM_PERCENTILES: tuple[float, ...] = tuple(float(p) for p in range(0, 101, 5))
PSI_EPSILON = 1e-4
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _analysis_image(img: Image.Image) -> Image.Image:
    """The RGB picture shrunk (box filter) to at most ANALYSIS_SIDE on its longer side."""
    rgb = to_rgb(img)
    scale = ANALYSIS_SIDE / max(rgb.size)
    if scale >= 1:
        return rgb
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    return rgb.resize(size, Image.Resampling.BOX)


def laplacian_variance(luma: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian (the usual blur measure); 0 for pictures under 3x3."""
    if min(luma.shape) < 3:
        return 0.0
    lap = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4.0 * luma[1:-1, 1:-1]
    return float(lap.var())


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler–Süsstrunk colourfulness of an HWC RGB array in 0-255 units (0 for grey, ~15 slightly,
    ~33 moderately, ~59 quite, ~109 extremely colourful)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    sigma = math.hypot(float(rg.std()), float(yb.std()))
    mu = math.hypot(float(rg.mean()), float(yb.mean()))
    return sigma + 0.3 * mu


def image_properties(img: Image.Image, original_size: tuple[int, int] | None = None) -> dict[str, float]:
    """brightness and contrast (mean and std of luma, 0-1), sharpness (Laplacian variance of the luma in
    0-255 units at ANALYSIS_SIDE), colourfulness, and width, height, aspect_ratio of `original_size` when
    given (else of `img`)."""
    small = _analysis_image(img)
    rgb = np.asarray(small, dtype=np.float32)
    luma = rgb @ LUMA
    width, height = original_size or img.size
    return {
        "brightness": float(luma.mean()) / 255.0,
        "contrast": float(luma.std()) / 255.0,
        "sharpness": laplacian_variance(luma),
        "colourfulness": colourfulness(rgb),
        "width": float(width),
        "height": float(height),
        "aspect_ratio": float(width) / float(height) if height else float("nan"),
    }


def histogram_edges(values: np.ndarray) -> list[float]:
    """Equal-mass bin edges: the distinct 0, 5, ..., 100th percentiles of the reference values."""
    edges = np.unique(np.percentile(values, HISTOGRAM_PERCENTILES))
    return [float(edge) for edge in edges] if len(edges) > 1 else [float(edges[0])] * 2


def bin_counts(edges: Sequence[float], values: Iterable[float]) -> list[int]:
    """Counts per bin of `edges`; values below the first or above the last edge fall in the end bins."""
    inner = np.asarray(edges[1:-1], dtype=np.float64)
    which = np.searchsorted(inner, np.asarray(list(values), dtype=np.float64), side="right")
    return [int(count) for count in np.bincount(which, minlength=len(edges) - 1)]


def describe(values: Sequence[float]) -> dict[str, Any]:
    """count, mean, std, quantiles (p0 ... p100) and an equal-mass histogram of finite values."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return {"count": 0}
    edges = histogram_edges(array)
    return {
        "count": int(array.size),
        "mean": float(array.mean()),
        "std": float(array.std()),
        "quantiles": {
            f"p{q:g}": float(v) for q, v in zip(QUANTILES, np.percentile(array, QUANTILES), strict=True)
        },
        "histogram": {"edges": edges, "counts": bin_counts(edges, array)},
    }


def reference_statistics(rows: Sequence[Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Per property (the union of the rows' keys, each over the rows that have it): describe()."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {name: describe([row[name] for row in rows if name in row]) for name in names}


def population_stability_index(reference: Mapping[str, Any], values: Iterable[float]) -> float:
    """PSI of live `values` against one property's reference statistics (over its histogram bins)."""
    histogram = reference["histogram"]
    expected = np.asarray(histogram["counts"], dtype=np.float64)
    actual = np.asarray(bin_counts(histogram["edges"], values), dtype=np.float64)
    if actual.sum() == 0 or expected.sum() == 0:
        return float("nan")
    p = np.clip(expected / expected.sum(), PSI_EPSILON, None)
    q = np.clip(actual / actual.sum(), PSI_EPSILON, None)
    return float(((q - p) * np.log(q / p)).sum())
