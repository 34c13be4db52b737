"""The ASGI app (`api.main:app`): FastAPI over ONNX Runtime, with micro-batching, metrics and JSON logs.

Run it with `make serve`, `python -m api` or `uvicorn api.main:app --port 8000`; settings come from
environment variables (api/settings.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from api import errors, logs
from api.budget import return_freed_memory_to_the_system
from api.feedback import FeedbackStore
from api.metrics import ServiceMetrics
from api.middleware import BodyRule, RequestContext, RequestGuard
from api.monitoring import DriftMonitor
from api.predictor import Predictor
from api.routes import admin, monitoring, page, predict, system
from api.settings import MB, Settings, get_settings

MULTIPART_SLACK = 64 * 1024
PART_HEADERS = 4 * 1024  # a form part's own headers (name, file name, content type) on top of its file
EXTRA_FORM_FIELDS = 4  # fields a client may send beside the files (ignored, but parsed and counted)
DESCRIPTION = """Cats-vs-Dogs classifier. Upload a photo, get P(cat) and P(dog).

* `curl -F file=@cat.jpg localhost:8000/predict`
* several at once: `curl -F files=@a.jpg -F files=@b.png localhost:8000/predict/batch`
* JSON: `curl -H 'content-type: application/json' -d '{"image": "<base64>"}' localhost:8000/predict/base64`
* the true label, later: `curl -H 'content-type: application/json'
  -d '{"prediction_id": "<its prediction_id>", "true_label": "cat"}' localhost:8000/feedback`

Every error is `{"error": {"code", "message"}}` with a 4xx status for bad input.
"""


def _version() -> str:
    try:
        return version("catdog")
    except PackageNotFoundError:
        return "0.0.0"


def upload_rules(settings: Settings) -> dict[str, BodyRule]:
    """Per upload route: the content type it takes, the largest body it reads and, for forms, how many
    parts (files and fields) of what size."""
    one = settings.max_upload_bytes + MULTIPART_SLACK
    part = settings.max_upload_bytes + PART_HEADERS
    batch = min(int(settings.max_batch_mb * MB), settings.max_upload_bytes * settings.max_batch_files)
    return {
        "/predict": BodyRule("multipart/form-data", one, 1 + EXTRA_FORM_FIELDS, part),
        "/predict/batch": BodyRule(
            "multipart/form-data", batch + MULTIPART_SLACK, settings.max_batch_files + EXTRA_FORM_FIELDS, part
        ),
        # base64 is 4/3 of the bytes, plus room for line breaks and a data: URL prefix.
        "/predict/base64": BodyRule("application/json", settings.max_upload_bytes * 3 // 2 + MULTIPART_SLACK),
    }


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service: routes, error handlers, middleware; the model loads when the app starts."""
    settings = settings or get_settings()
    logs.configure(settings.log_level)
    return_freed_memory_to_the_system()
    metrics = ServiceMetrics()
    drift = DriftMonitor(settings, metrics)
    feedback = FeedbackStore(settings, metrics)
    predictor = Predictor(settings, metrics, drift)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        drift.start()
        await feedback.start()
        await predictor.start()
        yield
        await predictor.stop()
        await feedback.stop()
        drift.stop()

    app = FastAPI(
        title="catdog prediction service",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "predict", "description": "Images in, class probabilities out."},
            {"name": "operations", "description": "Health, readiness, metrics and the model."},
            {"name": "monitoring", "description": "Ground-truth feedback, live accuracy and data drift."},
            {"name": "admin", "description": "Needs the X-API-Key header (ADMIN_API_KEY)."},
        ],
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.predictor = predictor
    app.state.drift = drift
    app.state.feedback = feedback
    errors.install(app)
    for module in (predict, monitoring, system, admin, page):
        app.include_router(module.router)
    app.add_middleware(
        RequestGuard,
        rules=upload_rules(settings),
        default_limit=MULTIPART_SLACK,
        max_in_flight=settings.max_in_flight,
        body_timeout=settings.body_timeout_seconds,
        metrics=metrics,
    )
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(RequestContext, metrics=metrics)
    return app


app = create_app()
