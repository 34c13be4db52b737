"""Moving @champion safely: which version a rollback goes to, and a write order that survives a crash.

A move (promote or rollback) is journaled before any alias changes, in the registered-model tag
`registry.move`:

1. journal {id, event, from, to, reason};
2. (rollback) mark the version left `rolled_back=true`; (promote) clear that mark on the version promoted;
3. @champion -> to: one write, so @champion names a gated version before and after it, and
4. @previous -> what a rollback from `to` would choose (removed when there is none), written after @champion
   when the move goes up (promote) and before it when it goes down (rollback), so that @previous is at every
   point a gated, never rolled-back version older than @champion (or absent);
5. the audit run (tagged with the move's id, so a repeat finds it);
6. drop the journal.

A process killed anywhere leaves @champion on `from` or on `to`, both gated; the next promote or rollback
(under the lease) finds the journal and completes steps 2-6, each of which can run twice without harm.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from catdog.config import Project
from catdog.registry import CHAMPION, PREVIOUS, audit
from catdog.registry.lease import Lease
from catdog.registry.store import Registry, Version

log = logging.getLogger(__name__)
JOURNAL_TAG = "registry.move"
ROLLED_BACK = "rolled_back"
ROLLED_BACK_TAGS = (ROLLED_BACK, f"{ROLLED_BACK}.at", f"{ROLLED_BACK}.reason")
GATE_OK = ("passed", "skipped")


@dataclass(frozen=True)
class Move:
    """One journaled change of @champion."""

    id: str
    event: str
    from_version: str | None
    to_version: str
    reason: str

    @classmethod
    def new(cls, event: str, from_version: str | None, to_version: str, reason: str) -> Move:
        return cls(uuid.uuid4().hex, event, from_version, str(to_version), reason)

    def as_tag(self) -> str:
        return json.dumps(asdict(self) | {"reason": self.reason[:2000]})


def gates_passed(version: Version, promoted: set[str]) -> bool:
    """The version's own gate tags say every gate passed (or, for one gated before tags existed, the audit
    trail shows a promotion to it)."""
    tags = version.tags
    if "promotion.passed" not in tags:
        return version.version in promoted
    results = [v for k, v in tags.items() if k.startswith("gate.") and not k.endswith(".detail")]
    return tags["promotion.passed"] == "true" and bool(results) and all(r in GATE_OK for r in results)


def rolled_back(version: Version) -> bool:
    return version.tags.get(ROLLED_BACK) == "true"


def promoted_versions(project: Project, registry: Registry) -> set[str]:
    """Versions the audit trail shows promoted to @champion."""
    rows = audit.history(project, registry)
    return {row["to_version"] for row in rows if row["event"] == "promote" and row["alias"] == CHAMPION}


def rollback_target(project: Project, registry: Registry, current: str) -> Version | None:
    """The newest version older than `current` that passed the gates and was never rolled back from."""
    promoted = promoted_versions(project, registry)
    candidates = [
        version
        for version in registry.versions()
        if int(version.version) < int(current)
        and gates_passed(version, promoted)
        and not rolled_back(version)
    ]
    return max(candidates, key=lambda version: int(version.version), default=None)


def journal(registry: Registry) -> Move | None:
    raw = (registry.client.get_registered_model(registry.name).tags or {}).get(JOURNAL_TAG)
    if not raw:
        return None
    try:
        return Move(**json.loads(raw))
    except (ValueError, TypeError):
        log.warning("unreadable move journal %r: ignored", raw[:200])
        return Move("unreadable", "?", None, "", "")


def _finish(project: Project, registry: Registry, move: Move, details: dict[str, Any] | None) -> None:
    """Steps 2-6 of the move (idempotent)."""
    client = registry.client
    if move.event == "rollback" and move.from_version:
        registry.set_tags(
            move.from_version,
            {
                ROLLED_BACK: "true",
                f"{ROLLED_BACK}.at": datetime.now(UTC).isoformat(timespec="seconds"),
                f"{ROLLED_BACK}.reason": move.reason[:4900],
            },
        )
    elif move.event == "promote" and rolled_back(registry.version(move.to_version)):
        for key in ROLLED_BACK_TAGS:
            client.delete_model_version_tag(registry.name, move.to_version, key)
    # @previous stays below @champion at every step: after @champion on a move up, before it on a move down.
    upward = move.from_version is None or int(move.to_version) > int(move.from_version)
    if upward:
        registry.set_alias(CHAMPION, move.to_version)
    previous = rollback_target(project, registry, move.to_version)
    if previous is not None:
        registry.set_alias(PREVIOUS, previous.version)
    elif PREVIOUS in registry.aliases():
        client.delete_registered_model_alias(registry.name, PREVIOUS)
    if not upward:
        registry.set_alias(CHAMPION, move.to_version)
    if not any(row.get("move_id") == move.id for row in audit.history(project, registry)):
        audit.record(
            project,
            registry,
            move.event,
            CHAMPION,
            move.from_version,
            move.to_version,
            move.reason,
            details,
            move_id=move.id,
        )
    client.delete_registered_model_tag(registry.name, JOURNAL_TAG)


def commit(
    project: Project, registry: Registry, lease: Lease, move: Move, details: dict[str, Any] | None = None
) -> None:
    """Make the move, journaled, while holding the lease."""
    lease.renew()
    registry.client.set_registered_model_tag(registry.name, JOURNAL_TAG, move.as_tag())
    _finish(project, registry, move, details)
    print(f"{move.event}: {registry.name} @{CHAMPION} {move.from_version or '-'} -> {move.to_version}")


def recover(project: Project, registry: Registry, lease: Lease) -> Move | None:
    """Complete a move a killed process left half done (or drop its journal when @champion moved since)."""
    move = journal(registry)
    if move is None:
        return None
    lease.check()
    current = registry.by_alias(CHAMPION)
    where = current.version if current else None
    if where not in {move.from_version, move.to_version} or not move.to_version:
        log.warning("dropping the journal of %s: @%s is %s now", move, CHAMPION, where)
        registry.client.delete_registered_model_tag(registry.name, JOURNAL_TAG)
        return None
    print(
        f"repair: completing the interrupted {move.event} of {registry.name} "
        f"@{CHAMPION} {move.from_version or '-'} -> {move.to_version} (@{CHAMPION} was at {where})"
    )
    _finish(project, registry, move, {"completed_by": lease.owner, "champion_found": where})
    return move
