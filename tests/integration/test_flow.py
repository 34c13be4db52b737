"""Real Prefect flow runs (a temporary local Prefect API) over real `dvc repro` of a tiny real-photo project:
the full pipeline through promotion, its MLflow lineage, a DVC experiment compared in the notebook, retries,
alerts, the data trigger and the deployments."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import mlflow
import nbformat
import pytest
import yaml
from nbclient import NotebookClient
from projects import TINY_TRAIN
from test_dvc_pipeline import copy_sample, make_repo, run

pytestmark = pytest.mark.slow
prefect = pytest.importorskip("prefect")

from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402

from catdog.config import Project  # noqa: E402
from catdog.lineage import data_version  # noqa: E402
from catdog.registry import CHAMPION  # noqa: E402
from catdog.registry.promotion import open_registry  # noqa: E402
from flows import alerts, data_trigger  # noqa: E402
from flows.alerts import ALERT_URLS_ENV  # noqa: E402
from flows.pipeline import pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STAGES = (
    "source",
    "ingest",
    "validate",
    "prepare",
    "train",
    "baselines",
    "evaluate",
    "checks",
    "export",
    "register",
)
FAST_RETRIES = {"retries": 2, "retry_delay_seconds": [0.2], "retry_jitter_factor": 0, "stages": {}}
TINY = {
    "train": TINY_TRAIN,
    "baselines": {
        "linear_probe": {"C": [1.0]},
        "simple_cnn": {"epochs": 1, "image_size": 64, "batch_size": 16},
    },
    # 15 photos per class leave 2 in the test split: floors a tiny simple_cnn experiment can meet
    "evaluate": {"min_accuracy": 0.0, "min_f1": 0.0, "max_log_loss": 10.0, "worst_examples": 2},
    "checks": {"min_class_recall": 0.0, "min_class_f1": 0.0, "max_brier_score": 1.0},
    "export": {"parity_images": 4, "latency_runs": 5, "throughput_batch_size": 4, "reference_images": 20},
    "registry": {
        "gates": {
            "min_accuracy": 0.0,
            "min_f1": 0.0,
            "max_log_loss": 100.0,
            "max_latency_ms_p95": 10_000,
            "latency_runs": 5,
            "smoke_images_per_class": 1,
            "smoke_min_confidence": 0.5,
        }
    },
    # 10 s, the default: with 2 s a loaded machine sometimes gave up before the webhook's request arrived.
    "orchestration": {**FAST_RETRIES, "alerts": {"on_success": True, "timeout_seconds": 10}},
}


def merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "stages":
            merge(base[key], value)
        else:
            base[key] = value
    return base


def tiny_repo(tmp_path: Path, name: str = "project") -> Path:
    """A git+DVC project holding this repo's pipeline with tiny, fast parameters."""
    root = tmp_path / name
    make_repo(root, tmp_path / f"{name}-remote", extra=("uv.lock",))
    params = merge(yaml.safe_load((root / "params.yaml").read_text()), json.loads(json.dumps(TINY)))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(root, "git", "commit", "-qam", "tiny params")
    return root


class Recorder(BaseHTTPRequestHandler):
    """Stands in for Discord (POSTs of webhook JSON) and for a flaky file host (GETs that fail at first)."""

    server: RecordingServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.posts.append({"path": self.path, "json": json.loads(body or b"null")})
        time.sleep(self.server.delay)
        self.send_response(self.server.post_status)
        self.end_headers()

    def do_GET(self) -> None:
        self.server.gets += 1
        if self.server.gets <= self.server.failures or self.server.payload is None:
            self.send_error(503, "try again later")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(self.server.payload)))
        self.end_headers()
        self.wfile.write(self.server.payload)

    def log_message(self, format: str, *args: object) -> None:
        pass


class RecordingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Recorder)
        self.posts: list[dict[str, Any]] = []
        self.delay = 0.0
        self.post_status = 204
        self.gets = 0
        self.failures = 0
        self.payload: bytes | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def web() -> Iterator[RecordingServer]:
    server = RecordingServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    """A temporary local Prefect API (SQLite) for this module's flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def source_folder(sample_images_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_sample(sample_images_dir, tmp_path_factory.mktemp("source") / "pets", per_class=15)


@pytest.fixture(scope="module")
def flowed(prefect_api, source_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One full flow run (every stage, then promotion) of a tiny project, shared by the tests below."""
    root = tiny_repo(tmp_path_factory.mktemp("flow"))
    commit = run(root, "git", "rev-parse", "HEAD").stdout.strip()
    started = time.perf_counter()
    state = pipeline(root=str(root), source=str(source_folder), return_state=True)
    print(f"\nfull flow run: {time.perf_counter() - started:.0f} s")
    return {"root": root, "state": state, "commit": commit}


def task_runs(state: Any) -> dict[str, Any]:
    """The flow run's task runs by name (the last one of each name)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    return {run.name: run for run in sorted(runs, key=lambda r: r.expected_start_time)}


def champion(root: Path) -> str | None:
    version = open_registry(Project(root)).by_alias(CHAMPION)
    return str(version.version) if version else None


def test_a_full_run_completes_and_a_rerun_skips_every_cached_stage(flowed, source_folder, web, monkeypatch):
    root, state = flowed["root"], flowed["state"]
    assert state.is_completed(), state.message
    runs = task_runs(state)
    assert {name: runs[name].state.name for name in (*STAGES, "promote")} == dict.fromkeys(
        (*STAGES, "promote"), "Completed"
    )
    assert all(runs[name].run_count == 1 for name in STAGES)
    summary = state.result()
    assert summary["ran"] == list(STAGES) and summary["skipped"] == []
    assert summary["registered"]["version"] == "1" and summary["champion"] == "1" == champion(root)
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert (root / "models" / "model.onnx").is_file() and (root / "dvc.lock").is_file()

    monkeypatch.setenv(ALERT_URLS_ENV, web.url("/api/webhooks/42/t0ken"))
    again = pipeline(root=str(root), source=str(source_folder), return_state=True)
    assert again.is_completed(), again.message
    runs = task_runs(again)
    assert runs["source"].state.name == "Completed", "always_changed: cheap and always run"
    assert {name: runs[name].state.name for name in STAGES[1:]} == dict.fromkeys(STAGES[1:], "Skipped")
    assert all(runs[name].state.is_completed() for name in STAGES)
    assert again.result()["skipped"] == list(STAGES[1:]) and champion(root) == "1"
    [post] = web.posts
    assert post["path"] == "/api/webhooks/42/t0ken"
    assert "catdog pipeline completed" in post["json"]["content"]
    assert "@champion is version 1" in post["json"]["content"]


def test_the_run_is_tracked_in_mlflow_with_its_lineage(flowed):
    root = flowed["root"]
    comparison = json.loads((root / "metrics" / "evaluate.json").read_text())["comparison"]["models"]
    assert set(comparison) == {"fine_tuned", "linear_probe", "simple_cnn"}
    metrics = run(root, "dvc", "metrics", "show", "--json").stdout
    assert "baselines.json" in metrics and "evaluate.json" in metrics

    info = json.loads((root / "models" / "mlflow_run.json").read_text())
    assert info["tracking_uri"] == f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(info["tracking_uri"])
    mlflow_run = client.get_run(info["run_id"])
    tags, logged = mlflow_run.data.tags, mlflow_run.data.metrics
    assert tags["git_commit"] == flowed["commit"] and tags["git_dirty"] == "false"
    assert tags["data_version"] == data_version(root / "dvc.lock")
    assert mlflow_run.data.params["train.model"] == "tf_efficientnet_lite0"
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert mlflow_run.data.params["data.source"] == params["data"]["source"]
    assert {"test/accuracy", "test/log_loss", "test/ece", "behaviour/flip_stability"} <= set(logged)
    assert len(client.get_metric_history(info["run_id"], "val/loss")) == 2, "one point per epoch"
    artifacts = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"evaluation", "model_files", "data"} <= artifacts
    data_files = {a.path for a in client.list_artifacts(info["run_id"], "data")}
    assert "data/validation.json" in data_files
    mlflow.set_tracking_uri(info["tracking_uri"])
    model = mlflow.models.get_model_info(tags["model_uri"])
    assert model.signature.inputs.inputs[0].shape == (-1, 3, 96, 96)


def execute_notebook(root: Path, tracking_uri: str) -> str:
    """Run the comparison notebook against a project's MLflow store; returns all its text outputs."""
    notebook = nbformat.read(REPO / "notebooks" / "compare_experiments.ipynb", as_version=4)
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "CATDOG_ROOT": str(root)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": root}}
        ).execute()
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
            texts.extend(str(v) for v in output.get("data", {}).values())
    return "\n".join(texts)


