"""POST /predict, /predict/batch and /predict/base64: image in, class probabilities out."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import time
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, File, Request, UploadFile

from api import errors
from api.deps import FeedbackDep, PredictorDep, SettingsDep
from api.errors import ApiError
from api.feedback import FeedbackStore
from api.predictor import Prediction
from api.schemas import (
    Base64In,
    BatchError,
    BatchOut,
    BatchPrediction,
    InDistributionOut,
    ModelRef,
    PredictionOut,
)
from catdog.preprocessing import ImageSource

router = APIRouter(tags=["predict"])
WHITESPACE = b" \t\r\n\v\f"
DATA_URL = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)
FORMATS = "JPEG, PNG, GIF (first frame), WebP, BMP or TIFF; the format is read from the bytes, not the name"


def _elapsed_ms(request: Request) -> float:
    return round((time.perf_counter() - request.state.started) * 1000, 2)


def _safe_name(name: str | None) -> str | None:
    """The client's file name, cut short, for the response and the (JSON-escaped) log."""
    return name[:200] if name else None


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, "upload_too_large", f"the file is {size} bytes, over the limit of {limit} bytes")


def upload_source(upload: UploadFile, limit: int) -> BinaryIO:
    """The uploaded file, rewound, for the decoder to read from where the form parser put it (memory up
    to 1 MB, then a temporary file): its bytes are never copied into one buffer."""
    size = upload.size
    if size is None:
        size = upload.file.seek(0, io.SEEK_END)
    if size > limit:
        raise _too_large(size, limit)
    upload.file.seek(0)
    return upload.file


def _model(prediction: Prediction) -> ModelRef:
    return ModelRef(name=prediction.model.name, version=prediction.model.version)


def _in_distribution(prediction: Prediction) -> InDistributionOut | None:
    verdict = prediction.in_distribution
    if verdict is None:
        return None
    return InDistributionOut(score=verdict.score, threshold=verdict.threshold, flag=verdict.flag)


def _log(request: Request, prediction: Prediction, filename: str | None) -> None:
    verdict = prediction.in_distribution
    request.state.log = {
        "model": prediction.model.name,
        "model_version": prediction.model.version,
        "label": prediction.label,
        "confidence": round(prediction.confidence, 4),
        "in_distribution": None if verdict is None else verdict.flag,
        "upload_name": filename,
    }


async def _answer(
    request: Request, predictor: Any, feedback: FeedbackStore, source: ImageSource, filename: str | None
) -> PredictionOut:
    prediction = await predictor.predict(source)
    prediction_id = feedback.remember(request.state.request_id, prediction)
    _log(request, prediction, filename)
    return PredictionOut(
        label=prediction.label,
        probabilities=prediction.probabilities,
        model=_model(prediction),
        in_distribution=_in_distribution(prediction),
        prediction_id=prediction_id,
        request_id=request.state.request_id,
        latency_ms=_elapsed_ms(request),
    )


@router.post(
    "/predict",
    response_model=PredictionOut,
    summary="Classify one uploaded image",
    responses=errors.responses(400, 413, 415, 422, 503),
)
async def predict(
    request: Request,
    predictor: PredictorDep,
    settings: SettingsDep,
    feedback: FeedbackDep,
    file: Annotated[UploadFile, File(description=f"The image: {FORMATS}.")],
) -> PredictionOut:
    """Multipart upload (field `file`): `curl -F file=@cat.jpg localhost:8000/predict`."""
    source = upload_source(file, settings.max_upload_bytes)
    return await _answer(request, predictor, feedback, source, _safe_name(file.filename))


@router.post(
    "/predict/batch",
    response_model=BatchOut,
    summary="Classify several uploaded images",
    responses=errors.responses(400, 413, 415, 422, 503),
)
async def predict_batch(
    request: Request,
    predictor: PredictorDep,
    settings: SettingsDep,
    feedback: FeedbackDep,
    files: Annotated[
        list[UploadFile], File(description=f"The images (repeat the field `files`): {FORMATS}.")
    ],
) -> BatchOut:
    """One result per file, in order; a bad file gets its own error and never fails the others. Each
    prediction has its own prediction_id for feedback."""
    if len(files) > settings.max_batch_files:
        raise ApiError(
            413, "too_many_files", f"{len(files)} files sent; at most {settings.max_batch_files} per request"
        )
    predictor.current()
    # One model batch of files at a time per request: a batch request never holds more decodes (and
    # their memory) than a model batch needs, and leaves the decode budget to other requests.
    turns = asyncio.Semaphore(settings.batch_max_size)

    async def one(index: int, upload: UploadFile) -> BatchPrediction | BatchError:
        name = _safe_name(upload.filename)
        try:
            async with turns:
                prediction = await predictor.predict(upload_source(upload, settings.max_upload_bytes))
        except ApiError as exc:
            return BatchError(filename=name, error=errors.ErrorDetail(code=exc.code, message=exc.message))
        prediction_id = feedback.remember(f"{request.state.request_id}:{index}", prediction)
        return BatchPrediction(
            filename=name,
            prediction_id=prediction_id,
            label=prediction.label,
            probabilities=prediction.probabilities,
            model=_model(prediction),
            in_distribution=_in_distribution(prediction),
        )

    results = await asyncio.gather(*(one(index, upload) for index, upload in enumerate(files)))
    labels = [r.label for r in results if isinstance(r, BatchPrediction)]
    request.state.log = {"files": len(files), "predicted": len(labels), "labels": labels[:64]}
    return BatchOut(
        results=list(results), request_id=request.state.request_id, latency_ms=_elapsed_ms(request)
    )


def decode_base64(text: str, limit: int) -> bytes:
    """The bytes of a base64 string (standard alphabet, optional data: URL prefix, whitespace ignored).

    Linear in the input with one copy per step (no per-character lists: splitting a whitespace-padded
    13 MB body into words cost ~345 MB); the route runs it in a worker thread."""
    head = DATA_URL.match(text[:4096].lstrip())
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ApiError(400, "invalid_base64", "the image field is not valid base64: non-ASCII text") from exc
    if head:
        raw = raw.lstrip()[head.end() :]
    raw = raw.translate(None, WHITESPACE)
    size = len(raw) * 3 // 4 - raw[-2:].count(b"=")  # the decoded length: padding carries no bytes
    if size > limit:
        raise _too_large(size, limit)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "invalid_base64", f"the image field is not valid base64: {exc}") from exc


@router.post(
    "/predict/base64",
    response_model=PredictionOut,
    summary="Classify one base64-encoded image",
    responses=errors.responses(400, 413, 415, 422, 503),
)
async def predict_base64(
    request: Request, predictor: PredictorDep, settings: SettingsDep, feedback: FeedbackDep, body: Base64In
) -> PredictionOut:
    """JSON body `{"image": "<base64>"}`; the same answer as /predict."""
    data = await asyncio.to_thread(decode_base64, body.image, settings.max_upload_bytes)
    return await _answer(request, predictor, feedback, data, _safe_name(body.filename))
