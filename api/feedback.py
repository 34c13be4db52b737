"""Ground truth for served predictions: every prediction is kept in SQLite under an id the server mints, so a
true label that arrives later (POST /feedback), even after a restart, gives the model's live accuracy.

Prediction ids are ULID-like, 48 bits of milliseconds then 80 random bits (so new ids land at the end of the
index instead of all over it): only whoever received the answer can label it. The client's X-Request-ID is
kept beside it as a correlation id only, so reusing one never touches another prediction. The first label of
a prediction wins. Optionally a key (FEEDBACK_API_KEY) limits feedback to trusted labellers;
token buckets limit feedback per client address and in all (FEEDBACK_RATE_PER_CLIENT, FEEDBACK_RATE_GLOBAL).

One thread owns the connection. Predictions are buffered in memory and written in batches, so the event loop
never waits on the disk and a database that is locked by another process or full never fails or slows a
prediction (a locked one keeps them buffered, up to MAX_PENDING, until it is free; a full one that pruning
cannot make room in drops them, counted); feedback then answers 503. A feedback call first writes what is
buffered, so a prediction is stored before feedback sent after its answer is looked up. The database stays
under FEEDBACK_MAX_ROWS rows and FEEDBACK_MAX_MB (SQLite's max_page_count: the file never grows past it):
the oldest unlabelled predictions are pruned first, then the oldest labelled ones outside the live accuracy
window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import sqlite3
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from api.errors import ApiError
from api.metrics import ServiceMetrics
from api.predictor import Prediction
from api.settings import Settings

log = logging.getLogger("catdog.api")
T = TypeVar("T")

MIB = 1024 * 1024
DAY = 86_400.0
MAX_PENDING = 10_000  # predictions buffered while the database is busy; more are dropped (and counted)
OPEN_TIMEOUT_S = 10.0  # several workers may open (and create) the file at once
BUSY_TIMEOUT_S = 0.5  # later, a write lock held longer than this answers 503 instead of waiting
WAL_LIMIT_BYTES = 8 * MIB  # the WAL is truncated to this after a checkpoint (journal_size_limit)
HIGH_WATER = 0.95  # of the byte cap: prune from here ...
LOW_WATER = 0.9  # ... down to here (of either cap), so pruning runs now and then, not on every insert
PRUNE_BATCH = 5_000  # rows per DELETE transaction, which bounds the WAL a prune writes
RECOUNT_EVERY = 10_000  # inserted rows between exact counts (other workers' inserts are not seen otherwise)
REOPEN_MIN_S = 5.0  # after a failed open, the next try (on a later prediction or feedback) waits this ...
REOPEN_MAX_S = 300.0  # ... doubling up to this: a volume that is mounted late is picked up without a restart
MAX_CLIENTS = 10_000  # client addresses whose rate budget is remembered (the least recently seen go first)
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    labels TEXT NOT NULL,
    UNIQUE (name, version, labels)
);
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY,
    prediction_id BLOB NOT NULL UNIQUE,
    request_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    model_id INTEGER NOT NULL REFERENCES models (id),
    label TEXT NOT NULL,
    confidence REAL NOT NULL,
    true_label TEXT,
    feedback_at REAL,
    feedback_client TEXT
);
CREATE INDEX IF NOT EXISTS predictions_by_feedback ON predictions (feedback_at) WHERE feedback_at IS NOT NULL;
"""
INSERT = """
INSERT OR IGNORE INTO predictions (prediction_id, request_id, created_at, model_id, label, confidence)
VALUES (?, ?, ?, ?, ?, ?)
"""
LOOKUP = """
SELECT p.label, p.true_label, p.request_id, m.name, m.version, m.labels
FROM predictions p JOIN models m ON m.id = p.model_id WHERE p.prediction_id = ?
"""
LABEL = """
UPDATE predictions SET true_label = ?, feedback_at = ?, feedback_client = ?
WHERE prediction_id = ? AND true_label IS NULL
"""
WINDOW = """
SELECT p.label, p.true_label, m.version, p.feedback_client
FROM predictions p JOIN models m ON m.id = p.model_id
WHERE p.feedback_at IS NOT NULL ORDER BY p.feedback_at DESC, p.id DESC LIMIT ?
"""
PRUNE_UNLABELLED = """
DELETE FROM predictions WHERE id IN (
    SELECT id FROM predictions WHERE feedback_at IS NULL AND id < ? ORDER BY id LIMIT ?
)
"""
PRUNE_LABELLED = """
DELETE FROM predictions WHERE id IN (
    SELECT id FROM predictions WHERE feedback_at IS NOT NULL AND id NOT IN (
        SELECT id FROM predictions WHERE feedback_at IS NOT NULL ORDER BY feedback_at DESC, id DESC LIMIT ?
    ) ORDER BY id LIMIT ?
)
"""
ALL_ROWS = 1 << 62


