"""POST /admin/reload: load a new model and swap it in atomically; GET /admin/status: the service's health
in full (admin key required)."""

from __future__ import annotations

import logging
import time
from typing import Annotated

from fastapi import APIRouter, Body, Depends

from api import errors
from api.deps import PredictorDep, SettingsDep, require_admin
from api.errors import ApiError
from api.model_loader import ModelLoadError, UriNotAllowed, allowed_model_dir, check_reload_uri
from api.schemas import AdminStatus, ModelRef, ReloadIn, ReloadOut

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])
log = logging.getLogger("catdog.api")


@router.post(
    "/reload",
    response_model=ReloadOut,
    summary="Load a model and swap it in",
    responses=errors.responses(400, 401, 403, 422),
)
async def reload(
    predictor: PredictorDep, settings: SettingsDep, body: Annotated[ReloadIn | None, Body()] = None
) -> ReloadOut:
    """Loads `model_uri` (default MODEL_URI), warms it up, then swaps it in; requests in flight finish on
    the model they started with. `model_uri` may be MODEL_URI, a models:/ registry URI or a path inside
    MODEL_DIR_ALLOWED (400 model_uri_not_allowed otherwise, before anything is read). When the new model
    fails to load or to answer, the old one keeps serving and the answer (422 model_load_failed) says why."""
    body = body or ReloadIn()
    previous = predictor.bundle
    started = time.perf_counter()
    try:
        uri = check_reload_uri(
            body.model_uri or settings.model_uri,
            allowed_model_dir(settings.model_dir_allowed, settings.model_uri),
            settings.model_uri,
        )
    except UriNotAllowed as exc:
        log.warning("reload refused: %s", exc)
        raise ApiError(400, "model_uri_not_allowed", str(exc)) from exc
    try:
        bundle = await predictor.reload(uri, body.precision or settings.model_precision)
    except ModelLoadError as exc:
        log.warning("reload refused: %s", exc)
        kept = f"; still serving {previous.name} version {previous.version}" if previous else ""
        raise ApiError(422, "model_load_failed", f"{exc}{kept}") from exc
    return ReloadOut(
        status="reloaded",
        previous=ModelRef(name=previous.name, version=previous.version) if previous else None,
        model=ModelRef(name=bundle.name, version=bundle.version),
        seconds=round(time.perf_counter() - started, 3),
    )


@router.get(
    "/status",
    response_model=AdminStatus,
    summary="The service's health in full",
    responses=errors.responses(401, 403),
)
async def status(predictor: PredictorDep) -> AdminStatus:
    """What GET /ready and /health sum up in a few words, with the details they leave out: the last load
    error, the served model's URI, the inference loop's failures, timeouts, restarts and hung threads."""
    return AdminStatus.model_validate(predictor.admin_state())
