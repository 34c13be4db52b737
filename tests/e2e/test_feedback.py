"""Feedback that cannot be forged or overflow, against real services over HTTP: server-minted prediction ids
(a reused X-Request-ID never replaces a prediction), the first label wins, the feedback key, rate limits, a
database locked by another process or full (predictions still served, feedback 503) and the row cap."""

from __future__ import annotations

import io
import json
import secrets
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from service_process import Server

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
FEEDBACK_KEY = "test-feedback-key"


def jpeg(shade: int = 120) -> bytes:
    """A small real JPEG (fast to predict)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (shade, 200 - shade // 2, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def predict(client: httpx.Client, image: bytes | None = None, **headers: str) -> dict:
    response = client.post(
        "/predict", files={"file": ("photo.jpg", image or jpeg(), "image/jpeg")}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json()


def send_feedback(
    client: httpx.Client, prediction_id: str, true_label: str, **headers: str
) -> httpx.Response:
    return client.post(
        "/feedback", json={"prediction_id": prediction_id, "true_label": true_label}, headers=headers
    )


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    return error


def rows(database: Path) -> list[dict]:
    """The feedback database's predictions, oldest first, read by this (another) process."""
    with sqlite3.connect(database) as db:
        db.row_factory = sqlite3.Row
        found = db.execute(
            "SELECT hex(prediction_id) AS prediction_id, request_id, label, true_label FROM predictions "
            "ORDER BY id"
        ).fetchall()
    return [{**dict(row), "prediction_id": row["prediction_id"].lower()} for row in found]


def client_from(server: Server, address: str) -> httpx.Client:
    """A client whose connections come from another loopback address (a different client to the server)."""
    return httpx.Client(base_url=server.url, timeout=60, transport=httpx.HTTPTransport(local_address=address))


@pytest.fixture(scope="module")
def service(server_factory, exported_model: Path, tmp_path_factory) -> tuple[Server, Path]:
    database = tmp_path_factory.mktemp("feedback") / "feedback.db"
    server = server_factory(exported_model / "model.onnx", MODEL_PRECISION="fp32", FEEDBACK_DB=str(database))
    return server, database


def test_a_reused_request_id_never_replaces_a_prediction(service, photos) -> None:
    server, database = service
    with server.client() as client:
        victim = predict(client, photos["cat"][0].read_bytes(), **{"X-Request-ID": "shared-id-1"})
        attacker = predict(client, photos["dog"][0].read_bytes(), **{"X-Request-ID": "shared-id-1"})
        by_request_id = send_feedback(client, "shared-id-1", "dog")
        forged = send_feedback(client, attacker["prediction_id"], "cat")
        genuine = send_feedback(client, victim["prediction_id"], "cat")
    assert victim["request_id"] == attacker["request_id"] == "shared-id-1"
    assert victim["prediction_id"] != attacker["prediction_id"]
    assert_error(by_request_id, 422, "invalid_request")
    assert forged.status_code == 200 and forged.json()["predicted_label"] == attacker["label"]
    assert genuine.status_code == 200, genuine.text
    body = genuine.json()
    assert body["status"] == "recorded" and body["prediction_id"] == victim["prediction_id"]
    assert body["predicted_label"] == victim["label"] and body["request_id"] == "shared-id-1"
    stored = {row["prediction_id"]: row for row in rows(database) if row["request_id"] == "shared-id-1"}
    assert stored[victim["prediction_id"]]["label"] == victim["label"]
    assert stored[victim["prediction_id"]]["true_label"] == "cat"
    assert stored[attacker["prediction_id"]]["label"] == attacker["label"]


def test_feedback_needs_the_server_minted_id(service) -> None:
    server, _ = service
    with server.client() as client:
        made = predict(client)
        batch = client.post(
            "/predict/batch", files=[("files", (f"{i}.jpg", jpeg(40 * i), "image/jpeg")) for i in range(3)]
        ).json()
        old_style = client.post("/feedback", json={"request_id": made["request_id"], "true_label": "cat"})
        request_id_as_prediction = send_feedback(client, made["request_id"], "cat")
        guessed = send_feedback(client, secrets.token_hex(16), "cat")
        answers = [send_feedback(client, r["prediction_id"], "dog") for r in batch["results"]]
    ids = [made["prediction_id"], *(r["prediction_id"] for r in batch["results"])]
    assert len(set(ids)) == 4 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert made["prediction_id"] != made["request_id"]
    assert_error(old_style, 422, "invalid_request")
    assert request_id_as_prediction.status_code in (404, 422)
    assert_error(guessed, 404, "prediction_not_found")
    for index, (answer, result) in enumerate(zip(answers, batch["results"], strict=True)):
        assert answer.status_code == 200, answer.text
        assert answer.json()["predicted_label"] == result["label"]
        assert answer.json()["request_id"] == f"{batch['request_id']}:{index}"


