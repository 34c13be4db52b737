"""Fault injection over HTTP: a real uvicorn process serving a tiny ONNX model that meets the contract but
misbehaves on some pictures (benchmarks.recovery.faulty_model): white answers one row short, black makes
onnxruntime raise, red hangs (a long Loop). The requests it touches get a JSON 503/504, /ready goes 503
until a model call works again (the next request or the canary) and back to 200, /health goes 503 only when
too many hung calls are still running, and the next requests are served. No hook in the service."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from service_process import ADMIN_KEY

from benchmarks.recovery import faulty_model, picture

pytestmark = pytest.mark.slow

KEY = {"x-api-key": ADMIN_KEY}
BOUND = 120.0  # seconds any wait may take before the test fails (the service needs a few)
# A red picture spins this many Loop iterations: about 3 s of one core here, far past the 0.5 s deadline.
SPIN = 600_000


@pytest.fixture
def faulty(server_factory, tmp_path: Path):
    """A service on the faulty model: deadline 0.5 s, canary every 3 s, one hung thread allowed."""
    model = faulty_model(tmp_path / "models" / "model.onnx", SPIN)
    return server_factory(
        model,
        INFERENCE_TIMEOUT_SECONDS="0.5",
        INFERENCE_PROBE_SECONDS="3",
        INFERENCE_MAX_HUNG_THREADS="1",
        MODEL_POLL_SECONDS="0",
    )


def post(client: httpx.Client, colour: str) -> httpx.Response:
    return client.post("/predict", files={"file": (f"{colour}.png", picture(colour), "image/png")})


def wait_for(client: httpx.Client, path: str, status: int) -> httpx.Response:
    deadline = time.monotonic() + BOUND
    while (response := client.get(path)).status_code != status:
        assert time.monotonic() < deadline, f"{path} never answered {status}: {response.text}"
        time.sleep(0.05)
    return response


def admin_status(client: httpx.Client) -> dict:
    response = client.get("/admin/status", headers=KEY)
    assert response.status_code == 200, response.text
    return response.json()


def no_unhandled_errors(server) -> None:
    records = [json.loads(line) for line in server.log_lines() if line.startswith("{")]
    assert not [r for r in records if r.get("message", "").startswith("unhandled")]
    assert not [r for r in records if r.get("status") == 500]


@pytest.mark.parametrize(
    ("colour", "cause"),
    [("white", "answered probabilities (0, 2) for a batch of 1"), ("black", "ONNXRuntimeError")],
)
def test_a_failing_model_call_fails_only_its_request(faulty, colour: str, cause: str) -> None:
    with faulty.client() as client:
        failed = post(client, colour)
        unready, health = client.get("/ready"), client.get("/health")
        served = post(client, "gray")
        ready = client.get("/ready")
        again = post(client, colour)
        unready_again = client.get("/ready")
        recovered = wait_for(client, "/ready", 200)  # the canary: no request in between
        status = admin_status(client)
        after = post(client, "gray")
    assert failed.status_code == 503 and failed.headers["retry-after"]
    assert failed.json()["error"]["code"] == "inference_failed"
    assert cause not in failed.text  # the public answer is short; the cause is for admins
    assert unready.status_code == 503 and unready.json()["detail"] == "inference failed"
    assert unready.json()["model"]["name"] == "faulty"
    assert health.status_code == 200
    assert served.status_code == 200 and served.json()["label"] in ("cat", "dog")
    assert ready.status_code == 200  # a request that worked made it ready again
    assert again.status_code == 503 and unready_again.status_code == 503
    assert recovered.json()["ready"] is True
    assert status["inference"]["failed_batches"] == 2 and status["inference"]["recoveries"] == 2
    assert cause in status["inference"]["last_error"]
    assert after.status_code == 200
    no_unhandled_errors(faulty)


def test_a_hung_model_call_is_abandoned_and_too_many_fail_liveness(faulty) -> None:
    with faulty.client() as client:
        hung = post(client, "red")
        unready, health = client.get("/ready"), client.get("/health")
        served = post(client, "gray")  # on a fresh inference thread, the hung one still spinning
        ready = client.get("/ready")
        hung_again = post(client, "red")
        unhealthy = client.get("/health")
        status = admin_status(client)
        healthy = wait_for(client, "/health", 200)  # both hung calls ended
        recovered = wait_for(client, "/ready", 200)
        after = post(client, "gray")
    assert hung.status_code == 504 and hung.json()["error"]["code"] == "inference_timeout"
    assert unready.status_code == 503 and unready.json()["detail"] == "inference timed out"
    assert health.status_code == 200  # one hung thread is allowed
    assert served.status_code == 200 and ready.status_code == 200
    assert hung_again.status_code == 504
    assert unhealthy.status_code == 503
    assert unhealthy.json() == {"status": "unhealthy", "detail": "too many hung inference threads"}
    assert status["alive"] is False and status["inference"]["abandoned_threads"] == 2
    assert status["inference"]["timeouts"] == 2
    assert healthy.json() == {"status": "ok"} and recovered.status_code == 200
    assert after.status_code == 200
    no_unhandled_errors(faulty)
