"""Register a pipeline run's model, promote the challenger through the gates, roll back: the alias moves.

Promote and rollback hold the registry's lease (lease.py) and move @champion through the journaled, crash-safe
sequence of moves.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catdog import tracking
from catdog.config import CLASSES, Project
from catdog.errors import CatdogError, QualityGateError
from catdog.registry import CHALLENGER, CHAMPION, audit, moves
from catdog.registry.lease import Lease
from catdog.registry.store import Registry

if TYPE_CHECKING:
    from catdog.registry import gates

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
    # Imported here: torch, timm and onnxruntime load slowly, and rollback or audit need none of them.
    from catdog import export, smoke
    from catdog.registry import gates
    from catdog.stages.prepare import load_split

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
    """Gate the challenger (or `version`); all passed -> champion moves to it, under the registry's lease."""
    registry = open_registry(project)
    if version is None and registry.by_alias(CHALLENGER) is None:
        raise CatdogError(
            f"{registry.name} has no @{CHALLENGER}: run the pipeline (its register stage) first"
        )
    with Lease(registry, "promote") as lease:
        moves.recover(project, registry, lease)
        return _promote(project, registry, lease, version)


def _promote(project: Project, registry: Registry, lease: Lease, version: str | None) -> dict[str, Any]:
    challenger = registry.version(version) if version else registry.by_alias(CHALLENGER)
    if challenger is None:
        raise CatdogError(
            f"{registry.name} has no @{CHALLENGER}: run the pipeline (its register stage) first"
        )
    if version is None and moves.rolled_back(challenger):
        # The scheduled flow promotes @challenger again and again: a version once rolled back from must not
        # come back that way, only when someone names it (and it passes the gates again).
        raise QualityGateError(
            f"promotion of {registry.name} version {challenger.version} refused: it was rolled back "
            f"({challenger.tags.get('rolled_back.at', '?')}: "
            f"{challenger.tags.get('rolled_back.reason', '')}); "
            f"register a new version, or name it (--version {challenger.version}) to gate it again"
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
    lease.check()
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
    reason = "all gates passed: " + "; ".join(f"{r.name} {r.status}" for r in results)
    move = moves.Move.new("promote", champion.version if champion else None, challenger.version, reason)
    moves.commit(project, registry, lease, move, report)
    return report


def rollback(
    project: Project,
    to_version: str | None = None,
    reason: str | None = None,
    expect_champion: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """@champion back to the newest older version that passed the gates and was never rolled back from (or
    to `to_version`); the version left is marked rolled_back, so no later rollback or scheduled promotion
    brings it back. `expect_champion`: refuse unless @champion is that version (a deploy rolling back only
    what it shipped)."""
    registry = open_registry(project)
    if dry_run:
        return _rollback(project, registry, None, to_version, reason, expect_champion)
    with Lease(registry, "rollback") as lease:
        moves.recover(project, registry, lease)
        return _rollback(project, registry, lease, to_version, reason, expect_champion)


def _rollback(
    project: Project,
    registry: Registry,
    lease: Lease | None,
    to_version: str | None,
    reason: str | None,
    expect_champion: str | None,
) -> dict[str, Any]:
    current = registry.by_alias(CHAMPION)
    if current is None:
        raise CatdogError(f"{registry.name} has no @{CHAMPION}: nothing to roll back")
    if expect_champion is not None and str(expect_champion) != current.version:
        raise CatdogError(
            f"{registry.name} @{CHAMPION} is version {current.version}, not {expect_champion}: it moved "
            f"since (another rollback or a promotion), so this rollback is not made"
        )
    if to_version:
        target = registry.version(to_version)
        if target.version == current.version:
            raise CatdogError(f"{registry.name} version {target.version} is already @{CHAMPION}")
        if moves.rolled_back(target):
            raise CatdogError(
                f"{registry.name} version {target.version} was rolled back from "
                f"({target.tags.get('rolled_back.reason', '')}): promote it (--version {target.version}) "
                f"to gate it again"
            )
        if not moves.gates_passed(target, moves.promoted_versions(project, registry)):
            raise CatdogError(
                f"{registry.name} version {target.version} never passed the promotion gates: promote it "
                f"(catdog promote --version {target.version}) instead"
            )
    else:
        target = moves.rollback_target(project, registry, current.version)
        if target is None:
            raise CatdogError(
                f"{registry.name} has no version older than @{CHAMPION} {current.version} that passed the "
                f"gates and was not rolled back from: name one (--to N) or promote one"
            )
    why = reason or "manual rollback"
    answer = {"name": registry.name, "from": current.version, "to": target.version, "reason": why}
    if lease is None:
        print(f"rollback (dry run): {registry.name} @{CHAMPION} {current.version} -> {target.version}")
        return answer
    moves.commit(project, registry, lease, moves.Move.new("rollback", current.version, target.version, why))
    return answer