def window_report(
    rows: list[tuple[str, str, str, str | None]], window: int, labelled_total: int
) -> dict[str, Any]:
    """Accuracy, per-class recall, per-model accuracy and feedback sources of (predicted, true, model
    version, feedback client) rows."""
    correct = sum(predicted == true for predicted, true, *_ in rows)
    per_class: dict[str, dict[str, Any]] = {}
    for label, count in sorted(Counter(true for _, true, *_ in rows).items()):
        hits = sum(predicted == true == label for predicted, true, *_ in rows)
        per_class[label] = {"labelled": count, "recall": hits / count}
    by_model: dict[str, dict[str, Any]] = {}
    for version, count in Counter(version for _, _, version, _ in rows).items():
        hits = sum(predicted == true for predicted, true, v, _ in rows if v == version)
        by_model[version] = {"labelled": count, "accuracy": hits / count}
    clients = Counter(client or "unknown" for *_, client in rows)
    top = [
        {
            "client": client,
            "labelled": count,
            "accuracy": sum(p == t for p, t, _, c in rows if (c or "unknown") == client) / count,
        }
        for client, count in clients.most_common(5)
    ]
    return {
        "window": window,
        "labelled": len(rows),
        "correct": correct,
        "accuracy": correct / len(rows) if rows else None,
        "per_class": per_class,
        "by_model": by_model,
        "labelled_total": labelled_total,
        "sources": {"clients": len(clients), "top": top},
    }


class RateLimiter:
    """Token buckets of `per_minute` requests a minute (bursts of as many) per key; 0 = no limit."""

    def __init__(self, per_minute: int, keys: int = MAX_CLIENTS) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.keys = keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def wait(self, key: str) -> float:
        """Take one request from `key`'s budget: 0 when allowed, else the seconds until it would be."""
        if not self.capacity:
            return 0.0
        now = time.monotonic()
        tokens, then = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.rate)
        allowed = tokens >= 1
        self._buckets[key] = (tokens - 1 if allowed else tokens, now)
        if len(self._buckets) > self.keys:
            self._buckets.popitem(last=False)
        return 0.0 if allowed else (1 - tokens) / self.rate


def mint_id() -> str:
    """A new prediction id: 32 hex digits, the time in milliseconds (6 bytes) then 80 random bits."""
    return (int(time.time() * 1000) % (1 << 48)).to_bytes(6, "big").hex() + secrets.token_hex(10)


def _rate_limited(seconds: float, whose: str) -> ApiError:
    wait = max(1, math.ceil(seconds))
    return ApiError(
        429,
        "rate_limited",
        f"too much feedback from {whose}; retry in {wait} s",
        {"Retry-After": str(wait)},
    )


