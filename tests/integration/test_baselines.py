"""The linear-probe baseline on real photos: scored like `evaluate`, its frozen features cached once."""

from __future__ import annotations

import json

import pytest
from projects import write_tiny_project

from catdog.stages import baselines

pytestmark = pytest.mark.slow


def test_linear_probe_scores_and_reuses_its_cached_features(tmp_path, tiny_processed):
    root = write_tiny_project(
        tmp_path / "project",
        tiny_processed,
        baselines={"linear_probe": {"C": [0.1, 1.0]}, "simple_cnn": {"enabled": False}},
    )
    first = baselines.run(root)["linear_probe"]
    assert set(first["test"]) == {"accuracy", "precision", "recall", "f1", "roc_auc", "log_loss", "ece"}
    assert first["C"] in (0.1, 1.0) and first["feature_images_per_second"] > 0
    assert first["test"]["accuracy"] >= 0.75, "ImageNet features separate cats from dogs even on 16 photos"
    cached = list((root / "data" / "features").glob("tf_efficientnet_lite0-*.npz"))
    assert len(cached) == 1

    second = baselines.run(root)["linear_probe"]
    assert second["feature_images_per_second"] is None, "the second run reads the cached features"
    assert second["test"] == first["test"]
    saved = json.loads((root / "metrics" / "baselines.json").read_text())
    assert set(saved) == {"linear_probe"}

    (root / "data" / "processed" / "manifest.csv").write_text(
        (root / "data" / "processed" / "manifest.csv").read_text() + "\n"
    )
    baselines.run(root)
    assert len(list((root / "data" / "features").glob("*.npz"))) == 2, "a new manifest gets new features"
