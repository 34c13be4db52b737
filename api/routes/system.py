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


@router.get(
    "/health",
    response_model=Health,
    summary="Liveness: the process can serve (or recover)",
    responses={503: {"model": Health, "description": "Only a restart can help."}},
)
async def health(predictor: PredictorDep) -> Response:
    """200 while the process can serve or recover by itself, with or without a model (see /ready); 503
    when only a restart helps: the inference loop could not be restarted, more than
    INFERENCE_MAX_HUNG_THREADS hung model calls are still running, or the canary kept failing."""
    problem = predictor.batcher.unrecoverable
    if problem is not None:
        return JSONResponse(Health(status="unhealthy", detail=problem).model_dump(), status_code=503)
    return JSONResponse(Health(status="ok").model_dump(exclude_none=True))


@router.get(
    "/ready",
    response_model=Readiness,
    summary="Readiness: a model is loaded and warmed up",
    responses={
        503: {
            "model": Readiness,
            "description": "No model is serving (loading, or it failed to load), or inference is failing or "
            "hung until a model call works again.",
        }
    },
)
async def ready(predictor: PredictorDep) -> Response:
    """200 only once a model is loaded, has answered a warm-up prediction, and no model call has failed since
    the last one that worked; 503 with a short reason otherwise."""
    bundle = predictor.bundle
    if bundle is None or not predictor.ready:
        model = ModelRef(name=bundle.name, version=bundle.version) if bundle else None
        body = Readiness(status="not_ready", ready=False, model=model, detail=predictor.reason)
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
