"""Registry and gated promotion on a real MLflow SQLite registry with real service processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from projects import copy_project

from catdog import tracking
from catdog.config import Project
from catdog.errors import EXIT_PERMANENT, CatdogError, QualityGateError
from catdog.registry import CHALLENGER, CHAMPION, PREVIOUS, audit
from catdog.registry.promotion import open_registry, promote, register, rollback

pytestmark = pytest.mark.slow
LOOSE_GATES = {
    "min_accuracy": 0.0,
    "min_f1": 0.0,
    "max_log_loss": 100.0,
    "max_accuracy_drop": 0.0,
    "max_log_loss_increase": 0.0,
    "max_latency_ms_p95": 10_000,
    "latency_runs": 5,
    "smoke_images_per_class": 2,
    "smoke_min_confidence": 0.5,
    "smoke_timeout_seconds": 60,
}


def set_gates(root: Path, **gates: float) -> Project:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.setdefault("registry", {})["gates"] = {**LOOSE_GATES, **gates}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return Project(root)


@pytest.fixture
def project(served_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    """A private copy of the evaluated and exported tiny project (its own registry), with loose gates."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = copy_project(served_project, tmp_path / "project")
    info = json.loads((root / "models" / "mlflow_run.json").read_text())
    assert info["tracking_uri"] == f"sqlite:///{root / 'mlflow.db'}"
    return set_gates(root)


def aliases(project: Project) -> dict[str, str]:
    return open_registry(project).aliases()


def log_model(project: Project, onnx_path: Path) -> str:
    """Log another ONNX file as a new run's model; returns its model URI."""
    with tracking.start_pipeline_run(project):
        return tracking.log_onnx_model(onnx_path, 64)


def register_other(project: Project, onnx_path: Path) -> str:
    """Register an ONNX file as the new challenger; returns its version."""
    registry = open_registry(project)
    version = registry.register(log_model(project, onnx_path), None, {"test": "other"})
    registry.set_alias(CHALLENGER, version.version)
    return str(version.version)


def untrained_model(folder: Path, labels: list[str] | None = None) -> Path:
    """A real but untrained simple_cnn through the export code (64 px)."""
    import torch

    from catdog import export
    from catdog.training.backbones import build_model, preprocess_config

    torch.manual_seed(5)
    config = preprocess_config("simple_cnn", 64)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    meta = {
        "labels": json.dumps(labels or ["cat", "dog"]),
        "preprocessing": config.to_json(),
        "model_name": "cnn",
    }
    export.export_onnx(build_model("simple_cnn"), config, target, meta)
    return target


def relabelled(project: Project, folder: Path, labels: list[str]) -> Path:
    """The project's own exported model with other labels in its metadata."""
    from catdog import export

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    shutil.copy(project.paths.onnx_model, target)
    export.add_metadata(target, {"labels": json.dumps(labels)})
    return target


def test_register_tags_the_version_and_names_it_challenger(project: Project) -> None:
    info = register(project)
    registry = open_registry(project)
    version = registry.version(info["version"])
    assert info["version"] == "1" and aliases(project) == {CHALLENGER: "1"}
    tags = version.tags
    for key in (
        "git_commit",
        "data_version",
        "params_hash",
        "run_id",
        "run_link",
        "test.accuracy",
        "test.log_loss",
    ):
        assert tags[key], key
    evaluation = json.loads(project.paths.evaluate_metrics.read_text())
    assert float(tags["test.accuracy"]) == pytest.approx(evaluation["test"]["accuracy"], abs=1e-6)
    assert json.loads(project.paths.registry_info.read_text())["model_uri"] == "models:/catdog/1"


def test_passing_gates_promote_and_are_recorded(project: Project) -> None:
    register(project)
    report = promote(project)
    assert report["passed"] and aliases(project) == {CHALLENGER: "1", CHAMPION: "1"}
    statuses = {gate["name"]: gate["status"] for gate in report["gates"]}
    assert statuses == {
        "metrics": "passed",
        "no_regression": "skipped",
        "schema": "passed",
        "latency": "passed",
        "staging_smoke": "passed",
    }
    assert "no champion" in report["gates"][1]["detail"]
    registry = open_registry(project)
    tags = registry.version("1").tags
    assert tags["gate.staging_smoke"] == "passed" and tags["promotion.passed"] == "true"
    artifacts = registry.client.list_artifacts(registry.version("1").run_id, "promotion")
    assert [a.path for a in artifacts if a.path.endswith(".json")]
    assert json.loads(project.paths.promotion_report.read_text())["version"] == "1"


FAILING = {
    "metrics": {"max_log_loss": 1e-9},
    "latency": {"max_latency_ms_p95": 1e-6},
}


@pytest.mark.parametrize("gate", sorted(FAILING))
def test_a_failing_threshold_gate_leaves_production_untouched(project: Project, gate: str) -> None:
    register(project)
    project = set_gates(project.root, **FAILING[gate])
    with pytest.raises(QualityGateError, match=rf"refused.*{gate}"):
        promote(project)
    assert CHAMPION not in aliases(project)
    assert open_registry(project).version("1").tags[f"gate.{gate}"] == "failed"
    report = json.loads(project.paths.promotion_report.read_text())
    assert report["passed"] is False and report["moved"] is False
    assert [r["event"] for r in audit.history(project, open_registry(project))] == ["register"]


def test_a_changed_signature_fails_the_schema_gate(project: Project, tmp_path: Path) -> None:
    register(project)
    promote(project)
    version = register_other(project, relabelled(project, tmp_path / "bird", ["cat", "dog", "bird"]))
    with pytest.raises(QualityGateError, match="schema: labels"):
        promote(project)
    assert aliases(project)[CHAMPION] == "1"
    assert open_registry(project).version(version).tags["gate.schema"] == "failed"


