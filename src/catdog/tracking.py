"""MLflow tracking: one run per pipeline run, opened by `train` and resumed by `evaluate` and `export`.

The store is $MLFLOW_TRACKING_URI when set (an MLflow server), else a local SQLite file with a local
artifact folder under the project (`mlflow ui --backend-store-uri sqlite:///mlflow.db` shows it).
The run id travels between the DVC stages in models/mlflow_run.json.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from catdog.config import Project
from catdog.errors import CatdogError
from catdog.lineage import data_version, git_state

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def tracking_uri(project: Project) -> str:
    return os.environ.get(TRACKING_URI_ENV, "").strip() or f"sqlite:///{project.paths.mlflow_db}"


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested values as joined keys: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}{sep}", sep))
        else:
            flat[name] = value
    return flat


def experiment_id(mlflow: Any, project: Project, name: str | None = None) -> str:
    """The id of experiment `name` (default: tracking.experiment), created on first use; a local store keeps
    its artifacts in the project's mlruns/."""
    name = name or project.params.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    local = mlflow.get_tracking_uri().startswith("sqlite:")
    location = project.paths.mlflow_artifacts.as_uri() if local else None
    return mlflow.create_experiment(name, artifact_location=location)


def lineage_tags(project: Project) -> dict[str, str]:
    git = git_state(project.root)
    return {
        "git_commit": str(git["commit"]),
        "git_dirty": str(git["dirty"]).lower(),
        "data_version": str(data_version(project.paths.dvc_lock)),
        "model_name": project.params.train.model,
    }


@contextmanager
def store(uri: str) -> Iterator[Any]:
    """MLflow pointed at `uri` for the block; the environment is restored (set_tracking_uri exports it)."""
    import mlflow

    before = os.environ.get(TRACKING_URI_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(before)


@contextmanager
def start_pipeline_run(project: Project) -> Iterator[Any]:
    """A new MLflow run for this pipeline run, with all parameters and lineage tags; its id is saved."""
    with store(tracking_uri(project)) as mlflow, _new_run(mlflow, project) as run:
        yield run


@contextmanager
def _new_run(mlflow: Any, project: Project) -> Iterator[Any]:
    experiment = experiment_id(mlflow, project)
    params = project.params.model_dump(by_alias=True, mode="json")
    with mlflow.start_run(experiment_id=experiment, tags=lineage_tags(project)) as run:
        mlflow.log_params(
            {k: json.dumps(v) if isinstance(v, list) else v for k, v in flatten(params).items()}
        )
        info = {
            "run_id": run.info.run_id,
            "experiment_id": experiment,
            "tracking_uri": tracking_uri(project),
        }
        project.paths.run_info.parent.mkdir(parents=True, exist_ok=True)
        project.paths.run_info.write_text(json.dumps(info, indent=2) + "\n")
        log.info("MLflow run %s in experiment %s (%s)", run.info.run_id, experiment, info["tracking_uri"])
        yield run


@contextmanager
def resume_pipeline_run(project: Project) -> Iterator[Any]:
    """The run that `train` opened, reopened to add evaluation or export results."""
    try:
        info = json.loads(project.paths.run_info.read_text())
    except FileNotFoundError as exc:
        raise CatdogError(f"{project.paths.run_info} not found; run the train stage first") from exc
    with store(info["tracking_uri"]) as mlflow, mlflow.start_run(run_id=info["run_id"]) as run:
        yield run


def log_metrics(values: Mapping[str, Any], prefix: str = "", step: int | None = None) -> None:
    """Log the finite numbers of a (nested) mapping under `prefix`."""
    import mlflow

    flat = flatten(values, prefix, sep="/")
    numbers = {
        k: float(v)
        for k, v in flat.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    if numbers:
        mlflow.log_metrics(numbers, step=step)


def log_history(history_csv: Path) -> None:
    """Per-epoch curves from the training history CSV (one MLflow step per epoch)."""
    if not history_csv.is_file():
        return
    with history_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("epoch") or 0))
            log_metrics({key: _number(value) for key, value in row.items() if key != "epoch"}, step=step)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def log_files(paths: list[Path], artifact_path: str) -> None:
    import mlflow

    for path in paths:
        if path.is_file():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
        elif path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=f"{artifact_path}/{path.name}")


def log_onnx_model(path: Path, size: int, extra_files: Sequence[Path] = ()) -> str:
    """Log the exported ONNX file as the run's MLflow model with its tensor signature (every output of the
    graph, its shape read from the file); returns its URI.

    The `extra_files` that exist (the int8 model, model card, labels, reference statistics, export
    metrics) travel with the model, in its extra_files/ folder.
    """
    import mlflow
    import numpy as np
    import onnx
    import onnxruntime
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    graph = onnx.load(str(path))
    outputs = [
        TensorSpec(
            np.dtype(np.float32),
            tuple(d.dim_value if d.dim_value > 0 else -1 for d in out.type.tensor_type.shape.dim),
            out.name,
        )
        for out in graph.graph.output
    ]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size), "image")]),
        outputs=Schema(outputs),
    )
    requirements = [f"onnxruntime=={onnxruntime.__version__}", f"onnx=={onnx.__version__}", "numpy<2"]
    info = mlflow.onnx.log_model(
        graph,
        name="model",
        signature=signature,
        save_as_external_data=False,
        pip_requirements=requirements,
        extra_files=[str(file) for file in extra_files if file.is_file()] or None,
    )
    mlflow.set_tag("model_uri", info.model_uri)
    return info.model_uri
