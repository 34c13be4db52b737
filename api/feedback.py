"""Ground truth for served predictions: every prediction is kept in SQLite by request id, so a true label
that arrives later (POST /feedback), even after a restart, gives the model's live accuracy.

One thread owns the connection and runs every statement in submission order (WAL journal), so the event
loop never waits on the disk, a prediction is always stored before feedback sent after its answer is
looked up, and a failing database never fails a prediction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from api.errors import ApiError
from api.metrics import ServiceMetrics
from api.predictor import Prediction
from api.settings import Settings

log = logging.getLogger("catdog.api")
T = TypeVar("T")

MAX_PENDING = 10_000
PRUNE_EVERY = 10_000
DAY = 86_400.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    request_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    label TEXT NOT NULL,
    confidence REAL NOT NULL,
    probabilities TEXT NOT NULL,
    true_label TEXT,
    feedback_at REAL
);
CREATE INDEX IF NOT EXISTS predictions_by_feedback ON predictions (feedback_at) WHERE feedback_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS predictions_by_time ON predictions (created_at);
"""
INSERT = """
INSERT INTO predictions (request_id, created_at, model_name, model_version, label, confidence, probabilities)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (request_id) DO UPDATE SET
    created_at = excluded.created_at, model_name = excluded.model_name,
    model_version = excluded.model_version, label = excluded.label, confidence = excluded.confidence,
    probabilities = excluded.probabilities
WHERE predictions.true_label IS NULL
"""
WINDOW = """
SELECT label, true_label, model_version FROM predictions
WHERE feedback_at IS NOT NULL ORDER BY feedback_at DESC, rowid DESC LIMIT ?
"""


def window_report(rows: list[tuple[str, str, str]], window: int, labelled_total: int) -> dict[str, Any]:
    """Accuracy, per-class recall and per-model accuracy of (predicted, true, model version) rows."""
    correct = sum(predicted == true for predicted, true, _ in rows)
    per_class: dict[str, dict[str, Any]] = {}
    for label, count in sorted(Counter(true for _, true, _ in rows).items()):
        hits = sum(predicted == true == label for predicted, true, _ in rows)
        per_class[label] = {"labelled": count, "recall": hits / count}
    by_model: dict[str, dict[str, Any]] = {}
    for version, count in Counter(version for *_, version in rows).items():
        hits = sum(predicted == true for predicted, true, v in rows if v == version)
        by_model[version] = {"labelled": count, "accuracy": hits / count}
    return {
        "window": window,
        "labelled": len(rows),
        "correct": correct,
        "accuracy": correct / len(rows) if rows else None,
        "per_class": per_class,
        "by_model": by_model,
        "labelled_total": labelled_total,
    }


