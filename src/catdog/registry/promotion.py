"""Register a pipeline run's model, promote the challenger through the gates, roll back: the alias moves."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from catdog import export, smoke, tracking
from catdog.config import CLASSES, Project
from catdog.errors import CatdogError, QualityGateError
from catdog.registry import CHALLENGER, CHAMPION, PREVIOUS, audit, gates
from catdog.registry.store import Registry
from catdog.stages.prepare import load_split

log = logging.getLogger(__name__)
METRIC_TAGS = ("accuracy", "f1", "precision", "recall", "roc_auc", "log_loss", "ece")


def open_registry(project: Project) -> Registry:
    """The project's registered model in the store of $MLFLOW_TRACKING_URI (default: sqlite:///mlflow.db)."""
    return Registry(tracking.tracking_uri(project), project.params.registry.model_name)


def params_hash(project: Project) -> str:
    """A stable digest of every pipeline parameter."""
    params = project.params.model_dump(by_alias=True, mode="json")
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CatdogError(f"{path} not found: {what}")
    return json.loads(path.read_text())


def register(project: Project) -> dict[str, Any]:
    """A new registered version of this run's exported model, tagged with its lineage; alias challenger."""
    paths = project.paths
    evaluation = _read_json(paths.evaluate_metrics, "run the evaluate stage first")
    if not evaluation.get("passed"):
        raise QualityGateError(
            f"the evaluation did not pass ({paths.evaluate_metrics}): not registering the model"
        )
    run_info = _read_json(paths.run_info, "run the train stage first")
    registry = open_registry(project)
    run = registry.client.get_run(run_info["run_id"])
    model_uri = run.data.tags.get("model_uri")
    if not model_uri:
        raise CatdogError(
            f"MLflow run {run_info['run_id']} has no logged ONNX model: run the export stage first"
        )
    lineage = tracking.lineage_tags(project)
    link = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    if registry.tracking_uri.startswith("http"):
        link = registry.tracking_uri.rstrip("/") + "/" + link
    tags = {
        "git_commit": lineage["git_commit"],
        "git_dirty": lineage["git_dirty"],
        "data_version": lineage["data_version"],
        "params_hash": params_hash(project),
        "architecture": lineage["model_name"],
        "run_id": run.info.run_id,
        "run_link": link,
        **{
            f"test.{name}": f"{evaluation['test'][name]:.6f}"
            for name in METRIC_TAGS
            if name in evaluation["test"]
        },
    }
    before = registry.by_alias(CHALLENGER)
    version = registry.register(model_uri, run.info.run_id, tags)
    registry.set_alias(CHALLENGER, version.version)
    audit.record(
        project,
        registry,
        "register",
        CHALLENGER,
        before.version if before else None,
        version.version,
        f"pipeline run {run.info.run_id} passed evaluation",
    )
    info = {
        "name": registry.name,
        "version": str(version.version),
        "alias": CHALLENGER,
        "model_uri": registry.uri(version.version),
        "source": model_uri,
        "run_id": run.info.run_id,
        "tracking_uri": registry.tracking_uri,
    }
    paths.registry_info.parent.mkdir(parents=True, exist_ok=True)
    paths.registry_info.write_text(json.dumps(info, indent=2) + "\n")
    print(f"register: {registry.name} version {version.version} <- {model_uri} (alias {CHALLENGER})")
    return info


def run_gates(
    project: Project, registry: Registry, challenger: Any, champion: Any | None
) -> list[gates.GateResult]:
    """All five gates on the challenger (each runs, whatever the others found)."""
    params = project.params.registry.gates
    paths = project.paths
    test_paths, y = load_split(paths.processed, "test", list(CLASSES))
    with tempfile.TemporaryDirectory(prefix="catdog-promote-") as tmp:
        candidate = gates.OnnxModel.load(registry.download(challenger.version, Path(tmp) / "challenger"))
        found = gates.evaluate(candidate, test_paths, y)
        reference = None
        if champion is not None:
            incumbent = gates.OnnxModel.load(registry.download(champion.version, Path(tmp) / "champion"))
            reference = gates.evaluate(incumbent, test_paths, y)
        inputs = export.load_inputs(test_paths[:8], candidate.config)
        results = [
            gates.metrics_gate(found, params),
            gates.regression_gate(found, reference, champion.version if champion else None, params),
            gates.schema_gate(candidate),
            gates.latency_gate(candidate, inputs, params),
        ]
    cases = smoke.confident_cases(
        paths.evaluate_reports / "predictions.csv",
        paths.processed,
        params.smoke_images_per_class,
        params.smoke_min_confidence,
    )
    results.append(
        gates.smoke_gate(
            registry.alias_uri(CHALLENGER),
            str(challenger.version),
            registry.tracking_uri,
            cases,
            params.smoke_timeout_seconds,
            paths.reports / "staging_service.log",
        )
    )
    return results


