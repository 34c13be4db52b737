"""Live monitoring against a real service: drift gauges and report after real uploads, ground-truth feedback
and the live accuracy (kept across a restart), the feedback errors, a model swap, and the replay script."""

from __future__ import annotations

import json
import math
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_process import ADMIN_KEY, REPO_ROOT, free_port, stop_server

from api.monitoring import MONITORED

pytestmark = pytest.mark.slow

DRIFT = {"DRIFT_WINDOW": "50", "DRIFT_MIN_IMAGES": "8"}


def gauges(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
    }


def predict(client: httpx.Client, photo: Path) -> dict:
    response = client.post("/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    return response.json()


def send_feedback(client: httpx.Client, prediction_id: str, true_label: str) -> httpx.Response:
    return client.post("/feedback", json={"prediction_id": prediction_id, "true_label": true_label})


def drift_report(client: httpx.Client, images: int) -> dict:
    """/monitoring/drift once the background monitor has measured `images` images."""
    deadline = time.monotonic() + 20
    while True:
        report = client.get("/monitoring/drift").json()
        if report["images"] >= images or time.monotonic() > deadline:
            return report
        time.sleep(0.05)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and response.json()["error"]["message"]


@pytest.fixture(scope="module")
def monitored(server_factory, exported_model: Path):
    """A service of its own (feedback and drift state must not mix with other tests'), small drift window."""
    return server_factory(exported_model / "model.onnx", MODEL_PRECISION="fp32", **DRIFT)


@pytest.fixture(scope="module")
def uploaded(monitored, photos) -> list[dict]:
    """Six real cat and six real dog photos predicted by the monitored service, with their true label."""
    with monitored.client() as client:
        return [
            {**predict(client, photo), "true_label": label}
            for label in ("cat", "dog")
            for photo in photos[label][:6]
        ]


def test_drift_gauges_and_report_after_real_uploads(monitored, uploaded, exported_model: Path) -> None:
    reference = json.loads((exported_model / "reference_stats.json").read_text())
    referenced = {*reference["images"]["properties"], "confidence"} & set(MONITORED)
    with monitored.client() as client:
        report = drift_report(client, len(uploaded))
        page = gauges(client)
        version = client.get("/model").json()["version"]
    assert report["images"] == len(uploaded) and report["window"] == 50 and report["min_images"] == 8
    assert report["status"] in ("ok", "drift") and report["model_version"] == version
    assert report["threshold"] == 0.2 and set(report["properties"]) == set(MONITORED)
    assert {"brightness", "contrast", "sharpness", "colourfulness", "confidence"} <= referenced
    for name, result in report["properties"].items():
        assert (result["score"] is not None) == (name in referenced), (name, result)
        assert result["live"]["mean"] > 0
        assert page[("catdog_drift_detected", (("property", name),))] == int(result["drifted"])
        score = page[("catdog_drift_score", (("property", name),))]
        assert math.isnan(score) if result["score"] is None else score == pytest.approx(result["score"])
    assert report["drifted"] == bool(report["drifted_properties"])
    confidence = report["properties"]["confidence"]["live"]["mean"]
    expected = sum(max(p["probabilities"].values()) for p in uploaded) / len(uploaded)
    assert confidence == pytest.approx(expected, abs=1e-4)
    assert page[("catdog_drift_window_images", ())] == len(uploaded)


def test_feedback_gives_the_live_accuracy(monitored, uploaded) -> None:
    with monitored.client() as client:
        before = gauges(client)
        answers = [send_feedback(client, p["prediction_id"], p["true_label"]) for p in uploaded]
        performance = client.get("/monitoring/performance").json()
        again = send_feedback(client, uploaded[0]["prediction_id"], uploaded[0]["true_label"])
        other = "dog" if uploaded[0]["true_label"] == "cat" else "cat"
        conflict = send_feedback(client, uploaded[0]["prediction_id"], other)
        after = gauges(client)
    assert math.isnan(before[("catdog_live_accuracy", ())])
    correct = [p["label"] == p["true_label"] for p in uploaded]
    for answer, prediction, right in zip(answers, uploaded, correct, strict=True):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["status"] == "recorded" and body["correct"] == right
        assert body["predicted_label"] == prediction["label"] and body["model"] == prediction["model"]
    assert answers[-1].json()["live_accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert performance["labelled"] == performance["labelled_total"] == len(uploaded)
    assert performance["correct"] == sum(correct) and performance["window"] == 500
    assert performance["accuracy"] == pytest.approx(sum(correct) / len(correct))
    for label in ("cat", "dog"):
        hits = [right for p, right in zip(uploaded, correct, strict=True) if p["true_label"] == label]
        assert performance["per_class"][label] == {"labelled": 6, "recall": pytest.approx(sum(hits) / 6)}
    assert list(performance["by_model"]) == [uploaded[0]["model"]["version"]]
    assert again.status_code == 200 and again.json()["status"] == "unchanged"
    assert_error(conflict, 409, "feedback_conflict")
    assert after[("catdog_live_accuracy", ())] == pytest.approx(performance["accuracy"])
    assert after[("catdog_live_accuracy_window", ())] == len(uploaded)
    assert after[("catdog_feedback_total", (("outcome", "correct"),))] == sum(correct)
    assert after[("catdog_feedback_total", (("outcome", "incorrect"),))] == len(correct) - sum(correct)


def test_feedback_errors_and_batch_ids(monitored, photos) -> None:
    with monitored.client() as client:
        made = predict(client, photos["cat"][7])
        unknown = send_feedback(client, secrets.token_hex(16), "cat")
        bad_label = send_feedback(client, made["prediction_id"], "horse")
        missing = client.post("/feedback", json={"prediction_id": made["prediction_id"]})
        bad_id = send_feedback(client, "no spaces allowed", "cat")
        not_json = client.post("/feedback", content=b"{", headers={"content-type": "application/json"})
        files = [
            ("files", (p.name, p.read_bytes(), "image/jpeg")) for p in (photos["cat"][8], photos["dog"][8])
        ]
        batch = client.post("/predict/batch", files=files).json()
        second = send_feedback(client, batch["results"][1]["prediction_id"], "dog")
    assert_error(unknown, 404, "prediction_not_found")
    assert_error(bad_label, 422, "invalid_label")
    assert_error(missing, 422, "invalid_request")
    assert_error(bad_id, 422, "invalid_request")
    assert_error(not_json, 422, "invalid_request")
    assert second.status_code == 200, second.text
    assert second.json()["predicted_label"] == batch["results"][1]["label"]


def test_feedback_survives_a_restart(server_factory, exported_model: Path, photos, tmp_path: Path) -> None:
    database = tmp_path / "feedback.db"
    first = server_factory(exported_model / "model.onnx", FEEDBACK_DB=str(database), **DRIFT)
    with first.client() as client:
        made = [predict(client, photo) for photo in (photos["cat"][10], photos["dog"][10], photos["dog"][11])]
        for prediction, label in zip(made[:2], ("cat", "dog"), strict=False):
            assert send_feedback(client, prediction["prediction_id"], label).status_code == 200
        before = client.get("/monitoring/performance").json()
    stop_server(first)
    second = server_factory(exported_model / "model.onnx", FEEDBACK_DB=str(database), **DRIFT)
    with second.client() as client:
        page = gauges(client)
        restarted = client.get("/monitoring/performance").json()
        late = send_feedback(client, made[2]["prediction_id"], "dog")
        after = client.get("/monitoring/performance").json()
        drift = client.get("/monitoring/drift").json()
    assert before["labelled"] == 2 and restarted == before
    assert page[("catdog_live_accuracy_window", ())] == 2
    assert page[("catdog_live_accuracy", ())] == pytest.approx(before["accuracy"])
    assert late.status_code == 200 and late.json()["predicted_label"] == made[2]["label"]
    assert after["labelled"] == after["labelled_total"] == 3
    assert drift["images"] == 0 and drift["status"] == "collecting"


def test_a_new_model_starts_a_new_drift_window(
    server_factory, exported_model: Path, photos, tmp_path
) -> None:
    models = Path(shutil.copytree(exported_model, tmp_path / "models"))
    own = server_factory(models / "model.onnx", MODEL_PRECISION="fp32", **DRIFT)
    with own.client() as client:
        first = predict(client, photos["dog"][12])
        assert drift_report(client, 1)["images"] == 1
        kept = client.post("/admin/reload", json={"precision": "fp32"}, headers={"x-api-key": ADMIN_KEY})
        assert kept.status_code == 200 and client.get("/monitoring/drift").json()["images"] == 1
        swapped = client.post(
            "/admin/reload",
            json={"model_uri": str(models / "model.int8.onnx")},
            headers={"x-api-key": ADMIN_KEY},
        )
        assert swapped.status_code == 200, swapped.text
        reset = client.get("/monitoring/drift").json()
        second = predict(client, photos["dog"][13])
        refilled = drift_report(client, 1)
        answer = send_feedback(client, first["prediction_id"], "dog")
    new_version = swapped.json()["model"]["version"]
    assert new_version != first["model"]["version"] and second["model"]["version"] == new_version
    assert reset["images"] == 0 and reset["model_version"] == new_version
    assert refilled["images"] == 1 and refilled["model_version"] == new_version
    assert answer.status_code == 200 and answer.json()["model"] == first["model"]


def test_replay_script_reports_the_live_accuracy(monitored, photos, tmp_path: Path) -> None:
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for photo in photos[label][14:17]:
            shutil.copy(photo, tmp_path / "images" / label / photo.name)
    (tmp_path / "images" / "cat" / "broken.jpg").write_bytes(b"not an image")
    with monitored.client() as client:
        before = client.get("/monitoring/performance").json()
    command = [sys.executable, "-m", "catdog.replay", monitored.url, "--images", str(tmp_path / "images")]
    done = subprocess.run(
        [*command, "--limit", "5"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert done.returncode == 0, done.stderr
    with monitored.client() as client:
        after = client.get("/monitoring/performance").json()
    print("\n" + done.stdout)
    assert "replayed 5 images" in done.stdout and "refused: 1 not_an_image" in done.stdout
    assert f"service live accuracy: {after['accuracy']:.4f}" in done.stdout
    assert after["labelled_total"] == before["labelled_total"] + 4
    no_images = subprocess.run(
        [*command[:3], monitored.url, "--images", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    unreachable = subprocess.run(
        [*command[:3], f"http://127.0.0.1:{free_port()}", "--images", str(tmp_path / "images")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert no_images.returncode == 1 and "no images in" in no_images.stderr
    assert unreachable.returncode == 1 and "cannot reach the prediction service" in unreachable.stderr