class FeedbackStore:
    """Predictions by request id and their ground truth, in the SQLite file FEEDBACK_DB."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        path = settings.feedback_db.strip()
        self.path = str(Path(path).expanduser()) if path else ""
        self.window = settings.accuracy_window
        self.retention_s = settings.feedback_retention_days * DAY
        self.metrics = metrics
        self.problem: str | None = None if self.path else "feedback is disabled (FEEDBACK_DB is empty)"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback-db")
        self._db: sqlite3.Connection | None = None
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._inserted = 0

    async def start(self) -> None:
        """Open (or create) the database and publish the live accuracy it holds."""
        if self.path:
            await asyncio.wrap_future(self._executor.submit(self._open))

    async def stop(self) -> None:
        """Write what is queued, then close the database."""
        self.problem = self.problem or "the service is shutting down"
        await asyncio.wrap_future(self._executor.submit(self._close))
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    def remember(self, request_id: str, prediction: Prediction) -> None:
        """Queue a served prediction for storage; never blocks (dropped, and counted, when far behind)."""
        if self.problem:
            return
        with self._pending_lock:
            if self._pending >= MAX_PENDING:
                self.metrics.monitoring_dropped.labels(monitor="feedback_db").inc()
                return
            self._pending += 1
        row = (
            request_id,
            time.time(),
            prediction.model.name,
            prediction.model.version,
            prediction.label,
            prediction.confidence,
            json.dumps(prediction.probabilities),
        )
        try:
            self._executor.submit(self._insert, row)
        except RuntimeError:
            with self._pending_lock:
                self._pending -= 1

    async def record(self, request_id: str, true_label: str) -> dict[str, Any]:
        """Store the true label of a prediction; 404 unknown id, 422 not one of its labels, 409 a different
        label already recorded (the same label again is accepted and changes nothing)."""
        return await self._call(self._record, request_id, true_label)

    async def performance(self) -> dict[str, Any]:
        """The live accuracy window's report."""
        return await self._call(self._performance)

    async def _call(self, work: Callable[..., T], *args: Any) -> T:
        if self.problem:
            raise ApiError(503, "feedback_unavailable", self.problem)
        return await asyncio.wrap_future(self._executor.submit(work, *args))

    def _open(self) -> None:
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            self._db = db
            self._prune()
            report = self._performance()
        except (OSError, sqlite3.Error) as exc:
            self.problem = f"the feedback database {self.path} cannot be used: {exc}"
            log.error(self.problem)
            return
        log.info(
            "feedback database open",
            extra={"path": self.path, "labelled": report["labelled"], "live_accuracy": report["accuracy"]},
        )

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _insert(self, row: tuple[Any, ...]) -> None:
        with self._pending_lock:
            self._pending -= 1
        if self._db is None:
            return
        try:
            with self._db:
                self._db.execute(INSERT, row)
            self._inserted += 1
            if self._inserted % PRUNE_EVERY == 0:
                self._prune()
        except sqlite3.Error as exc:
            log.warning("prediction %s not stored for feedback: %s", row[0], exc)

    def _prune(self) -> None:
        """Delete predictions older than FEEDBACK_RETENTION_DAYS that never got feedback."""
        if self._db is None or not self.retention_s:
            return
        with self._db:
            cursor = self._db.execute(
                "DELETE FROM predictions WHERE feedback_at IS NULL AND created_at < ?",
                (time.time() - self.retention_s,),
            )
        if cursor.rowcount:
            log.info("pruned %d predictions without feedback", cursor.rowcount)

    def _record(self, request_id: str, true_label: str) -> dict[str, Any]:
        db = self._available()
        found = db.execute(
            "SELECT label, probabilities, model_name, model_version, true_label FROM predictions "
            "WHERE request_id = ?",
            (request_id,),
        ).fetchone()
        if found is None:
            raise ApiError(
                404,
                "prediction_not_found",
                f"no stored prediction has request id {request_id!r} (unknown, failed, or older than the "
                "retention period)",
            )
        label, probabilities, model_name, model_version, recorded = found
        labels = list(json.loads(probabilities))
        if true_label not in labels:
            raise ApiError(422, "invalid_label", f"true_label must be one of {labels}; got {true_label!r}")
        if recorded is not None and recorded != true_label:
            raise ApiError(
                409,
                "feedback_conflict",
                f"request {request_id!r} already has the true label {recorded!r}; feedback is never "
                "overwritten",
            )
        if recorded is None:
            with db:
                db.execute(
                    "UPDATE predictions SET true_label = ?, feedback_at = ? WHERE request_id = ?",
                    (true_label, time.time(), request_id),
                )
            self.metrics.feedback.labels(outcome="correct" if label == true_label else "incorrect").inc()
        report = self._performance()
        return {
            "request_id": request_id,
            "status": "recorded" if recorded is None else "unchanged",
            "predicted_label": label,
            "true_label": true_label,
            "correct": label == true_label,
            "model": {"name": model_name, "version": model_version},
            "live_accuracy": report["accuracy"],
            "labelled": report["labelled"],
        }

    def _performance(self) -> dict[str, Any]:
        db = self._available()
        rows = db.execute(WINDOW, (self.window,)).fetchall()
        total = db.execute("SELECT count(*) FROM predictions WHERE feedback_at IS NOT NULL").fetchone()[0]
        report = window_report(rows, self.window, total)
        self.metrics.observe_accuracy(report["accuracy"], report["labelled"])
        return report

    def _available(self) -> sqlite3.Connection:
        if self._db is None:
            raise ApiError(503, "feedback_unavailable", self.problem or "the feedback database is not open")
        return self._db