def test_the_first_label_wins(service) -> None:
    server, database = service
    with server.client() as client:
        made = predict(client)
        first = send_feedback(client, made["prediction_id"], "cat")
        second = send_feedback(client, made["prediction_id"], "dog")
        same = send_feedback(client, made["prediction_id"], "cat")
        performance = client.get("/monitoring/performance").json()
    assert first.status_code == 200 and first.json()["status"] == "recorded"
    assert "cat" in assert_error(second, 409, "feedback_conflict")["message"]
    assert same.status_code == 200 and same.json()["status"] == "unchanged"
    (row,) = [row for row in rows(database) if row["prediction_id"] == made["prediction_id"]]
    assert row["true_label"] == "cat"
    sources = performance["sources"]
    assert sources["clients"] == 1 and sources["top"][0]["client"] == "127.0.0.1"
    assert sources["top"][0]["labelled"] == performance["labelled"]


def test_flooding_feedback_is_rate_limited(server_factory, exported_model: Path) -> None:
    server = server_factory(
        exported_model / "model.onnx", FEEDBACK_RATE_PER_CLIENT="5", FEEDBACK_RATE_GLOBAL="8"
    )
    with server.client() as first, client_from(server, "127.0.0.2") as second:
        made = predict(first)
        own = [send_feedback(first, made["prediction_id"], "cat") for _ in range(6)]
        others = [send_feedback(second, made["prediction_id"], "cat") for _ in range(4)]
        served = first.get("/monitoring/performance")
    assert [r.status_code for r in own] == [200] * 5 + [429]
    assert "this client" in assert_error(own[-1], 429, "rate_limited")["message"]
    assert int(own[-1].headers["retry-after"]) >= 1
    assert [r.status_code for r in others] == [200] * 3 + [429]
    assert "all clients" in assert_error(others[-1], 429, "rate_limited")["message"]
    assert int(others[-1].headers["retry-after"]) >= 1
    assert served.status_code == 200


def test_the_feedback_key(server_factory, exported_model: Path) -> None:
    server = server_factory(
        exported_model / "model.onnx", FEEDBACK_API_KEY=FEEDBACK_KEY, FEEDBACK_RATE_PER_CLIENT="3"
    )
    with server.client() as client:
        made = predict(client)
        missing = send_feedback(client, made["prediction_id"], "cat")
        wrong = send_feedback(client, made["prediction_id"], "cat", **{"X-Feedback-Key": "guess"})
        admin = send_feedback(client, made["prediction_id"], "cat", **{"X-API-Key": "test-admin-key"})
        keyed = [
            send_feedback(client, made["prediction_id"], "cat", **{"X-Feedback-Key": FEEDBACK_KEY})
            for _ in range(4)
        ]
        after = send_feedback(client, made["prediction_id"], "cat")
    assert_error(missing, 401, "missing_feedback_key")
    assert_error(wrong, 403, "invalid_feedback_key")
    assert_error(admin, 401, "missing_feedback_key")
    # Keyed requests are not limited per client; the three anonymous ones used this client's budget.
    assert [r.status_code for r in keyed] == [200] * 4
    assert keyed[0].json()["status"] == "recorded"
    assert_error(after, 429, "rate_limited")


