"""DVC stage `train`: fine-tune the classifier on data/processed.

Phase 1 trains the head on a frozen pretrained backbone (on cached pooled features when
train.feature_cache.enabled, computed once, the plain images plus augmented views); phase 2 fine-tunes the
whole network briefly at a lower LR. The checkpoint with the best val/loss becomes models/model.ckpt
(weights and the hyperparameters that rebuild the model); metrics/train.json and plots/train_history.csv
record the run. With train.resume and an existing models/checkpoints/last.ckpt the run continues from it.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import Logger

from catdog import tracking
from catdog.config import CLASSES, Params, Project
from catdog.errors import CatdogError
from catdog.training.backbones import preprocess_config
from catdog.training.callbacks import HISTORY_METRICS, EpochHistory, FineTuneEarlyStopping
from catdog.training.checkpoint import write_model_checkpoint
from catdog.training.data import CatDogDataModule
from catdog.training.module import ClassifierModule
from catdog.training.runtime import available_cores, resolve_precision, uses_cuda

log = logging.getLogger(__name__)

MONITOR = "val/loss"


def build(params: Params, processed: Path) -> tuple[ClassifierModule, CatDogDataModule]:
    """The Lightning module and data module that params.yaml describes."""
    train = params.train
    size = train.image_size or params.prepare.image_size
    preprocess = preprocess_config(train.model, size, params.prepare.resize)
    module = ClassifierModule(
        model_name=train.model,
        preprocess=preprocess.to_json(),
        class_names=list(CLASSES),
        pretrained=train.pretrained,
        epochs_frozen=train.epochs_frozen,
        epochs_unfrozen=train.epochs_unfrozen,
        lr_head=train.lr_head,
        lr_backbone=train.lr_backbone,
        weight_decay=train.weight_decay,
        optimizer=train.optimizer,
        scheduler=train.scheduler,
        warmup_fraction=train.warmup_fraction,
        freeze_batchnorm=train.freeze_batchnorm,
        channels_last=train.channels_last,
    )
    cached_epochs = module.frozen_epochs if train.feature_cache.enabled else 0
    datamodule = CatDogDataModule(
        processed,
        preprocess,
        batch_size=train.batch_size,
        num_workers=train.num_workers,
        augment=train.augment,
        limit_images=train.limit_images,
        seed=params.seed,
        cached_epochs=cached_epochs,
        cache_views=train.feature_cache.views,
    )
    if cached_epochs:
        datamodule.feature_extractor = module.extract_features
    return module, datamodule


def build_trainer(
    params: Params,
    *,
    precision: str,
    callbacks: Sequence[Callback] = (),
    logger: Logger | Sequence[Logger] | bool = False,
    **overrides: Any,
) -> L.Trainer:
    """A Trainer configured from params.yaml; `overrides` (fast_dev_run, limit_*_batches ...) win."""
    train = params.train
    progress_bar = train.progress_bar and sys.stderr.isatty()
    options: dict[str, Any] = {
        "max_epochs": train.epochs_frozen + train.epochs_unfrozen,
        "accelerator": train.accelerator,
        "devices": train.devices,
        "strategy": train.strategy,
        "precision": precision,
        "callbacks": [*callbacks, *([TQDMProgressBar(refresh_rate=10)] if progress_bar else [])],
        "logger": logger,
        "enable_progress_bar": progress_bar,
        "enable_model_summary": False,
        "reload_dataloaders_every_n_epochs": 1 if train.feature_cache.enabled else 0,
        "log_every_n_steps": 10,
        "num_sanity_val_steps": 0,
        **overrides,
    }
    return L.Trainer(**options)


def setup_runtime(params: Params) -> str:
    """Threads, seeds, matmul precision and quieter warnings; returns the resolved Lightning precision."""
    train = params.train
    torch.set_num_threads(train.threads or available_cores())
    if uses_cuda(train.accelerator):
        torch.set_float32_matmul_precision("high")
    if logging.getLogger().hasHandlers():
        logging.getLogger("lightning").handlers.clear()  # its own console handler would repeat every line
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    L.seed_everything(params.seed, workers=True)
    return resolve_precision(train.precision, train.accelerator)


def train(
    project: Project,
    *,
    callbacks: Sequence[Callback] = (),
    logger: Logger | Sequence[Logger] | bool = False,
    **trainer_overrides: Any,
) -> dict[str, Any]:
    """Train as params.yaml says; extra callbacks/loggers (e.g. MLflow) plug in. Returns the metrics."""
    params, paths = project.params, project.paths
    started = time.perf_counter()
    precision = setup_runtime(params)
    module, datamodule = build(params, paths.processed)
    resume = params.train.resume and paths.last_checkpoint.is_file()
    if not resume:
        shutil.rmtree(paths.train_checkpoints, ignore_errors=True)
    checkpoint = ModelCheckpoint(
        dirpath=paths.train_checkpoints,
        filename="best",
        monitor=MONITOR,
        mode="min",
        save_last=True,
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    history = EpochHistory(paths.train_history)
    stopping = (
        [FineTuneEarlyStopping(MONITOR, mode="min", patience=params.train.early_stopping_patience)]
        if params.train.early_stopping_patience
        else []
    )
    trainer = build_trainer(
        params,
        precision=precision,
        callbacks=[checkpoint, history, *stopping, *callbacks],
        logger=logger,
        **trainer_overrides,
    )
    log.info(
        "training %s (%s, %s threads, %s)%s",
        params.train.model,
        precision,
        torch.get_num_threads(),
        trainer.accelerator.__class__.__name__,
        f", resuming from {paths.last_checkpoint}" if resume else "",
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=paths.last_checkpoint if resume else None)
    best = checkpoint.best_model_path or checkpoint.last_model_path
    if not best:
        raise CatdogError("training saved no checkpoint (did any validation run?)")
    if trainer.is_global_zero:
        write_model_checkpoint(Path(best), paths.model_checkpoint)
    metrics = summarize(
        history.rows,
        model=params.train.model,
        precision=precision,
        seconds=time.perf_counter() - started,
        global_step=trainer.global_step,
        stopped_early=any(callback.stopped_epoch > 0 for callback in stopping),
        train_images_per_second=history.image_throughput(),
        feature_images_per_second=module.feature_images_per_second,
    )
    if trainer.is_global_zero:
        paths.train_metrics.parent.mkdir(parents=True, exist_ok=True)
        paths.train_metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info(
        "trained in %.0f s: best epoch %s val/loss %s val/acc %s; throughput %s images/s fine-tuning, "
        "%s images/s feature caching",
        metrics["seconds"],
        metrics["best_epoch"],
        metrics["best"].get("val/loss"),
        metrics["best"].get("val/acc"),
        metrics["train_images_per_second"],
        metrics["feature_images_per_second"],
    )
    return metrics


def summarize(rows: Sequence[Mapping[str, Any]], **facts: Any) -> dict[str, Any]:
    """metrics/train.json: the best epoch's (lowest val/loss) and the last epoch's metrics, plus run facts."""
    scored = [row for row in rows if row.get(MONITOR) is not None]
    best = min(scored, key=lambda row: row[MONITOR]) if scored else (rows[-1] if rows else {})
    final = rows[-1] if rows else {}
    rounded = {key: round(value, 2) if isinstance(value, float) else value for key, value in facts.items()}
    return {
        **rounded,
        "epochs": len(rows),
        "best_epoch": best.get("epoch"),
        "best": {name: best.get(name) for name in HISTORY_METRICS},
        "final": {name: final.get(name) for name in HISTORY_METRICS},
    }


def run(root: Path | None = None) -> dict[str, Any]:
    """Train with the project's params.yaml inside a new MLflow run that later stages add to."""
    project = Project(root)
    paths = project.paths
    with tracking.start_pipeline_run(project):
        metrics = train(project)
        tracking.log_history(paths.train_history)
        tracking.log_metrics(
            {k: v for k, v in metrics.items() if k not in ("best", "final")} | {"best": metrics["best"]},
            "train_run/",
        )
        tracking.log_files([paths.validation_report, paths.validation_summary], "data")
        tracking.log_files([paths.train_metrics, paths.train_history], "training")
    return metrics