def _is_busy(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _is_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


class FeedbackStore:
    """Predictions by server-minted id and their ground truth, in the SQLite file FEEDBACK_DB."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        path = settings.feedback_db.strip()
        self.path = str(Path(path).expanduser()) if path else ""
        self.window = settings.accuracy_window
        self.retention_s = settings.feedback_retention_days * DAY
        self.max_rows = settings.feedback_max_rows
        self.max_bytes = int(settings.feedback_max_mb * MIB)
        key = settings.feedback_api_key
        self.api_key = key.get_secret_value().encode() if key and key.get_secret_value() else None
        self.metrics = metrics
        self.problem: str | None = None if self.path else "feedback is disabled (FEEDBACK_DB is empty)"
        self._per_client = RateLimiter(settings.feedback_rate_per_client)
        self._global = RateLimiter(settings.feedback_rate_global)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback-db")
        self._db: sqlite3.Connection | None = None
        self._buffer: deque[tuple[Any, ...]] = deque()
        self._lock = threading.Lock()
        self._flush_queued = False
        self._trouble: str | None = None  # why the last write failed (locked, full), until one succeeds
        self._models: dict[tuple[str, str, tuple[str, ...]], int] = {}
        self._rows = 0
        self._since_count = 0
        self._max_pages = 0
        self._page_size = 4096
        self._reopen_at: float | None = None  # monotonic time from which a failed open is tried again
        self._reopen_wait = REOPEN_MIN_S
        self._reopening: Future[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Open (or create) the database and publish the live accuracy it holds."""
        if self.path:
            await asyncio.wrap_future(self._executor.submit(self._open))

    async def stop(self) -> None:
        """Write what is buffered, then close the database."""
        self._stopping = True
        self._reopen_at = None
        self.problem = self.problem or "the service is shutting down"
        await asyncio.wrap_future(self._executor.submit(self._close))
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    def remember(self, request_id: str, prediction: Prediction) -> str:
        """Mint the prediction's id and buffer the prediction for storage; never blocks (dropped, and
        counted, when the writer is MAX_PENDING behind)."""
        prediction_id = mint_id()
        if self.problem:
            self._reopen_due()
            return prediction_id
        model = (prediction.model.name, prediction.model.version, tuple(prediction.probabilities))
        row = (
            bytes.fromhex(prediction_id),
            request_id,
            time.time(),
            model,
            prediction.label,
            prediction.confidence,
        )
        with self._lock:
            if len(self._buffer) >= MAX_PENDING:
                self.metrics.monitoring_dropped.labels(monitor="feedback_db").inc()
                return prediction_id
            self._buffer.append(row)
            if self._flush_queued:
                return prediction_id
            self._flush_queued = True
        with contextlib.suppress(RuntimeError):  # shutting down: stop() writes what is buffered
            self._executor.submit(self._flush)
        return prediction_id

    def admit(self, client: str, key: str | None) -> None:
        """Let a feedback request in, or raise: 429 over the client's or the global rate, 401/403 without
        the right FEEDBACK_API_KEY. Keyed requests are not limited per client (only untrusted ones are)."""
        trusted = (
            self.api_key is not None
            and key is not None
            and secrets.compare_digest(key.encode(), self.api_key)
        )
        if not trusted:
            if wait := self._per_client.wait(client):
                raise _rate_limited(wait, "this client")
            if self.api_key is not None and not key:
                raise ApiError(
                    401,
                    "missing_feedback_key",
                    "send the feedback key in the X-Feedback-Key header",
                    {"WWW-Authenticate": "APIKey"},
                )
            if self.api_key is not None:
                raise ApiError(403, "invalid_feedback_key", "the X-Feedback-Key header does not match")
        if wait := self._global.wait("all"):
            raise _rate_limited(wait, "all clients")

    async def record(self, prediction_id: str, true_label: str, client: str) -> dict[str, Any]:
        """Store the true label of a prediction; 404 unknown id, 422 not one of its labels, 409 a different
        label already recorded (the same label again is accepted and changes nothing), 503 when the
        database is locked or full."""
        return await self._call(self._guarded, self._record, prediction_id, true_label, client)

    async def performance(self) -> dict[str, Any]:
        """The live accuracy window's report; 503 when the database cannot be read."""
        return await self._call(self._guarded, self._performance)

    async def drain(self) -> None:
        """Wait until what is buffered now has been written (or failed to be)."""
        if self.path:
            await asyncio.wrap_future(self._executor.submit(self._flush))

    def size(self) -> dict[str, int]:
        """Rows, and bytes on disk: the database file, its WAL, and all its files (with the shared-memory
        index) together; blocks until the writer is free (for benchmarks)."""
        sizes = {
            suffix: Path(self.path + suffix).stat().st_size if Path(self.path + suffix).exists() else 0
            for suffix in ("", "-wal", "-shm")
        }
        return {
            "rows": self._executor.submit(self._count).result(),
            "bytes": sum(sizes.values()),
            "database_bytes": sizes[""],
            "wal_bytes": sizes["-wal"],
        }

    async def _call(self, work: Callable[..., T], *args: Any) -> T:
        if self.problem and (reopen := self._reopen_due()):
            await asyncio.wrap_future(reopen)
        if self.problem:
            raise ApiError(503, "feedback_unavailable", self.problem)
        return await asyncio.wrap_future(self._executor.submit(work, *args))

    def _reopen_due(self) -> Future[None] | None:
        """After a failed open, the try under way, or a new one once the backoff has passed; else None."""
        if self._reopening is not None and not self._reopening.done():
            return self._reopening
        if self._reopen_at is None or time.monotonic() < self._reopen_at or self._stopping:
            return None
        self._reopen_at = None  # one try at a time: a failed one sets the next time
        try:
            self._reopening = self._executor.submit(self._open)
        except RuntimeError:  # shutting down
            return None
        return self._reopening

    # --- on the writer thread ---------------------------------------------------------------------------

    def _open(self) -> None:
        """Open the database; on any failure, say why (feedback answers 503) and try again later."""
        if self._stopping:
            return
        db: sqlite3.Connection | None = None
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=OPEN_TIMEOUT_S, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
            # The file never grows past this; SQLite keeps it at its size when it is already bigger.
            wanted = max(self.max_bytes // self._page_size, 1)
            self._max_pages = db.execute(f"PRAGMA max_page_count={wanted}").fetchone()[0]
            self._db = db
            with self._transaction():
                self._migrate()
                for statement in _statements(SCHEMA):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._rows = self._count()
            self._prune_expired()
            self._enforce_caps()
            db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            report = self._performance()
        except Exception as exc:  # whatever the cause, predictions must still be served
            self.problem = f"the feedback database {self.path} cannot be used: {exc}"
            log.error("%s (next try in %.0f s)", self.problem, self._reopen_wait)
            with contextlib.suppress(Exception):
                self._close()
            if db is not None:  # it failed before self._db was set
                with contextlib.suppress(Exception):
                    db.close()
            self._reopen_at = time.monotonic() + self._reopen_wait
            self._reopen_wait = min(self._reopen_wait * 2, REOPEN_MAX_S)
            return
        self.problem = None
        self._reopen_wait = REOPEN_MIN_S
        log.info(
            "feedback database open",
            extra={
                "path": self.path,
                "rows": self._rows,
                "labelled": report["labelled"],
                "live_accuracy": report["accuracy"],
            },
        )

    def _migrate(self) -> None:
        """Schema 1 (keyed by the client's request id) to 2: its labelled rows are kept under new ids (they
        can take no more feedback anyway); its unlabelled ones, whose ids no client ever got, are dropped."""
        db = self._available()
        columns = {row[1] for row in db.execute("PRAGMA table_info(predictions)")}
        if not columns or "prediction_id" in columns:
            return
        db.execute("DROP INDEX IF EXISTS predictions_by_feedback")
        db.execute("DROP INDEX IF EXISTS predictions_by_time")
        db.execute("ALTER TABLE predictions RENAME TO predictions_v1")
        for statement in _statements(SCHEMA):
            db.execute(statement)
        old = db.execute(
            "SELECT request_id, created_at, model_name, model_version, probabilities, label, confidence, "
            "true_label, feedback_at FROM predictions_v1 WHERE feedback_at IS NOT NULL ORDER BY feedback_at"
        ).fetchall()
        kept = corrupt = 0
        for request_id, created, name, version, probabilities, label, confidence, true, at in old:
            try:
                labels = tuple(json.loads(probabilities))
            except (ValueError, TypeError):  # not JSON, or not a list of labels: one bad row stops nothing
                corrupt += 1
                continue
            model = self._model_id((name, version, labels))
            db.execute(
                "INSERT INTO predictions (prediction_id, request_id, created_at, model_id, label, "
                "confidence, true_label, feedback_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (secrets.token_bytes(16), request_id, created, model, label, confidence, true, at),
            )
            kept += 1
        dropped = db.execute("SELECT count(*) FROM predictions_v1").fetchone()[0] - len(old)
        db.execute("DROP TABLE predictions_v1")
        log.warning(
            "feedback database migrated to server-minted prediction ids: %d labelled predictions kept, "
            "%d unlabelled ones dropped, %d corrupt ones (unreadable probabilities) skipped",
            kept,
            dropped,
            corrupt,
        )

    def _close(self) -> None:
        if self._db is not None:
            self._flush()
            self._db.close()
            self._db = None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE (the write lock up front, so a busy database fails here, within the busy
        timeout), COMMIT, or ROLLBACK on any error."""
        db = self._available()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            if db.in_transaction:  # SQLite may already have rolled back (full, I/O error)
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _flush(self) -> None:
        """Write the buffered predictions in one transaction. Locked: they stay buffered for the next
        flush. Full (after pruning) or broken: they are dropped and counted."""
        with self._lock:
            self._flush_queued = False
            rows = list(self._buffer)
        if not rows or self._db is None:
            return
        try:
            self._write(rows)
        except sqlite3.Error as exc:
            if _is_busy(exc):
                self._trouble = "the feedback database is locked by another process"
                log.warning("%d predictions wait to be stored for feedback: %s", len(rows), exc)
                return
            self._forget(len(rows))
            self.metrics.monitoring_dropped.labels(monitor="feedback_db").inc(len(rows))
            self._trouble = (
                "the feedback database is full" if _is_full(exc) else f"the feedback database failed: {exc}"
            )
            log.error("%d predictions not stored for feedback: %s", len(rows), exc)
            return
        # Committed: forget them now, so a failed maintenance step below never writes them twice.
        self._forget(len(rows))
        self._trouble = None
        try:
            self._maintain(len(rows))
        except sqlite3.Error as exc:  # the caps are enforced again after the next write
            log.warning("feedback database maintenance (pruning) failed: %s", exc)

    def _forget(self, count: int) -> None:
        with self._lock:
            for _ in range(count):
                self._buffer.popleft()

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        """Insert the rows in one transaction (full: prune, then once more)."""
        try:
            self._insert(rows)
        except sqlite3.Error as exc:
            # Full: make room (the oldest unlabelled first) and try once more.
            if not _is_full(exc) or not self._prune(max(len(rows), int(self._rows * (1 - LOW_WATER)))):
                raise
            self._insert(rows)

    def _maintain(self, inserted: int) -> None:
        """After `inserted` rows: recount now and then, prune the expired, enforce the caps."""
        self._rows += inserted
        self._since_count += inserted
        if self._since_count >= RECOUNT_EVERY:
            self._since_count = 0
            self._rows = self._count()
            self._prune_expired()
        self._enforce_caps()

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        models = {row[3]: self._model_id(row[3]) for row in rows}
        with self._transaction() as db:
            db.executemany(INSERT, [(*row[:3], models[row[3]], *row[4:]) for row in rows])

    def _model_id(self, model: tuple[str, str, tuple[str, ...]]) -> int:
        """The id of the models row of (name, version, labels), added when new."""
        if model not in self._models:
            db = self._available()
            values = (model[0], model[1], json.dumps(list(model[2])))
            add = "INSERT OR IGNORE INTO models (name, version, labels) VALUES (?, ?, ?)"
            if db.in_transaction:
                db.execute(add, values)
            else:
                with self._transaction():
                    db.execute(add, values)
            found = db.execute(
                "SELECT id FROM models WHERE name = ? AND version = ? AND labels = ?", values
            ).fetchone()
            self._models[model] = found[0]
        return self._models[model]

    def _count(self) -> int:
        return self._available().execute("SELECT count(*) FROM predictions").fetchone()[0]

    def _used_bytes(self) -> int:
        """Bytes of the pages in use (the file keeps freed pages for reuse)."""
        db = self._available()
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self._page_size

    def _enforce_caps(self) -> None:
        """Over FEEDBACK_MAX_ROWS rows or HIGH_WATER of the byte cap: prune down to LOW_WATER of it."""
        if self._rows > self.max_rows:
            self._rows = self._count()
            if self._rows > self.max_rows:
                self._prune(self._rows - int(self.max_rows * LOW_WATER))
        cap = self._max_pages * self._page_size
        used = self._used_bytes()
        if used > cap * HIGH_WATER and self._rows:
            per_row = used / self._rows
            self._prune(math.ceil((used - cap * LOW_WATER) / per_row))

    def _prune(self, excess: int, before_id: int = ALL_ROWS) -> int:
        """Delete up to `excess` rows, the oldest unlabelled first (only those with an id under
        `before_id` when given), then the oldest labelled outside the live accuracy window; the count."""
        deleted = 0
        stages = [(PRUNE_UNLABELLED, lambda n: (before_id, n))]
        if before_id == ALL_ROWS:
            stages.append((PRUNE_LABELLED, lambda n: (self.window, n)))
        for statement, arguments in stages:
            while deleted < excess:
                with self._transaction() as db:
                    cursor = db.execute(statement, arguments(min(PRUNE_BATCH, excess - deleted)))
                if cursor.rowcount <= 0:
                    break
                deleted += cursor.rowcount
        if deleted:
            self._rows = max(self._rows - deleted, 0)
            log.info("pruned %d predictions from the feedback database", deleted)
        return deleted

    def _prune_expired(self) -> None:
        """Delete the predictions older than FEEDBACK_RETENTION_DAYS that never got feedback."""
        if not self.retention_s:
            return
        # Ids grow with time: the first recent row bounds the old ones (no index on created_at needed).
        first_recent = (
            self._available()
            .execute(
                "SELECT id FROM predictions WHERE created_at >= ? ORDER BY id LIMIT 1",
                (time.time() - self.retention_s,),
            )
            .fetchone()
        )
        self._prune(ALL_ROWS, before_id=first_recent[0] if first_recent else ALL_ROWS - 1)

    def _guarded(self, work: Callable[..., T], *args: Any) -> T:
        """Run `work`; a SQLite error becomes a 503 feedback_unavailable (with Retry-After)."""
        try:
            return work(*args)
        except sqlite3.Error as exc:
            if _is_busy(exc):
                reason, wait = "the feedback database is locked by another process", 1
            elif _is_full(exc):
                reason, wait = "the feedback database is full", 60
            else:
                reason, wait = f"the feedback database failed: {exc}", 5
            log.warning("feedback database call %s failed: %s", work.__name__, exc)
            raise ApiError(
                503, "feedback_unavailable", f"{reason}; try again later", {"Retry-After": str(wait)}
            ) from exc

    def _record(self, prediction_id: str, true_label: str, client: str) -> dict[str, Any]:
        self._flush()
        return self._label(prediction_id, true_label, client)

    def _label(self, prediction_id: str, true_label: str, client: str) -> dict[str, Any]:
        db = self._available()
        key = bytes.fromhex(prediction_id)
        found = db.execute(LOOKUP, (key,)).fetchone()
        if found is None:
            if self._trouble:
                raise ApiError(
                    503,
                    "feedback_unavailable",
                    f"{self._trouble}: recent predictions could not be stored; try again later",
                    {"Retry-After": "5"},
                )
            raise ApiError(
                404,
                "prediction_not_found",
                f"no stored prediction has the id {prediction_id!r} (unknown, or pruned: older than the "
                "retention period or past the database's size limit)",
            )
        label, recorded, request_id, model_name, model_version, labels = found
        labels = json.loads(labels)
        if true_label not in labels:
            raise ApiError(422, "invalid_label", f"true_label must be one of {labels}; got {true_label!r}")
        status = "unchanged"
        if recorded is None:
            with self._transaction() as tx:
                changed = tx.execute(LABEL, (true_label, time.time(), client, key)).rowcount
            if changed:
                status = "recorded"
                self.metrics.feedback.labels(outcome="correct" if label == true_label else "incorrect").inc()
            else:  # another worker labelled it in between: its label won
                recorded = db.execute(
                    "SELECT true_label FROM predictions WHERE prediction_id = ?", (key,)
                ).fetchone()[0]
        if recorded is not None and recorded != true_label:
            raise ApiError(
                409,
                "feedback_conflict",
                f"prediction {prediction_id!r} already has the true label {recorded!r}; the first label wins",
            )
        report = self._performance()
        return {
            "prediction_id": prediction_id,
            "request_id": request_id,
            "status": status,
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


def _statements(script: str) -> list[str]:
    """The statements of a script of simple statements (executescript would commit the transaction)."""
    return [statement.strip() for statement in script.split(";") if statement.strip()]
