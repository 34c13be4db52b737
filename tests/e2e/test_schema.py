"""Schemathesis against the live /openapi.json: no 5xx, and every response matches the documented schema."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from service_process import ADMIN_KEY

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_schemathesis_finds_no_failure(server_factory, exported_model: Path, tmp_path: Path) -> None:
    models = Path(shutil.copytree(exported_model, tmp_path / "models"))
    server = server_factory(models / "model.onnx", MODEL_PRECISION="fp32", MONITORING_EXPOSE_WINDOW="true")
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(CONFIG),
        "run",
        f"{server.url}/openapi.json",
        "--header",
        f"X-API-Key: {ADMIN_KEY}",
        "--max-examples",
        "40",
        "--generation-deterministic",
        "--request-timeout",
        "30",
        "--no-color",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "13/13" in done.stdout and " passed" in done.stdout  # 13 operations, GET /admin/status included
    records = [json.loads(line) for line in server.log_lines()]
    served = [r for r in records if r.get("message") == "request" and r["route"] != "/ready"]
    assert len(served) > 200
    assert not [r for r in served if r["status"] >= 500]
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")]
    with server.client() as client:
        assert client.get("/ready").status_code == 200
