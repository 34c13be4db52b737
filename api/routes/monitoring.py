"""POST /feedback, GET /monitoring/performance and /monitoring/drift: ground truth, live accuracy, drift."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api import errors
from api.deps import DriftDep, FeedbackDep
from api.schemas import DriftReport, FeedbackIn, FeedbackOut, PerformanceReport

router = APIRouter(tags=["monitoring"])


@router.post(
    "/feedback",
    response_model=FeedbackOut,
    summary="Record the true label of a prediction",
    responses=errors.responses(400, 404, 409, 422, 503),
)
async def feedback(request: Request, store: FeedbackDep, body: FeedbackIn) -> FeedbackOut:
    """`{"request_id", "true_label"}` for a prediction this service made (kept across restarts). 404 for an
    unknown request id, 422 for a label the model does not have, 409 when a different true label was
    already recorded; sending the same label again is accepted and changes nothing."""
    result = await store.record(body.request_id, body.true_label)
    request.state.log = {
        "feedback_for": body.request_id,
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
