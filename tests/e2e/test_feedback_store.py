"""The feedback store on a real SQLite file, without HTTP: the byte cap holds the file under FEEDBACK_MAX_MB
while predictions keep coming (the oldest unlabelled pruned first, labelled ones kept), and a database of the
old schema (keyed by the client's request id) is migrated."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from api import feedback
from api.errors import ApiError
from api.feedback import FeedbackStore
from api.metrics import ServiceMetrics
from api.settings import Settings

MIB = 1024 * 1024


def prediction(index: int) -> Any:
    """What the store reads of a served prediction."""
    return SimpleNamespace(
        label="cat" if index % 2 else "dog",
        confidence=0.9,
        probabilities={"cat": 0.9, "dog": 0.1} if index % 2 else {"cat": 0.1, "dog": 0.9},
        model=SimpleNamespace(name="tf_efficientnet_lite0", version="3"),
    )


def test_the_byte_cap_holds_the_file_and_prunes_unlabelled_first(tmp_path: Path) -> None:
    settings = Settings(
        feedback_db=str(tmp_path / "feedback.db"),
        feedback_max_mb=1,
        feedback_max_rows=10_000_000,
        accuracy_window=3,
    )
    store = FeedbackStore(settings, ServiceMetrics())

    async def scenario() -> tuple[list[str], list[dict], list[str], dict]:
        await store.start()
        first = [store.remember(f"r{i}", prediction(i)) for i in range(5)]
        await store.drain()
        labelled = [await store.record(pid, "cat", "192.0.2.1") for pid in first[:2]]
        made = []
        for batch in range(10):  # 20 000 predictions: about 2.3 MiB unpruned
            made += [store.remember(f"b{batch}-{i}", prediction(i)) for i in range(2_000)]
            await store.drain()
        again = [await store.record(pid, "cat", "192.0.2.1") for pid in first[:2]]
        newest = await store.record(made[-1], "dog", "192.0.2.2")
        with pytest.raises(ApiError) as pruned:
            await store.record(first[2], "cat", "192.0.2.1")
        size = store.size()
        await store.stop()
        return [a["status"] for a in labelled + again], [newest], [pruned.value.code], size

    statuses, (newest,), (pruned,), size = asyncio.run(scenario())
    file = (tmp_path / "feedback.db").stat().st_size  # closed: the WAL is checkpointed into it
    print(f"\n1 MiB cap after 20 005 predictions: {size}; closed: {file} bytes")
    assert statuses == ["recorded", "recorded", "unchanged", "unchanged"]
    assert newest["status"] == "recorded" and pruned == "prediction_not_found"
    assert size["database_bytes"] <= 1 * MIB and 0.8 * MIB < file <= 1 * MIB
    assert not (tmp_path / "feedback.db-wal").exists()
    assert 1_000 < size["rows"] < 20_005
    with sqlite3.connect(tmp_path / "feedback.db") as db:
        assert db.execute("SELECT count(*) FROM predictions WHERE true_label IS NOT NULL").fetchone()[0] == 3


def test_a_database_of_the_old_schema_is_migrated(tmp_path: Path) -> None:
    database = tmp_path / "feedback.db"
    with sqlite3.connect(database) as db:
        db.executescript(
            """
            CREATE TABLE predictions (
                request_id TEXT PRIMARY KEY, created_at REAL NOT NULL, model_name TEXT NOT NULL,
                model_version TEXT NOT NULL, label TEXT NOT NULL, confidence REAL NOT NULL,
                probabilities TEXT NOT NULL, true_label TEXT, feedback_at REAL
            );
            CREATE INDEX predictions_by_feedback ON predictions (feedback_at) WHERE feedback_at IS NOT NULL;
            CREATE INDEX predictions_by_time ON predictions (created_at);
            """
        )
        now = time.time()
        probabilities = json.dumps({"cat": 0.8, "dog": 0.2})
        db.executemany(
            "INSERT INTO predictions VALUES (?, ?, 'lite0', '3', 'cat', 0.8, ?, ?, ?)",
            [
                ("old-1", now, probabilities, "cat", now),
                ("old-2", now, probabilities, "dog", now + 1),
                ("old-3", now, probabilities, None, None),
            ],
        )
    store = FeedbackStore(Settings(feedback_db=str(database)), ServiceMetrics())

    async def scenario() -> dict:
        await store.start()
        made = store.remember("new-1", prediction(1))
        await store.record(made, "cat", "192.0.2.1")
        report = await store.performance()
        await store.stop()
        return report

    report = asyncio.run(scenario())
    assert report["labelled"] == report["labelled_total"] == 3
    assert report["correct"] == 2 and report["by_model"]["3"]["labelled"] == 3
    with sqlite3.connect(database) as db:
        kept = db.execute("SELECT request_id, true_label FROM predictions ORDER BY id").fetchall()
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert kept == [("old-1", "cat"), ("old-2", "dog"), ("new-1", "cat")]
    assert tables == {"models", "predictions"}


def test_a_failed_maintenance_step_loses_no_prediction(tmp_path: Path) -> None:
    """Another process holds the write lock while pruning runs after an insert, and a prediction arrives
    meanwhile: the committed rows are not written again, and the new one is stored too."""
    database = tmp_path / "feedback.db"
    store = FeedbackStore(Settings(feedback_db=str(database)), ServiceMetrics())
    enforce_caps = store._enforce_caps
    locked: list[str] = []  # the id of the prediction made while the lock was held

    def locked_once() -> None:
        if not locked:  # a real SQLITE_BUSY: another connection holds the write lock past the busy timeout
            other = sqlite3.connect(database, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            locked.append(store.remember("r2", prediction(2)))
            try:
                with store._transaction():
                    pass
            finally:
                other.execute("ROLLBACK")
                other.close()
        enforce_caps()

    async def scenario() -> list[str]:
        await store.start()
        store._enforce_caps = locked_once  # type: ignore[method-assign]
        first = store.remember("r1", prediction(1))
        await store.drain()
        answers = [
            await store.record(first, "cat", "192.0.2.1"),
            await store.record(locked[0], "dog", "192.0.2.1"),
        ]
        await store.stop()
        return [answer["status"] for answer in answers]

    assert asyncio.run(scenario()) == ["recorded", "recorded"]
    assert len(locked) == 1
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT request_id FROM predictions ORDER BY id").fetchall() == [("r1",), ("r2",)]


def test_a_corrupt_legacy_row_is_skipped_and_the_good_ones_kept(tmp_path: Path) -> None:
    database = tmp_path / "feedback.db"
    with sqlite3.connect(database) as db:
        db.execute(
            "CREATE TABLE predictions (request_id TEXT PRIMARY KEY, created_at REAL NOT NULL, "
            "model_name TEXT NOT NULL, model_version TEXT NOT NULL, label TEXT NOT NULL, "
            "confidence REAL NOT NULL, probabilities TEXT NOT NULL, true_label TEXT, feedback_at REAL)"
        )
        now = time.time()
        good = json.dumps({"cat": 0.8, "dog": 0.2})
        db.executemany(
            "INSERT INTO predictions VALUES (?, ?, 'lite0', '3', 'cat', 0.8, ?, ?, ?)",
            [
                ("old-1", now, good, "cat", now),
                ("bad-json", now, "{not json", "cat", now + 1),
                ("bad-type", now, "5", "dog", now + 2),
                ("old-2", now, good, "dog", now + 3),
            ],
        )
    store = FeedbackStore(Settings(feedback_db=str(database)), ServiceMetrics())

    async def scenario() -> dict:
        await store.start()
        report = await store.performance()
        await store.stop()
        return report

    report = asyncio.run(scenario())
    assert store.problem == "the service is shutting down"
    assert report["labelled_total"] == 2 and report["correct"] == 1
    with sqlite3.connect(database) as db:
        kept = db.execute("SELECT request_id FROM predictions ORDER BY id").fetchall()
    assert kept == [("old-1",), ("old-2",)]


def test_a_database_path_that_becomes_usable_is_opened_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feedback, "REOPEN_MIN_S", 0.0)  # retry on the next call, not seconds later
    blocker = tmp_path / "volume"
    blocker.write_text("a file where the database's folder should be")
    store = FeedbackStore(Settings(feedback_db=str(blocker / "feedback.db")), ServiceMetrics())

    async def scenario() -> tuple[str, str, str]:
        await store.start()
        store.remember("lost", prediction(1))  # served, not stored: the database is not open
        with pytest.raises(ApiError) as unavailable:
            await store.performance()
        blocker.unlink()  # the volume appears
        await store.performance()
        made = store.remember("r1", prediction(1))
        answer = await store.record(made, "cat", "192.0.2.1")
        await store.stop()
        return unavailable.value.code, answer["status"], store.problem or ""

    code, status, problem = asyncio.run(scenario())
    assert code == "feedback_unavailable" and status == "recorded"
    assert problem == "the service is shutting down"
    assert (blocker / "feedback.db").exists()


def test_a_database_error_while_reporting_is_a_503(tmp_path: Path) -> None:
    database = tmp_path / "feedback.db"
    store = FeedbackStore(Settings(feedback_db=str(database)), ServiceMetrics())

    async def scenario() -> ApiError:
        await store.start()
        with sqlite3.connect(database) as other:  # the schema changes under the service
            other.execute("DROP TABLE predictions")
        with pytest.raises(ApiError) as failed:
            await store.performance()
        await store.stop()
        return failed.value

    error = asyncio.run(scenario())
    assert error.status == 503 and error.code == "feedback_unavailable"
