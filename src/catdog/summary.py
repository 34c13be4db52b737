"""What a pipeline run produced, in a few lines: where the model, the metrics and the MLflow run are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from catdog.config import Project


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def render(project: Project) -> str:
    """A short report of the latest pipeline outputs (missing pieces are skipped)."""
    paths = project.paths
    prepare, train = _read(paths.prepare_metrics), _read(paths.train_metrics)
    evaluate, export, run = _read(paths.evaluate_metrics), _read(paths.export_metrics), _read(paths.run_info)
    lines = ["", "== catdog pipeline =="]
    if prepare:
        splits = ", ".join(f"{s} {sum(c.values())}" for s, c in prepare["splits"].items())
        lines.append(
            f"data       {prepare['images']} images ({splits}); prepare {prepare['images_per_second']} img/s"
        )
    if train:
        lines.append(
            f"training   {train.get('model')}: {train.get('epochs')} epochs in {train.get('seconds')} s; "
            f"{train.get('train_images_per_second')} img/s fine-tuning, "
            f"{train.get('feature_images_per_second')} img/s frozen features"
        )
    if evaluate:
        for name, test in (
            evaluate.get("comparison", {}).get("models", {"fine_tuned": evaluate["test"]}).items()
        ):
            lines.append(
                f"test       {name:<12} accuracy {test['accuracy']:.4f}  f1 {test['f1']:.4f}  "
                f"log loss {test['log_loss']:.4f}  ece {test['ece']:.4f}"
            )
    if export:
        lines.append(
            f"model      {paths.onnx_model} ({export['onnx_size_mb']} MB, "
            f"parity {export['parity']['max_abs_diff']:.1e}, "
            f"{export['onnxruntime']['latency_ms_median']} ms/image onnxruntime)"
        )
        lines.append(f"card       {paths.model_card}")
    lines.append(f"metrics    {paths.metrics}/*.json (dvc metrics show), plots: dvc plots show")
    if run:
        lines.append(f"mlflow     run {run['run_id']} in {run['tracking_uri']}")
        if run["tracking_uri"].startswith("sqlite:///"):
            lines.append(f"           browse: .venv/bin/mlflow ui --backend-store-uri {run['tracking_uri']}")
    return "\n".join(lines)
