"""Per-epoch history (CSV for DVC plots), one log line per epoch, and training throughput."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping

log = logging.getLogger(__name__)

HISTORY_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/f1", "val/auroc")
HISTORY_COLUMNS = ("epoch", "phase", "inputs", *HISTORY_METRICS, "samples", "samples_per_second", "seconds")


class EpochHistory(Callback):
    """Collects one row per training epoch (and logs progress through long image epochs); the rows travel
    in checkpoints, so a resumed run keeps them."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._start = 0.0
        self._train_end = 0.0
        self._samples = 0
        self._inputs = "images"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._train_end = time.perf_counter()
        self._samples = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        inputs, targets = batch
        self._samples += len(targets)
        self._inputs = "features" if inputs.ndim == 2 else "images"
        self._train_end = time.perf_counter()
        batches = trainer.num_training_batches
        if (
            self._inputs == "images"
            and batch_idx + 1 < batches
            and (batch_idx + 1) % max(1, batches // 4) == 0
        ):
            elapsed = self._train_end - self._start
            log.info(
                "epoch %d: %d/%d batches, %.1f images/s",
                trainer.current_epoch + 1,
                batch_idx + 1,
                batches,
                self._samples / elapsed,
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        train_seconds = self._train_end - self._start
        row: dict[str, Any] = {
            "epoch": trainer.current_epoch + 1,
            "phase": pl_module.phase(trainer.current_epoch) if hasattr(pl_module, "phase") else "",
            "inputs": self._inputs,
            **{name: round(float(metrics[name]), 6) if name in metrics else None for name in HISTORY_METRICS},
            "samples": self._samples,
            "samples_per_second": round(self._samples / train_seconds, 2) if train_seconds > 0 else None,
            "seconds": round(time.perf_counter() - self._start, 2),
        }
        self.rows.append(row)
        if self.path is not None and trainer.is_global_zero:
            self.write(self.path)
        shown = " ".join(f"{name} {row[name]:.4f}" for name in HISTORY_METRICS if row[name] is not None)
        log.info(
            "epoch %d/%d %s (%s): %s | %d %s in %.1f s, %s/s",
            row["epoch"],
            trainer.max_epochs,
            row["phase"],
            row["inputs"],
            shown,
            row["samples"],
            row["inputs"],
            train_seconds,
            row["samples_per_second"],
        )

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)

    def image_throughput(self) -> float | None:
        """Training images per second over the epochs that ran on images (not cached features)."""
        epochs = [row for row in self.rows if row["inputs"] == "images" and row["samples_per_second"]]
        if not epochs:
            return None
        seconds = sum(row["samples"] / row["samples_per_second"] for row in epochs)
        return round(sum(row["samples"] for row in epochs) / seconds, 2)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))


class FineTuneEarlyStopping(EarlyStopping):
    """EarlyStopping that watches only the epochs after the frozen-backbone phase.

    The head-only epochs are few and cheap (cached features); stopping during them would skip fine-tuning
    altogether, and the best checkpoint is kept either way.
    """

    def _watching(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        phase = getattr(pl_module, "phase", None)
        return phase is None or phase(trainer.current_epoch) != "frozen"

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._watching(trainer, pl_module):
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._watching(trainer, pl_module):
            super().on_validation_end(trainer, pl_module)
