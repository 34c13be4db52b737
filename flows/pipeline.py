"""The Prefect flow `catdog-pipeline`: every DVC stage as a task (skipped when DVC says it is up to date),
then the promotion gates; retries for transient failures only, per-stage timeouts, and alerts.

Run it with `make flow` (Prefect's ephemeral local API, nothing to set up) or against a Prefect server by
setting PREFECT_API_URL; `python -m flows --help` lists the options.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.logging.loggers import flow_run_logger
from prefect.states import Completed, State

from catdog.config import Project, find_root
from catdog.errors import CatdogError
from flows import alerts, dvc_stages, overrides

PROMOTE = "promote"
DATA_SOURCE_ENV = "DATA_SOURCE"


def _retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: a failed gate or a configuration/input error is not retried."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, dvc_stages.StageFailed):
        return error.retryable
    return not isinstance(error, CatdogError)


def _env(source: str | None) -> dict[str, str]:
    return dvc_stages.command_env({DATA_SOURCE_ENV: source} if source else None)


@task(name="params", task_run_name="params", cache_policy=NO_CACHE, persist_result=False)
def apply_params(root: str, params: dict[str, Any]) -> dict[str, list[Any]]:
    """Write the run's parameter overrides into params.yaml (as `dvc exp run -S` does) and validate it."""
    log = get_run_logger()
    try:
        changed = overrides.apply(Path(root), params)
        Project(Path(root)).params  # noqa: B018 - an invalid params.yaml fails here, before any stage
    except CatdogError as exc:
        raise dvc_stages.StageFailed("params", exc.exit_code, [f"error: {exc}"]) from exc
    for key, (old, new) in changed.items():
        log.info("params.yaml: %s = %r (was %r)", key, new, old)
    if not changed:
        log.info("params.yaml: no overrides")
    return {key: list(pair) for key, pair in changed.items()}


@task(cache_policy=NO_CACHE, persist_result=False)
def run_stage(root: str, stage: str, source: str | None, timeout_seconds: float) -> Any:
    """One DVC stage, `dvc repro --single-item <stage>`: shown as Skipped when DVC found it up to date."""
    log = get_run_logger()
    started = time.monotonic()
    output = dvc_stages.run_command(
        stage, dvc_stages.repro_command(stage), Path(root), _env(source), timeout_seconds, log
    )
    if dvc_stages.skipped(stage, output):
        message = f"DVC: stage '{stage}' is up to date, skipped"
        return Completed(name="Skipped", message=message, data={"stage": stage, "skipped": True})
    seconds = round(time.monotonic() - started, 1)
    log.info("stage '%s' done in %.1f s", stage, seconds)
    return {"stage": stage, "skipped": False, "seconds": seconds}


@task(name=PROMOTE, task_run_name=PROMOTE, cache_policy=NO_CACHE, persist_result=False)
def run_promote(root: str, timeout_seconds: float) -> dict[str, Any]:
    """`python -m catdog promote`: the gates move @champion to the challenger, or refuse (not retried)."""
    import sys

    log = get_run_logger()
    command = [sys.executable, "-m", "catdog", "promote"]
    dvc_stages.run_command(PROMOTE, command, Path(root), _env(None), timeout_seconds, log)
    return {"stage": PROMOTE, "skipped": False}


