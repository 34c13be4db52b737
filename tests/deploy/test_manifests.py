"""What builds and deploys the service, checked by the real linters and on the rendered manifests.

Every tool run goes through scripts/lint_deploy.sh (what `make lint-deploy` runs), so these tests also test
that script; each linter is also shown a broken input, so a check that silently passes anything fails here.
The Kubernetes overlays are rendered with the machine's `kubectl kustomize` (apt-get installs it when missing)
and their behaviour asserted on the YAML: probes, rolling update, security, autoscaling, the model alias of
each environment, TLS and no public admin route in production. scripts/deploy.sh runs against a stand-in
kubectl (no cluster here) to show the rollback, the smoke test and the alert.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from missing_tool import missing_tool

ROOT = Path(__file__).resolve().parents[2]
LINT = ROOT / "scripts" / "lint_deploy.sh"
DEPLOY = ROOT / "scripts" / "deploy.sh"
OVERLAYS = ("staging", "production")
ALIASES = {"staging": "models:/catdog@challenger", "production": "models:/catdog@champion"}
PUBLIC_PATHS = ("/", "/predict", "/predict/batch", "/predict/base64", "/feedback", "/health", "/ready")
SERVING_SECRET = "catdog-serving-secrets"
PIPELINE_SECRET = "catdog-pipeline-secrets"
PRIVATE_PATHS = ("/admin", "/admin/reload", "/metrics", "/monitoring/window", "/monitoring/drift", "/docs")


def lint(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(LINT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def passed(result: subprocess.CompletedProcess[str]) -> bool:
    """True on exit 0; otherwise the assertion message shows what the tool said."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return True


def rejected(result: subprocess.CompletedProcess[str], *needles: str) -> bool:
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"a broken input passed:\n{output}"
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"
    return True


@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl on PATH, installed with apt-get (Debian's kubernetes-client) by lint_deploy.sh when missing."""
    if shutil.which("kubectl") is None:
        if shutil.which("apt-get") is None:
            missing_tool("kubectl is missing and this machine has no apt-get to install it: install kubectl")
        if os.geteuid() != 0 and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode:
            missing_tool("kubectl is missing and installing it with apt-get needs root or passwordless sudo")
        passed(lint("ensure-kubectl"))
    found = shutil.which("kubectl")
    assert found, "lint_deploy.sh ensure-kubectl succeeded but kubectl is not on PATH"
    return found


@pytest.fixture(scope="module")
def rendered(kubectl: str) -> dict[str, list[dict[str, Any]]]:
    """Each overlay as kustomize renders it: a list of resources."""
    out = {}
    for overlay in OVERLAYS:
        result = lint("render", f"deploy/k8s/overlays/{overlay}")
        passed(result)
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def config(docs: list[dict[str, Any]]) -> dict[str, str]:
    return one(docs, "ConfigMap")["data"]


# ---------------------------------------------------------------- Dockerfiles


def test_dockerfiles_pass_hadolint():
    for required in ("Dockerfile", "docker/pipeline.Dockerfile"):
        assert (ROOT / required).is_file(), f"{required} is missing"
    passed(lint("dockerfiles"))


def test_hadolint_rejects_a_broken_dockerfile(tmp_path: Path):
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM ubuntu:latest\nMAINTAINER someone\nRUN apt-get install curl\n")
    rejected(lint("dockerfiles", str(broken)), "DL3007", "DL4000")


# ---------------------------------------------------------------- GitHub workflows


@pytest.mark.slow
def test_workflows_pass_github_schema_and_actionlint():
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert {p.name for p in workflows} >= {
        "ci.yml",
        "staging.yml",
        "production.yml",
        "continuous-training.yml",
    }
    passed(lint("workflows"))


@pytest.mark.slow
def test_a_workflow_breaking_the_schema_is_rejected(tmp_path: Path):
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  test:\n    runs_on: ubuntu-latest\n    steps:\n      - run: make test\n"
    )
    rejected(lint("workflows", str(broken)), "Schema validation errors")


