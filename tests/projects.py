"""Helpers that build test projects, for conftest.py and the tests. Tests import helpers from here, never
`from conftest import`: tests/containers has a conftest.py of its own, and that finds whichever came last."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_TRAIN = {
    "model": "tf_efficientnet_lite0",
    "image_size": 96,
    "batch_size": 8,
    "epochs_frozen": 2,
    "epochs_unfrozen": 0,
    "early_stopping_patience": None,
    "progress_bar": False,
    "accelerator": "cpu",
    "feature_cache": {"enabled": True, "views": 1},
}


def write_tiny_project(root: Path, processed: Path, **sections: dict) -> Path:
    """A project root with the repo's params.yaml (sections updated) and a copy of a processed dataset."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "data" / "processed").exists():
        shutil.copytree(processed, root / "data" / "processed")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["train"].update(TINY_TRAIN)
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def copy_project(source: Path, target: Path) -> Path:
    """A copy of a project whose pipeline run points at the copy's own MLflow database (models/mlflow_run.json
    names the store by absolute path), so later stages in the copy never write to the original's."""
    root = Path(shutil.copytree(source, target, symlinks=True))
    run_info = root / "models" / "mlflow_run.json"
    if run_info.is_file():
        info = json.loads(run_info.read_text())
        if info["tracking_uri"].startswith("sqlite:///"):
            info["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
            run_info.write_text(json.dumps(info, indent=2) + "\n")
    return root
