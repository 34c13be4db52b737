"""POST /admin/reload: key checks, atomic swap under load, a failed reload that keeps the old model, and the
URIs it refuses (anything but MODEL_URI, models:/ registry URIs and paths in the allowed model folder);
GET /admin/status."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
from pathlib import Path

import odd_images
import pytest
from service_process import ADMIN_KEY

pytestmark = pytest.mark.slow

KEY = {"x-api-key": ADMIN_KEY}


def second_model(folder: Path) -> Path:
    """Another real exported model (an untrained simple_cnn via the export code): a different version."""
    import torch

    from catdog import export
    from catdog.training.backbones import build_model, preprocess_config

    torch.manual_seed(3)
    config = preprocess_config("simple_cnn", 64)
    target = folder / "model.onnx"
    meta = {
        "labels": json.dumps(["cat", "dog"]),
        "preprocessing": config.to_json(),
        "model_name": "simple_cnn",
    }
    export.export_onnx(build_model("simple_cnn"), config, target, meta)
    return target


@pytest.fixture
def own_server(server_factory, exported_model: Path, tmp_path: Path):
    """A server of its own (reloads must not disturb the shared one), on a private copy of the model; it may
    reload any model under tmp_path (MODEL_DIR_ALLOWED)."""
    models = Path(shutil.copytree(exported_model, tmp_path / "models"))
    return server_factory(models / "model.onnx", MODEL_PRECISION="fp32", MODEL_DIR_ALLOWED=str(tmp_path))


def predict(client) -> dict:
    response = client.post("/predict", files={"file": ("a.jpg", odd_images.jpeg(5), "image/jpeg")})
    assert response.status_code == 200, response.text
    return response.json()


def test_reload_needs_the_key(own_server, server_factory, exported_model: Path) -> None:
    with own_server.client() as client:
        missing = client.post("/admin/reload")
        wrong = client.post("/admin/reload", headers={"x-api-key": "guess"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "invalid_api_key"
    disabled = server_factory(exported_model / "model.onnx", ADMIN_API_KEY="")
    with disabled.client() as client:
        refused = client.post("/admin/reload", headers={"x-api-key": ""})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_disabled"


def test_reload_swaps_the_model_while_requests_flow(own_server, tmp_path: Path) -> None:
    new = second_model(tmp_path / "new")
    with own_server.client() as client:
        old_version = predict(client)["model"]["version"]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            during = [pool.submit(predict, own_server.client()) for _ in range(40)]
            reloaded = client.post("/admin/reload", headers=KEY, json={"model_uri": str(new)})
            answers = [future.result() for future in during]
        after = predict(client)
        info = client.get("/model").json()
        metrics = client.get("/metrics").text
    assert reloaded.status_code == 200, reloaded.text
    body = reloaded.json()
    assert body["status"] == "reloaded" and body["previous"]["version"] == old_version
    assert body["model"]["name"] == "simple_cnn" and body["model"]["version"] != old_version
    assert {a["model"]["version"] for a in answers} <= {old_version, body["model"]["version"]}
    assert after["model"] == body["model"] and info["name"] == "simple_cnn"
    assert info["preprocessing"]["size"] == 64
    assert f'version="{body["model"]["version"]}"' in metrics


@pytest.mark.parametrize("kind", ["missing", "not_onnx", "no_metadata", "int8_absent"])
def test_a_failed_reload_keeps_the_old_model(own_server, tmp_path: Path, kind: str) -> None:
    bad = tmp_path / "bad.onnx"
    payload: dict[str, str] = {"model_uri": str(bad)}
    if kind == "not_onnx":
        bad.write_bytes(b"this is not a model")
    elif kind == "no_metadata":
        import torch

        from catdog.training.backbones import build_model

        torch.onnx.export(
            build_model("simple_cnn").eval(),
            (torch.zeros(1, 3, 32, 32),),
            str(bad),
            dynamo=True,
            input_names=["image"],
            output_names=["probabilities"],
        )
    elif kind == "int8_absent":
        folder = tmp_path / "fp32only"
        folder.mkdir()
        shutil.copy(own_server.env["MODEL_URI"], folder / "model.onnx")
        payload = {"model_uri": str(folder), "precision": "int8"}
    with own_server.client() as client:
        before = predict(client)["model"]
        response = client.post("/admin/reload", headers=KEY, json=payload)
        after = predict(client)["model"]
        ready = client.get("/ready")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "model_load_failed" and before["version"] in error["message"]
    expected = {
        "missing": "does not exist",
        "not_onnx": "not a loadable ONNX model",
        "no_metadata": "metadata lacks labels",
        "int8_absent": "no model.int8.onnx",
    }[kind]
    assert expected in error["message"]
    assert after == before and ready.status_code == 200


def test_reload_without_a_body_reloads_model_uri(own_server) -> None:
    with own_server.client() as client:
        version = predict(client)["model"]["version"]
        response = client.post("/admin/reload", headers=KEY)
    assert response.status_code == 200 and response.json()["model"]["version"] == version


def test_reload_refuses_uris_outside_the_allowed_folder(server_factory, exported_model: Path, tmp_path: Path):
    """By default only MODEL_URI's folder: other paths (existing or not, through `..` or a link), remote and
    run URIs get the same 400 before anything is read, naming no file; a path inside is loaded."""
    models = Path(shutil.copytree(exported_model, tmp_path / "models"))
    outside = Path(shutil.copytree(exported_model, tmp_path / "elsewhere"))
    (models / "link").symlink_to(outside, target_is_directory=True)
    shutil.copytree(exported_model, models / "v2")
    service = server_factory(models / "model.onnx", MODEL_PRECISION="fp32")
    refused_uris = [
        str(outside / "model.onnx"),
        str(outside),
        str(tmp_path / "missing" / "model.onnx"),
        "/etc/passwd",
        str(models / ".." / "elsewhere" / "model.onnx"),
        str(models / "link" / "model.onnx"),
        f"file://{outside / 'model.onnx'}",
        "http://127.0.0.1:9/model.onnx",
        "https://example.com/model.onnx",
        "s3://bucket/models/model.onnx",
        "gs://bucket/model",
        "runs:/0123456789abcdef/model",
        "mlflow-artifacts:/0/abc/artifacts/model",
        "models:/catdog/../../etc",
    ]
    with service.client() as client:
        before = predict(client)["model"]
        answers = {
            uri: client.post("/admin/reload", headers=KEY, json={"model_uri": uri}) for uri in refused_uris
        }
        inside = client.post("/admin/reload", headers=KEY, json={"model_uri": str(models / "v2")})
        after = predict(client)["model"]
    for uri, answer in answers.items():
        assert answer.status_code == 400, (uri, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "model_uri_not_allowed", uri
        assert str(tmp_path) not in error["message"] and "exist" not in error["message"]
    paths = {answers[uri].json()["error"]["message"] for uri in refused_uris[:7]}
    assert len(paths) == 1  # the same answer whether the file exists or not: nothing to probe with
    assert inside.status_code == 200, inside.text
    assert after == before == inside.json()["model"]  # the same model file: the same version


def test_admin_status_gives_the_details(own_server, tmp_path: Path) -> None:
    with own_server.client() as client:
        refused = client.get("/admin/status")
        failed = client.post("/admin/reload", headers=KEY, json={"model_uri": str(tmp_path / "nothing.onnx")})
        status = client.get("/admin/status", headers=KEY).json()
        ready = client.get("/ready").json()
    assert refused.status_code == 401 and failed.status_code == 422
    assert status["ready"] is True and status["alive"] is True and status["status"] == "ready"
    assert status["uri"] == own_server.env["MODEL_URI"] and status["model"]["name"] == "tf_efficientnet_lite0"
    assert "does not exist" in status["load_error"]
    assert status["inference"]["failed_batches"] == 0 and status["inference"]["abandoned_threads"] == 0
    assert ready == {"status": "ready", "ready": True, "model": status["model"], "detail": "ready"}
