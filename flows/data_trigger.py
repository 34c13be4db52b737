"""The data-change trigger: run the pipeline only when the data source differs from what was last ingested.

The `source` stage fingerprints the data source (a folder's listing, a zip's size and mtime, a URL and its
checksum) into data/source.json, and dvc.lock records the md5 of the data/source.json the `ingest` stage
last consumed. Comparing the two is exactly DVC's own notion of "the data changed", with no state of its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from catdog.config import Project, find_root
from catdog.lineage import dependency_md5
from catdog.stages import source as source_stage
from flows.pipeline import pipeline


@dataclass(frozen=True)
class DataCheck:
    changed: bool
    location: str
    fingerprint: str
    current_md5: str
    ingested_md5: str | None


def check(root: Path, source: str | None = None) -> DataCheck:
    """Compare the source's fingerprint now with the one the last `ingest` consumed (dvc.lock)."""
    project = Project(root)
    info = source_stage.describe(project, cwd=root, source=source)
    current = hashlib.md5(source_stage.to_json(info).encode()).hexdigest()
    consumed_path = project.paths.source_info.relative_to(project.root).as_posix()
    ingested = dependency_md5(project.paths.dvc_lock, "ingest", consumed_path)
    return DataCheck(current != ingested, info["location"], info["fingerprint"], current, ingested)


@task(name="check-data", task_run_name="check-data", cache_policy=NO_CACHE, persist_result=False)
def check_data(root: str, source: str | None) -> dict[str, Any]:
    """The data-change check as a task (its verdict in the task's log)."""
    result = check(Path(root), source)
    log = get_run_logger()
    if result.ingested_md5 is None:
        log.info("no earlier ingest recorded in dvc.lock: %s counts as new data", result.location)
    else:
        verdict = "changed" if result.changed else "unchanged"
        log.info("data source %s: %s (fingerprint %s)", result.location, verdict, result.fingerprint[:12])
    return asdict(result)


@flow(name="catdog-data-watch", log_prints=True)
def data_watch(root: str | None = None, source: str | None = None, promote: bool = True) -> dict[str, Any]:
    """Start the pipeline (as a subflow) only when the data source changed since the last ingest."""
    project_root = str(Path(root).resolve() if root else find_root())
    result = check_data(project_root, source)
    if not result["changed"]:
        print(f"data unchanged since the last ingest ({result['location']}); pipeline not started")
        return {"changed": False, "pipeline": None}
    print(f"data changed ({result['location']}); starting the pipeline")
    return {"changed": True, "pipeline": pipeline(root=project_root, source=source, promote=promote)}