def test_a_locked_database_never_fails_a_prediction(server_factory, exported_model: Path, tmp_path) -> None:
    database = tmp_path / "feedback.db"
    server = server_factory(exported_model / "model.onnx", FEEDBACK_DB=str(database))
    with server.client() as client:
        before = predict(client)
        assert send_feedback(client, secrets.token_hex(16), "cat").status_code == 404  # stored by now
        holder = sqlite3.connect(database, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            during = [predict(client, jpeg(shade)) for shade in (10, 60, 110)]
            refused_stored = send_feedback(client, before["prediction_id"], "cat")
            refused_new = send_feedback(client, during[0]["prediction_id"], "cat")
            performance = client.get("/monitoring/performance")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        after = [send_feedback(client, p["prediction_id"], "dog") for p in (before, *during)]
    for refused in (refused_stored, refused_new):
        assert "locked" in assert_error(refused, 503, "feedback_unavailable")["message"]
        assert int(refused.headers["retry-after"]) >= 1
    assert performance.status_code in (200, 503)
    # Nothing was lost: the predictions made while the lock was held were written once it was released.
    assert [r.status_code for r in after] == [200] * 4, [r.text for r in after]
    assert [r.json()["predicted_label"] for r in after] == [p["label"] for p in (before, *during)]


def fill(database: Path, max_mb: float) -> int:
    """Fill the feedback database up to FEEDBACK_MAX_MB from this (another) process with labelled predictions
    that are all in the live accuracy window, so the service can prune none of them; the rows written."""
    db = sqlite3.connect(database, isolation_level=None, timeout=10)
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {int(max_mb * MIB) // page_size}")
    labels = json.dumps(["cat", "dog"])
    db.execute("INSERT INTO models (name, version, labels) VALUES ('filler', 'v0', ?)", (labels,))
    model = db.execute("SELECT id FROM models WHERE name = 'filler'").fetchone()[0]
    written, size = 0, 200
    while size:
        now = time.time()
        batch = [
            (secrets.token_bytes(16), secrets.token_hex(16), now, model, "cat", 0.9, "cat", now, "192.0.2.1")
            for _ in range(size)
        ]
        try:
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO predictions (prediction_id, request_id, created_at, model_id, label, "
                "confidence, true_label, feedback_at, feedback_client) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                batch,
            )
            db.execute("COMMIT")
            written += size
        except sqlite3.OperationalError as exc:
            assert "full" in str(exc)
            if db.in_transaction:
                db.execute("ROLLBACK")
            size //= 2
    db.close()
    return written


def test_a_full_database_never_fails_a_prediction(server_factory, exported_model: Path, tmp_path) -> None:
    database = tmp_path / "feedback.db"
    server = server_factory(
        exported_model / "model.onnx",
        FEEDBACK_DB=str(database),
        FEEDBACK_MAX_MB="1",
        FEEDBACK_MAX_ROWS="100000",
        ACCURACY_WINDOW="100000",
        FEEDBACK_RATE_PER_CLIENT="0",
    )
    with server.client() as client:
        predict(client)
        assert send_feedback(client, secrets.token_hex(16), "cat").status_code == 404  # schema written
        assert fill(database, 1) > 1000
        answers = []
        for shade in range(200):  # the service fills what little room is left, then has to drop
            made = predict(client, jpeg(shade))
            answers.append(send_feedback(client, made["prediction_id"], "cat"))
            if answers[-1].status_code != 200:
                break
    assert "full" in assert_error(answers[-1], 503, "feedback_unavailable")["message"]
    assert int(answers[-1].headers["retry-after"]) >= 1
    assert database.stat().st_size <= 1 * MIB


def test_the_row_cap_prunes_the_oldest_unlabelled_first(
    server_factory, exported_model: Path, tmp_path
) -> None:
    database = tmp_path / "feedback.db"
    server = server_factory(
        exported_model / "model.onnx",
        FEEDBACK_DB=str(database),
        FEEDBACK_MAX_ROWS="20",
        ACCURACY_WINDOW="5",
        FEEDBACK_RATE_PER_CLIENT="0",
    )
    with server.client() as client:
        made = [predict(client, jpeg(shade)) for shade in range(4)]
        labelled = [send_feedback(client, p["prediction_id"], "cat") for p in made[:2]]
        made += [predict(client, jpeg(shade)) for shade in range(4, 30)]
        newest = send_feedback(client, made[-1]["prediction_id"], "dog")
        kept = [send_feedback(client, p["prediction_id"], "cat") for p in made[:2]]
        pruned = send_feedback(client, made[2]["prediction_id"], "cat")
        performance = client.get("/monitoring/performance").json()
    stored = rows(database)
    ids = [row["prediction_id"] for row in stored]
    assert all(r.status_code == 200 for r in labelled) and newest.status_code == 200
    assert len(stored) <= 20
    assert ids[:2] == [p["prediction_id"] for p in made[:2]]  # labelled: kept, still the oldest
    assert [r.json()["status"] for r in kept] == ["unchanged", "unchanged"]
    assert_error(pruned, 404, "prediction_not_found")
    assert made[2]["prediction_id"] not in ids and made[3]["prediction_id"] not in ids
    assert ids[-1] == made[-1]["prediction_id"]
    assert performance["labelled"] == performance["labelled_total"] == 3
