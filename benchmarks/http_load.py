"""An async HTTP load generator and latency statistics, shared by the serving benchmark and the load test.

Built to cost the server as little CPU as possible on a small machine: every request body is encoded once
up front, each worker keeps one keep-alive connection (its own aiohttp connector, limit 1) and sends its
next request as soon as the previous answer is read, so exactly `concurrency` requests are in flight.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class Request:
    """One pre-encoded POST and what a correct answer looks like (its status and bytes its body holds)."""

    kind: str
    path: str
    body: bytes
    content_type: str
    expect_status: int = 200
    expect_text: tuple[bytes, ...] = ()

    def accepts(self, status: int, body: bytes) -> bool:
        return status == self.expect_status and all(text in body for text in self.expect_text)


def multipart(parts: Sequence[tuple[str, str, bytes, str]]) -> tuple[bytes, str]:
    """A multipart/form-data body of (field, file name, data, content type) parts, and its content type."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, filename, data, content_type in parts:
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        )
        chunks.append(head.encode() + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def upload(
    kind: str,
    data: bytes,
    filename: str,
    content_type: str = "image/jpeg",
    expect_status: int = 200,
    expect_text: tuple[bytes, ...] = (b'"label":',),
) -> Request:
    """POST /predict with one file in the field `file`."""
    body, header = multipart([("file", filename, data, content_type)])
    return Request(kind, "/predict", body, header, expect_status, expect_text)


def batch_upload(
    kind: str, files: Sequence[tuple[str, bytes]], expect_text: tuple[bytes, ...] = ()
) -> Request:
    """POST /predict/batch with (file name, data) files in the field `files`."""
    body, header = multipart([("files", name, data, "image/jpeg") for name, data in files])
    return Request(kind, "/predict/batch", body, header, 200, expect_text)


def base64_request(
    kind: str,
    image: str,
    expect_status: int = 200,
    expect_text: tuple[bytes, ...] = (b'"label":',),
) -> Request:
    """POST /predict/base64 with a JSON body whose `image` field is the given text."""
    body = json.dumps({"image": image}).encode()
    return Request(kind, "/predict/base64", body, "application/json", expect_status, expect_text)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def percentiles(values: Sequence[float], points: Sequence[int] = PERCENTILES) -> dict[str, float]:
    """{"p50": ..., "p95": ..., "p99": ...} of the values (NaN when there are none)."""
    if not values:
        return {f"p{point}": float("nan") for point in points}
    found = np.percentile(np.asarray(values, dtype=np.float64), points)
    return {f"p{point}": round(float(value), 2) for point, value in zip(points, found, strict=True)}


@dataclass
class LoadResult:
    """What a closed-loop load run saw: answers by status and kind, latencies, client-side failures."""

    concurrency: int
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    kinds: dict[str, Counter[int]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def throughput(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)

    def record(self, request: Request, status: int, body: bytes, latency_ms: float) -> None:
        self.latencies_ms.append(latency_ms)
        self.statuses[status] += 1
        self.kinds.setdefault(request.kind, Counter())[status] += 1
        if not request.accepts(status, body):
            self.unexpected[f"{request.kind}: {status} (expected {request.expect_status})"] += 1

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 2),
            "requests": self.answered,
            "throughput_rps": round(self.throughput, 2),
            "latency_ms": percentiles(self.latencies_ms),
            "statuses": {str(status): count for status, count in sorted(self.statuses.items())},
            "kinds": {kind: dict(sorted(counts.items())) for kind, counts in sorted(self.kinds.items())},
            "client_errors": dict(self.errors),
            "unexpected": dict(self.unexpected),
        }


def _session(url: str, timeout: float) -> aiohttp.ClientSession:
    """A session holding one keep-alive connection."""
    return aiohttp.ClientSession(
        base_url=url,
        connector=aiohttp.TCPConnector(limit=1),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


async def _send(session: aiohttp.ClientSession, request: Request, result: LoadResult) -> None:
    started = time.perf_counter()
    try:
        async with session.post(
            request.path, data=request.body, headers={"Content-Type": request.content_type}
        ) as response:
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.errors[type(exc).__name__] += 1
        return
    result.record(request, response.status, body, (time.perf_counter() - started) * 1000)


async def _worker(
    url: str, requests: Sequence[Request], offset: int, stop_at: float, result: LoadResult, timeout: float
) -> None:
    async with _session(url, timeout) as session:
        index = offset
        while time.perf_counter() < stop_at:
            await _send(session, requests[index % len(requests)], result)
            index += 1


async def run_load(
    url: str, requests: Sequence[Request], concurrency: int, seconds: float, timeout: float = 30.0
) -> LoadResult:
    """`concurrency` workers, each cycling through `requests` from its own offset, for `seconds`."""
    result = LoadResult(concurrency)
    step = max(1, len(requests) // concurrency)
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(
        *(_worker(url, requests, worker * step, stop_at, result, timeout) for worker in range(concurrency))
    )
    result.seconds = time.perf_counter() - started
    return result


async def probe(url: str, path: str, seconds: float, interval: float = 0.05) -> list[float]:
    """Latencies (ms) of GET `path` every `interval` for `seconds`, on a connection of its own."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    async with _session(url, 10.0) as session:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            async with session.get(path) as response:
                await response.read()
            if response.status == 200:
                latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(interval)
    return latencies