def _failure_alert(flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure / on_crashed: tell the team which stage failed and why."""
    error = state.result(raise_on_failure=False)
    stage = getattr(error, "stage", None) or "the flow"
    reason = error.summary() if isinstance(error, dvc_stages.StageFailed) else (state.message or repr(error))
    settings = _alert_settings(flow_run)
    alerts.send(
        log=flow_run_logger(flow_run, flow),
        title=f"catdog pipeline FAILED at {stage if stage == 'the flow' else repr(stage)}",
        body=f"Flow run {flow_run.name} ({flow_run.id}) of {flow.name} ended {state.name}.\n"
        f"Stage: {stage}\nError: {reason}{_ui_link(flow_run)}",
        failure=True,
        timeout_seconds=settings.timeout_seconds,
    )


def _success_alert(flow: Any, flow_run: Any, state: Any) -> None:
    """on_completion: a short summary (when params.yaml orchestration.alerts.on_success)."""
    settings = _alert_settings(flow_run)
    if not settings.on_success:
        return
    summary = state.result(raise_on_failure=False)
    alerts.send(
        log=flow_run_logger(flow_run, flow),
        title="catdog pipeline completed",
        body=f"Flow run {flow_run.name} ({flow_run.id}) of {flow.name} completed.\n"
        f"{summary.get('text', '') if isinstance(summary, dict) else ''}{_ui_link(flow_run)}",
        failure=False,
        timeout_seconds=settings.timeout_seconds,
    )


def _alert_settings(flow_run: Any):
    from catdog.config import AlertParams

    try:
        return Project(_root(flow_run.parameters.get("root"))).params.orchestration.alerts
    except Exception:  # an unreadable params.yaml must not stop the alert about it
        return AlertParams()


def _ui_link(flow_run: Any) -> str:
    from prefect.settings import PREFECT_UI_URL

    base = PREFECT_UI_URL.value()
    return f"\n{base}/runs/flow-run/{flow_run.id}" if base else ""


def _root(root: str | None) -> Path:
    return Path(root).resolve() if root else find_root()


@flow(
    name="catdog-pipeline",
    log_prints=True,
    on_failure=[_failure_alert],
    on_crashed=[_failure_alert],
    on_completion=[_success_alert],
)
def pipeline(
    root: str | None = None,
    source: str | None = None,
    params: dict[str, Any] | None = None,
    promote: bool = True,
    until: str | None = None,
) -> dict[str, Any]:
    """Run the DVC stages (all, or those `until` needs) as tasks, then the promotion gates.

    Args:
        root: the project folder (default: the one holding params.yaml above the working directory).
        source: the data source for this run (a URL, a zip or a folder; default $DATA_SOURCE or params.yaml).
        params: overrides written into params.yaml first, e.g. {"train.epochs_frozen": 2}.
        promote: run `catdog promote` after the register stage.
        until: stop after this stage (e.g. "prepare"); promotion only follows a run that reached register.
    """
    project_root = _root(root)
    started = time.monotonic()
    apply_params(str(project_root), params or {})
    settings = Project(project_root).params.orchestration
    stages = dvc_stages.plan(project_root, until)
    results = []
    for stage in stages:
        options = _task_options(settings, stage)
        outcome = run_stage.with_options(name=stage, task_run_name=stage, **options)(
            str(project_root), stage, source, settings.timeout_seconds_of(stage)
        )
        results.append(outcome.result() if isinstance(outcome, State) else outcome)
    promoted = None
    if promote and "register" in stages:
        run_promote.with_options(**_task_options(settings, PROMOTE))(
            str(project_root), settings.timeout_seconds_of(PROMOTE)
        )
        promoted = True
    return summarize(project_root, results, promoted, time.monotonic() - started)


def _task_options(settings: Any, stage: str) -> dict[str, Any]:
    return {
        "retries": settings.retries_of(stage),
        "retry_delay_seconds": settings.retry_delay_seconds,
        "retry_jitter_factor": settings.retry_jitter_factor or None,
        "retry_condition_fn": _retry_unless_permanent,
    }


def summarize(
    root: Path, results: list[dict[str, Any]], promoted: bool | None, seconds: float
) -> dict[str, Any]:
    """What the run did: stages run and skipped, test metrics, the registered version and the champion."""
    project = Project(root)
    ran = [r["stage"] for r in results if not r.get("skipped")]
    skipped = [r["stage"] for r in results if r.get("skipped")]
    summary: dict[str, Any] = {
        "ran": ran,
        "skipped": skipped,
        "promoted": promoted,
        "seconds": round(seconds, 1),
    }
    lines = [f"Stages run: {', '.join(ran) or 'none'}; up to date: {', '.join(skipped) or 'none'}."]
    test = _read_json(project.paths.evaluate_metrics).get("test") or {}
    if test:
        summary["test"] = {k: test[k] for k in ("accuracy", "f1", "log_loss") if k in test}
        lines.append("Test: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["test"].items()) + ".")
    registered = _read_json(project.paths.registry_info)
    if registered:
        summary["registered"] = {"name": registered.get("name"), "version": registered.get("version")}
        lines.append(
            f"Registered: {registered.get('name')} version {registered.get('version')} (@challenger)."
        )
    if promoted is not None:
        champion = _champion(project)
        summary["champion"] = champion
        lines.append(f"Promotion gates passed; @champion is version {champion}.")
    else:
        lines.append("Promotion not run.")
    lines.append(f"Took {seconds:.0f} s.")
    summary["text"] = "\n".join(lines)
    print(summary["text"])
    return summary


def _champion(project: Project) -> str | None:
    from catdog.registry import CHAMPION
    from catdog.registry.promotion import open_registry

    version = open_registry(project).by_alias(CHAMPION)
    return str(version.version) if version is not None else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
