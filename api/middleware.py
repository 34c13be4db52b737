"""Pure ASGI middleware: request id, access log and HTTP metrics; upload content type and size limits."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from python_multipart.multipart import parse_options_header

from api import logs
from api.errors import BodyRefused
from api.metrics import ServiceMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("catdog.api")
SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
HEADER = b"x-request-id"
UNGUARDED = frozenset({"/health", "/ready", "/metrics"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def send_error(
    send: Send, status: int, code: str, message: str, extra: dict[str, str] | None = None
) -> None:
    """A complete JSON error response, sent from middleware."""
    body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.encode(), value.encode()) for name, value in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestContext:
    """Request id (the client's X-Request-ID when safe, else a new one), one access-log line and metrics."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = _header(scope, HEADER)
        rid = incoming if incoming and SAFE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        state = scope.setdefault("state", {})
        state.update(request_id=rid, started=started)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (HEADER, rid.encode())]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            self._record(scope, status, time.perf_counter() - started)
            logs.request_id.reset(token)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or scope.get("state", {}).get("route") or "unmatched"
        self.metrics.requests.labels(route=path, method=scope["method"], status=str(status)).inc()
        self.metrics.latency.labels(route=path).observe(seconds)
        if path == "/metrics" or (path in ("/health", "/ready") and status < 400):
            return
        extra = {
            "route": path,
            "method": scope["method"],
            "status": status,
            "latency_ms": round(seconds * 1000, 2),
            **scope.get("state", {}).get("log", {}),
        }
        log.log(logging.WARNING if status >= 500 else logging.INFO, "request", extra=extra)


@dataclass(frozen=True)
class BodyRule:
    """What a route's request body may be: its content type, total size and, for multipart bodies, how
    many parts and how large each."""

    content_type: str
    max_bytes: int
    max_parts: int = 0
    max_part_bytes: int = 0


class MultipartMeter:
    """Counts the parts of a multipart body and measures each as it streams in, by finding the boundary
    delimiters, so a flood of parts or one oversized part is refused before the form parser holds them
    (Starlette's parser keeps every file part under 1 MB in memory and FastAPI sets no part count)."""

    def __init__(self, boundary: bytes, rule: BodyRule) -> None:
        self.delimiter = b"--" + boundary
        self.rule = rule
        self.parts = -1  # the closing delimiter ends the last part; the first opens the first
        self.seen = 0  # bytes of the body so far
        self.part_start = 0
        self.tail = b""

    def feed(self, chunk: bytes) -> None:
        data = self.tail + chunk
        base = self.seen - len(self.tail)
        self.seen += len(chunk)
        position = 0
        while (found := data.find(self.delimiter, position)) != -1:
            self._end_part(base + found)
            position = found + len(self.delimiter)
            self.part_start = base + position
        if self.seen - self.part_start > self.rule.max_part_bytes:
            self._too_large(self.seen - self.part_start)
        self.tail = data[max(position, len(data) - len(self.delimiter) + 1) :]

    def _end_part(self, at: int) -> None:
        if self.parts >= 0 and at - self.part_start > self.rule.max_part_bytes:
            self._too_large(at - self.part_start)
        self.parts += 1
        if self.parts > self.rule.max_parts:
            raise BodyRefused(
                413,
                "too_many_files",
                f"the form has more than {self.rule.max_parts} parts (files and fields)",
            )

    def _too_large(self, size: int) -> None:
        raise BodyRefused(
            413,
            "upload_too_large",
            f"a file in the form is over {size} bytes, over the limit of {self.rule.max_part_bytes} bytes",
        )


def _boundary(content_type: str) -> bytes | None:
    """The boundary exactly as Starlette's form parser reads it (python-multipart's header parser: the last
    `boundary` parameter, quoted or not), so the meter counts the delimiters the parser will split on."""
    _, params = parse_options_header(content_type)
    return params.get(b"boundary") or None


class RequestGuard:
    """Bounds every request before the app parses it: requests in flight (503 with Retry-After), the
    content type (415), the body's size (413, from Content-Length or as it streams in), the parts of a
    multipart form and each part's size (413), and the time the body takes to arrive (408). Probes and
    /metrics are never refused, so liveness stays fast under any load."""

    def __init__(
        self,
        app: ASGIApp,
        rules: dict[str, BodyRule],
        default_limit: int,
        max_in_flight: int,
        body_timeout: float,
        metrics: ServiceMetrics,
    ) -> None:
        self.app = app
        self.rules = rules
        self.default_limit = default_limit
        self.max_in_flight = max_in_flight
        self.body_timeout = body_timeout
        self.metrics = metrics
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] in ("GET", "HEAD") and scope["path"] in UNGUARDED):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            await self._refuse(
                send,
                503,
                "overloaded",
                f"{self.in_flight} requests are already being handled; try again shortly",
                {"retry-after": "1"},
            )
            return
        self.in_flight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _refuse(
        self, send: Send, status: int, code: str, message: str, extra: dict[str, str] | None = None
    ) -> None:
        self.metrics.guard_refused.labels(reason=code).inc()
        await send_error(send, status, code, message, extra)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        rule = self.rules.get(scope["path"], BodyRule("", self.default_limit))
        if scope["path"] in self.rules:
            scope.setdefault("state", {})["route"] = scope["path"]
        header = _header(scope, b"content-type") or ""
        meter = None
        if rule.content_type:
            given = header.split(";")[0].strip().lower()
            if given != rule.content_type:
                shown = f"'{given[:80]}'" if given else "none"
                await self._refuse(
                    send,
                    415,
                    "unsupported_media_type",
                    f"{scope['path']} takes {rule.content_type}; got {shown}",
                )
                return
            if rule.max_parts:
                boundary = _boundary(header)
                if boundary is None:
                    await self._refuse(send, 400, "invalid_request", "the multipart body has no boundary")
                    return
                meter = MultipartMeter(boundary, rule)
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > rule.max_bytes:
            await self._refuse(
                send,
                413,
                "upload_too_large",
                f"the request body ({length} bytes) is over the limit of {rule.max_bytes} bytes",
            )
            return
        received = 0
        complete = False
        deadline = time.monotonic() + self.body_timeout

        async def guarded_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()  # after the body: only http.disconnect, with no deadline
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.metrics.guard_refused.labels(reason="body_timeout").inc()
                raise BodyRefused(
                    408, "body_timeout", f"the request body did not arrive within {self.body_timeout:g} s"
                ) from None
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                complete = not message.get("more_body", False)
                if received > rule.max_bytes:
                    self.metrics.guard_refused.labels(reason="upload_too_large").inc()
                    raise BodyRefused(
                        413,
                        "upload_too_large",
                        f"the request body is over the limit of {rule.max_bytes} bytes",
                    )
                if meter is not None:
                    try:
                        meter.feed(chunk)
                    except BodyRefused as refused:
                        self.metrics.guard_refused.labels(reason=refused.code).inc()
                        raise
            return message

        await self.app(scope, guarded_receive, send)
