"""Fixtures of the container tests: the Docker engine (installed and started when missing, stopped at the end
when these tests started it), the locally made base image, the serving image built from ./Dockerfile, the
tiny model as a folder the container's user can read, and real photos that model labels right.

Where no engine can run (no root to start dockerd, no Docker at all) the tests skip and say why; under CI
(CI=true) they fail instead (tests/missing_tool.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from docker_cli import (
    API_IMAGE,
    BASE_IMAGE,
    IMAGE_LIMIT_MB,
    REPO_ROOT,
    docker,
    engine_answers,
    engine_script,
    image_size,
)
from filelock import FileLock
from missing_tool import missing_tool

IMAGE_LABEL = "org.opencontainers.image.title=catdog-api"  # the serving image's runtime stage (Dockerfile)


def report(request: pytest.FixtureRequest, line: str) -> None:
    """A line on the terminal even when output is captured (image sizes and build times)."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"[containers] {line}")


@pytest.fixture
def say(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """report() for a test: its figures (memory, answers) show on the terminal of a normal suite run."""
    return lambda line: report(request, line)


@contextmanager
def docker_lock() -> Iterator[None]:
    """One test process at a time starts the engine, makes the base image or builds the serving image (the
    suite runs on xdist workers; the second one then finds the engine up and the layers cached)."""
    with FileLock(str(Path(tempfile.gettempdir()) / "catdog-container-tests.lock"), timeout=1800):
        yield


def _last_lines(text: str, count: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-count:])


@pytest.fixture(scope="session")
def docker_engine(request: pytest.FixtureRequest):
    """An engine that answers `docker info`: the running one, else Debian's docker.io installed (apt-get)
    when missing and dockerd started in the background, stopped again by its PID when the session ends."""
    started_pid = None
    with docker_lock():
        started_pid = _start_engine(request)
    yield
    if started_pid is not None and os.environ.get("PYTEST_XDIST_WORKER"):
        report(request, f"dockerd (pid {started_pid}) left running for the other workers: make docker-stop")
    elif started_pid is not None:
        done = engine_script("stop", started_pid, timeout=60)
        report(request, f"dockerd (pid {started_pid}) stopped: {done.stderr.strip() or done.returncode}")


def _start_engine(request: pytest.FixtureRequest) -> str | None:
    """Install and start the engine when `docker info` gets no answer: the PID of the dockerd started here."""
    started_pid = None
    if not engine_answers():
        if shutil.which("dockerd") is None or shutil.which("docker") is None:
            done = engine_script("install")
            if done.returncode != 0:
                missing_tool(f"Docker is not installed and cannot be here: {_last_lines(done.stderr)}")
        done = engine_script("start", timeout=120)
        if done.returncode != 0:
            missing_tool(f"the Docker engine cannot start on this machine: {_last_lines(done.stderr)}")
        if done.stdout.startswith("started "):
            started_pid = done.stdout.split()[1]
            report(request, f"dockerd started for the container tests (pid {started_pid})")
    return started_pid


@pytest.fixture(scope="session")
def base_image(docker_engine, request: pytest.FixtureRequest) -> str:
    """The base the project's Dockerfiles are built on here: made once by scripts/docker_engine.sh
    (debootstrap bookworm + python3 + this machine's CA bundle), then reused by tag."""
    with docker_lock():
        return _base_image(request)


def _base_image(request: pytest.FixtureRequest) -> str:
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    if shutil.which("debootstrap") is None:
        engine_script("install")
    started = time.monotonic()
    done = engine_script("base-image", timeout=900)
    if done.returncode != 0:
        pytest.fail(f"could not make the base image {BASE_IMAGE}: {_last_lines(done.stderr)}")
    report(
        request,
        f"base image {BASE_IMAGE} made in {time.monotonic() - started:.0f}s "
        f"({image_size(BASE_IMAGE) / 1e6:.0f} MB)",
    )
    return BASE_IMAGE


@pytest.fixture(scope="session")
def serving_image(base_image: str, request: pytest.FixtureRequest) -> str:
    """The serving image, built from ./Dockerfile on the local base with the classic builder (layers cached
    by the engine: a rebuild after a code change reinstalls nothing)."""
    with docker_lock():
        return _serving_image(base_image, request)


def _serving_image(base_image: str, request: pytest.FixtureRequest) -> str:
    started = time.monotonic()
    build = ["build", "--build-arg", f"BASE_IMAGE={base_image}", "--tag", API_IMAGE, "--file", "Dockerfile"]
    docker(*build, ".", timeout=900, cwd=REPO_ROOT, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    # The image this build replaced (untagged now); never the builder stage's, which is the layer cache.
    docker("image", "prune", "--force", "--filter", f"label={IMAGE_LABEL}", check=False)
    size, base = image_size(API_IMAGE), image_size(base_image)
    report(
        request,
        f"serving image {API_IMAGE}: {size / 1e6:.0f} MB ({base / 1e6:.0f} MB of it the base {base_image}, "
        f"limit {IMAGE_LIMIT_MB} MB), built in {time.monotonic() - started:.0f}s",
    )
    return API_IMAGE


@pytest.fixture(scope="session")
def container_model(exported_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's served files in a folder the container's user (uid 10001) can read: mounted read-only
    at /models (the test run's own folders are private to root)."""
    folder = tmp_path_factory.mktemp("container-model")
    for path in exported_model.iterdir():
        if path.is_file() and path.suffix in {".onnx", ".json", ".md"}:
            shutil.copy2(path, folder / path.name)
            (folder / path.name).chmod(0o644)
    folder.chmod(0o755)
    return folder


@pytest.fixture(scope="session")
def smoke_cases(container_model: Path, photos: dict[str, list[Path]]) -> list[tuple[Path, str]]:
    """Two real photos per class that the tiny model (fp32, run here with onnxruntime exactly as the service
    does) labels right with some margin: the container must give the same answers."""
    from api.model_loader import load
    from catdog import onnx_model
    from catdog.preprocessing import preprocess

    bundle = load(str(container_model), "fp32", threads=1)
    cases: list[tuple[Path, str]] = []
    for label, paths in photos.items():
        right = []
        for path in paths:
            probabilities = onnx_model.probabilities(bundle.session, preprocess(path, bundle.config)[None])[0]
            best = int(probabilities.argmax())
            if bundle.labels[best] == label and probabilities[best] >= 0.6:
                right.append(path)
            if len(right) == 2:
                break
        assert right, f"the tiny model labels none of {len(paths)} {label} photos right: cannot smoke-test"
        cases += [(path, label) for path in right]
    return cases
