"""The registry's least privilege, on a real MLflow server running the basic-auth app with the project's
configuration (docker/mlflow-auth.ini) and users (docker/mlflow_users.py, what compose's mlflow-users job
runs): the pipeline's user registers versions and moves aliases; the serving user resolves and downloads
the model but can neither move @champion nor register a version."""

from __future__ import annotations

import io
import os
import runpy
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
AUTH_INI = ROOT / "docker" / "mlflow-auth.ini"
USERS_SCRIPT = ROOT / "docker" / "mlflow_users.py"
MODEL = "catdog"
ADMIN = ("admin", "admin-password-for-tests")
PIPELINE = ("pipeline", "pipeline-password-for-tests")
SERVING = ("serving", "serving-password-for-tests")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server --app-name basic-auth` on loopback: sqlite stores, artifacts served by the server."""
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    ini = tmp / "auth.ini"
    # The project's file, only the users' database moved out of the container's volume path.
    ini.write_text(
        AUTH_INI.read_text().replace(
            "sqlite:////var/lib/mlflow/auth/basic_auth.db", f"sqlite:///{tmp / 'auth.db'}"
        )
    )
    assert f"sqlite:///{tmp / 'auth.db'}" in ini.read_text(), (
        "docker/mlflow-auth.ini changed its database_uri"
    )
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0],
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", str(tmp / "artifacts"),
    ]  # fmt: skip
    log = (tmp / "server.log").open("w")
    process = subprocess.Popen(command, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 480  # a loaded 2-core machine: MLflow imports twice (CLI, worker)
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()


def users_script(url: str, **overrides: str) -> tuple[int, str, str]:
    """docker/mlflow_users.py run as a script in this process (one MLflow import): (exit code, out, err)."""
    env = {
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_TRACKING_USERNAME": ADMIN[0],
        "MLFLOW_TRACKING_PASSWORD": ADMIN[1],
        "MLFLOW_PIPELINE_USERNAME": PIPELINE[0],
        "MLFLOW_PIPELINE_PASSWORD": PIPELINE[1],
        "MLFLOW_SERVING_USERNAME": SERVING[0],
        "MLFLOW_SERVING_PASSWORD": SERVING[1],
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        **overrides,
    }
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env), redirect_stdout(out), redirect_stderr(err):
        try:
            runpy.run_path(str(USERS_SCRIPT), run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def users(server: str) -> str:
    for _ in range(2):  # the second run finds everything in place: idempotent
        code, out, err = users_script(server)
        assert code == 0, out + err
    return server


def as_user(monkeypatch: pytest.MonkeyPatch, user: tuple[str, str]) -> None:
    """MLflow's client reads the credentials from the environment on every request."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def denied(action) -> MlflowException:
    with pytest.raises(MlflowException) as caught:
        action()
    assert caught.value.error_code == "PERMISSION_DENIED", caught.value
    return caught.value


def test_the_serving_user_reads_the_champion_but_cannot_move_it(
    users: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", users)
    client = MlflowClient(tracking_uri=users)
    as_user(monkeypatch, PIPELINE)
    experiment = client.create_experiment("catdog-identities")
    run = client.create_run(experiment)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.onnx").write_bytes(b"not really onnx")
    client.log_artifacts(run.info.run_id, str(tmp_path / "model"), "model")
    client.set_terminated(run.info.run_id)
    source = f"{run.info.artifact_uri}/model"
    first = client.create_model_version(MODEL, source, run_id=run.info.run_id)
    second = client.create_model_version(MODEL, source, run_id=run.info.run_id)
    client.set_registered_model_alias(MODEL, "champion", first.version)

    as_user(monkeypatch, SERVING)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == first.version
    downloaded = Path(
        mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion", dst_path=str(tmp_path / "dl"))
    )
    assert (downloaded / "model.onnx").read_bytes() == b"not really onnx"
    denied(lambda: client.set_registered_model_alias(MODEL, "champion", second.version))
    denied(lambda: client.delete_registered_model_alias(MODEL, "champion"))
    denied(lambda: client.create_model_version(MODEL, source, run_id=run.info.run_id))
    denied(lambda: client.set_registered_model_tag(MODEL, "promotion.passed", "true"))
    denied(lambda: client.delete_registered_model(MODEL))
    denied(lambda: client.log_metric(run.info.run_id, "accuracy", 1.0))

    as_user(monkeypatch, PIPELINE)  # the pipeline still can: the denials above were the serving user's alone
    client.set_registered_model_alias(MODEL, "champion", second.version)
    assert client.get_model_version_by_alias(MODEL, "champion").version == second.version


def test_no_request_without_a_user(users: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{users}/api/2.0/mlflow/registered-models/get?name={MODEL}", timeout=10)
    assert caught.value.code == 401


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"MLFLOW_SERVING_USERNAME": PIPELINE[0]}, "three different users"),
        ({"MLFLOW_SERVING_PASSWORD": ""}, "MLFLOW_SERVING_PASSWORD"),
    ],
)
def test_the_users_script_refuses_a_shared_or_incomplete_identity(
    server: str, overrides: dict[str, str], message: str
) -> None:
    code, out, err = users_script(server, **overrides)
    assert code == 2 and message in err, out + err
