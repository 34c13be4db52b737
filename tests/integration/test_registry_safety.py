"""Registry safety on a real MLflow SQLite store: rollback never returns to a bad model, the lease keeps two
moves apart, and a move killed (SIGKILL) between any two of its writes leaves @champion valid and is completed
by the next promote or rollback.

The registry here holds small placeholder versions whose gate results are recorded the way `catdog promote`
records them (`_record_gates`); the gates themselves run in test_registry.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from projects import REPO_ROOT, copy_project

from catdog import tracking
from catdog.config import Project
from catdog.errors import EXIT_PERMANENT, EXIT_TRANSIENT, CatdogError, QualityGateError
from catdog.registry import CHALLENGER, CHAMPION, PREVIOUS, audit, moves
from catdog.registry.gates import GateResult
from catdog.registry.lease import LEASE_TAG, Holder, Lease, RegistryBusyError, pid_namespace
from catdog.registry.promotion import _record_gates, open_registry, promote, register, rollback

pytestmark = pytest.mark.slow
GATE_NAMES = ("metrics", "no_regression", "schema", "latency", "staging_smoke")

# Runs `catdog ARGS` in a process of its own; after the N-th registry write counted from the move's journal
# (KILL_AT_WRITE, 0: never) it SIGKILLs itself. BARRIER=DIR:N lines N of them up once all imported.
# FORK_PLAN "N:ROOT;N:ROOT..." runs `catdog ARGS --root ROOT` in one forked child after another instead, each
# killed after its write N (the imports, slow on a busy machine, happen once).
DRIVER = r"""
import os, signal, sys, time
from mlflow import MlflowClient
import catdog.registry.promotion
from catdog.cli import app, run_cli
from catdog.registry.moves import JOURNAL_TAG

WRITES = ("set_registered_model_tag", "delete_registered_model_tag", "set_model_version_tag",
          "delete_model_version_tag", "set_registered_model_alias", "delete_registered_model_alias",
          "create_run", "log_dict", "set_terminated")
state = {"armed": False, "writes": [], "kill_at": int(os.environ.get("KILL_AT_WRITE", "0"))}

