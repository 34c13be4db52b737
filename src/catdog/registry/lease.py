"""A lease on the registered model, so that two alias moves (promote, rollback) never interleave.

The lease is a registered-model tag holding its owner (host:pid:uuid), the operation and an expiry time.
MLflow has no compare-and-set, so acquiring is write, wait `settle` seconds, read back: of two processes that
both saw the lease free, the later write wins and the earlier one reads the other's owner back and gives up.
This holds while a writer's read-then-write gap stays under `settle` (milliseconds against half a second). A
lease is taken over when it has expired, or at once when its owner ran on this host, in this PID namespace
(not another container that happens to share the host name), in a process now gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from catdog.errors import EXIT_TRANSIENT, CatdogError
from catdog.registry.store import Registry

log = logging.getLogger(__name__)

LEASE_TAG = "registry.lease"
LEASE_SECONDS = 900.0  # outlasts the five gates (about a minute); renewed before the alias writes
SETTLE_SECONDS = 0.5


class RegistryBusyError(CatdogError):
    """Another promote or rollback holds the registry's lease: worth retrying once it is done."""

    exit_code = EXIT_TRANSIENT


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, doing what, until when (epoch seconds)."""

    owner: str
    operation: str
    expires: float
    pid_namespace: str = ""

    @classmethod
    def parse(cls, raw: str | None) -> Holder | None:
        if not raw:
            return None
        try:
            data = json.loads(raw)
            return cls(
                str(data["owner"]),
                str(data.get("operation", "?")),
                float(data["expires"]),
                str(data.get("pid_namespace", "")),
            )
        except (ValueError, KeyError, TypeError):
            return cls(f"unreadable lease {raw[:80]!r}", "?", 0.0)  # expired: taken over

    def as_tag(self) -> str:
        return json.dumps(
            {
                "owner": self.owner,
                "operation": self.operation,
                "expires": self.expires,
                "pid_namespace": self.pid_namespace,
            }
        )

    def describe(self) -> str:
        until = datetime.fromtimestamp(self.expires, UTC).isoformat(timespec="seconds")
        return f"{self.operation} by {self.owner} (lease until {until})"


def pid_namespace() -> str:
    """This process's PID namespace (a pid from another one, e.g. another container, means nothing here)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_gone(pid: int) -> bool:
    """True when no process `pid` runs on this host (a zombie, killed and not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def stale(holder: Holder, now: float | None = None) -> bool:
    """An expired lease, or one whose owner ran on this host and PID namespace in a process that is gone."""
    if holder.expires <= (time.time() if now is None else now):
        return True
    host, _, rest = holder.owner.partition(":")
    pid = rest.partition(":")[0]
    here = host == socket.gethostname() and holder.pid_namespace == pid_namespace() != ""
    return here and pid.isdigit() and _process_gone(int(pid))


class Lease:
    """`with Lease(registry, "promote") as lease:` holds the registry's lease for the block (or refuses)."""

    def __init__(
        self,
        registry: Registry,
        operation: str,
        seconds: float = LEASE_SECONDS,
        settle: float = SETTLE_SECONDS,
    ) -> None:
        self.registry = registry
        self.operation = operation
        self.seconds = seconds
        self.settle = settle
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.held = False

    def holder(self) -> Holder | None:
        """The lease as the store has it now."""
        tags = self.registry.client.get_registered_model(self.registry.name).tags or {}
        return Holder.parse(tags.get(LEASE_TAG))

    def _busy(self, holder: Holder) -> RegistryBusyError:
        return RegistryBusyError(
            f"{self.registry.name} is busy: {holder.describe()}; {self.operation} refused, try again when "
            f"it is done (a lease of a killed process on this host is taken over at once, others at expiry)"
        )

    def _write_and_confirm(self) -> None:
        from mlflow.exceptions import MlflowException

        mine = Holder(self.owner, self.operation, time.time() + self.seconds, pid_namespace())
        try:
            self.registry.client.set_registered_model_tag(self.registry.name, LEASE_TAG, mine.as_tag())
            time.sleep(self.settle)
            found = self.holder()
        except MlflowException as exc:
            # Two writers at the same moment: a SQLite store answers "database is locked" to one of them.
            # Not holding the lease is the same answer as a busy one: retry later (exit 75).
            self.held = False
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise RegistryBusyError(
                f"{self.registry.name} is busy: {self.operation} by another process held the store's write "
                f"lock as this one took its lease ({reason}); try again shortly"
            ) from exc
        if found is None or found.owner != self.owner:
            self.held = False
            raise self._busy(found or Holder("nobody (released meanwhile)", "?", 0.0))
        self.held = True

    def acquire(self) -> Any:
        found = self.holder()
        if found is not None and found.owner != self.owner and not stale(found):
            raise self._busy(found)
        self._write_and_confirm()
        return self

    def check(self) -> None:
        """Refuse to go on unless the lease is still ours (nobody took it over after an expiry)."""
        found = self.holder()
        if found is None or found.owner != self.owner:
            self.held = False
            raise RegistryBusyError(
                f"{self.registry.name}: the {self.operation} lost its lease "
                f"({found.describe() if found else 'released by someone else'}); nothing more was written"
            )

    def renew(self) -> None:
        """A fresh expiry before the writes (the gates may have taken a while)."""
        self.check()
        self._write_and_confirm()

    def release(self) -> None:
        """Drop the lease if it is still ours (best effort: an unreachable store lets it expire instead)."""
        from mlflow.exceptions import MlflowException

        if not self.held:
            return
        self.held = False
        try:
            found = self.holder()
            if found is not None and found.owner == self.owner:
                self.registry.client.delete_registered_model_tag(self.registry.name, LEASE_TAG)
        except MlflowException as exc:
            log.warning("the lease of %s was not released (it expires by itself): %s", self.owner, exc)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()
