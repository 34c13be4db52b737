"""The audit log of every alias move: one run of an MLflow experiment per move, readable back in order.

Kept in the tracking store itself, so it works unchanged with the local SQLite store and with a server,
and answers "what was in production last Tuesday".
"""

from __future__ import annotations

import getpass
import json
import socket
import sys
import time
from datetime import UTC, datetime
from typing import Any

from catdog import tracking
from catdog.config import Project
from catdog.registry.store import Registry

FIELDS = ("at", "event", "alias", "from_version", "to_version", "reason", "command", "user")


def record(
    project: Project,
    registry: Registry,
    event: str,
    alias: str,
    from_version: str | None,
    to_version: str,
    reason: str,
    details: dict[str, Any] | None = None,
    move_id: str = "",
) -> None:
    """Append one move (register, promote, rollback) to the audit experiment (`move_id`: its journal id)."""
    now_ns = time.time_ns()
    tags = {
        "audit.model": registry.name,
        "audit.event": event,
        "audit.alias": alias,
        "audit.from_version": from_version or "",
        "audit.to_version": str(to_version),
        "audit.reason": reason[:4900],
        "audit.command": " ".join(sys.argv)[:1000],
        "audit.user": getpass.getuser(),
        "audit.host": socket.gethostname(),
        "audit.at_ns": str(now_ns),
        "audit.move_id": move_id,
    }
    with tracking.store(registry.tracking_uri) as mlflow:
        experiment = tracking.experiment_id(mlflow, project, project.params.registry.audit_experiment)
    run = registry.client.create_run(
        experiment,
        start_time=now_ns // 1_000_000,
        tags=tags,
        run_name=f"{event}: {alias} {from_version or '-'} -> {to_version}",
    )
    if details:
        registry.client.log_dict(run.info.run_id, details, "details.json")
    registry.client.set_terminated(run.info.run_id)


def history(project: Project, registry: Registry) -> list[dict[str, Any]]:
    """Every recorded move of this model, oldest first."""
    experiment = registry.client.get_experiment_by_name(project.params.registry.audit_experiment)
    if experiment is None:
        return []
    runs = registry.client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`audit.model` = '{registry.name}'", max_results=50000
    )
    rows = []
    for run in runs:
        tags = run.data.tags
        at_ns = int(tags.get("audit.at_ns", run.info.start_time * 1_000_000))
        rows.append(
            {
                "at": datetime.fromtimestamp(at_ns / 1e9, UTC).isoformat(timespec="milliseconds"),
                "at_ns": at_ns,
                **{field: tags.get(f"audit.{field}", "") for field in FIELDS[1:]},
                "move_id": tags.get("audit.move_id", ""),
                "run_id": run.info.run_id,
            }
        )
    return sorted(rows, key=lambda row: row["at_ns"])


def champion_at(rows: list[dict[str, Any]], moment: datetime) -> str | None:
    """The champion version at `moment` (None when there was none yet)."""
    limit = moment.timestamp() * 1e9
    champion = None
    for row in rows:
        if row["at_ns"] <= limit and row["alias"] == "champion":
            champion = row["to_version"]
    return champion


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The log as a fixed-width table."""
    lines = [f"{'when (UTC)':<24} {'event':<9} {'alias':<10} {'from':>4} -> {'to':<4} {'by':<10} reason"]
    for row in rows:
        reason = row["reason"].replace("\n", " ")
        lines.append(
            f"{row['at'][:23]:<24} {row['event']:<9} {row['alias']:<10} {row['from_version'] or '-':>4} -> "
            f"{row['to_version']:<4} {row['user'][:10]:<10} {reason[:100]}"
        )
    return "\n".join(lines)


def as_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)