def wrap(name):
    original = getattr(MlflowClient, name)
    def write(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if name == "set_registered_model_tag" and args[1] == JOURNAL_TAG:
            state["armed"] = True
        if state["armed"]:
            state["writes"].append(name)
            print("write", len(state["writes"]), name, file=sys.stderr, flush=True)
            if len(state["writes"]) == state["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(MlflowClient, name, write)

for name in WRITES:
    wrap(name)
for item in filter(None, os.environ.get("FORK_PLAN", "").split(";")):
    kill_at, root = item.split(":", 1)
    child = os.fork()
    if child == 0:
        state["kill_at"] = int(kill_at)
        sys.argv = ["catdog", *sys.argv[1:], "--root", root]
        try:
            run_cli(app)
        except SystemExit as exc:
            os._exit(exc.code or 0)
        os._exit(0)
    print("child", kill_at, os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), flush=True)
if os.environ.get("FORK_PLAN"):
    sys.exit(0)
if os.environ.get("BARRIER"):
    folder, count = os.environ["BARRIER"].rsplit(":", 1)
    open(os.path.join(folder, str(os.getpid())), "w").close()
    deadline = time.time() + 240
    while len(os.listdir(folder)) < int(count) and time.time() < deadline:
        time.sleep(0.005)
sys.argv = ["catdog", *sys.argv[1:]]
run_cli(app)
"""


def record_gates(project: Project, version: str, passed: bool = True) -> None:
    """Gate results on the version as `catdog promote` records them (metrics fails when not `passed`)."""
    registry = open_registry(project)
    results = [GateResult(name, passed or name != "metrics", "recorded by the test") for name in GATE_NAMES]
    report = {"passed": passed, "checked_at": datetime.now(UTC).isoformat(timespec="seconds")}
    _record_gates(registry, registry.version(version), results, report)


def register_placeholder(project: Project) -> str:
    """A new version (a placeholder artifact: nothing here loads it), also named @challenger."""
    registry = open_registry(project)
    folder = project.root / "placeholder"
    folder.mkdir(exist_ok=True)
    (folder / "model.txt").write_text("placeholder")
    with tracking.store(registry.tracking_uri) as mlflow, mlflow.start_run():
        mlflow.log_artifacts(str(folder), "model")
        source = mlflow.get_artifact_uri("model")
    version = registry.register(source, None, {"test": "placeholder"}).version
    registry.set_alias(CHALLENGER, version)
    return version


def promote_recorded(project: Project, version: str) -> None:
    """What `catdog promote` does once the gates passed: record them and move @champion (journaled)."""
    record_gates(project, version)
    registry = open_registry(project)
    with Lease(registry, "promote", settle=0) as lease:
        current = registry.by_alias(CHAMPION)
        before = current.version if current else None
        moves.commit(project, registry, lease, moves.Move.new("promote", before, version, "gates passed"))


@pytest.fixture(scope="module")
def four_promoted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose registry had versions 1..4 promoted in turn: @champion 4, @previous 3."""
    root = tmp_path_factory.mktemp("registry") / "project"
    root.mkdir()
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        project = Project(root)
        for _ in range(4):
            promote_recorded(project, register_placeholder(project))
    return root


@pytest.fixture
def project(four_promoted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield Project(copy_project(four_promoted, tmp_path / "project"))


def aliases(project: Project) -> dict[str, str]:
    return open_registry(project).aliases()


def moves_in_audit(project: Project) -> list[tuple[str, str, str]]:
    """(event, from, to) of every @champion move, "-" for none."""
    rows = audit.history(project, open_registry(project))
    return [(r["event"], r["from_version"] or "-", r["to_version"]) for r in rows if r["alias"] == CHAMPION]


def catdog(project: Project, *args: str, kill_at: int = 0) -> subprocess.CompletedProcess:
    """`catdog ARGS --root ...` in the driver; every registry write it makes is listed on stderr."""
    env = {**os.environ, "KILL_AT_WRITE": str(kill_at)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-c", DRIVER, *args, "--root", str(project.root)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_the_setup_is_four_promotions(project: Project) -> None:
    assert aliases(project) == {CHALLENGER: "4", CHAMPION: "4", PREVIOUS: "3"}
    assert moves_in_audit(project) == [("promote", old, new) for old, new in ("-1", "12", "23", "34")]


def test_rollback_twice_goes_further_back_never_to_the_bad_model(project: Project) -> None:
    first = rollback(project, reason="v4 is bad")
    assert (first["from"], first["to"]) == ("4", "3")
    assert aliases(project) == {CHALLENGER: "4", CHAMPION: "3", PREVIOUS: "2"}
    tags = open_registry(project).version("4").tags
    assert tags["rolled_back"] == "true" and tags["rolled_back.reason"] == "v4 is bad"
    second = rollback(project, reason="v3 is bad too")
    assert (second["from"], second["to"]) == ("3", "2")
    assert aliases(project) == {CHALLENGER: "4", CHAMPION: "2", PREVIOUS: "1"}
    assert moves_in_audit(project)[-2:] == [("rollback", "4", "3"), ("rollback", "3", "2")]


def test_rollback_skips_versions_that_did_not_pass_the_gates(project: Project) -> None:
    record_gates(project, "3", passed=False)  # v3 re-gated and failed: no longer a rollback target
    ungated = register_placeholder(project)  # v5: never gated
    promote_recorded(project, register_placeholder(project))  # v6
    assert aliases(project)[PREVIOUS] == "4"
    assert rollback(project)["to"] == "4"
    assert rollback(project)["to"] == "2"
    assert ungated == "5" and aliases(project)[PREVIOUS] == "1"


def test_a_rolled_back_challenger_is_not_promoted_again_unless_named(project: Project) -> None:
    rollback(project, reason="v4 is bad")
    with pytest.raises(QualityGateError, match=r"version 4 refused: it was rolled back .*--version 4"):
        promote(project)  # what the scheduled flow runs, with @challenger still on 4
    assert aliases(project)[CHAMPION] == "3"
    assert [event for event, _, _ in moves_in_audit(project)].count("promote") == 4


def test_rollback_guards(project: Project) -> None:
    with pytest.raises(CatdogError, match="@champion is version 4, not 3: it moved"):
        rollback(project, expect_champion="3")
    registry = open_registry(project)
    never_gated = register_placeholder(project)
    with pytest.raises(CatdogError, match=f"version {never_gated} never passed the promotion gates"):
        rollback(project, to_version=never_gated)
    rollback(project)
    with pytest.raises(CatdogError, match="version 4 was rolled back from"):
        rollback(project, to_version="4")
    assert rollback(project, dry_run=True)["to"] == "2" and aliases(project)[CHAMPION] == "3"
    rollback(project, to_version="1")
    with pytest.raises(CatdogError, match="no version older than @champion 1 that passed the gates"):
        rollback(project)
    assert registry.by_alias(CHAMPION).version == "1" and PREVIOUS not in aliases(project)


def test_a_held_lease_refuses_another_move_with_exit_75(project: Project) -> None:
    registry = open_registry(project)
    with Lease(registry, "promote"):
        busy = catdog(project, "rollback")
        assert busy.returncode == EXIT_TRANSIENT, busy.stderr
        assert "catdog is busy: promote by" in busy.stderr and "Traceback" not in busy.stderr
        with pytest.raises(RegistryBusyError):
            rollback(project)
    assert aliases(project)[CHAMPION] == "4" and moves_in_audit(project)[-1][0] == "promote"
    assert LEASE_TAG not in registry.client.get_registered_model(registry.name).tags


def test_an_expired_lease_or_one_of_a_dead_process_is_taken_over(project: Project) -> None:
    registry = open_registry(project)
    dead = subprocess.Popen(["true"])
    dead.wait()
    holders = [  # an expired lease, and one of a process killed on this host
        Holder("elsewhere:1:abc", "promote", time.time() - 1),
        Holder(f"{socket.gethostname()}:{dead.pid}:abc", "promote", time.time() + 3600, pid_namespace()),
    ]
    for holder in holders:
        registry.client.set_registered_model_tag(registry.name, LEASE_TAG, holder.as_tag())
        rollback(project)
    assert aliases(project)[CHAMPION] == "2"
    alive = Holder("elsewhere:1:abc", "promote", time.time() + 3600)
    # a dead pid of this host name in another PID namespace (another container): its pids mean nothing here
    owner = f"{socket.gethostname()}:{dead.pid}:abc"
    other_container = Holder(owner, "promote", time.time() + 3600, "pid:[1]")
    for holder in (alive, other_container):
        registry.client.set_registered_model_tag(registry.name, LEASE_TAG, holder.as_tag())
        with pytest.raises(RegistryBusyError, match=f"promote by {holder.owner}"):
            rollback(project)
    assert aliases(project)[CHAMPION] == "2"


def test_two_rollbacks_at_once_move_champion_once(project: Project, tmp_path: Path) -> None:
    """Both expect @champion 4: whichever comes second is refused (busy, or @champion moved), never both."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, "rollback", "--expect-champion", "4", "--root", str(project.root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "BARRIER": f"{barrier}:2"},
        )
        for _ in range(2)
    ]
    errors = [process.communicate(timeout=600)[1] for process in processes]
    results = [(process.returncode, err) for process, err in zip(processes, errors, strict=True)]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] in (EXIT_TRANSIENT, EXIT_PERMANENT), results
    assert aliases(project) == {CHALLENGER: "4", CHAMPION: "3", PREVIOUS: "2"}
    assert [m for m in moves_in_audit(project) if m[0] == "rollback"] == [("rollback", "4", "3")]


def test_a_rollback_killed_between_any_two_writes_is_completed_by_the_next(
    four_promoted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dry = Project(copy_project(four_promoted, tmp_path / "dry"))
    whole = catdog(dry, "rollback", "--reason", "v4 is bad")
    assert whole.returncode == 0, whole.stderr
    writes = [line for line in whole.stderr.splitlines() if line.startswith("write ")]
    assert len(writes) >= 8, writes  # journal, 3 marks, 2 aliases, audit run (2), journal dropped, lease
    roots = {k: copy_project(four_promoted, tmp_path / f"kill{k}") for k in range(1, len(writes) + 1)}
    killed = subprocess.run(
        [sys.executable, "-c", DRIVER, "rollback", "--reason", "v4 is bad"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "FORK_PLAN": ";".join(f"{k}:{root}" for k, root in roots.items())},
    )
    children = [line.split() for line in killed.stdout.splitlines() if line.startswith("child ")]
    assert children == [["child", str(k), str(-signal.SIGKILL)] for k in roots], killed.stdout + killed.stderr
    for kill_at, root in roots.items():
        project = Project(root)
        registry = open_registry(project)
        found = aliases(project)
        # at every point: @champion on one of the two gated versions, @previous a gated one below it
        assert found[CHAMPION] in {"4", "3"}, (kill_at, writes[kill_at - 1], found)
        assert int(found[PREVIOUS]) < int(found[CHAMPION]), (kill_at, writes[kill_at - 1], found)
        promoted = moves.promoted_versions(project, registry)
        assert moves.gates_passed(registry.by_alias(CHAMPION), promoted)
        assert not moves.rolled_back(registry.by_alias(PREVIOUS))
        capsys.readouterr()
        rollback(project, reason="v3 is bad too")
        repaired = "repair: completing the interrupted rollback" in capsys.readouterr().out
        assert repaired == (kill_at < len(writes) - 1), kill_at  # the journal goes last but for the lease
        assert aliases(project) == {CHALLENGER: "4", CHAMPION: "2", PREVIOUS: "1"}, kill_at
        assert moves_in_audit(project)[-2:] == [("rollback", "4", "3"), ("rollback", "3", "2")], kill_at
        assert moves.journal(registry) is None and moves.rolled_back(registry.version("4"))


# ------------------------------------------------------------- the real `catdog promote`, its gates included
LOOSE_GATES = {
    "min_accuracy": 0.0,
    "min_f1": 0.0,
    "max_log_loss": 100.0,
    "max_accuracy_drop": 0.0,
    "max_log_loss_increase": 0.0,
    "max_latency_ms_p95": 10_000,
    "latency_runs": 5,
    "smoke_images_per_class": 2,
    "smoke_min_confidence": 0.5,
    "smoke_timeout_seconds": 300,  # the staging service loads slowly on a busy machine
}


@pytest.fixture
def served(served_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    """A private copy of the evaluated and exported tiny project, loose gates, its model registered (v1)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = copy_project(served_project, tmp_path / "served")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.setdefault("registry", {})["gates"] = LOOSE_GATES
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    project = Project(root)
    register(project)
    return project


def test_two_promotions_at_once_one_promotes_the_other_is_refused(served: Project, tmp_path: Path) -> None:
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, "promote", "--root", str(served.root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "BARRIER": f"{barrier}:2"},
        )
        for _ in range(2)
    ]
    errors = [process.communicate(timeout=900)[1] for process in processes]
    results = sorted((process.returncode, err) for process, err in zip(processes, errors, strict=True))
    assert [code for code, _ in results] == [0, EXIT_TRANSIENT], results
    assert "catdog is busy: promote by" in results[1][1] and "Traceback" not in results[1][1]
    assert aliases(served) == {CHALLENGER: "1", CHAMPION: "1"}
    assert moves_in_audit(served) == [("promote", "-", "1")]


def test_a_promotion_killed_between_its_writes_is_completed_by_the_next(
    served: Project, capsys: pytest.CaptureFixture
) -> None:
    killed = catdog(served, "promote", kill_at=2)  # after the journal and @champion, before the audit
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "write 2 set_registered_model_alias" in killed.stderr
    registry = open_registry(served)
    assert aliases(served) == {CHALLENGER: "1", CHAMPION: "1"}
    assert moves.gates_passed(registry.version("1"), set())
    assert moves.journal(registry) is not None and moves_in_audit(served) == []
    assert LEASE_TAG in registry.client.get_registered_model(registry.name).tags  # the dead process's
    capsys.readouterr()
    report = promote(served)
    out = capsys.readouterr().out
    assert "repair: completing the interrupted promote of catdog @champion - -> 1" in out, out
    assert report["moved"] is False and "already @champion" in out  # completed, not gated again
    assert moves_in_audit(served) == [("promote", "-", "1")]
    assert moves.journal(registry) is None
    assert LEASE_TAG not in registry.client.get_registered_model(registry.name).tags
