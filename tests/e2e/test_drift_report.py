"""`python -m catdog drift-report` against a real service exposing its window (MONITORING_EXPOSE_WINDOW):
no drift on real photos (exit 0, reports written), drift on a darkened window (exit 3 naming brightness), and
GET /monitoring/window's privacy switch and admin key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from projects import copy_project
from service_process import ADMIN_KEY, REPO_ROOT, free_port

from api.monitoring import MONITORED

pytestmark = pytest.mark.slow

WINDOW_PROPERTIES = {"brightness", "contrast", "sharpness", "colourfulness"}


def drift_report(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "ADMIN_API_KEY"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "catdog", "drift-report", "--root", str(root), *args],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def exposing(server_factory, exported_model: Path, photos):
    """A service exposing its drift window, after 10 real cat and 10 real dog photos."""
    server = server_factory(
        exported_model / "model.onnx",
        MODEL_PRECISION="fp32",
        MONITORING_EXPOSE_WINDOW="true",
        DRIFT_WINDOW="50",
        DRIFT_MIN_IMAGES="8",
    )
    sent = [photo for label in ("cat", "dog") for photo in photos[label][:10]]
    with server.client(headers={"X-API-Key": ADMIN_KEY}) as client:
        for photo in sent:
            answer = client.post("/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
            assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 20
        while client.get("/monitoring/window").json()["images"] < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
    return server


@pytest.fixture(scope="module")
def project(served_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the served project; its 16 training images against 20 live ones need a looser KS limit."""
    root = copy_project(served_project, tmp_path_factory.mktemp("drift") / "project")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["checks"]["max_feature_drift"] = 0.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def test_window_route_is_private_by_default_and_needs_the_admin_key(server, exposing) -> None:
    with server.client() as client:
        hidden = client.get("/monitoring/window", headers={"X-API-Key": ADMIN_KEY})
        anonymous_hidden = client.get("/monitoring/window")
    assert anonymous_hidden.status_code == 401  # the key is checked before the switch: no probing
    assert hidden.status_code == 404, hidden.text
    assert hidden.json()["error"]["code"] == "window_not_exposed"
    assert "MONITORING_EXPOSE_WINDOW" in hidden.json()["error"]["message"]
    with exposing.client() as client:
        anonymous = client.get("/monitoring/window")
        wrong = client.get("/monitoring/window", headers={"X-API-Key": "nope"})
        window = client.get("/monitoring/window", headers={"X-API-Key": ADMIN_KEY}).json()
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "missing_api_key"
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert window["images"] == len(window["rows"]) == 20 and window["properties"] == list(MONITORED)
    assert all(set(row) == set(MONITORED) for row in window["rows"])  # numbers only: no names, no ids
    assert all(isinstance(value, float) for row in window["rows"] for value in row.values())


def test_drift_report_on_real_photos_then_a_darkened_window(exposing, project: Path, tmp_path: Path) -> None:
    out, saved = tmp_path / "drift", tmp_path / "window.json"
    ok = drift_report(
        project, "--url", exposing.url, "--out", str(out), "--save-window", str(saved),
        env={"ADMIN_API_KEY": ADMIN_KEY},
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "drift_report.html").stat().st_size > 10_000
    assert summary["images"] == 20 and summary["reference_images"] == 16 and not summary["drifted"]
    assert summary["threshold"] == 0.5
    for name in WINDOW_PROPERTIES:
        entry = summary["properties"][name]
        assert entry["score"] is not None and entry["drifted"] is False and entry["method"]
        assert f"{name}: ok" in ok.stdout
    # The tiny project has no reports/validation_images.csv: sizes are not compared, and said so.
    assert summary["properties"]["width"]["skipped"] and "width: skipped" in ok.stdout

    window = json.loads(saved.read_text())
    for row in window["rows"]:
        row["brightness"] *= 0.35
    darkened = tmp_path / "darkened.json"
    darkened.write_text(json.dumps(window))
    drift = drift_report(project, "--window", str(darkened), "--out", str(out))
    assert drift.returncode == 3, drift.stdout + drift.stderr
    assert "brightness" in drift.stderr and "brightness: DRIFT" in drift.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["drifted"] and summary["drifted_properties"] == ["brightness"]
    assert summary["properties"]["brightness"]["score"] > 0.5


def test_drift_report_says_what_is_wrong(server, exposing, project: Path, tmp_path: Path) -> None:
    cases = [
        (["--url", f"http://127.0.0.1:{free_port()}"], "cannot reach the service"),
        (["--url", server.url, "--api-key", ADMIN_KEY], "MONITORING_EXPOSE_WINDOW=true"),
        (["--url", exposing.url], "--api-key"),
        (["--url", exposing.url, "--api-key", ADMIN_KEY, "--min-images", "50"], "fewer than the 50"),
    ]
    for args, message in cases:
        result = drift_report(project, *args, "--out", str(tmp_path / "out"))
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
