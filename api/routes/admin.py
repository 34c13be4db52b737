"""POST /admin/reload: load a new model and swap it in atomically (admin key required)."""

from __future__ import annotations

import logging
import time
from typing import Annotated

from fastapi import APIRouter, Body, Depends

from api import errors
from api.deps import PredictorDep, SettingsDep, require_admin
from api.errors import ApiError
from api.model_loader import ModelLoadError
from api.schemas import ModelRef, ReloadIn, ReloadOut

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
    the model they started with. When the new model fails to load or to answer, the old one keeps serving
    and the answer (422 model_load_failed) says why."""
    body = body or ReloadIn()
    previous = predictor.bundle
    started = time.perf_counter()
    try:
        bundle = await predictor.reload(
            body.model_uri or settings.model_uri, body.precision or settings.model_precision
        )
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