def test_a_model_answering_the_wrong_labels_fails_the_smoke_test(project: Project, tmp_path: Path) -> None:
    register(project)
    promote(project)
    register_other(project, relabelled(project, tmp_path / "swapped", ["dog", "cat"]))
    with pytest.raises(QualityGateError, match="staging_smoke: labels: 0/"):
        promote(project)
    assert aliases(project)[CHAMPION] == "1"


def test_a_worse_challenger_fails_the_no_regression_gate(project: Project, tmp_path: Path) -> None:
    register(project)
    promote(project)
    register_other(project, untrained_model(tmp_path / "untrained"))
    with pytest.raises(QualityGateError, match=r"no_regression: .*champion v1"):
        promote(project)
    assert aliases(project)[CHAMPION] == "1" and PREVIOUS not in aliases(project)


def test_non_regression_promotion_rollback_and_audit(project: Project) -> None:
    register(project)
    promote(project)
    register(project)
    report = promote(project)
    regression = next(gate for gate in report["gates"] if gate["name"] == "no_regression")
    assert regression["status"] == "passed" and regression["values"]["champion_version"] == "1"
    assert aliases(project) == {CHALLENGER: "2", CHAMPION: "2", PREVIOUS: "1"}
    between = datetime.now(UTC)
    time.sleep(0.05)
    moved = rollback(project, reason="bad reviews")
    assert moved == {"name": "catdog", "from": "2", "to": "1", "reason": "bad reviews"}
    # @previous: what a rollback would choose, and nothing older than v1 passed the gates
    assert aliases(project) == {CHALLENGER: "2", CHAMPION: "1"}
    assert open_registry(project).version("2").tags["rolled_back"] == "true"
    rows = audit.history(project, open_registry(project))
    assert [(r["event"], r["alias"], r["from_version"], r["to_version"]) for r in rows] == [
        ("register", CHALLENGER, "", "1"),
        ("promote", CHAMPION, "", "1"),
        ("register", CHALLENGER, "1", "2"),
        ("promote", CHAMPION, "1", "2"),
        ("rollback", CHAMPION, "2", "1"),
    ]
    assert rows[-1]["reason"] == "bad reviews" and rows[3]["reason"].startswith("all gates passed")
    assert audit.champion_at(rows, between) == "2"
    assert audit.champion_at(rows, datetime(2000, 1, 1, tzinfo=UTC)) is None
    with pytest.raises(CatdogError, match="already @champion"):
        rollback(project, to_version="1")


def cli(project: Project, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "catdog", *args, "--root", str(project.root)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_exit_codes_and_audit_output(project: Project) -> None:
    nothing = cli(project, "promote")
    assert (
        nothing.returncode == EXIT_PERMANENT
        and "no @challenger" in nothing.stderr
        and "Traceback" not in nothing.stderr
    )
    register(project)
    promote(project)
    at = cli(project, "audit", "--at", datetime.now(UTC).isoformat())
    assert at.returncode == 0 and "@champion at" in at.stdout and at.stdout.strip().endswith(": 1")
    table = audit.format_rows(audit.history(project, open_registry(project)))
    assert "register" in table and "promote" in table and "all gates passed" in table


def test_a_service_on_champion_follows_promotion_and_rollback(project: Project, server_factory) -> None:
    register(project)
    promote(project)
    server = server_factory(
        "models:/catdog@champion",
        MLFLOW_TRACKING_URI=tracking.tracking_uri(project),
        MODEL_POLL_SECONDS="0.3",
    )
    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()
    image = (project.paths.processed / "test" / "cat").glob("*.jpg").__next__().read_bytes()

    def traffic() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                response = client.post("/predict", files={"file": ("a.jpg", image, "image/jpeg")})
                seen.append((response.status_code, response.json().get("model", {}).get("version")))

    def wait_for(version: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if seen and seen[-1][1] == version:
                return
            time.sleep(0.1)
        raise AssertionError(f"the service never served version {version}: {seen[-3:]}")

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        wait_for("1")
        register(project)
        promote(project)
        wait_for("2")
        rollback(project)
        wait_for("1")
    finally:
        stop.set()
        worker.join()
    assert {status for status, _ in seen} == {200}
    versions = [version for _, version in seen]
    assert versions[0] == "1" and versions[-1] == "1" and "2" in versions


def test_a_broken_champion_never_replaces_a_working_model(
    project: Project, server_factory, tmp_path: Path
) -> None:
    register(project)
    promote(project)
    server = server_factory(
        "models:/catdog@champion",
        MLFLOW_TRACKING_URI=tracking.tracking_uri(project),
        MODEL_POLL_SECONDS="0.2",
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a model at all")
    registry = open_registry(project)
    with tracking.store(registry.tracking_uri) as mlflow, mlflow.start_run():
        mlflow.log_artifacts(str(broken), "broken_model")
        source = mlflow.get_artifact_uri("broken_model")
    bad = registry.register(source, None, {"note": "forced past the gates"})
    registry.set_alias(CHAMPION, bad.version)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "not swapped in" not in server.log.read_text():
        time.sleep(0.2)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        image = next((project.paths.processed / "test" / "dog").glob("*.jpg")).read_bytes()
        answer = client.post("/predict", files={"file": ("a.jpg", image, "image/jpeg")})
        ready = client.get("/ready")
    assert answer.status_code == 200 and answer.json()["model"]["version"] == "1"
    assert ready.status_code == 200
    assert f"version {bad.version}" in server.log.read_text()
