"""The deployments: weekly retraining, the data-change trigger, and an unscheduled one for manual runs.

`python -m flows serve` (make flow-serve) registers them with the Prefect API in force (a server when
PREFECT_API_URL is set) and runs their flow runs in this process until stopped; schedules come from
params.yaml `orchestration.schedule`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect.schedules import Cron, Interval

from catdog.config import Project
from flows.data_trigger import data_watch
from flows.pipeline import pipeline

WEEKLY = "weekly-retrain"
DATA_CHANGE = "data-change"
MANUAL = "manual"


def deployments(root: Path) -> list[Any]:
    """The three deployments of the project at `root` (their flow runs use that folder)."""
    schedule = Project(root).params.orchestration.schedule
    parameters = {"root": str(root)}
    return [
        pipeline.to_deployment(
            name=WEEKLY,
            schedules=[Cron(schedule.retrain_cron, timezone=schedule.timezone)],
            parameters=parameters,
            description="Retrain, register and promote on a schedule (params.yaml orchestration.schedule).",
            tags=["catdog", "retrain"],
        ),
        data_watch.to_deployment(
            name=DATA_CHANGE,
            schedules=[Interval(timedelta(minutes=schedule.data_check_minutes))],
            parameters=parameters,
            description="Run the pipeline when the data source's fingerprint differs from the last ingest.",
            tags=["catdog", "data-trigger"],
        ),
        pipeline.to_deployment(
            name=MANUAL,
            parameters=parameters,
            description="No schedule: `prefect deployment run catdog-pipeline/manual`.",
            tags=["catdog"],
        ),
    ]


def serve(root: Path) -> None:
    """Register the deployments and run their flow runs here until interrupted."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(root))
