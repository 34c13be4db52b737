"""The monitoring configuration (monitoring/): the Prometheus scrape config and alert rules checked and
unit-tested by the real promtool, alert and dashboard expressions using only metrics the service exports,
the Grafana provisioning consistent, and a real Prometheus scraping a real running service with the rules
loaded.

promtool and prometheus come from Debian's `prometheus` package; `make test` installs it
(scripts/install_prometheus.sh).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
MONITORING = REPO_ROOT / "monitoring"
PROMETHEUS_DIR = MONITORING / "prometheus"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
ALERTS_YML = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST_YML = PROMETHEUS_DIR / "alerts_test.yml"
GRAFANA = MONITORING / "grafana"
DATASOURCES_YML = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS_YML = GRAFANA / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARD_JSON = GRAFANA / "dashboards" / "catdog.json"
RUNBOOK = REPO_ROOT / "docs" / "runbook.md"

JOB = "catdog-api"
# Every metric the service exports (api/metrics.py), by the names Prometheus stores.
SERVICE_METRICS = {
    "catdog_http_requests_total",
    "catdog_http_request_duration_seconds_bucket",
    "catdog_http_request_duration_seconds_count",
    "catdog_http_request_duration_seconds_sum",
    "catdog_http_requests_in_flight",
    "catdog_predictions_total",
    "catdog_prediction_confidence_bucket",
    "catdog_prediction_confidence_count",
    "catdog_prediction_confidence_sum",
    "catdog_rejected_images_total",
    "catdog_inference_batch_size_bucket",
    "catdog_inference_batch_size_count",
    "catdog_inference_batch_size_sum",
    "catdog_inference_duration_seconds_bucket",
    "catdog_inference_duration_seconds_count",
    "catdog_inference_duration_seconds_sum",
    "catdog_inference_queue_images",
    "catdog_model_info",
    "catdog_model_ready",
    "catdog_model_reloads_total",
    "catdog_drift_score",
    "catdog_drift_detected",
    "catdog_drift_window_images",
    "catdog_live_accuracy",
    "catdog_live_accuracy_window",
    "catdog_feedback_total",
}
PROMETHEUS_METRICS = {"up"}  # written by Prometheus itself for every target
# What the dashboard must show (the monitoring issue's list).
DASHBOARD_MUST_USE = {
    "catdog_http_requests_total",
    "catdog_http_request_duration_seconds_bucket",
    "catdog_predictions_total",
    "catdog_prediction_confidence_bucket",
    "catdog_drift_score",
    "catdog_live_accuracy",
    "catdog_model_info",
    "catdog_model_ready",
    "catdog_inference_queue_images",
    "catdog_inference_batch_size_bucket",
}
EXPECTED_ALERTS = {
    "CatdogApiDown",
    "CatdogModelNotReady",
    "CatdogHigh5xxRate",
    "CatdogHighPredictLatency",
    "CatdogDataDrift",
    "CatdogLiveAccuracyLow",
    "CatdogNoPredictions",
    "CatdogModelReloadFailed",
}

INSTALL_HINT = (
    "`make test` installs it (scripts/install_prometheus.sh: Debian's `prometheus` package, which provides "
    "promtool and prometheus); or run `scripts/install_prometheus.sh` / `apt-get install prometheus` yourself"
)


def tool(name: str) -> str:
    """The path of promtool or prometheus; the test fails (not skips) with how to install it when missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: {INSTALL_HINT}", pytrace=False)
    return path


