"""Image properties and reference statistics for drift monitoring, on generated pictures."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image, ImageFilter

from catdog.image_stats import (
    QUANTILES,
    bin_counts,
    image_properties,
    population_stability_index,
    reference_statistics,
)


def noise_image(
    seed: int = 0, size: tuple[int, int] = (224, 224), low: int = 0, high: int = 256
) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(low, high, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def flat(colour: tuple[int, int, int], size: tuple[int, int] = (224, 224)) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_brightness_and_contrast() -> None:
    dark = image_properties(noise_image(low=0, high=60))
    bright = image_properties(noise_image(low=190, high=256))
    assert dark["brightness"] < 0.15 < 0.85 < bright["brightness"]
    assert image_properties(flat((0, 0, 0)))["brightness"] == pytest.approx(0.0)
    assert image_properties(flat((255, 255, 255)))["brightness"] == pytest.approx(1.0)
    assert image_properties(flat((128, 128, 128)))["contrast"] == pytest.approx(0.0, abs=1e-6)
    halves = np.zeros((224, 224, 3), dtype=np.uint8)
    halves[:, 112:] = 255
    assert image_properties(Image.fromarray(halves))["contrast"] == pytest.approx(0.5, abs=0.01)


def test_blur_lowers_sharpness() -> None:
    sharp = noise_image(seed=1)
    blurred = sharp.filter(ImageFilter.GaussianBlur(3))
    assert image_properties(blurred)["sharpness"] < 0.1 * image_properties(sharp)["sharpness"]
    assert image_properties(flat((40, 90, 200)))["sharpness"] == pytest.approx(0.0)


def test_colourfulness() -> None:
    grey = noise_image(seed=2).convert("L")
    assert image_properties(grey)["colourfulness"] == pytest.approx(0.0, abs=1e-3)
    assert image_properties(grey.convert("RGB"))["colourfulness"] == pytest.approx(0.0, abs=1e-3)
    pale = image_properties(flat((140, 128, 120)))["colourfulness"]
    vivid = image_properties(flat((255, 0, 0)))["colourfulness"]
    assert pale < 10 < 50 < vivid


def test_size_of_the_original_when_given() -> None:
    img = noise_image(size=(224, 224))
    assert (image_properties(img)["width"], image_properties(img)["aspect_ratio"]) == (224.0, 1.0)
    props = image_properties(img, original_size=(640, 480))
    assert (props["width"], props["height"]) == (640.0, 480.0)
    assert props["aspect_ratio"] == pytest.approx(4 / 3)
    assert image_properties(noise_image(size=(300, 100)))["aspect_ratio"] == pytest.approx(3.0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_any_mode(mode: str) -> None:
    img = noise_image(seed=3).convert("L") if mode == "I;16" else noise_image(seed=3).convert(mode)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
    props = image_properties(img)
    assert set(props) == set(image_properties(noise_image()))
    assert all(np.isfinite(v) for v in props.values())
    assert 0 <= props["brightness"] <= 1


def test_tiny_image() -> None:
    props = image_properties(flat((10, 20, 30), size=(1, 2)))
    assert props["sharpness"] == 0.0 and props["aspect_ratio"] == 0.5


def test_cheap_per_call() -> None:
    img = noise_image(seed=4)
    image_properties(img)
    runs = 50
    start = time.perf_counter()
    for _ in range(runs):
        image_properties(img, original_size=(500, 375))
    assert (time.perf_counter() - start) / runs < 0.01  # < 2 ms measured; generous for shared CI machines


def test_reference_statistics() -> None:
    rng = np.random.default_rng(5)
    rows = [{"brightness": float(v), "width": 500.0} for v in rng.uniform(0, 1, 1000)]
    rows.append({"brightness": 0.5})
    stats = reference_statistics(rows)
    bright = stats["brightness"]
    assert bright["count"] == 1001 and stats["width"]["count"] == 1000
    assert bright["mean"] == pytest.approx(0.5, abs=0.03) and bright["std"] == pytest.approx(0.289, abs=0.02)
    assert list(bright["quantiles"]) == [f"p{q:g}" for q in QUANTILES]
    assert bright["quantiles"]["p0"] <= bright["quantiles"]["p50"] <= bright["quantiles"]["p100"]
    edges, counts = bright["histogram"]["edges"], bright["histogram"]["counts"]
    assert len(counts) == len(edges) - 1 == 20 and sum(counts) == 1001
    assert all(abs(c - 50) <= 2 for c in counts), "bins are equal-mass"
    constant = stats["width"]["histogram"]
    assert constant == {"edges": [500.0, 500.0], "counts": [1000]}
    json.dumps(stats, allow_nan=False)


def test_non_finite_and_empty() -> None:
    stats = reference_statistics([{"x": float("nan")}, {"x": 1.0}, {"y": float("inf")}])
    assert stats["x"]["count"] == 1
    assert stats["y"] == {"count": 0}
    assert reference_statistics([]) == {}


def test_bin_counts_clip_to_end_bins() -> None:
    assert bin_counts([0.0, 1.0, 2.0], [-5, 0.5, 1.0, 1.5, 9]) == [2, 3]


def test_psi_detects_a_shift() -> None:
    rng = np.random.default_rng(6)
    reference = reference_statistics([{"b": float(v)} for v in rng.normal(0.5, 0.1, 5000)])["b"]
    same = population_stability_index(reference, rng.normal(0.5, 0.1, 2000))
    darker = population_stability_index(reference, rng.normal(0.3, 0.1, 2000))
    assert same < 0.05 < 0.25 < darker
    assert np.isnan(population_stability_index(reference, []))


def test_imports_neither_torch_nor_sklearn() -> None:
    code = "import sys, catdog.image_stats; print(sorted({'torch', 'sklearn'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
