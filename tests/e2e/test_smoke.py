"""`make smoke URL=...` (src/catdog/smoke.py) against real uvicorn processes: it passes on the right model and
fails, with a clear message, on a wrong model, on a service with no model and on no service at all."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from service_process import REPO_ROOT, free_port

from catdog import smoke

pytestmark = pytest.mark.slow


def make_smoke(url: str, *args: str) -> subprocess.CompletedProcess:
    """The command a person (or a deploy workflow) types."""
    smoke_args = " ".join(args)
    return subprocess.run(
        ["make", "-s", "--no-print-directory", "smoke", f"URL={url}", f"SMOKE_ARGS={smoke_args}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def evaluated(served_project: Path) -> list[str]:
    """SMOKE_ARGS picking one test image per class the tiny model's evaluation labelled right."""
    return [
        "--predictions",
        str(served_project / "reports" / "evaluate" / "predictions.csv"),
        "--processed",
        str(served_project / "data" / "processed"),
        "--per-class",
        "1",
        "--min-confidence",
        "0.5",
    ]


def test_the_right_model_passes_every_check(server, evaluated: list[str]) -> None:
    done = make_smoke(server.url, *evaluated)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    checks = {line.split()[1].rstrip(":"): line.split()[0] for line in lines if line[:4] in ("ok  ", "FAIL")}
    assert checks == {name: "ok" for name in ("ready", "health", "labels", "bad_upload", "metrics")}
    assert "2/2 right" in done.stdout
    assert f"smoke test passed against {server.url} (2 images)" in lines[-1]


def test_a_wrong_model_fails_the_labels(
    server_factory, exported_model: Path, evaluated: list[str], tmp_path: Path
) -> None:
    from catdog import export

    wrong = Path(shutil.copytree(exported_model, tmp_path / "models")) / "model.onnx"
    export.add_metadata(wrong, {"labels": json.dumps(["dog", "cat"])})  # every answer the other class
    (wrong.parent / "model.int8.onnx").unlink(missing_ok=True)
    served = server_factory(wrong, MODEL_PRECISION="fp32")
    done = make_smoke(served.url, *evaluated)
    assert done.returncode != 0
    assert "FAIL labels: 0/2 right" in done.stdout
    assert "expected cat, got dog" in done.stdout and "expected dog, got cat" in done.stdout
    assert f"smoke test FAILED against {served.url}: labels: 0/2 right" in done.stderr


def test_a_service_with_no_model_is_not_ready(server_factory, evaluated: list[str], tmp_path: Path) -> None:
    served = server_factory(tmp_path / "missing.onnx", wait_ready=False)
    done = make_smoke(served.url, *evaluated, "--timeout", "3")
    assert done.returncode != 0
    assert "FAIL ready:" in done.stdout and "smoke test FAILED" in done.stderr


def test_no_service_fails_fast_and_bad_arguments_exit_2(evaluated: list[str], tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    done = make_smoke(nobody, *evaluated, "--timeout", "1")
    assert done.returncode != 0
    assert f"smoke test FAILED against {nobody}: health:" in done.stderr
    assert "ready: <urlopen error [Errno 111] Connection refused>" in done.stderr
    no_images = subprocess.run(
        [sys.executable, "-m", "catdog.smoke", nobody, "--predictions", str(tmp_path / "none.csv")],
        capture_output=True,
        text=True,
    )
    assert no_images.returncode == 2 and "none.csv: no such file" in no_images.stderr
    usage = subprocess.run(["make", "-s", "smoke"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: make smoke URL=" in usage.stderr


def test_confident_cases_take_only_right_and_confident_answers(tmp_path: Path) -> None:
    csv_file = tmp_path / "predictions.csv"
    csv_file.write_text(
        "path,label,predicted,p_cat,p_dog\n"
        "test/cat/a.jpg,cat,dog,0.2,0.8\n"
        "test/cat/b.jpg,cat,cat,0.6,0.4\n"
        "test/cat/c.jpg,cat,cat,0.97,0.03\n"
        "test/dog/d.jpg,dog,dog,0.01,0.99\n"
    )
    cases = smoke.confident_cases(csv_file, tmp_path / "processed", per_class=1, min_confidence=0.9)
    processed = tmp_path / "processed"
    assert cases == [(processed / "test/cat/c.jpg", "cat"), (processed / "test/dog/d.jpg", "dog")]
    assert smoke.confident_cases(tmp_path / "absent.csv", tmp_path, 1) == []
