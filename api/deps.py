"""FastAPI dependencies: the app's settings, predictor, monitors and feedback store; the admin key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from api.errors import ApiError
from api.feedback import FeedbackStore
from api.metrics import ServiceMetrics
from api.monitoring import DriftMonitor
from api.predictor import Predictor
from api.settings import Settings

admin_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="The ADMIN_API_KEY of the service."
)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_predictor(request: Request) -> Predictor:
    return request.app.state.predictor


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


def get_drift(request: Request) -> DriftMonitor:
    return request.app.state.drift


def get_feedback(request: Request) -> FeedbackStore:
    return request.app.state.feedback


SettingsDep = Annotated[Settings, Depends(get_settings)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
DriftDep = Annotated[DriftMonitor, Depends(get_drift)]
FeedbackDep = Annotated[FeedbackStore, Depends(get_feedback)]


def require_admin(
    settings: SettingsDep, key: Annotated[str | None, Security(admin_key_header)] = None
) -> None:
    """401 without a key, 403 with a wrong one or when ADMIN_API_KEY is not set (admin disabled)."""
    configured = settings.admin_api_key
    if configured is None or not configured.get_secret_value():
        raise ApiError(403, "admin_disabled", "the admin API is disabled: set ADMIN_API_KEY to enable it")
    if not key:
        raise ApiError(
            401,
            "missing_api_key",
            "send the admin key in the X-API-Key header",
            {"WWW-Authenticate": "APIKey"},
        )
    if not secrets.compare_digest(key.encode(), configured.get_secret_value().encode()):
        raise ApiError(403, "invalid_api_key", "the X-API-Key header does not match ADMIN_API_KEY")