def test_a_dvc_experiment_reruns_only_what_changed_and_the_notebook_compares_the_runs(flowed, source_folder):
    root = flowed["root"]
    info = json.loads((root / "models" / "mlflow_run.json").read_text())
    experiment = run(
        root,
        "dvc",
        "exp",
        "run",
        "-S",
        "train.model=simple_cnn",
        "evaluate",
        env={"DATA_SOURCE": str(source_folder)},
    )
    ran = {stage for stage in STAGES if f"Running stage '{stage}'" in experiment.stdout}
    assert ran == {"source", "train", "evaluate"}, "the data stages and the baselines are cached"
    mlflow.set_tracking_uri(info["tracking_uri"])
    runs = mlflow.search_runs(experiment_ids=[info["experiment_id"]], search_all_experiments=False)
    assert sorted(runs["params.train.model"]) == ["simple_cnn", "tf_efficientnet_lite0"]
    assert runs["metrics.test/accuracy"].notna().all()

    outputs = execute_notebook(root, info["tracking_uri"])
    assert "simple_cnn (this run's model)" in outputs and "linear_probe" in outputs
    assert "tf_efficientnet_lite0" in outputs, "the table of every run lists the default model's run too"
    assert outputs.count("final val-train loss gap") == 2


def test_a_failed_quality_gate_is_not_retried_and_production_is_unchanged(
    flowed, source_folder, web, monkeypatch
):
    root = flowed["root"]
    monkeypatch.setenv(ALERT_URLS_ENV, web.url("/api/webhooks/42/t0ken"))
    before = json.loads((root / "models" / "registry.json").read_text())
    aliases = open_registry(Project(root)).aliases()

    state = pipeline(
        root=str(root), source=str(source_folder), params={"evaluate.max_log_loss": 0.001}, return_state=True
    )
    assert state.is_failed()
    runs = task_runs(state)
    assert runs["evaluate"].state.is_failed() and runs["evaluate"].run_count == 1, "a failed gate is final"
    assert "export" not in runs and "promote" not in runs
    assert yaml.safe_load((root / "params.yaml").read_text())["evaluate"]["max_log_loss"] == 0.001
    assert champion(root) == "1"
    assert json.loads((root / "models" / "registry.json").read_text()) == before
    assert open_registry(Project(root)).aliases() == aliases and aliases["champion"] == "1"
    [post] = web.posts
    assert "'evaluate'" in post["json"]["content"] and "quality gate failed" in post["json"]["content"]


def test_a_transient_download_failure_is_retried_and_the_flow_completes(
    prefect_api, source_folder, web, tmp_path
):
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source_folder.rglob("*.jpg")):
            zf.write(path, path.relative_to(source_folder).as_posix())
    web.payload = archive.read_bytes()
    web.failures = 3  # the stage's own download retries give up after 2 attempts, the flow retries the stage
    root = tiny_repo(tmp_path)
    state = pipeline(
        root=str(root),
        source=web.url("/pets.zip"),
        params={"data.download.attempts": 2, "data.download.backoff_seconds": 0.1},
        promote=False,
        until="ingest",
        return_state=True,
    )
    assert state.is_completed(), state.message
    runs = task_runs(state)
    assert runs["ingest"].state.name == "Completed" and runs["ingest"].run_count == 2
    assert web.gets == 4, "2 failed GETs, a retried stage: 1 more failure, then the download"
    assert len(list((root / "data" / "raw" / "PetImages" / "Cat").glob("*.jpg"))) == 15
    assert web.posts == [], "no alert URL configured: nothing sent"


