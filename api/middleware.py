"""Pure ASGI middleware: request id, access log and HTTP metrics; upload content type and size limits."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from api import logs
from api.errors import BodyTooLarge
from api.metrics import ServiceMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("catdog.api")
SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
HEADER = b"x-request-id"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def send_error(send: Send, status: int, code: str, message: str) -> None:
    """A complete JSON error response, sent from middleware."""
    body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
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


class UploadGuard:
    """Per route: the content type a body must have (415) and its size limit (413), enforced as it streams
    in, so an oversized upload is refused without being read into memory."""

    def __init__(self, app: ASGIApp, rules: dict[str, tuple[str, int]], default_limit: int) -> None:
        self.app = app
        self.rules = rules
        self.default_limit = default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        content_type, limit = self.rules.get(scope["path"], ("", self.default_limit))
        if scope["path"] in self.rules:
            scope.setdefault("state", {})["route"] = scope["path"]
        if content_type:
            given = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if given != content_type:
                shown = f"'{given[:80]}'" if given else "none"
                await send_error(
                    send, 415, "unsupported_media_type", f"{scope['path']} takes {content_type}; got {shown}"
                )
                return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await send_error(
                send,
                413,
                "upload_too_large",
                f"the request body ({length} bytes) is over the limit of {limit} bytes",
            )
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)
