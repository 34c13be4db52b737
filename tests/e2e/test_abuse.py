"""The service under abuse, over HTTP against a real uvicorn process: small files that decode to huge
pictures at concurrency, part floods, oversized parts, padded base64, slow clients and more requests than
it takes. Each answer is a JSON 4xx/503, memory stays inside the budget, and /health keeps answering."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import worst_images
from service_process import Server

from catdog import preprocessing

MiB = 2**20
# Kubernetes' liveness probe gives up after timeoutSeconds (deploy/k8s): a probe slower than this fails.
PROBE_TIMEOUT = 5.0
WORST = ("png_palette_transparent", "png_rgba", "webp_rgba_lossless", "tiff_rgba_deflate", "gif_palette")


@pytest.fixture(scope="module")
def guarded(exported_model: Path, server_factory) -> Server:
    """The service as deployed (1 GiB memory), with a short body timeout for the slow-client tests."""
    return server_factory(
        exported_model / "model.onnx",
        MODEL_PRECISION="fp32",
        MEMORY_LIMIT_MB="1024",
        BODY_TIMEOUT_SECONDS="2",
    )


@pytest.fixture(scope="module")
def small(exported_model: Path, server_factory) -> Server:
    """A service given little memory and few requests at a time: the guards fire."""
    return server_factory(
        exported_model / "model.onnx", MODEL_PRECISION="fp32", MEMORY_LIMIT_MB="300", MAX_IN_FLIGHT="2"
    )


class Prober:
    """Polls /health (and samples the server's RSS) in the background while a test attacks."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.failures: list[str] = []
        self.slowest = 0.0
        self.peak_rss = server.rss_mb()
        self.probes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=PROBE_TIMEOUT) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    status = client.get("/health").status_code
                    if status != 200:
                        self.failures.append(f"/health answered {status}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"/health: {type(exc).__name__}")
                self.slowest = max(self.slowest, time.perf_counter() - started)
                self.probes += 1
                self.peak_rss = max(self.peak_rss, self.server.rss_mb())
                self._stop.wait(0.1)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        slowest = self.slowest * 1000
        print(f"/health: {self.probes} probes, slowest {slowest:.0f} ms; peak RSS {self.peak_rss:.0f} MB")


def _multipart(name: str, filename: str, data: bytes, boundary: str) -> bytes:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return head.encode() + data + b"\r\n"


@contextmanager
def raw_connection(server: Server) -> Iterator[socket.socket]:
    address = urlsplit(server.url)
    sock = socket.create_connection((address.hostname, address.port), timeout=30)
    try:
        yield sock
    finally:
        sock.close()


def _read_response(sock: socket.socket, timeout: float = 30) -> tuple[int, dict[str, str], dict]:
    """Status, headers and JSON body of one HTTP/1.1 response."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
    }
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, json.loads(body or b"{}")


def stream_until_answered(
    server: Server, path: str, parts: Iterator[bytes], boundary: str, length: int | None
) -> tuple[int, dict[str, str], dict, int]:
    """POST a multipart body part by part (chunked when `length` is None, as a client that declares no
    length), stopping as soon as the server answers: status, headers, JSON body and bytes sent."""
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    with raw_connection(server) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n{framing}\r\n\r\n".encode()
        )
        sent = 0
        for part in parts:
            sock.settimeout(5)  # a server that stopped reading (it answered) leaves sendall blocked
            try:
                sock.sendall(part if length is not None else b"%x\r\n%b\r\n" % (len(part), part))
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
            sent += len(part)
            sock.settimeout(0.001)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except (TimeoutError, BlockingIOError):
                pass
        status, headers, body = _read_response(sock)
        return status, headers, body, sent


def test_small_files_that_decode_huge_stay_inside_the_budget_at_concurrency(guarded: Server) -> None:
    """Five formats x three copies, six at a time: each answered 200, or 413 when its estimated decode
    exceeds the whole budget (40 % of 1 GiB); none 5xx, memory under the 1 GiB limit and given back."""
    files = [(name, worst_images.worst(name)) for name in WORST for _ in range(3)]
    assert max(len(data) for _, data in files) < 300_000
    budget = 1024 * MiB * 0.4
    expected = {
        name: 200 if preprocessing.plan_decode(data, size=224).cost_bytes <= budget else 413
        for name, data in files
    }
    assert sorted(expected.values()).count(200) >= 4
    baseline = guarded.rss_mb()

    def send(item: tuple[str, bytes]) -> tuple[str, int, dict]:
        name, data = item
        with httpx.Client(base_url=guarded.url, timeout=120) as client:
            answer = client.post("/predict", files={"file": (name, data)})
        return name, answer.status_code, answer.json()

    with Prober(guarded) as prober, ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, files))
    print(f"RSS before {baseline:.0f} MB, peak {prober.peak_rss:.0f} MB")
    for name, status, body in results:
        assert status == expected[name], (name, body)
        if status == 200:
            assert body["label"] in ("cat", "dog")
        else:
            assert body["error"]["code"] == "image_too_large"
    assert prober.failures == []
    assert prober.peak_rss < 1024, f"peak RSS {prober.peak_rss:.0f} MB"
    time.sleep(1)
    assert guarded.rss_mb() < baseline + 150, f"RSS stayed at {guarded.rss_mb():.0f} MB (was {baseline:.0f})"


def test_a_decode_larger_than_the_whole_budget_is_refused_before_decoding(small: Server) -> None:
    """MEMORY_LIMIT_MB=300 leaves a 120 MB decode budget: a 40-megapixel RGBA PNG (~350 MB) gets 413."""
    with small.client() as client:
        answer = client.post("/predict", files={"file": ("big.png", worst_images.worst("png_rgba"))})
        metrics = client.get("/metrics").text
    assert answer.status_code == 413
    error = answer.json()["error"]
    assert error["code"] == "image_too_large" and "budget" in error["message"]
    assert "catdog_decode_budget_bytes 1.2582912e+08" in metrics


def test_a_flood_of_parts_is_refused_after_the_limit_not_after_parsing(guarded: Server) -> None:
    """300 parts of 900 KB (each under the form parser's in-memory threshold), sent chunked with no
    declared length: 413 too_many_files once the parts outnumber max_batch_files + fields, after ~33 MB
    rather than 270 MB, and the server's memory does not grow by the flood."""
    boundary = "floodboundary"
    part = _multipart("files", "a.png", b"\0" * 900_000, boundary)
    before = guarded.rss_mb()
    status, _, body, sent = stream_until_answered(
        guarded, "/predict/batch", iter([part] * 300), boundary, None
    )
    assert status == 413 and body["error"]["code"] == "too_many_files", body
    assert sent < 45 * MiB
    assert guarded.rss_mb() < before + 100


def test_more_parts_than_files_allowed_is_too_many_files(guarded: Server) -> None:
    boundary = "partsboundary"
    parts = [_multipart("files", f"{i}.png", b"x" * 10, boundary) for i in range(60)]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, _, answer, _ = stream_until_answered(guarded, "/predict/batch", iter([body]), boundary, len(body))
    assert status == 413 and answer["error"]["code"] == "too_many_files"
    assert "parts" in answer["error"]["message"]


def test_one_oversized_part_is_refused_while_it_streams(guarded: Server) -> None:
    """An 11 MB file inside a batch (each file's limit is MAX_UPLOAD_MB=10) is refused mid-part."""
    boundary = "bigpartboundary"
    head = _multipart("files", "big.png", b"", boundary)[:-2]
    chunks = [head] + [b"\0" * MiB] * 11 + [f"\r\n--{boundary}--\r\n".encode()]
    total = sum(len(chunk) for chunk in chunks)
    status, _, body, _ = stream_until_answered(guarded, "/predict/batch", iter(chunks), boundary, total)
    assert status == 413 and body["error"]["code"] == "upload_too_large", body
    # The guard's message (the route's own check says "the file is N bytes"): refused while streaming.
    assert "a file in the form" in body["error"]["message"]


def test_a_batch_body_over_max_batch_mb_is_refused_from_its_length(guarded: Server) -> None:
    status, _, body, sent = stream_until_answered(guarded, "/predict/batch", iter([b"x" * 10]), "x", 41 * MiB)
    assert status == 413 and body["error"]["code"] == "upload_too_large" and sent == 10


def test_padded_base64_is_decoded_off_the_event_loop(guarded: Server, photos: dict[str, list[Path]]) -> None:
    """A photo's base64 with a space after every character (twice the size), four at once, while
    /health is probed: all answered right, no probe fails."""
    photo = photos["cat"][0].read_bytes()
    encoded = base64.b64encode(photo).decode()
    padded = " ".join(encoded)
    assert len(padded) > 2 * len(encoded) - 2

    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=guarded.url, timeout=120) as client:
            return client.post("/predict/base64", json={"image": "data:image/jpeg;base64," + padded})

    with Prober(guarded) as prober, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, range(8)))
    assert [answer.status_code for answer in answers] == [200] * 8
    with guarded.client() as client:
        plain = client.post("/predict", files={"file": ("cat.jpg", photo)}).json()
    assert all(answer.json()["probabilities"] == plain["probabilities"] for answer in answers)
    assert prober.failures == []