def _record_gates(registry: Registry, version: Any, results: list[gates.GateResult], report: dict) -> None:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    tags = {f"gate.{r.name}": r.status for r in results}
    tags |= {f"gate.{r.name}.detail": r.detail[:4900] for r in results}
    tags |= {"promotion.passed": str(report["passed"]).lower(), "promotion.checked_at": report["checked_at"]}
    registry.set_tags(version.version, tags)
    registry.log_json(version, report, f"promotion/v{version.version}-{stamp}.json")


def promote(project: Project, version: str | None = None) -> dict[str, Any]:
    """Gate the challenger (or `version`); all passed -> champion moves to it, the old one to previous."""
    registry = open_registry(project)
    challenger = registry.version(version) if version else registry.by_alias(CHALLENGER)
    if challenger is None:
        raise CatdogError(
            f"{registry.name} has no @{CHALLENGER}: run the pipeline (its register stage) first"
        )
    if version and str(version) != (getattr(registry.by_alias(CHALLENGER), "version", None)):
        registry.set_alias(CHALLENGER, challenger.version)
    champion = registry.by_alias(CHAMPION)
    if champion is not None and champion.version == challenger.version:
        print(f"promote: {registry.name} version {challenger.version} is already @{CHAMPION}")
        return {
            "name": registry.name,
            "version": challenger.version,
            "passed": True,
            "moved": False,
            "gates": [],
        }
    started = time.perf_counter()
    results = run_gates(project, registry, challenger, champion)
    passed = all(result.passed for result in results)
    report = {
        "name": registry.name,
        "version": str(challenger.version),
        "champion_before": champion.version if champion else None,
        "passed": passed,
        "moved": passed,
        "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "gates": [result.as_dict() for result in results],
    }
    _record_gates(registry, challenger, results, report)
    project.paths.promotion_report.parent.mkdir(parents=True, exist_ok=True)
    project.paths.promotion_report.write_text(json.dumps(report, indent=2) + "\n")
    for result in results:
        print(f"  {result.status:<7} {result.name:<14} {result.detail}")
    if not passed:
        failed = "; ".join(f"{r.name}: {r.detail}" for r in results if not r.passed)
        raise QualityGateError(
            f"promotion of {registry.name} version {challenger.version} refused, @{CHAMPION} unchanged "
            f"({champion.version if champion else 'none'}): {failed}; see {project.paths.promotion_report}"
        )
    move(
        project,
        registry,
        challenger.version,
        "promote",
        "all gates passed: " + "; ".join(f"{r.name} {r.status}" for r in results),
        report,
    )
    return report


def move(
    project: Project, registry: Registry, target: str, event: str, reason: str, details: dict | None
) -> None:
    """Point champion at `target`, keep the former champion as previous, and audit both moves."""
    current = registry.by_alias(CHAMPION)
    if current is not None:
        registry.set_alias(PREVIOUS, current.version)
    registry.set_alias(CHAMPION, target)
    audit.record(
        project, registry, event, CHAMPION, current.version if current else None, str(target), reason, details
    )
    print(f"{event}: {registry.name} @{CHAMPION} {current.version if current else '-'} -> {target}")


def rollback(project: Project, to_version: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """champion back to previous (or to `to_version`); the version it leaves becomes previous."""
    registry = open_registry(project)
    current = registry.by_alias(CHAMPION)
    if current is None:
        raise CatdogError(f"{registry.name} has no @{CHAMPION}: nothing to roll back")
    target = registry.version(to_version) if to_version else registry.by_alias(PREVIOUS)
    if target is None:
        raise CatdogError(f"{registry.name} has no @{PREVIOUS}: name the version to roll back to (--to N)")
    if target.version == current.version:
        raise CatdogError(f"{registry.name} version {target.version} is already @{CHAMPION}")
    why = reason or "manual rollback"
    move(project, registry, target.version, "rollback", why, None)
    return {"name": registry.name, "from": current.version, "to": target.version, "reason": why}