def run_tool(*args: str | Path, cwd: Path = PROMETHEUS_DIR) -> str:
    result = subprocess.run(
        [str(arg) for arg in args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed ({result.returncode}):\n{output}"
    return output


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS_YML.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_JSON.read_text())


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Panels with those nested in (collapsed) rows."""
    found = []
    for panel in panels:
        found.append(panel)
        found += all_panels(panel.get("panels", []))
    return found


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets, annotations, template variable queries."""
    exprs = [
        target["expr"]
        for panel in all_panels(board["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    exprs += [note["expr"] for note in board.get("annotations", {}).get("list", []) if note.get("expr")]
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if variable.get("type") == "query" and query:
            exprs.append(query)
    return exprs


GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\s*\)\s*$", re.S)


def as_promql(expr: str) -> str:
    """A Grafana expression as plain PromQL: template variables replaced, label_values() by its selector."""
    match = LABEL_VALUES.match(expr)
    if match:
        expr = match["selector"] or "up"
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


PROMQL_KEYWORDS = {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are no function, keyword, label,
    string, duration or number."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"' r"|'(?:[^'\\]|\\.)*'", '""', as_promql(expr))
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.])[a-zA-Z_:][\w:]*(?![\w:])", text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group().lower() in PROMQL_KEYWORDS:
            continue
        names.add(match.group())
    return names


def registry_metric_names() -> set[str]:
    """The series names the service's own registry (api.metrics.ServiceMetrics) exports, by metric type."""
    from api.metrics import ServiceMetrics

    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("_count", "_sum"),
        "info": ("_info",),
        "gauge": ("",),
    }
    return {
        family.name + suffix
        for family in ServiceMetrics().registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


# ------------------------------------------------------------------------------------------- promtool


def test_promtool_check_config():
    output = run_tool(tool("promtool"), "check", "config", PROMETHEUS_YML)
    assert "SUCCESS" in output


def test_promtool_check_rules():
    output = run_tool(tool("promtool"), "check", "rules", ALERTS_YML)
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_promtool_unit_tests_of_the_alerts():
    output = run_tool(tool("promtool"), "test", "rules", ALERTS_TEST_YML)
    assert "SUCCESS" in output and "FAILED" not in output


# ------------------------------------------------------------------------------------------- configuration


def test_scrape_config_has_production_and_staging_targets():
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {
        target: group.get("labels", {}).get("environment")
        for group in job["static_configs"]
        for target in group["targets"]
    }
    assert targets == {"api:8000": "production", "api-staging:8000": "staging"}


def test_every_alert_is_complete_and_unit_tested():
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert sorted(names) == sorted(EXPECTED_ALERTS)
    tests = yaml.safe_load(ALERTS_TEST_YML.read_text())
    cases = [case for test in tests["tests"] for case in test.get("alert_rule_test", [])]
    anchors = {
        github_anchor(line.lstrip("#")) for line in RUNBOOK.read_text().splitlines() if line.startswith("#")
    }
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations.get("summary") and annotations.get("description"), name
        url = annotations["runbook_url"]
        assert re.fullmatch(r"(.*/)?docs/runbook\.md#[\w-]+", url), f"{name}: {url}"
        assert url.split("#")[1] == name.lower() and name.lower() in anchors, f"{name}: no section for {url}"
        own = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in own), f"{name}: no test where it fires"
        assert any(not case.get("exp_alerts") for case in own), f"{name}: no test where it stays quiet"


def test_documented_metrics_are_the_ones_the_service_exports():
    """The list above (and so the alert rules and the dashboard) tracks api/metrics.py."""
    exported = registry_metric_names()
    assert exported >= SERVICE_METRICS, (
        f"not exported by api.metrics.ServiceMetrics: {SERVICE_METRICS - exported}"
    )


def test_alerts_and_dashboard_use_only_exported_metrics():
    known = SERVICE_METRICS | PROMETHEUS_METRICS
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        used[f"alert {rule['alert']}"] = metric_names(rule["expr"]) | set(
            re.findall(r"\bcatdog_\w+", " ".join(rule["annotations"].values()))
        )
    for expr in dashboard_exprs(dashboard()):
        used[f"dashboard {expr[:80]}"] = metric_names(expr)
    unknown = {where: names - known for where, names in used.items() if names - known}
    assert not unknown, f"metric names the service does not export: {unknown}"
    assert all(used.values()), [where for where, names in used.items() if not names]
    dashboard_names = set().union(*(names for where, names in used.items() if where.startswith("dashboard")))
    assert dashboard_names >= DASHBOARD_MUST_USE, DASHBOARD_MUST_USE - dashboard_names


def test_metric_name_parser():
    expr = (
        "histogram_quantile(0.95, sum by (environment, le) (rate(catdog_http_request_duration_seconds_bucket"
        '{job="catdog-api", route=~"/predict.*", environment=~"$environment"}[$__rate_interval]))) > 0.5 '
        "and on (job) catdog_model_ready offset 15m == 1 unless up"
    )
    assert metric_names(expr) == {"catdog_http_request_duration_seconds_bucket", "catdog_model_ready", "up"}
    assert metric_names('label_values(up{job="catdog-api"}, environment)') == {"up"}


def test_dashboard_exprs_are_valid_promql(tmp_path: Path):
    """promtool parses every dashboard expression (Grafana variables replaced) as a recording rule."""
    exprs = dashboard_exprs(dashboard())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": as_promql(e)} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    output = run_tool(tool("promtool"), "check", "rules", path, cwd=tmp_path)
    assert f"SUCCESS: {len(exprs)} rules found" in output


def test_dashboard_structure_and_datasource():
    datasources = yaml.safe_load(DATASOURCES_YML.read_text())["datasources"]
    (prometheus,) = [source for source in datasources if source["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090"
    uid = prometheus["uid"]
    providers = yaml.safe_load(DASHBOARD_PROVIDERS_YML.read_text())["providers"]
    assert any(provider["type"] == "file" and provider["options"]["path"] for provider in providers)

    board = dashboard()
    assert board["uid"] and board["title"]
    panels = all_panels(board["panels"])
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert "environment" in variables
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == uid, variable["name"]
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panel {panel['id']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
            # templated by environment: every query is restricted to the chosen one
            assert 'environment=~"$environment"' in target["expr"], f"{panel['title']}: {target['expr']}"
    for note in board["annotations"]["list"]:
        if note.get("expr"):
            assert note["datasource"]["uid"] == uid


# ------------------------------------------------------------------------------------------- live Prometheus


def tiny_model(folder: Path) -> Path:
    """A real exported-model-shaped ONNX file (input `image`, output `probabilities`, labels and
    preprocessing metadata): mean colour -> linear -> softmax on 32x32 pixels, so the service starts in
    seconds."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from catdog.preprocessing import PreprocessConfig

    weights = numpy_helper.from_array(np.array([[1, -1], [0, 0], [-1, 1]], np.float32), "weights")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(
        model,
        {
            "labels": json.dumps(["cat", "dog"]),
            "preprocessing": PreprocessConfig(size=32).to_json(),
            "model_name": "tiny-monitoring-test",
        },
    )
    onnx.checker.check_model(model)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


def jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def wait_for(check, timeout: float, what: str):
    """Poll `check()` until it returns something truthy; fail with `what` and the last value otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    pytest.fail(f"{what} after {timeout}s; last: {last}")


@pytest.mark.slow
def test_real_prometheus_scrapes_the_service_and_loads_the_rules(tmp_path: Path, server_factory):
    from service_process import free_port

    promtool, prometheus = tool("promtool"), tool("prometheus")
    server = server_factory(
        tiny_model(tmp_path),
        MODEL_PRECISION="fp32",
        MODEL_POLL_SECONDS="0",
        FEEDBACK_DB=str(tmp_path / "feedback.db"),
    )
    with server.client() as client:
        for _ in range(3):
            answer = client.post("/predict", files={"file": ("photo.jpg", jpeg(), "image/jpeg")})
            assert answer.status_code == 200, answer.text
        version = client.get("/model").json()["version"]

    # The real configuration (job, labels, rules) pointed at the test's service, scraped every second.
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS_YML)]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    production = next(g for g in job["static_configs"] if g["labels"]["environment"] == "production")
    production["targets"] = [server.url.removeprefix("http://")]
    job["static_configs"] = [production]
    config["scrape_configs"] = [job]
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    run_tool(promtool, "check", "config", config_file, cwd=tmp_path)

    port = free_port()
    api = f"http://127.0.0.1:{port}"
    log = tmp_path / "prometheus.log"
    with log.open("w") as handle:
        process = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            cwd=tmp_path,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:

        def query(promql: str) -> list[dict[str, Any]]:
            answer = httpx.get(f"{api}/api/v1/query", params={"query": promql}, timeout=5).json()
            assert answer["status"] == "success", answer
            return answer["data"]["result"]

        def started() -> bool:
            assert process.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
            return httpx.get(f"{api}/-/ready", timeout=2).status_code == 200

        wait_for(started, 20, "prometheus not ready")
        (up,) = wait_for(lambda: query(f'up{{job="{JOB}"}} == 1'), 20, "the service's target not up")
        assert up["metric"]["environment"] == "production"
        assert up["metric"]["instance"] == server.url.removeprefix("http://")

        ready = query(f'catdog_model_ready{{job="{JOB}", environment="production"}}')
        assert [sample["value"][1] for sample in ready] == ["1"]
        (info,) = query(f'catdog_model_info{{job="{JOB}"}}')
        assert info["metric"]["version"] == version and info["metric"]["name"] == "tiny-monitoring-test"
        predicted = query(f'sum(catdog_predictions_total{{job="{JOB}"}})')
        assert float(predicted[0]["value"][1]) == 3

        def rules_evaluated() -> list[dict[str, Any]] | None:
            groups = httpx.get(f"{api}/api/v1/rules", timeout=5).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            never = "0001-01-01T00:00:00Z"  # Go's zero time: not evaluated yet
            evaluated = rules and all(rule.get("lastEvaluation", never) != never for rule in rules)
            return rules if evaluated else None

        rules = wait_for(rules_evaluated, 20, "alert rules not loaded and evaluated")
        assert {rule["name"] for rule in rules} == EXPECTED_ALERTS
        assert all(rule["type"] == "alerting" for rule in rules)
        assert {rule["name"]: rule["health"] for rule in rules} == dict.fromkeys(EXPECTED_ALERTS, "ok")
        firing = [rule["name"] for rule in rules if rule["state"] == "firing"]
        assert not firing, f"alerts firing against a healthy service: {firing}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