@pytest.mark.slow
def test_actionlint_rejects_what_the_schema_allows(tmp_path: Path):
    """Valid for the schema, wrong to actionlint: an undefined property, an untrusted input in a script."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  test:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo ${{ github.no_such_thing }}\n"
        '      - run: echo "${{ github.event.head_commit.message }}"\n'
    )
    rejected(
        lint("workflows", str(broken)), 'property "no_such_thing" is not defined', "potentially untrusted"
    )


def test_workflows_follow_the_branch_model():
    flows = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / ".github" / "workflows").glob("*.yml")}
    triggers = {name: flow[True] for name, flow in flows.items()}  # YAML 1.1 reads the key `on` as True
    assert triggers["staging"]["push"]["branches"] == ["staging"]
    assert triggers["production"]["push"]["branches"] == ["main"]
    assert set(triggers["ci"]["push"]["branches-ignore"]) == {"staging", "main"}
    assert "pull_request" in triggers["ci"] and "workflow_call" in triggers["ci"]
    ct = triggers["continuous-training"]
    assert ct["schedule"] and "workflow_dispatch" in ct
    assert set(ct["push"]["paths"]) == {"dvc.lock", "**/*.dvc"}
    for name, environment in (("staging", "staging"), ("production", "production")):
        jobs = flows[name]["jobs"]
        assert jobs["ci"]["uses"] == "./.github/workflows/ci.yml"
        deploy = jobs[name]
        assert deploy["needs"] == "ci" and deploy["environment"]["name"] == environment
        runs = [step.get("run", "") for step in deploy["steps"]]
        assert any(f"make deploy ENV={name}" in run for run in runs)
        # Least privilege: the pods' Secret gets the read-only serving user; the deploy step sees no S3 key.
        (step,) = [step for step in deploy["steps"] if f"make deploy ENV={name}" in step.get("run", "")]
        assert "secrets.SERVING_MLFLOW_TRACKING_USERNAME" in step["env"]["SERVING_MLFLOW_TRACKING_USERNAME"]
        assert not [key for key in {**deploy["env"], **step["env"]} if key.startswith("AWS_")], name
    staging_runs = "\n".join(step.get("run", "") for step in flows["staging"]["jobs"]["staging"]["steps"])
    assert staging_runs.index("make deploy") < staging_runs.index("make promote")
    images = flows["ci"]["jobs"]["images"]
    assert "refs/heads/dev" in images["env"]["PUSH"] and "pull_request" in images["env"]["PUSH"]
    text = "\n".join(p.read_text() for p in (ROOT / ".github" / "workflows").glob("*.yml"))
    assert "|| true" not in text


# ---------------------------------------------------------------- docker compose


def test_compose_file_is_valid():
    for required in ("docker-compose.yml", ".env.example"):
        assert (ROOT / required).is_file(), f"{required} is missing"
    passed(lint("compose"))


def test_compose_rejects_a_broken_file(tmp_path: Path):
    broken, env_file = tmp_path / "compose.yml", tmp_path / ".env"
    broken.write_text("services:\n  api:\n    image: catdog\n    ports: 8000\n    restart_policy: always\n")
    env_file.write_text("")
    rejected(lint("compose", str(broken), str(env_file)))


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.slow
def test_overlays_render_and_validate_strictly(kubectl: str):
    passed(lint("k8s"))


@pytest.mark.slow
def test_kubernetes_validate_rejects_a_broken_manifest(tmp_path: Path):
    broken = tmp_path / "deployment.yaml"
    broken.write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: catdog\nspec:\n  replicaz: 2\n"
        "  selector: {matchLabels: {app: catdog}}\n  template:\n    metadata: {labels: {app: catdog}}\n"
        "    spec:\n      containers: [{name: api, image: catdog}]\n"
    )
    rejected(lint("validate", str(broken)), "replicaz")


def test_a_kustomization_that_does_not_render_is_rejected(kubectl: str, tmp_path: Path):
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    rejected(lint("k8s", str(tmp_path)))


def test_both_overlays_run_the_same_image_with_their_own_model_alias(rendered):
    images = {overlay: container(docs)["image"] for overlay, docs in rendered.items()}
    assert len(set(images.values())) == 1, images
    for overlay, docs in rendered.items():
        assert config(docs)["MODEL_URI"] == ALIASES[overlay]
    assert config(rendered["staging"])["LOG_LEVEL"] != config(rendered["production"])["LOG_LEVEL"]
    hpas = {overlay: one(docs, "HorizontalPodAutoscaler")["spec"] for overlay, docs in rendered.items()}
    assert hpas["production"]["minReplicas"] > hpas["staging"]["minReplicas"]
    namespaces = {
        overlay: {doc["metadata"].get("namespace") for doc in docs if doc["kind"] != "Namespace"}
        for overlay, docs in rendered.items()
    }
    assert namespaces == {"staging": {"catdog-staging"}, "production": {"catdog-production"}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rollout_probes_and_resources(rendered, overlay):
    deployment = one(rendered[overlay], "Deployment")
    spec = deployment["spec"]
    assert "replicas" not in spec, "the HPA owns the replica count"
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    api = container(rendered[overlay])
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    port_names = {port["name"]: port["containerPort"] for port in api["ports"]}
    assert api["readinessProbe"]["httpGet"]["port"] in port_names
    assert port_names["http"] == int(config(rendered[overlay])["PORT"])
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(api["resources"][kind]), kind
    assert int(config(rendered[overlay])["INFERENCE_THREADS"]) == int(api["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_non_root_read_only_with_writable_tmp_and_model_cache(rendered, overlay):
    pod = one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    api = container(rendered[overlay])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert api["securityContext"]["readOnlyRootFilesystem"] is True
    assert api["securityContext"]["allowPrivilegeEscalation"] is False
    assert api["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    empty_dirs = {volume["name"] for volume in pod["volumes"] if "emptyDir" in volume}
    mounts = {mount["mountPath"]: mount["name"] for mount in api["volumeMounts"]}
    settings = config(rendered[overlay])
    for path in ("/tmp", settings["MODEL_CACHE_DIR"], str(Path(settings["FEEDBACK_DB"]).parent)):
        assert mounts.get(path) in empty_dirs, f"{path} is not a writable emptyDir"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_come_from_the_configmap_and_the_out_of_band_secret(rendered, overlay):
    from api.settings import Settings

    docs = rendered[overlay]
    assert not [doc for doc in docs if doc["kind"] == "Secret"], (
        "secrets are created out of band, never applied"
    )
    sources = container(docs)["envFrom"]
    assert {"configMapRef": {"name": one(docs, "ConfigMap")["metadata"]["name"]}} in sources
    assert {"secretRef": {"name": SERVING_SECRET}} in sources
    fields = set(Settings.model_fields)
    unknown = [key for key in config(docs) if key.lower() not in fields]
    assert not unknown, f"ConfigMap keys that are no setting of api/settings.py: {unknown}"
    examples = secret_examples()
    assert "ADMIN_API_KEY" in examples[SERVING_SECRET]


def secret_examples() -> dict[str, dict[str, str]]:
    path = ROOT / "deploy" / "k8s" / "base" / "secret.example.yaml"
    return {doc["metadata"]["name"]: doc["stringData"] for doc in yaml.safe_load_all(path.read_text()) if doc}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_reference_only_the_read_only_serving_secret(rendered, overlay):
    """Least privilege: the pods hold the registry's serving user and no storage keys; the pipeline's Secret
    (the user that moves @champion, the S3 keys) is referenced by nothing that serves."""
    pod = one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    names = set()
    for item in pod["containers"] + pod.get("initContainers", []):
        names |= {source["secretRef"]["name"] for source in item.get("envFrom", []) if "secretRef" in source}
        names |= {
            env["valueFrom"]["secretKeyRef"]["name"]
            for env in item.get("env", [])
            if "secretKeyRef" in env.get("valueFrom", {})
        }
    names |= {volume["secret"]["secretName"] for volume in pod.get("volumes", []) if "secret" in volume}
    assert names == {SERVING_SECRET}
    examples = secret_examples()
    assert set(examples) == {SERVING_SECRET, PIPELINE_SECRET}
    serving, pipeline = examples[SERVING_SECRET], examples[PIPELINE_SECRET]
    assert not [key for key in serving if key.startswith("AWS_")], "the pods need no S3 keys"
    assert serving["MLFLOW_TRACKING_USERNAME"] != pipeline["MLFLOW_TRACKING_USERNAME"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_hpa_and_pdb_select_the_deployment(rendered, overlay):
    docs = rendered[overlay]
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = one(docs, "PodDisruptionBudget")
    assert (
        pdb["apiVersion"] == "policy/v1" and pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    )
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"


def exposes(rule: dict[str, Any], url_path: str) -> bool:
    """Whether an Ingress path rule routes `url_path` (Kubernetes' Exact and Prefix semantics)."""
    path = rule["path"]
    if rule["pathType"] == "Exact":
        return url_path == path
    prefix = path.rstrip("/")
    return url_path in (path, prefix) or url_path.startswith(prefix + "/")


def test_production_is_https_only_and_keeps_the_admin_routes_private(rendered):
    assert not [doc for doc in rendered["staging"] if doc["kind"] == "Ingress"]
    ingress = one(rendered["production"], "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["cert-manager.io/cluster-issuer"]
    assert annotations["nginx.ingress.kubernetes.io/force-ssl-redirect"] == "true"
    assert not [key for key in annotations if "snippet" in key], "snippets could route around the path rules"
    spec = ingress["spec"]
    (tls,) = spec["tls"]
    assert tls["secretName"]
    service = one(rendered["production"], "Service")["metadata"]["name"]
    rules = []
    for host_rule in spec["rules"]:
        assert host_rule["host"] in tls["hosts"], "every routed host is served with the certificate"
        for rule in host_rule["http"]["paths"]:
            assert rule["backend"]["service"]["name"] == service
            rules.append(rule)
    assert "defaultBackend" not in spec
    for path in PUBLIC_PATHS:
        assert any(exposes(rule, path) for rule in rules), f"{path} should be public"
    for path in PRIVATE_PATHS:
        assert not any(exposes(rule, path) for rule in rules), f"{path} must not be routed publicly"


# ---------------------------------------------------------------- scripts/deploy.sh


def deploy(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DEPLOY), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


@pytest.mark.slow
def test_deploy_renders_the_same_image_tag_for_every_environment(kubectl: str):
    images, host = {}, "cats.example.org"
    for overlay in OVERLAYS:
        result = deploy(
            "--render", overlay, "0123abc", env={"IMAGE": "ghcr.io/me/catdog", "PUBLIC_HOST": host}
        )
        passed(result)
        docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        images[overlay] = container(docs)["image"]
        if overlay == "production":
            ingress = one(docs, "Ingress")["spec"]
            assert [rule["host"] for rule in ingress["rules"]] == [host] and ingress["tls"][0]["hosts"] == [
                host
            ]
    assert images == {"staging": "ghcr.io/me/catdog:0123abc", "production": "ghcr.io/me/catdog:0123abc"}
    bad = deploy("--render", "staging", "bad tag;", env={"IMAGE": "catdog"})
    assert bad.returncode == 2 and "not a valid image tag" in bad.stderr
    assert deploy("--render", "nowhere", "abc", env={"IMAGE": "catdog"}).returncode == 2


FAKE_KUBECTL = """#!/usr/bin/env bash
# A stand-in for kubectl: records every call, renders with the real one, answers the rest as a cluster would.
echo "$*" >> "$FAKE_LOG"
case "$*" in
  kustomize*) exec "$REAL_KUBECTL" "$@" ;;
  *"get secret"*) printf '%b' "${FAKE_SECRET_KEYS:-}" ;;
  *"create namespace"* | *"create secret"*) echo "kind: Secret" ;;
  *annotate*) exit 0 ;;
  *"model-version"*) echo "$FAKE_MODEL_VERSION" ;;
  *"get deployment/catdog"*) echo 7 ;;
  *apply*) cat > /dev/null ;;
  *"rollout status"*) if grep -q "rollout undo" "$FAKE_LOG"; then exit 0; fi; exit "$FAKE_ROLLOUT_STATUS" ;;
  *"rollout undo"*) echo "deployment.apps/catdog rolled back" ;;
  *"get pods"*) printf 'catdog-1 catdog:old 2026-01-01T00:00:00Z\\ncatdog-2 %s \\n' "$FAKE_IMAGE" ;;
  *port-forward*) exit 0 ;;
  *) echo "fake kubectl: unexpected: $*" >&2; exit 99 ;;
esac
"""


class _Recorder(BaseHTTPRequestHandler):
    """/health 200, POST /hook records the alert, POST /admin/reload answers server.admin_status."""

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/hook":
            self.server.alerts.append(json.loads(body))
            self.send_response(204)
        else:
            self.send_response(self.server.admin_status if self.path == "/admin/reload" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.alerts, server.admin_status = [], 404
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_cluster(tmp_path: Path, kubectl: str) -> dict[str, Any]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "kubectl"
    fake.write_text(FAKE_KUBECTL)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "kubectl.log"
    smoke_file = tmp_path / "smoke.txt"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "REAL_KUBECTL": kubectl,
        "FAKE_LOG": str(log),
        "FAKE_IMAGE": "ghcr.io/me/catdog:abc123",
        "FAKE_ROLLOUT_STATUS": "0",
        "FAKE_MODEL_VERSION": "",
        "IMAGE": "ghcr.io/me/catdog",
        "SMOKE_CMD": f"{sys.executable} -c 'import sys; open(sys.argv[1], \"w\").write(sys.argv[2])' "
        f"{smoke_file} {{url}}",
        "SMOKE_PORT": "18999",
    }
    for name in (
        "KUBE_CONTEXT",
        "PUBLIC_HOST",
        "PUBLIC_URL",
        "SYNC_SECRET",
        "ROLLBACK_MODEL",
        "CATDOG_ALERT_URLS",
        "FAKE_SECRET_KEYS",
        "MLFLOW_TRACKING_USERNAME",
        "SERVING_MLFLOW_TRACKING_URI",
        "SERVING_MLFLOW_TRACKING_USERNAME",
        "SERVING_MLFLOW_TRACKING_PASSWORD",
    ):
        env[name] = ""
    return {"env": env, "log": log, "smoke": smoke_file}


def test_deploy_applies_waits_and_smoke_tests_one_new_pod(fake_cluster, http_server):
    url = f"http://127.0.0.1:{http_server.server_port}"
    env = {**fake_cluster["env"], "PUBLIC_URL": url}
    passed(deploy("staging", "abc123", env=env))
    calls = fake_cluster["log"].read_text().splitlines()
    order = [
        next(i for i, call in enumerate(calls) if word in call)
        for word in ("apply", "rollout status", "port-forward")
    ]
    assert order == sorted(order), calls
    assert any("port-forward pod/catdog-2 18999:8000" in call for call in calls), "the pod of the new image"
    assert fake_cluster["smoke"].read_text() == "http://127.0.0.1:18999"
    assert not any("rollout undo" in call for call in calls)
    namespaced = [call for call in calls if not call.startswith(("kustomize", "apply"))]
    assert namespaced and all("--namespace catdog-staging" in call for call in namespaced), calls


def test_a_failed_rollout_is_rolled_back_and_alerted(fake_cluster, http_server):
    hook = f"http://127.0.0.1:{http_server.server_port}/hook"
    env = {**fake_cluster["env"], "FAKE_ROLLOUT_STATUS": "1", "DISCORD_WEBHOOK_URL": hook}
    result = deploy("production", "abc123", env=env)
    assert result.returncode == 1, result.stderr
    calls = fake_cluster["log"].read_text()
    assert "rollout undo deployment/catdog --to-revision=7" in calls
    assert not fake_cluster["smoke"].exists()
    (alert,) = http_server.alerts
    assert "failed" in alert["content"] and "rolled back to revision 7" in alert["content"]


def test_an_exposed_admin_route_fails_the_deploy_and_rolls_back(fake_cluster, http_server):
    http_server.admin_status = 401  # the service itself answered: the Ingress routed /admin
    env = {**fake_cluster["env"], "PUBLIC_URL": f"http://127.0.0.1:{http_server.server_port}"}
    result = deploy("production", "abc123", env=env)
    assert result.returncode == 1 and "admin routes must not be public" in result.stderr
    assert "rollout undo deployment/catdog --to-revision=7" in fake_cluster["log"].read_text()


def test_a_missing_secret_stops_before_anything_is_applied(fake_cluster):
    fake = Path(fake_cluster["env"]["PATH"].split(os.pathsep)[0]) / "kubectl"
    fake.write_text(fake.read_text().replace('*"get secret"*) printf', '*"get secret"*) exit 1; printf'))
    result = deploy("staging", "abc123", env=fake_cluster["env"])
    assert result.returncode == 2 and f"secret/{SERVING_SECRET} is missing" in result.stderr
    assert "apply" not in fake_cluster["log"].read_text()


def registry_with_two_promotions(root: Path) -> str:
    """A SQLite registry (this repo's params.yaml) where versions 1 and 2 passed the gates and were promoted
    in turn: @champion 2. Returns its tracking URI."""
    from catdog import tracking
    from catdog.config import Project
    from catdog.registry import moves
    from catdog.registry.gates import GateResult
    from catdog.registry.lease import Lease
    from catdog.registry.promotion import _record_gates, open_registry

    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    (root / "model.txt").write_text("placeholder")
    project = Project(root)
    registry = open_registry(project)
    for version in ("1", "2"):
        with tracking.store(registry.tracking_uri) as mlflow, mlflow.start_run():
            mlflow.log_artifact(str(root / "model.txt"), "model")
            registry.register(mlflow.get_artifact_uri("model"), None, {})
        report = {"passed": True, "checked_at": "2026-01-01T00:00:00+00:00"}
        _record_gates(registry, registry.version(version), [GateResult("metrics", True, "")], report)
        with Lease(registry, "promote", settle=0) as lease:
            before = "1" if version == "2" else None
            moves.commit(project, registry, lease, moves.Move.new("promote", before, version, "gates passed"))
    return registry.tracking_uri


@pytest.mark.slow
def test_a_failed_deploy_rolls_back_only_the_model_it_moved(fake_cluster, tmp_path, monkeypatch):
    from catdog.config import Project
    from catdog.registry.promotion import open_registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = registry_with_two_promotions(tmp_path / "registry")
    registry = open_registry(Project(tmp_path / "registry"))
    env = {**fake_cluster["env"], "ROLLBACK_MODEL": "1", "MLFLOW_TRACKING_URI": uri}
    env["FAKE_ROLLOUT_STATUS"] = "1"
    # 1. the last good deploy ran version 1, this one brings @champion 2 and fails: 2 is rolled back
    first = deploy("production", "abc123", env={**env, "FAKE_MODEL_VERSION": "1"}, timeout=600)
    assert first.returncode == 1 and "@champion 2 rolled back" in first.stdout, first.stdout + first.stderr
    assert registry.by_alias("champion").version == "1"
    assert registry.version("2").tags["rolled_back"] == "true"
    # 2. a second failing deploy runs the model the last good deploy ran: the model is left alone (it used to
    # toggle back to the bad version 2)
    log = tmp_path / "second.log"
    second = deploy(
        "production", "abc123", env={**env, "FAKE_MODEL_VERSION": "1", "FAKE_LOG": str(log)}, timeout=600
    )
    assert second.returncode == 1 and "@champion 1 left alone" in second.stdout, second.stdout + second.stderr
    assert registry.by_alias("champion").version == "1"
    # 3. a good deploy records the model it ran on the Deployment
    log = tmp_path / "third.log"
    third = deploy(
        "production", "abc123", env={**env, "FAKE_ROLLOUT_STATUS": "0", "FAKE_LOG": str(log)}, timeout=600
    )
    assert third.returncode == 0, third.stderr
    assert "annotate deployment/catdog catdog/model-version=1 --overwrite" in log.read_text()


def test_a_serving_secret_holding_storage_keys_stops_the_deploy(fake_cluster):
    env = {
        **fake_cluster["env"],
        "FAKE_SECRET_KEYS": "ADMIN_API_KEY\\nAWS_SECRET_ACCESS_KEY\\nMLFLOW_TRACKING_URI\\n",
    }
    result = deploy("staging", "abc123", env=env)
    assert result.returncode == 2 and "holds storage credentials (AWS_SECRET_ACCESS_KEY" in result.stderr
    assert "apply" not in fake_cluster["log"].read_text()


PIPELINE_IDENTITY = {
    "SYNC_SECRET": "1",
    "MLFLOW_TRACKING_URI": "http://mlflow.example:5000",
    "MLFLOW_TRACKING_USERNAME": "pipeline",
    "MLFLOW_TRACKING_PASSWORD": "pipeline-secret",
    "AWS_ACCESS_KEY_ID": "pipeline-s3-id",
    "AWS_SECRET_ACCESS_KEY": "pipeline-s3-secret",
    "ADMIN_API_KEY": "admin-key",
}


def test_the_synced_secret_holds_the_serving_user_never_the_pipelines(fake_cluster):
    env = {
        **fake_cluster["env"],
        **PIPELINE_IDENTITY,
        "SERVING_MLFLOW_TRACKING_USERNAME": "serving",
        "SERVING_MLFLOW_TRACKING_PASSWORD": "serving-secret",
    }
    passed(deploy("staging", "abc123", env=env))
    (created,) = [call for call in fake_cluster["log"].read_text().splitlines() if "create secret" in call]
    assert f"generic {SERVING_SECRET} " in created
    for literal in (
        "MLFLOW_TRACKING_USERNAME=serving",
        "MLFLOW_TRACKING_PASSWORD=serving-secret",
        "MLFLOW_TRACKING_URI=http://mlflow.example:5000",
        "ADMIN_API_KEY=admin-key",
    ):
        assert f"--from-literal={literal}" in created, created
    for leaked in ("pipeline-secret", "pipeline-s3", "AWS_", "=pipeline "):
        assert leaked not in created + " ", f"{leaked} in the pods' Secret: {created}"


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        ({}, "SERVING_MLFLOW_TRACKING_USERNAME is unset"),
        ({"SERVING_MLFLOW_TRACKING_USERNAME": "pipeline"}, "is the pipeline's user"),
    ],
)
def test_syncing_the_pipelines_identity_into_the_pods_is_refused(fake_cluster, serving, message):
    env = {**fake_cluster["env"], **PIPELINE_IDENTITY, "SERVING_MLFLOW_TRACKING_PASSWORD": "x", **serving}
    env.setdefault("SERVING_MLFLOW_TRACKING_USERNAME", "")
    result = deploy("staging", "abc123", env=env)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    log = fake_cluster["log"].read_text() if fake_cluster["log"].exists() else ""
    assert "create secret" not in log and "apply" not in log
