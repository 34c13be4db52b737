"""MODEL_URI as an MLflow model URI: the logged model of the pipeline run, and a registered version."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import odd_images
import pytest

pytestmark = pytest.mark.slow


def answer(server) -> dict:
    with server.client() as client:
        response = client.post("/predict", files={"file": ("a.jpg", odd_images.jpeg(9), "image/jpeg")})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def logged_model(served_project: Path) -> tuple[str, str]:
    """(tracking URI, model URI) of the ONNX model the export stage logged to the project's MLflow store."""
    import mlflow

    info = json.loads((served_project / "models" / "mlflow_run.json").read_text())
    run = mlflow.MlflowClient(info["tracking_uri"]).get_run(info["run_id"])
    return info["tracking_uri"], run.data.tags["model_uri"]


def test_serves_the_logged_model(server_factory, server, logged_model, tmp_path: Path) -> None:
    tracking_uri, model_uri = logged_model
    from_mlflow = server_factory(
        model_uri, MLFLOW_TRACKING_URI=tracking_uri, MODEL_PRECISION="fp32", MODEL_CACHE_DIR=str(tmp_path)
    )
    served, local = answer(from_mlflow), answer(server)
    assert served["probabilities"] == local["probabilities"]
    assert served["model"] == local["model"]
    with from_mlflow.client() as client:
        info = client.get("/model").json()
    assert info["uri"] == model_uri and info["registry"] is None
    assert info["card"] and "Model card" in info["card"]


def test_serves_a_registered_version_by_number_and_alias(
    server_factory, logged_model, tmp_path: Path
) -> None:
    import mlflow

    tracking_uri, model_uri = logged_model
    client = mlflow.MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    version = mlflow.register_model(model_uri, "catdog-e2e").version
    client.set_registered_model_alias("catdog-e2e", "champion", version)
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "MODEL_PRECISION": "fp32"}
    by_alias = server_factory("models:/catdog-e2e@champion", MODEL_CACHE_DIR=str(tmp_path / "a"), **env)
    assert answer(by_alias)["model"]["version"] == str(version)
    with by_alias.client() as api:
        info = api.get("/model").json()
    assert info["registry"] == {"name": "catdog-e2e", "version": str(version), "aliases": ["champion"]}
    unknown = server_factory(
        "models:/catdog-e2e@nobody", wait_ready=False, MODEL_CACHE_DIR=str(tmp_path / "b"), **env
    )
    for _ in range(200):
        ready = httpx.get(unknown.url + "/ready")
        if "no model" in ready.json()["detail"]:
            break
    assert ready.status_code == 503 and "registry" in ready.json()["detail"]