def test_invalid_base64_characters_are_a_400(guarded: Server) -> None:
    with guarded.client() as client:
        bad = client.post("/predict/base64", json={"image": "aGVsbG8*"})
        accented = client.post("/predict/base64", json={"image": "aGVsbG8é"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_base64"
    assert accented.status_code == 400 and accented.json()["error"]["code"] == "invalid_base64"


def test_a_slow_client_gets_408_and_the_service_stays_healthy(guarded: Server) -> None:
    """Headers and half a body, then nothing: BODY_TIMEOUT_SECONDS=2 ends it with 408 body_timeout."""
    with raw_connection(guarded) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=slow\r\n"
            b'Content-Length: 100000\r\n\r\n--slow\r\nContent-Disposition: form-data; name="file"; '
            b'filename="a.jpg"\r\n\r\n' + b"\xff" * 1000
        )
        started = time.monotonic()
        status, _, body = _read_response(sock, timeout=30)
        waited = time.monotonic() - started
    assert status == 408 and body["error"]["code"] == "body_timeout", body
    assert waited < 25
    with guarded.client() as client:
        assert client.get("/health").status_code == 200


def test_requests_beyond_max_in_flight_get_503_with_retry_after(small: Server, photos) -> None:
    """Two stalled uploads fill MAX_IN_FLIGHT=2: a third request is refused at once, /health still
    answers, and once they end the service takes requests again."""
    stalled = []
    try:
        for _ in range(2):
            address = urlsplit(small.url)
            sock = socket.create_connection((address.hostname, address.port), timeout=30)
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=s\r\n"
                b"Content-Length: 100000\r\n\r\n--s\r\n"
            )
            stalled.append(sock)
        time.sleep(0.5)
        with small.client() as client:
            refused = client.post("/predict", files={"file": ("cat.jpg", photos["cat"][0].read_bytes())})
            health = client.get("/health")
            metrics = client.get("/metrics").text
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "overloaded" and refused.headers["retry-after"] == "1"
        assert health.status_code == 200
        assert 'catdog_http_requests_refused_total{reason="overloaded"}' in metrics
    finally:
        for sock in stalled:
            sock.close()
    time.sleep(0.5)
    with small.client() as client:
        answer = client.post("/predict", files={"file": ("cat.jpg", photos["cat"][0].read_bytes())})
    assert answer.status_code == 200
