"""DVC stage `baselines`: the two reference models the fine-tuned default is compared with, on the same split.

- `linear_probe`: logistic regression on the frozen pretrained backbone's pooled features (un-augmented,
  computed once and cached in data/features/ per backbone, input recipe and manifest), its regularisation
  chosen by validation log loss.
- `simple_cnn`: the small CNN trained from scratch (the course's baseline), briefly.
Both are scored on the test split with the same metrics as `evaluate` (metrics/baselines.json).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from catdog import metrics
from catdog.config import CLASSES, SPLITS, FeatureCacheParams, Params, Project
from catdog.inference import feature_paths, predict_paths
from catdog.stages.prepare import load_split
from catdog.stages.train import build, build_trainer, setup_runtime
from catdog.training.backbones import build_model, preprocess_config

log = logging.getLogger(__name__)


def frozen_features(
    params: Params, processed: Path, cache_dir: Path
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float | None]:
    """Pooled features and labels per split, computed once per (backbone, input recipe, manifest) and cached.

    Returns the features and the extraction throughput (None when they came from the cache).
    """
    probe = params.baselines.linear_probe
    size = params.train.image_size or params.prepare.image_size
    config = preprocess_config(probe.backbone, size, params.prepare.resize)
    manifest = hashlib.sha256((processed / "manifest.csv").read_bytes()).hexdigest()
    key = hashlib.sha256(f"{probe.backbone}|{config.to_json()}|{manifest}".encode()).hexdigest()[:16]
    cached = cache_dir / f"{probe.backbone}-{key}.npz"
    if cached.is_file():
        with np.load(cached) as stored:
            log.info("frozen %s features from the cache %s", probe.backbone, cached)
            return {split: (stored[f"{split}_x"], stored[f"{split}_y"]) for split in SPLITS}, None
    backbone = build_model(probe.backbone, num_classes=len(CLASSES), pretrained=True)
    started = time.perf_counter()
    data = {}
    for split in SPLITS:
        paths, y = load_split(processed, split, CLASSES)
        data[split] = (feature_paths(backbone, paths, config, probe.batch_size), y)
    speed = sum(len(y) for _, y in data.values()) / (time.perf_counter() - started)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(cached.name + ".partial.npz")
    np.savez(partial, **{f"{s}_{part}": v for s, (x, y) in data.items() for part, v in (("x", x), ("y", y))})
    partial.replace(cached)
    return data, round(speed, 1)


def linear_probe(params: Params, processed: Path, cache_dir: Path) -> dict[str, Any]:
    """Fit the probe on train features, pick C on val, score on test."""
    probe = params.baselines.linear_probe
    started = time.perf_counter()
    data, speed = frozen_features(params, processed, cache_dir)
    best: tuple[float, float, LogisticRegression] | None = None
    for c in probe.C:
        model = LogisticRegression(C=c, max_iter=2000).fit(*data["train"])
        loss = log_loss(data["val"][1], model.predict_proba(data["val"][0]), labels=[0, 1])
        if best is None or loss < best[0]:
            best = (loss, c, model)
    assert best is not None
    val_loss, c, model = best
    test = metrics.classification_metrics(data["test"][1], model.predict_proba(data["test"][0]))
    return {
        "test": test,
        "backbone": probe.backbone,
        "C": c,
        "val_log_loss": val_loss,
        "feature_images_per_second": speed,
        "seconds": round(time.perf_counter() - started, 1),
    }


def simple_cnn(params: Params, processed: Path) -> dict[str, Any]:
    """Train the from-scratch CNN briefly with the training stage's own builders, score it on test."""
    cnn = params.baselines.simple_cnn
    train = params.train.model_copy(
        update={
            "model": "simple_cnn",
            "pretrained": False,
            "image_size": cnn.image_size,
            "batch_size": cnn.batch_size,
            "epochs_frozen": 0,
            "epochs_unfrozen": cnn.epochs,
            "lr_head": cnn.lr,
            "early_stopping_patience": None,
            "feature_cache": FeatureCacheParams(enabled=False),
            "progress_bar": False,
        }
    )
    cnn_params = params.model_copy(update={"train": train})
    started = time.perf_counter()
    precision = setup_runtime(cnn_params)
    module, datamodule = build(cnn_params, processed)
    trainer = build_trainer(cnn_params, precision=precision, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    test_paths, y = load_split(processed, "test", CLASSES)
    model = module.model.eval()
    proba = predict_paths(model, test_paths, module.preprocess_config, params.evaluate.batch_size)
    return {
        "test": metrics.classification_metrics(y, proba),
        "epochs": cnn.epochs,
        "image_size": cnn.image_size,
        "seconds": round(time.perf_counter() - started, 1),
    }


def run(root: Path | None = None) -> dict[str, Any]:
    """Train and score both baselines; write metrics/baselines.json."""
    project = Project(root)
    params, paths = project.params, project.paths
    results: dict[str, Any] = {}
    if params.baselines.linear_probe.enabled:
        results["linear_probe"] = linear_probe(params, paths.processed, paths.feature_cache)
    if params.baselines.simple_cnn.enabled:
        results["simple_cnn"] = simple_cnn(params, paths.processed)
    paths.metrics.mkdir(parents=True, exist_ok=True)
    paths.baselines_metrics.write_text(json.dumps(results, indent=2) + "\n")
    for name, result in results.items():
        test = result["test"]
        log.info("%s: test accuracy %.4f, log loss %.4f", name, test["accuracy"], test["log_loss"])
    return results


def comparison_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table of test metrics, one row per model."""
    keys = ("accuracy", "f1", "roc_auc", "log_loss", "ece")
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, test in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{test[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
