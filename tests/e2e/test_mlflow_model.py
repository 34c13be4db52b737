"""MODEL_URI as an MLflow model URI: the logged model of the pipeline run, a registered version, one cache
folder per version (no file of one version served with another, no temporary copy left behind), and a load
failure that the public /ready reports without paths or host names."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import odd_images
import pytest
from service_process import ADMIN_KEY, free_port

from benchmarks.recovery import faulty_model
from catdog import export, tracking

pytestmark = pytest.mark.slow

KEY = {"x-api-key": ADMIN_KEY}
V2_CARD = "# Model card: version 2 (no int8 model, no reference statistics)\n"


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
    ready = wait_not_ready(unknown)
    assert ready.status_code == 503 and ready.json()["detail"] == "no model: load failed"
    with unknown.client() as api:
        status = api.get("/admin/status", headers=KEY).json()
    assert "registry" in status["load_error"] and "nobody" in status["load_error"]


def wait_not_ready(server, bound: float = 120) -> httpx.Response:
    """/ready once the model load has failed (bounded)."""
    deadline = time.monotonic() + bound
    while "no model" not in (ready := httpx.get(server.url + "/ready")).json()["detail"]:
        assert time.monotonic() < deadline, f"the load never failed: {ready.text}"
        time.sleep(0.05)
    return ready


def test_a_failed_load_shows_no_host_or_path_in_public(server_factory, tmp_path: Path) -> None:
    registry = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    down = server_factory(
        "models:/catdog@champion",
        wait_ready=False,
        MLFLOW_TRACKING_URI=registry,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="5",
        MODEL_CACHE_DIR=str(tmp_path / "cache"),
    )
    ready = wait_not_ready(down)
    with down.client() as api:
        predicted = api.post("/predict", files={"file": ("a.jpg", odd_images.jpeg(9), "image/jpeg")})
        status = api.get("/admin/status", headers=KEY).json()
    assert ready.status_code == 503 and ready.json()["detail"] == "no model: load failed"
    assert predicted.status_code == 503 and predicted.json()["error"]["message"] == "no model: load failed"
    for public in (ready.text, predicted.text):
        assert "127.0.0.1" not in public and str(tmp_path) not in public and "catdog@champion" not in public
    assert "models:/catdog@champion" in status["load_error"] and status["ready"] is False


@pytest.fixture(scope="module")
def two_versions(served_project: Path, logged_model, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Registered model catdog-cache: version 1 = the exported model with an approved int8 model, its card
    and reference statistics; version 2 = another model with only its own card. Returns the tracking URI."""
    import mlflow

    tracking_uri, _ = logged_model
    v1 = Path(shutil.copytree(served_project / "models", tmp_path_factory.mktemp("v1") / "models"))
    export.add_metadata(v1 / "model.int8.onnx", {"int8_approved": "true"})
    v2 = tmp_path_factory.mktemp("v2")
    faulty_model(v2 / "model.onnx")
    (v2 / "model_card.md").write_text(V2_CARD)
    size = json.loads(export.onnx_metadata(v1 / "model.onnx")["preprocessing"])["size"]
    with tracking.store(tracking_uri) as store:
        for files, model_size in (
            ([v1 / "model.int8.onnx", v1 / "model_card.md", v1 / "reference_stats.json"], size),
            ([v2 / "model_card.md"], 32),
        ):
            with store.start_run():
                uri = tracking.log_onnx_model(files[-1].parent / "model.onnx", model_size, files)
            store.register_model(uri, "catdog-cache")
    mlflow.MlflowClient(tracking_uri).set_registered_model_alias("catdog-cache", "champion", "1")
    return tracking_uri


def started(server_factory, model_uri: str, **env: str):
    """A service on an MLflow URI, once ready (a process's first use of an MLflow store can take a minute on
    a busy machine: more than the factory waits)."""
    server = server_factory(model_uri, wait_ready=False, **env)
    deadline = time.monotonic() + 300
    while (ready := httpx.get(server.url + "/ready")).status_code != 200:
        assert time.monotonic() < deadline and "no model" not in ready.text, ready.text
        time.sleep(0.1)
    return server


def served(api: httpx.Client) -> tuple[str, str, str | None, str]:
    """(version, precision, card, drift status) of the served model."""
    info = api.get("/model").json()
    return info["version"], info["precision"], info["card"], api.get("/monitoring/drift").json()["status"]


def test_each_version_gets_its_own_cache_folder(server_factory, two_versions: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    service = started(
        server_factory,
        "models:/catdog-cache@champion",
        MLFLOW_TRACKING_URI=two_versions,
        MODEL_CACHE_DIR=str(cache),
        MODEL_PRECISION="auto",
        MODEL_POLL_SECONDS="0",
    )
    with service.client() as api:
        first = served(api)
        folders_v1 = sorted(p.name for p in cache.iterdir() if p.is_dir())
        reloaded = api.post("/admin/reload", headers=KEY, json={"model_uri": "models:/catdog-cache/2"})
        second = served(api)
        predicted = api.post("/predict", files={"file": ("a.jpg", odd_images.jpeg(9), "image/jpeg")})
    assert first[:2] == ("1", "int8") and "Model card" in first[2] and first[3] == "collecting"
    assert len(folders_v1) == 1 and "catdog-cache-v1" in folders_v1[0]
    assert reloaded.status_code == 200, reloaded.text
    assert second == ("2", "fp32", V2_CARD, "no_reference")
    assert predicted.status_code == 200 and predicted.json()["model"]["version"] == "2"
    folders = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(folders) == 1 and "catdog-cache-v2" in folders[0]  # v1 removed once v2 served
    assert not list(cache.rglob("model.int8.onnx"))


def test_no_temporary_copy_is_left_without_a_cache_dir(
    server_factory, two_versions: str, tmp_path: Path
) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    service = started(
        server_factory,
        "models:/catdog-cache/1",
        MLFLOW_TRACKING_URI=two_versions,
        MODEL_CACHE_DIR="",
        MODEL_POLL_SECONDS="0",
        TMPDIR=str(temporary),
    )
    with service.client() as api:
        versions = []
        for uri in ["models:/catdog-cache/2", "models:/catdog-cache/1"] * 2:
            response = api.post("/admin/reload", headers=KEY, json={"model_uri": uri})
            assert response.status_code == 200, response.text
            versions.append(response.json()["model"]["version"])
        info = api.get("/model").json()
    assert versions == ["2", "1", "2", "1"]
    assert info["card"] and "Model card" in info["card"]  # read before the download went
    assert not list(temporary.rglob("*.onnx")), sorted(map(str, temporary.rglob("*")))
