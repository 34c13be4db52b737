"""The serving image (./Dockerfile) for real: its size, what it holds (no torch, no training code, no model),
and a container of it, non-root on a read-only root file system with the tiny model mounted read-only,
turning healthy through its own HEALTHCHECK and passing the smoke test over loopback."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
from docker_cli import IMAGE_LIMIT_MB, SERVICE_MODULES, docker, image_size, inspect, wait_healthy

from catdog import smoke

pytestmark = pytest.mark.slow

USER = "10001:10001"


@pytest.fixture(scope="module")
def api_container(serving_image: str, container_model: Path):
    """A container of the image serving the tiny model (fp32), published on a random loopback port:
    (name, base URL). Removed, with its anonymous volumes, at the end of the module."""
    name = f"catdog-test-api-{uuid.uuid4().hex[:8]}"
    docker(
        "run",
        "--detach",
        "--name",
        name,
        "--label",
        "catdog.test=image",
        "--publish",
        "127.0.0.1::8000",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/var/lib/catdog:uid=10001,gid=10001",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--volume",
        f"{container_model}:/models:ro",
        "--env",
        "MODEL_URI=/models",
        "--env",
        "MODEL_PRECISION=fp32",
        serving_image,
    )
    try:
        host_port = docker("port", name, "8000/tcp").stdout.split()[0]
        assert host_port.startswith("127.0.0.1:"), host_port
        yield name, f"http://{host_port}"
    finally:
        logs = docker("logs", "--tail", "30", name, check=False)
        print(logs.stdout[-4000:], logs.stderr[-4000:])
        docker("rm", "--force", "--volumes", name, check=False)


def test_the_image_is_under_the_size_limit(serving_image: str) -> None:
    size_mb = image_size(serving_image) / 1e6
    print(f"serving image {serving_image}: {size_mb:.0f} MB")
    assert size_mb < IMAGE_LIMIT_MB


def in_image(image: str, code: str, check: bool = True):
    """`python -c code` in a throwaway container of the image, without a network."""
    return docker("run", "--rm", "--network", "none", image, "python", "-c", code, check=check)


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).strip().lower()


def test_the_serving_environment_is_the_locks_serve_extra_without_torch(serving_image: str) -> None:
    """The image's /opt/venv holds exactly what the lock pins for `serve`; its installed size is reported."""
    script = (
        "import json, pathlib, importlib.metadata as m; "
        "root = pathlib.Path('/opt/venv'); "
        "size = sum(f.stat().st_size for f in root.rglob('*') if f.is_file() and not f.is_symlink()); "
        "print(json.dumps({'mb': size / 1e6, 'installed': sorted(d.metadata['Name'].lower() for d in "
        "m.distributions(path=[str(next(root.glob('lib/python3*/site-packages')))])), "
        "'pinned': (root / 'requirements.txt').read_text()}))"
    )
    found = json.loads(in_image(serving_image, script).stdout)
    pinned = {
        normalized(line.split("==")[0])
        for line in found["pinned"].splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    }
    installed = {normalized(name) for name in found["installed"]}
    print(f"serving environment (/opt/venv): {found['mb']:.0f} MB, {len(found['installed'])} distributions")
    assert {"fastapi", "onnxruntime", "mlflow-skinny", "numpy", "pillow", "prometheus-client"} <= installed
    assert not installed & {"torch", "torchvision", "lightning", "timm", "mlflow", "dvc", "prefect"}
    assert installed == pinned, "the image's environment differs from the lock's serve extra"
    assert found["mb"] < IMAGE_LIMIT_MB


def test_the_image_holds_no_torch_no_training_code_and_no_model(serving_image: str) -> None:
    no_torch = in_image(serving_image, "import torch", check=False)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    listing = in_image(
        serving_image,
        "import json, os; print(json.dumps({p: os.listdir(p) for p in ('/app', '/app/catdog', '/models')}))",
    )
    folders = json.loads(listing.stdout)
    assert sorted(folders["/app"]) == ["api", "catdog"]
    assert {name for name in folders["/app/catdog"] if name != "__pycache__"} == SERVICE_MODULES
    assert "model.onnx" not in folders["/models"], "a model is baked in by default"
    for training in ("catdog.stages", "catdog.training", "flows", "lightning", "dvc", "prefect"):
        done = in_image(serving_image, f"import {training}", check=False)
        assert done.returncode != 0, f"{training} is importable in the serving image"


def test_the_container_runs_as_a_non_root_user(api_container: tuple[str, str]) -> None:
    name, _ = api_container
    assert inspect(name)["Config"]["User"] == USER
    assert docker("exec", name, "id", "-u").stdout.strip() == "10001"


def test_the_healthcheck_turns_healthy_and_the_smoke_test_passes(
    api_container: tuple[str, str], smoke_cases: list[tuple[Path, str]]
) -> None:
    name, url = api_container
    assert wait_healthy(name, timeout=120) == "healthy"
    result = smoke.run(url, smoke_cases, timeout=60)
    print("\n".join(f"{c['check']}: {'ok' if c['passed'] else 'FAIL'} {c['detail']}" for c in result.checks))
    assert result.passed, result.failures()
