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
from api.feedback import FeedbackStore
from api.metrics import ServiceMetrics
from api.middleware import RequestContext, UploadGuard
from api.monitoring import DriftMonitor
from api.predictor import Predictor
from api.routes import admin, monitoring, page, predict, system
from api.settings import Settings, get_settings

MULTIPART_SLACK = 64 * 1024
DESCRIPTION = """Cats-vs-Dogs classifier. Upload a photo, get P(cat) and P(dog).

* `curl -F file=@cat.jpg localhost:8000/predict`
* several at once: `curl -F files=@a.jpg -F files=@b.png localhost:8000/predict/batch`
* JSON: `curl -H 'content-type: application/json' -d '{"image": "<base64>"}' localhost:8000/predict/base64`
* the true label, later: `curl -H 'content-type: application/json'
  -d '{"request_id": "<id>", "true_label": "cat"}' localhost:8000/feedback`

Every error is `{"error": {"code", "message"}}` with a 4xx status for bad input.
"""


def _version() -> str:
    try:
        return version("catdog")
    except PackageNotFoundError:
        return "0.0.0"


def upload_rules(settings: Settings) -> dict[str, tuple[str, int]]:
    """Per upload route: the content type it takes and the largest body it reads."""
    one = settings.max_upload_bytes + MULTIPART_SLACK
    return {
        "/predict": ("multipart/form-data", one),
        "/predict/batch": (
            "multipart/form-data",
            settings.max_upload_bytes * settings.max_batch_files + MULTIPART_SLACK,
        ),
        "/predict/base64": ("application/json", settings.max_upload_bytes * 4 // 3 + MULTIPART_SLACK),
    }


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service: routes, error handlers, middleware; the model loads when the app starts."""
    settings = settings or get_settings()
    logs.configure(settings.log_level)
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
    app.add_middleware(UploadGuard, rules=upload_rules(settings), default_limit=MULTIPART_SLACK)
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
