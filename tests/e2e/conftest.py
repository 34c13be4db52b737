"""A real uvicorn process serving a real exported model over HTTP (loopback), for the e2e tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = "test-admin-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running service: its base URL, process and log file."""

    url: str
    process: subprocess.Popen
    log: Path
    env: dict[str, str]

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def rss_mb(self) -> float:
        """Resident memory of the server process (MB)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


def start_server(
    model_uri: str | Path, log: Path, wait_ready: bool = True, timeout: float = 90, **env: str
) -> Server:
    """`python -m uvicorn api.main:app` on a free loopback port with MODEL_URI and extra settings."""
    port = free_port()
    environment = {
        **os.environ,
        "MODEL_URI": str(model_uri),
        "ADMIN_API_KEY": ADMIN_KEY,
        "LOG_LEVEL": "info",
        **env,
    }
    handle = log.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO_ROOT,
        env=environment,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", process, log, environment)
    deadline = time.monotonic() + timeout
    path = "/ready" if wait_ready else "/health"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    stop_server(server)
    raise RuntimeError(f"the server was not answering {path} after {timeout}s:\n{log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def served_project(trained_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose evaluate and export stages ran on the tiny real lite0 training run: models/ holds
    model.onnx (test metrics in its metadata), model.int8.onnx and the model card, and
    reports/evaluate/predictions.csv the evaluation stage's probabilities; shared, so never modified."""
    pytest.importorskip("onnxscript")
    import yaml

    from catdog.stages import evaluate, export

    target = tmp_path_factory.mktemp("served") / "project"
    root = Path(shutil.copytree(trained_project, target, symlinks=True))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"].update(min_accuracy=0.0, min_f1=0.0, max_log_loss=100.0, worst_examples=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    evaluate.run(root)
    export.run(root)
    return root


@pytest.fixture(scope="session")
def exported_model(served_project: Path) -> Path:
    """The served project's models/ folder."""
    return served_project / "models"


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Start extra servers (stopped at the end of the session): factory(model_uri, **env)."""
    started: list[Server] = []

    def make(model_uri: str | Path, wait_ready: bool = True, **env: str) -> Server:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = start_server(model_uri, log, wait_ready=wait_ready, **env)
        started.append(server)
        return server

    yield make
    for server in started:
        stop_server(server)


@pytest.fixture(scope="session")
def server(exported_model: Path, server_factory: Callable[..., Server]) -> Server:
    """The service on the exported fp32 model (the e2e tests' default)."""
    return server_factory(exported_model / "model.onnx", MODEL_PRECISION="fp32")


@pytest.fixture(scope="session")
def photos(sample_images_dir: Path) -> dict[str, list[Path]]:
    """Real photos of the shared sample by class (the last ones: never in the tiny training set)."""
    return {
        label: sorted((sample_images_dir / "PetImages" / folder).glob("*.jpg"))[-20:]
        for label, folder in (("cat", "Cat"), ("dog", "Dog"))
    }
