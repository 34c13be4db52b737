"""The DVC side of the flow: which stages run in which order, whether one is up to date, and running one.

The flow never re-implements a stage: it asks DVC for the plan `dvc repro` would follow and runs each
stage with `dvc repro --single-item <stage>` in a subprocess, so dvc.lock, the cache and the outputs are
exactly what a person typing `dvc repro` gets.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from catdog.errors import EXIT_GATE, EXIT_PERMANENT

NOT_RETRIED = frozenset({EXIT_PERMANENT, EXIT_GATE})
TAIL_LINES = 40
DVC_EXIT = re.compile(r"exited with (-?\d+)")


class StageFailed(Exception):
    """A stage's process failed: its exit status, whether retrying may help, and the end of its output."""

    def __init__(
        self, stage: str, exit_code: int | None, tail: Sequence[str], timed_out: bool = False
    ) -> None:
        self.stage = stage
        self.exit_code = exit_code
        self.tail = list(tail)
        self.timed_out = timed_out
        super().__init__(self.summary())

    @property
    def retryable(self) -> bool:
        """False for a failed quality gate or a configuration/input error: the same run would fail again."""
        return self.timed_out or self.exit_code not in NOT_RETRIED

    @property
    def error_lines(self) -> list[str]:
        """The lines of the output that say what went wrong (the CLI's `error:` lines, else DVC's)."""
        ours = [line for line in self.tail if line.startswith("error: ")]
        return ours or [line for line in self.tail if line.startswith("ERROR:")] or self.tail[-3:]

    def summary(self) -> str:
        if self.timed_out:
            return f"stage '{self.stage}' timed out"
        kind = {EXIT_GATE: "quality gate failed", EXIT_PERMANENT: "not retried"}.get(self.exit_code, "")
        status = f"exit {self.exit_code}" + (f", {kind}" if kind else "")
        detail = " | ".join(self.error_lines)[:1500]
        return f"stage '{self.stage}' failed ({status}): {detail}"


def plan(root: Path, until: str | None = None) -> list[str]:
    """The stages `dvc repro [until]` would consider, in execution order."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        targets = None
        if until is not None:
            targets = [stage for stage in repo.index.stages if stage.name == until]
            if not targets:
                names = ", ".join(stage.name for stage in repo.index.stages)
                raise ValueError(f"{root / 'dvc.yaml'}: no stage {until!r} (stages: {names})")
        return [stage.name for stage in plan_repro(graph, targets)]


def skipped(stage: str, output: Sequence[str]) -> bool:
    """True when `dvc repro --single-item` found the stage up to date and did not run it."""
    return f"Stage '{stage}' didn't change, skipping" in output and not any(
        line.startswith("Running stage") for line in output
    )


def command_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a stage's process: this venv first on PATH, unbuffered output, no DVC analytics."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["DVC_NO_ANALYTICS"] = "1"
    env.update(overrides or {})
    return env


def run_command(
    name: str,
    command: Sequence[str],
    root: Path,
    env: Mapping[str, str],
    timeout_seconds: float,
    log: logging.Logger | logging.LoggerAdapter,
) -> list[str]:
    """Run `command` in `root`, logging every output line; returns its last lines, raises StageFailed.

    The exit status is the command's, or for `dvc repro` the one of the stage's command that DVC reports.
    After `timeout_seconds` the whole process group is killed.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    process = subprocess.Popen(
        list(command),
        cwd=root,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def pump() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip()
            if line:
                tail.append(line)
                log.info("%s | %s", name, line)

    reader = threading.Thread(target=pump, name=f"{name}-output", daemon=True)
    reader.start()
    try:
        status = process.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        reader.join(5)
        raise StageFailed(name, None, tail, timed_out=True) from None
    reader.join(30)
    if status != 0:
        raise StageFailed(name, stage_exit_code(status, tail), tail)
    return list(tail)


def stage_exit_code(status: int, tail: Sequence[str]) -> int:
    """The stage command's own exit status when DVC names it ('... exited with N'), else `status`."""
    for line in reversed(tail):
        if found := DVC_EXIT.search(line):
            return int(found.group(1))
    return status


def repro_command(stage: str) -> list[str]:
    """`dvc repro --single-item <stage>` with this interpreter's DVC."""
    return [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
