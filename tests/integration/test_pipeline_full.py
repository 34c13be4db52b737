"""`dvc repro` from ingest through export on a few dozen real photos, then the MLflow run's lineage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import nbformat
import pytest
import yaml
from nbclient import NotebookClient
from test_dvc_pipeline import REPO, copy_sample, make_repo, run

from catdog.lineage import data_version

pytestmark = pytest.mark.slow

ALL_STAGES = ("ingest", "validate", "prepare", "train", "baselines", "evaluate", "export")
TINY = {
    "train": {
        "image_size": 96,
        "batch_size": 8,
        "epochs_frozen": 2,
        "epochs_unfrozen": 1,
        "early_stopping_patience": None,
        "progress_bar": False,
        "feature_cache": {"enabled": True, "views": 1},
    },
    "baselines": {
        "linear_probe": {"C": [1.0]},
        "simple_cnn": {"epochs": 1, "image_size": 64, "batch_size": 16},
    },
    "evaluate": {"min_accuracy": 0.5, "min_f1": 0.5, "max_log_loss": 1.0, "worst_examples": 4},
    "export": {"parity_images": 8, "latency_runs": 5, "throughput_batch_size": 4},
}


def execute_notebook(root: Path, tracking_uri: str) -> str:
    """Run the comparison notebook against a project's MLflow store; returns all its text outputs."""
    notebook = nbformat.read(REPO / "notebooks" / "compare_experiments.ipynb", as_version=4)
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "CATDOG_ROOT": str(root)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": root}}
        ).execute()
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
            texts.extend(str(v) for v in output.get("data", {}).values())
    return "\n".join(texts)


def test_dvc_repro_through_export_tracks_lineage_in_mlflow(tmp_path, sample_images_dir):
    source = copy_sample(sample_images_dir, tmp_path / "source", per_class=20)
    root = tmp_path / "project"
    make_repo(root, tmp_path / "remote", extra=("uv.lock",))
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(params[section].get(key), dict):
                params[section][key].update(value)
            else:
                params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(root, "git", "commit", "-qam", "tiny params")
    commit = run(root, "git", "rev-parse", "HEAD").stdout.strip()

    first = run(root, "dvc", "repro", env={"DATA_SOURCE": str(source)})
    assert {s for s in ALL_STAGES if f"Running stage '{s}'" in first.stdout} == set(ALL_STAGES)
    for path in ("models/model.onnx", "models/model_card.md", "models/reference_stats.json", "dvc.lock"):
        assert (root / path).is_file(), path
    comparison = json.loads((root / "metrics" / "evaluate.json").read_text())["comparison"]["models"]
    assert set(comparison) == {"fine_tuned", "linear_probe", "simple_cnn"}
    metrics = run(root, "dvc", "metrics", "show", "--json").stdout
    assert "baselines.json" in metrics and "evaluate.json" in metrics

    info = json.loads((root / "models" / "mlflow_run.json").read_text())
    assert info["tracking_uri"] == f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(info["tracking_uri"])
    mlflow_run = client.get_run(info["run_id"])
    tags, logged = mlflow_run.data.tags, mlflow_run.data.metrics
    assert tags["git_commit"] == commit and tags["git_dirty"] == "false"
    assert tags["data_version"] == data_version(root / "dvc.lock")
    assert mlflow_run.data.params["train.model"] == "tf_efficientnet_lite0"
    assert mlflow_run.data.params["data.source"] == params["data"]["source"]
    assert {"test/accuracy", "test/log_loss", "test/ece", "behaviour/flip_stability"} <= set(logged)
    assert len(client.get_metric_history(info["run_id"], "val/loss")) == 3, "one point per epoch"
    artifacts = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"evaluation", "model_files", "data"} <= artifacts
    data_files = {a.path for a in client.list_artifacts(info["run_id"], "data")}
    assert "data/validation.json" in data_files
    mlflow.set_tracking_uri(info["tracking_uri"])
    model = mlflow.models.get_model_info(tags["model_uri"])
    assert model.signature.inputs.inputs[0].shape == (-1, 3, 96, 96)

    again = run(root, "dvc", "repro", env={"DATA_SOURCE": str(source)})
    assert all(f"Running stage '{s}'" not in again.stdout for s in ALL_STAGES), again.stdout

    experiment = run(
        root, "dvc", "exp", "run", "-S", "train.model=simple_cnn", env={"DATA_SOURCE": str(source)}
    )
    assert {s for s in ALL_STAGES if f"Running stage '{s}'" in experiment.stdout} == {
        "train",
        "evaluate",
        "export",
    }
    runs = mlflow.search_runs(experiment_ids=[info["experiment_id"]], search_all_experiments=False)
    assert sorted(runs["params.train.model"]) == ["simple_cnn", "tf_efficientnet_lite0"]
    assert runs["metrics.test/accuracy"].notna().all()

    outputs = execute_notebook(root, info["tracking_uri"])
    assert "simple_cnn (this run's model)" in outputs and "linear_probe" in outputs
    assert "tf_efficientnet_lite0" in outputs, "the table of every run lists the default model's run too"
    assert outputs.count("final val-train loss gap") == 2
