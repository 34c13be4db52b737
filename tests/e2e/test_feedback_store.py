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
