"""Training on a tiny real-photo dataset: smoke runs, overfitting, resuming, the train stage end to end."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader

from catdog.config import Params, Project
from catdog.preprocessing import preprocess
from catdog.stages import train as train_stage
from catdog.training.callbacks import HISTORY_COLUMNS
from catdog.training.checkpoint import load_classifier, predict_proba, read_checkpoint
from catdog.training.data import CatDogDataModule, limit_samples, read_manifest
from catdog.training.module import lr_factor
from catdog.training.runtime import resolve_precision

NO_AUGMENT = {"hflip": 0, "random_resized_crop_scale": [1.0, 1.0], "color_jitter": 0, "rotate_limit": 0}
SMALL = {
    "image_size": 64,
    "batch_size": 8,
    "epochs_frozen": 0,
    "num_workers": 0,
    "early_stopping_patience": None,
    "progress_bar": False,
    "accelerator": "cpu",
    "feature_cache": {"enabled": True, "views": 1},
}


def make_params(**train: Any) -> Params:
    return Params.model_validate({"seed": 42, "data": {"source": "unused"}, "train": {**SMALL, **train}})


def make_project(root: Path, processed: Path, **train: Any) -> Project:
    """A project root holding params.yaml (train section from SMALL + `train`) and a copy of `processed`."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "data" / "processed").exists():
        shutil.copytree(processed, root / "data" / "processed")
    raw = make_params(**train).model_dump(mode="json", by_alias=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return Project(root)


def fit(params: Params, processed: Path, **trainer_options: Any) -> tuple[L.Trainer, Any, CatDogDataModule]:
    L.seed_everything(params.seed)
    module, datamodule = train_stage.build(params, processed)
    precision = resolve_precision("auto", "cpu")
    trainer = train_stage.build_trainer(
        params, precision=precision, enable_checkpointing=False, **trainer_options
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, module, datamodule


class StepCounter(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1


def test_lr_factor_warms_up_then_anneals() -> None:
    factors = [lr_factor(step, 100, 0.1) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[-1] < 0.01
    assert lr_factor(50, 100, 0.1, "constant") == 1.0


def test_manifest_and_limit(tiny_processed: Path) -> None:
    splits = read_manifest(tiny_processed)
    assert {split: len(samples) for split, samples in splits.items()} == {"train": 16, "val": 8, "test": 8}
    limited = limit_samples(splits["train"], 6, seed=1)
    assert len(limited) == 6 and sorted(s.label for s in limited) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    ("model", "epochs_frozen", "cache"),
    [
        ("simple_cnn", 0, False),
        ("tf_efficientnet_lite0", 0, False),
        ("tf_efficientnet_lite0", 1, True),
        ("tf_efficientnet_lite0", 1, False),
    ],
    ids=["simple_cnn", "lite0-finetune", "lite0-frozen-cached", "lite0-frozen-images"],
)
def test_one_batch_smoke(tiny_processed: Path, model: str, epochs_frozen: int, cache: bool) -> None:
    params = make_params(
        model=model,
        epochs_frozen=epochs_frozen,
        epochs_unfrozen=1,
        feature_cache={"enabled": cache, "views": 1},
    )
    module, datamodule = train_stage.build(params, tiny_processed)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = train_stage.build_trainer(params, precision=resolve_precision("auto", "cpu"), fast_dev_run=True)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    after = module.model.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    head = {"classifier.weight", "classifier.bias"}
    assert head <= changed
    statistics = {key for key in changed if "running_" in key}
    if epochs_frozen:
        assert changed == head, "a frozen backbone (weights and BatchNorm statistics) must not change"
        assert (module.feature_images_per_second is not None) is cache
    else:
        assert changed - head - statistics
        assert bool(statistics) is (model == "simple_cnn"), "pretrained BatchNorm statistics stay frozen"


def test_overfits_eight_images(tiny_processed: Path) -> None:
    params = make_params(
        model="simple_cnn",
        epochs_frozen=0,
        epochs_unfrozen=40,
        lr_head=3e-3,
        scheduler="constant",
        limit_images=8,
        augment=NO_AUGMENT,
    )
    trainer, module, datamodule = fit(params, tiny_processed, limit_val_batches=0)
    images, labels = next(iter(DataLoader(datamodule.dataset("train", augmented=False), batch_size=8)))
    probs = module.predict_proba(images)
    loss = torch.nn.functional.nll_loss(probs.log(), labels)
    assert trainer.global_step == 40
    assert (probs.argmax(dim=1) == labels).float().mean() == 1.0
    assert loss < 0.2


def test_resume_continues_from_last_checkpoint(tiny_processed: Path, tmp_path: Path) -> None:
    first = train_stage.train(make_project(tmp_path, tiny_processed, model="simple_cnn", epochs_unfrozen=1))
    assert (first["epochs"], first["global_step"]) == (1, 2)
    counter = StepCounter()
    project = make_project(tmp_path, tiny_processed, model="simple_cnn", epochs_unfrozen=2, resume=True)
    second = train_stage.train(project, callbacks=[counter])
    assert counter.steps == 2, "only the second epoch should run after resuming"
    assert (second["epochs"], second["global_step"]) == (2, 4)
    with project.paths.train_history.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert float(rows[0]["val/loss"]) == pytest.approx(first["final"]["val/loss"])


def test_train_stage_end_to_end(tiny_processed: Path, tmp_path: Path) -> None:
    project = make_project(
        tmp_path,
        tiny_processed,
        model="tf_efficientnet_lite0",
        image_size=96,
        epochs_frozen=2,
        epochs_unfrozen=1,
        feature_cache={"enabled": True, "views": 2},
    )
    train_stage.run(project.root)
    paths = project.paths

    metrics = json.loads(paths.train_metrics.read_text())
    assert metrics["epochs"] == 3 and metrics["global_step"] == 4 + 4 + 2
    assert {
        "best",
        "final",
        "best_epoch",
        "seconds",
        "train_images_per_second",
        "feature_images_per_second",
    } <= set(metrics)
    assert {"val/loss", "val/acc", "val/f1", "val/auroc", "train/loss", "train/acc"} <= set(metrics["best"])
    with paths.train_history.open() as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == HISTORY_COLUMNS
    assert [(row["phase"], row["inputs"]) for row in rows] == [
        ("frozen", "features"),
        ("frozen", "features"),
        ("unfrozen", "images"),
    ]

    checkpoint = read_checkpoint(paths.model_checkpoint)
    assert "optimizer_states" not in checkpoint
    model, config, class_names = load_classifier(paths.model_checkpoint)
    assert not model.training and class_names == ["cat", "dog"]
    assert (config.size, config.mean, config.std) == (96, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    test_images = sorted((paths.processed / "test").rglob("*.jpg"))[:4]
    batch = torch.stack([torch.from_numpy(preprocess(path, config)) for path in test_images])
    probs = predict_proba(model, batch)
    assert probs.shape == (4, 2)
    assert torch.allclose(probs.sum(dim=1), torch.ones(4), atol=1e-5)
