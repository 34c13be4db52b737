"""A real uvicorn process serving a model over loopback HTTP, for the tests that need the live service."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
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
    """`python -m uvicorn api.main:app` on a free loopback port with MODEL_URI and extra settings (the
    feedback database beside the log unless FEEDBACK_DB is given)."""
    port = free_port()
    environment = {
        **os.environ,
        "MODEL_URI": str(model_uri),
        "ADMIN_API_KEY": ADMIN_KEY,
        "LOG_LEVEL": "info",
        "FEEDBACK_DB": str(log.with_name("feedback.db")),
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