def test_a_permanent_failure_fails_the_flow_without_retries_or_alerts_when_none_configured(
    prefect_api, tmp_path, monkeypatch, web
):
    monkeypatch.delenv(ALERT_URLS_ENV, raising=False)
    root = tiny_repo(tmp_path)
    state = pipeline(root=str(root), source=str(tmp_path / "missing"), until="ingest", return_state=True)
    assert state.is_failed()
    assert "stage 'source' failed (exit 2" in state.message and "data source not found" in state.message
    runs = task_runs(state)
    assert runs["source"].run_count == 1 and "ingest" not in runs
    assert web.posts == [] and web.gets == 0


def test_the_cli_on_the_ephemeral_api_alerts_discord_and_a_slow_webhook_does_not_block(tmp_path, web):
    root = tiny_repo(tmp_path)
    web.delay = 120.0
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        ALERT_URLS_ENV: web.url("/api/webhooks/7/secret-token"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flows", "run", "--root", str(root), "--source", str(tmp_path / "gone")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - started
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "flow run ended Failed" in output and "stage 'source' failed (exit 2" in output, output[-6000:]
    assert "did not answer within 10 s" in output and elapsed < web.delay, "the webhook held the flow"
    assert "secret-token" not in output, "webhook secrets never reach the logs"
    [post] = web.posts
    message = post["json"]["content"]
    assert "catdog pipeline FAILED at 'source'" in message and "data source not found" in message
    assert post["path"] == "/api/webhooks/7/secret-token"


def test_the_data_trigger_runs_the_pipeline_only_when_the_source_changed(flowed, source_folder, tmp_path):
    root = flowed["root"]
    unchanged = data_trigger.data_watch(root=str(root), source=str(source_folder), return_state=True)
    assert unchanged.is_completed() and unchanged.result() == {"changed": False, "pipeline": None}

    grown = Path(shutil.copytree(source_folder, tmp_path / "grown"))
    extra = sorted((grown / "PetImages" / "Dog").glob("*.jpg"))[0]
    shutil.copy2(extra, extra.with_name("new-dog.jpg"))
    check = data_trigger.check(root, str(grown))
    assert check.changed and check.ingested_md5 is not None and check.current_md5 != check.ingested_md5
    assert not data_trigger.check(root, str(source_folder)).changed


def test_serve_registers_the_scheduled_deployments(flowed, tmp_path):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    root = flowed["root"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "flows", "serve", "--root", str(root)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        found: dict[str, Any] = {}
        while time.monotonic() < deadline and len(found) < 3:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            with get_client(sync_client=True) as client:
                found = {d.name: d for d in client.read_deployments()}
            time.sleep(1)
        assert set(found) == {"weekly-retrain", "data-change", "manual"}, (tmp_path / "serve.log").read_text()
        [weekly] = found["weekly-retrain"].schedules
        assert weekly.schedule.cron == "0 3 * * 1" and weekly.schedule.timezone == "UTC"
        [watch] = found["data-change"].schedules
        assert watch.schedule.interval.total_seconds() == 3600
        assert found["manual"].schedules == []
        assert found["weekly-retrain"].parameters == {"root": str(root)}
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def test_alert_urls_can_live_in_a_prefect_secret_block_and_a_failing_webhook_only_logs(
    prefect_api, web, monkeypatch, caplog
):
    from prefect.blocks.system import Secret

    monkeypatch.delenv(ALERT_URLS_ENV, raising=False)
    assert alerts.configured_urls() == []
    Secret(value=web.url("/api/webhooks/9/from-block")).save(alerts.DEFAULT_SECRET_BLOCK, overwrite=True)
    try:
        assert alerts.configured_urls() == [web.url("/api/webhooks/9/from-block")]
        web.post_status = 500
        assert alerts.send(title="t", body="boom", failure=True, timeout_seconds=5) is False
        assert [post["path"] for post in web.posts] == ["/api/webhooks/9/from-block"]
        assert "did not accept the alert" in caplog.text
    finally:
        Secret(value="").save(alerts.DEFAULT_SECRET_BLOCK, overwrite=True)
