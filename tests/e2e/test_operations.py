"""GET /health, /ready, /model and /metrics, request ids, JSON logs and the torch-free process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import odd_images
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_process import ADMIN_KEY, REPO_ROOT

pytestmark = pytest.mark.slow


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(page: dict, name: str, **labels: str) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def test_health_and_ready(server) -> None:
    with server.client() as client:
        health, ready = client.get("/health"), client.get("/ready")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json()["ready"] is True and ready.json()["model"]["name"] == "tf_efficientnet_lite0"


def test_model_describes_what_is_served(server, exported_model: Path) -> None:
    with server.client() as client:
        info = client.get("/model").json()
        predicted = client.post("/predict", files={"file": ("a.jpg", odd_images.jpeg(), "image/jpeg")}).json()
    assert info["name"] == "tf_efficientnet_lite0" and info["version"] == predicted["model"]["version"]
    assert info["precision"] == "fp32" and info["labels"] == ["cat", "dog"]
    assert info["preprocessing"]["size"] == 96 and info["preprocessing"]["resize"] == "center_crop"
    assert 0 <= info["metrics"]["test"]["accuracy"] <= 1
    assert info["lineage"]["git_commit"]
    assert info["card"] == (exported_model / "model_card.md").read_text()


def test_metrics_count_requests_predictions_and_batches(server, photos) -> None:
    with server.client() as client:
        before = samples(client.get("/metrics").text)
        labels = [
            client.post("/predict", files={"file": ("p.jpg", p.read_bytes(), "image/jpeg")}).json()["label"]
            for p in photos["cat"][:3] + photos["dog"][:3]
        ]
        client.post("/predict", files={"file": ("p.jpg", b"nope", "image/jpeg")})
        response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = samples(response.text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("catdog_http_requests_total", route="/predict", method="POST", status="200") == 6
    assert delta("catdog_http_requests_total", route="/predict", method="POST", status="415") == 1
    assert delta("catdog_rejected_images_total", code="not_an_image") == 1
    for label in ("cat", "dog"):
        assert delta("catdog_predictions_total", label=label) == labels.count(label)
    assert delta("catdog_prediction_confidence_count") == 6
    assert delta("catdog_http_request_duration_seconds_count", route="/predict") == 7
    assert delta("catdog_inference_batch_size_sum") == 6
    info = [key for key in after if key[0] == "catdog_model_info"]
    assert len(info) == 1 and ("name", "tf_efficientnet_lite0") in info[0][1]
    assert value(after, "catdog_model_ready") == 1


def test_request_ids(server) -> None:
    jpeg = odd_images.jpeg()
    with server.client() as client:
        given = client.post(
            "/predict", files={"file": ("a.jpg", jpeg)}, headers={"x-request-id": "abc-123.x"}
        )
        unsafe = client.post(
            "/predict", files={"file": ("a.jpg", jpeg)}, headers={"x-request-id": "no spaces!"}
        )
        error = client.post("/predict", files={"file": ("a.jpg", b"")}, headers={"x-request-id": "err-1"})
    assert given.headers["x-request-id"] == "abc-123.x" == given.json()["request_id"]
    generated = unsafe.headers["x-request-id"]
    assert generated != "no spaces!" and len(generated) == 32 and unsafe.json()["request_id"] == generated
    assert error.headers["x-request-id"] == "err-1"


def test_request_logs_are_json_without_image_bytes(server, photos) -> None:
    data = photos["dog"][5].read_bytes()
    with server.client() as client:
        response = client.post(
            "/predict", files={"file": ('dog "best"\n\x1b[31mred.jpg', data, "image/jpeg")}
        )
    request_id = response.headers["x-request-id"]
    # The access line is written after the answer is sent: wait for it rather than read the log at once.
    deadline = time.monotonic() + 30
    while True:
        lines = server.log_lines()
        records = [json.loads(line) for line in lines]
        found = [r for r in records if r.get("request_id") == request_id and "route" in r]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    (line,) = found
    assert line["route"] == "/predict" and line["status"] == 200 and line["latency_ms"] > 0
    assert line["model_version"] == response.json()["model"]["version"]
    assert line["label"] == response.json()["label"]
    assert line["confidence"] == pytest.approx(max(response.json()["probabilities"].values()), abs=1e-3)
    raw = "\n".join(lines)
    assert "\x1b" not in raw and '"best"' not in raw
    assert "JFIF" not in raw and data[100:140].hex() not in raw


def test_the_serving_process_never_loads_torch(server) -> None:
    with server.client() as client:
        client.post("/predict", files={"file": ("a.jpg", odd_images.jpeg())})
    libraries = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "onnxruntime" in libraries
    assert "libtorch" not in libraries and "/torch/" not in libraries
    probe = (
        "import sys, api.main; print(sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**server.env, "MODEL_URI": "/nonexistent"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_not_ready_without_a_model(server_factory, tmp_path: Path) -> None:
    missing = server_factory(tmp_path / "nothing-here" / "model.onnx", wait_ready=False)
    with missing.client() as client:
        health = client.get("/health")
        for _ in range(100):
            ready = client.get("/ready")
            if "no model" in ready.json()["detail"]:
                break
        predicted = client.post("/predict", files={"file": ("a.jpg", odd_images.jpeg())})
        model = client.get("/model")
        status = client.get("/admin/status", headers={"x-api-key": ADMIN_KEY}).json()
    assert health.status_code == 200
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert ready.json()["detail"] == "no model: load failed"  # public: no path; admins get the cause
    assert "does not exist" in status["load_error"]
    assert predicted.status_code == 503 and predicted.json()["error"]["code"] == "model_not_ready"
    assert model.status_code == 503
    assert predicted.headers["retry-after"]


def test_openapi_documents_every_route(server) -> None:
    with server.client() as client:
        schema = client.get("/openapi.json").json()
        docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    paths = schema["paths"]
    for route in ("/predict", "/predict/batch", "/predict/base64", "/health", "/ready", "/metrics", "/model"):
        assert route in paths
    upload = paths["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["schema"]
    for status in ("400", "413", "415", "422", "503"):
        assert status in paths["/predict"]["post"]["responses"]
    assert "/admin/reload" in paths and "X-API-Key" in json.dumps(schema["components"]["securitySchemes"])


def test_cors_is_off_by_default(server) -> None:
    response = httpx.options(
        server.url + "/predict",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in response.headers
