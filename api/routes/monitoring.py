"""POST /feedback, GET /monitoring/performance, /monitoring/drift and /monitoring/window: ground truth, live
accuracy, drift, and (MONITORING_EXPOSE_WINDOW, admin key) the drift window's per-image properties."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Security
from pydantic import BaseModel, Field

from api import errors
from api.deps import DriftDep, FeedbackDep, SettingsDep, admin_key_header, require_admin
from api.errors import ApiError
from api.schemas import DriftReport, FeedbackIn, FeedbackOut, PerformanceReport

router = APIRouter(tags=["monitoring"])
# A plain optional header, not a security scheme: whether it is needed depends on the deployment
# (FEEDBACK_API_KEY), and a declared scheme would tell clients and schema-driven tools it always is.
FeedbackKey = Annotated[
    str | None,
    Header(
        alias="X-Feedback-Key",
        max_length=256,
        description="The service's FEEDBACK_API_KEY; needed only when the service sets one.",
    ),
]


@router.post(
    "/feedback",
    response_model=FeedbackOut,
    summary="Record the true label of a prediction",
    responses=errors.responses(400, 401, 403, 404, 409, 422, 429, 503),
)
async def feedback(
    request: Request,
    store: FeedbackDep,
    body: FeedbackIn,
    key: FeedbackKey = None,
) -> FeedbackOut:
    """`{"prediction_id", "true_label"}` for a prediction this service made (kept across restarts). The
    first label wins: 409 for a different one, the same again changes nothing. 404 for an unknown prediction
    id, 422 for a label the model does not have; 401/403 without the X-Feedback-Key when FEEDBACK_API_KEY is
    set; 429 over the rate limits and 503 while the database is locked or full (both with Retry-After)."""
    client = request.client.host if request.client else "unknown"
    store.admit(client, key)
    result = await store.record(body.prediction_id, body.true_label, client)
    request.state.log = {
        "feedback_for": body.prediction_id,
        "prediction_request_id": result["request_id"],
        "feedback_client": client,
        "true_label": body.true_label,
        "correct": result["correct"],
        "feedback": result["status"],
    }
    return FeedbackOut.model_validate(result)


@router.get(
    "/monitoring/performance",
    response_model=PerformanceReport,
    summary="Live accuracy from ground-truth feedback",
    responses=errors.responses(503),
)
async def performance(store: FeedbackDep) -> PerformanceReport:
    """Accuracy, per-class recall and per-model accuracy of the last ACCURACY_WINDOW labelled predictions."""
    return PerformanceReport.model_validate(await store.performance())


@router.get("/monitoring/drift", response_model=DriftReport, summary="Data drift of recent predictions")
async def drift(monitor: DriftDep) -> DriftReport:
    """PSI of each image property and of the model's confidence over the last DRIFT_WINDOW predicted images
    against the served model's reference statistics; drift is judged from DRIFT_MIN_IMAGES images on."""
    return DriftReport.model_validate(monitor.report())


class DriftWindow(BaseModel):
    model_version: str | None = Field(description="The served model the window belongs to.")
    window: int = Field(description="DRIFT_WINDOW: the most recent images kept.")
    images: int = Field(description="Images in the window now (rows).")
    properties: list[str] = Field(description="The names every row has, in order.")
    rows: list[dict[str, float | None]] = Field(
        description="One per image, oldest first: its properties and the model's confidence (null when "
        "unmeasurable). Numbers only: no pixels, file names or request ids."
    )


@router.get(
    "/monitoring/window",
    response_model=DriftWindow,
    summary="The drift window's per-image properties (for the deepchecks drift report)",
    responses=errors.responses(401, 403, 404),
)
async def window(
    monitor: DriftDep, settings: SettingsDep, key: Annotated[str | None, Security(admin_key_header)] = None
) -> DriftWindow:
    """The properties of the images now in the drift window, for `python -m catdog drift-report`. The admin
    key is required first (401 without it, 403 with a wrong one or when ADMIN_API_KEY is unset); then 404
    unless MONITORING_EXPOSE_WINDOW is true. The window is empty while the model has no reference
    statistics."""
    require_admin(settings, key)
    if not settings.monitoring_expose_window:
        raise ApiError(
            404,
            "window_not_exposed",
            "the drift window is not exposed: set MONITORING_EXPOSE_WINDOW=true (and ADMIN_API_KEY) "
            "to enable it",
        )
    return DriftWindow.model_validate(monitor.window())
