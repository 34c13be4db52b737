"""One JSON error shape for every failure: {"error": {"code", "message"}}, the right status, no traceback."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from catdog.preprocessing import ImageDecodeError

log = logging.getLogger("catdog.api")

# The shared preprocessing module's stable codes -> (HTTP status, API error code).
DECODE_ERRORS: dict[str, tuple[int, str]] = {
    "empty": (400, "empty_file"),
    "not_an_image": (415, "not_an_image"),
    "unsupported_format": (415, "unsupported_format"),
    "truncated": (422, "corrupt_image"),
    "too_large": (413, "image_too_large"),
    "too_small": (422, "image_too_small"),
}


class ApiError(Exception):
    """A failure the client should see as it is (status, stable code, message)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class BodyRefused(HTTPException):
    """Raised while the body streams in (too large, too many parts, too slow), so FastAPI's body parsing
    passes it through unchanged and the client gets it with its own code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, message)
        self.code = code


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable error code.", examples=["not_an_image"])
    message: str = Field(
        description="What went wrong, for a person.",
        examples=["the content is not a recognised image format"],
    )


class ErrorBody(BaseModel):
    error: ErrorDetail


def decode_error(exc: ImageDecodeError) -> ApiError:
    """The API error for an image the shared preprocessing module refused."""
    status, code = DECODE_ERRORS.get(exc.code, (422, exc.code))
    return ApiError(status, code, exc.message)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _status_code_name(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


def _validation_message(errors: list[dict[str, Any]]) -> str:
    """A short sentence per problem, e.g. "body.file: Field required" (never echoing the input)."""
    parts = []
    for error in errors[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
    return "; ".join(parts) or "the request is invalid"


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = exc.code if isinstance(exc, BodyRefused) else _status_code_name(exc.status_code)
    message = exc.detail if isinstance(exc.detail, str) else _status_code_name(exc.status_code)
    return error_response(exc.status_code, code, message, getattr(exc, "headers", None))


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "invalid_request", _validation_message(list(exc.errors())))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(500, "internal_error", "an unexpected error occurred; it has been logged")


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the one JSON shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses, all with the ErrorBody schema."""
    return {
        status: {"model": ErrorBody, "description": HTTPStatus(status).phrase}
        for status in sorted(set(statuses))
    }
