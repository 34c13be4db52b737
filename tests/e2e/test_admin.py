"""POST /admin/reload: key checks, atomic swap under load, and a failed reload that keeps the old model."""

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
    """A server of its own (reloads must not disturb the shared one), on a private copy of the model."""
    models = Path(shutil.copytree(exported_model, tmp_path / "models"))
    return server_factory(models / "model.onnx", MODEL_PRECISION="fp32")


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
