"""GET /health, /ready, /metrics and /model: liveness, readiness, Prometheus metrics, model facts."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api import errors
from api.deps import MetricsDep, PredictorDep
from api.schemas import Health, ModelOut, ModelRef, Readiness

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
async def health() -> Health:
    """Always 200 while the process runs (it does not look at the model: see /ready)."""
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Readiness,
    summary="Readiness: a model is loaded and warmed up",
    responses={503: {"model": Readiness, "description": "No model is serving yet (or it failed to load)."}},
)
async def ready(predictor: PredictorDep) -> Response:
    """200 only once a model is loaded and has answered a warm-up prediction; 503 (with the reason) before."""
    bundle = predictor.bundle
    if bundle is None:
        body = Readiness(status="not_ready", ready=False, detail=predictor.status)
        return JSONResponse(body.model_dump(), status_code=503)
    body = Readiness(
        status="ready", ready=True, model=ModelRef(name=bundle.name, version=bundle.version), detail="ready"
    )
    return JSONResponse(body.model_dump())


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}},
)
async def metrics(metrics: MetricsDep, predictor: PredictorDep) -> Response:
    """Requests by route and status, latency, predictions by label, confidence, batch sizes, model info."""
    metrics.queue.set(predictor.batcher.waiting)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/model", response_model=ModelOut, summary="The model being served", responses=errors.responses(503)
)
async def model(predictor: PredictorDep) -> ModelOut:
    """Name, version, precision, labels, preprocessing, test metrics, lineage and the model card."""
    bundle = predictor.current()
    return ModelOut(
        name=bundle.name,
        version=bundle.version,
        precision=bundle.precision,
        uri=bundle.uri,
        labels=list(bundle.labels),
        preprocessing=asdict(bundle.config),
        metrics=bundle.metrics,
        lineage=bundle.lineage(),
        registry=bundle.registry,
        loaded_at=bundle.loaded_at,
        card=bundle.card,
    )
