"""The predictor owns the model: loading, warm-up, readiness, atomic reloads (each telling the drift monitor
which model and reference it now judges against) and micro-batched predictions, each with the model's
out-of-distribution verdict when the model has the `pet_score` output (catdog.onnx_model)."""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from anyio import CapacityLimiter, to_thread
from PIL import Image

from api import budget, model_loader
from api.batching import InferenceFailed, InferenceTimeout, InferenceUnavailable, MicroBatcher, QueueFull
from api.errors import ApiError, decode_error
from api.metrics import ServiceMetrics
from api.model_loader import ModelBundle, ModelLoadError
from api.monitoring import DriftMonitor
from api.settings import Settings
from catdog import onnx_model
from catdog.preprocessing import (
    DecodePlan,
    ImageDecodeError,
    ImageSource,
    PreprocessConfig,
    model_input,
    plan_decode,
)

log = logging.getLogger("catdog.api")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class InDistribution:
    """The out-of-distribution verdict: flag is False when the picture does not look like a cat or a dog
    (score below the threshold calibrated at export)."""

    score: float
    threshold: float
    flag: bool


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]
    confidence: float
    model: ModelBundle
    in_distribution: InDistribution | None = None


class ScoredModel:
    """What the micro-batcher runs for one bundle: rows of class probabilities, followed by the pet score
    when the model has it and a threshold (one model run gives both)."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self.threshold = onnx_model.ood_threshold(bundle.session)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        probabilities, score = onnx_model.predict(self.bundle.session, batch, self.threshold is not None)
        expected = (len(batch), len(self.bundle.labels))
        if probabilities.shape != expected or (score is not None and score.shape != expected[:1]):
            # A wrong shape would hand requests other images' rows (or none): fail the batch instead.
            shapes = f"{probabilities.shape}" + ("" if score is None else f" and scores {score.shape}")
            raise ValueError(f"the model answered probabilities {shapes} for a batch of {len(batch)}")
        return probabilities if score is None else np.column_stack([probabilities, score])

    def split(self, row: np.ndarray) -> tuple[np.ndarray, InDistribution | None]:
        """A batcher row as (class probabilities, verdict)."""
        if self.threshold is None:
            return row, None
        score = float(row[len(self.bundle.labels)])
        verdict = InDistribution(round(score, 6), self.threshold, bool(score >= self.threshold))
        return row[: len(self.bundle.labels)], verdict


@dataclass(frozen=True)
class Decoded:
    """An upload as the model takes it, with what the drift monitor measures."""

    tensor: np.ndarray
    picture: Image.Image
    original_size: tuple[int, int]


def plan_upload(source: ImageSource, config: PreprocessConfig, max_pixels: int) -> DecodePlan:
    """Read an upload's header: what decoding it to the model's size will cost (no pixels yet)."""
    return plan_decode(source, size=config.size, resize=config.resize, max_pixels=max_pixels)


def decode_upload(plan: DecodePlan, config: PreprocessConfig) -> Decoded:
    """The model input of a planned upload (the shared preprocessing, as in training), the model-sized
    RGB picture it was made from (for the drift monitor) and the file's own size."""
    picture = plan.run()
    return Decoded(model_input(picture, config), picture, plan.original_size)


def warmup_image() -> bytes:
    """A small real JPEG (a colour gradient) that goes through the whole decode path."""
    ramp = np.linspace(0, 255, 320, dtype=np.uint8)
    pixels = np.stack(
        [np.tile(ramp, (240, 1)), np.tile(ramp[::-1], (240, 1)), np.full((240, 320), 128, np.uint8)]
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


class Predictor:
    """The served model and the batcher in front of it."""

    # While no model is served, the configured load is retried after these pauses (doubling): a transient
    # failure (MLflow down, a slow warm-up) must not leave the pod unready for good.
    retry_first_s = 5.0
    retry_max_s = 60.0

    def __init__(self, settings: Settings, metrics: ServiceMetrics, drift: DriftMonitor) -> None:
        self.settings = settings
        self.metrics = metrics
        self.drift = drift
        self.batcher = MicroBatcher(
            settings.batch_max_size,
            settings.batch_max_wait_ms,
            settings.max_queue,
            metrics.observe_batch,
            deadline_s=settings.inference_timeout_seconds,
            max_abandoned=settings.inference_max_hung_threads,
            probe_s=settings.inference_probe_seconds,
        )
        self.bundle: ModelBundle | None = None
        # Public reasons are short (no paths, hosts or URIs); admins get the load error (GET /admin/status).
        self.status = "starting: the model is loading"
        self.load_error: str | None = None
        self._lock = asyncio.Lock()
        self._loading: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        self._broken_version: str | None = None
        self._decoders: CapacityLimiter | None = None
        limit = budget.memory_limit_bytes(settings.memory_limit_mb)
        self.decode_budget = budget.DecodeBudget(int(limit * settings.decode_memory_fraction))
        metrics.decode_memory.set_function(lambda: self.decode_budget.used)
        metrics.decode_budget.set(self.decode_budget.total)
        self._scored: ScoredModel | None = None
        # Computed at each scrape, so it drops to 0 whenever /ready would answer 503 (inference failing too).
        metrics.ready.set_function(lambda: float(self.ready))

    def scored(self, bundle: ModelBundle) -> ScoredModel:
        """The batcher's model for `bundle` (one per bundle, so a batch never mixes models)."""
        if self._scored is None or self._scored.bundle is not bundle:
            self._scored = ScoredModel(bundle)
        return self._scored

    async def _decode(self, source: ImageSource, bundle: ModelBundle) -> Decoded:
        """The shared preprocessing in worker threads: read the header, reserve the decode's estimated peak
        memory from the budget (waiting while other decodes hold it), then decode. At most one decode per
        core runs at a time (more only add memory and steal the cores from inference)."""
        if self._decoders is None:
            self._decoders = CapacityLimiter(self.settings.threads)
        max_pixels = self.settings.max_image_pixels
        plan_work = functools.partial(plan_upload, source, bundle.config, max_pixels)
        plan = await to_thread.run_sync(plan_work, limiter=self._decoders)
        async with self.decode_budget.reserve(plan.cost_bytes):
            work = functools.partial(decode_upload, plan, bundle.config)
            return await to_thread.run_sync(work, limiter=self._decoders)

    @property
    def ready(self) -> bool:
        """A model is loaded and inference works (GET /ready)."""
        return self.bundle is not None and self.batcher.ready

    @property
    def reason(self) -> str:
        """Why the service is not ready, in a few words (public: no paths, hosts or URIs)."""
        if self.bundle is None:
            return self.status
        return self.batcher.problem or "ready"

    def admin_state(self) -> dict[str, Any]:
        """The service's health with the details the public endpoints leave out (GET /admin/status)."""
        bundle = self.bundle
        return {
            "ready": self.ready,
            "alive": self.batcher.alive,
            "status": self.reason,
            "model": None if bundle is None else {"name": bundle.name, "version": bundle.version},
            "uri": None if bundle is None else bundle.uri,
            "load_error": self.load_error,
            "inference": self.batcher.state(),
        }

    async def start(self) -> None:
        """Start the batcher and load MODEL_URI in the background (the process answers /health at once)."""
        self.batcher.start()
        loop = asyncio.get_running_loop()
        self._loading = loop.create_task(self._load_configured(), name="model-load")
        if self.settings.model_poll_seconds > 0:
            self._watching = loop.create_task(self._watch_alias(), name="alias-watch")

    async def stop(self) -> None:
        for task in (self._loading, self._watching):
            if task is not None and not task.done():
                task.cancel()
        await self.batcher.stop()

    async def _watch_alias(self) -> None:
        """Follow a models:/name@alias URI: when the alias moves, load the new version and swap it in; a
        version that fails to load or warm up is skipped (the working model keeps serving) until it moves.
        An unexpected error is logged and the next poll goes on: the watcher never dies."""
        while True:
            await asyncio.sleep(self.settings.model_poll_seconds)
            try:
                await self.check_alias()
            except Exception:
                log.exception("alias check of %s failed", self.settings.model_uri)

    async def check_alias(self) -> None:
        """One poll of the served alias (a no-op for other URIs)."""
        bundle = self.bundle
        uri = bundle.uri if bundle is not None else self.settings.model_uri
        try:
            version = await asyncio.to_thread(model_loader.alias_version, uri)
        except ModelLoadError as exc:
            log.warning("cannot resolve %s: %s", uri, exc)
            return
        if (
            version is None
            or (bundle is not None and bundle.version == version)
            or version == self._broken_version
        ):
            return
        log.info("alias moved", extra={"uri": uri, "model_version": version})
        try:
            await self.reload(uri, self.settings.model_precision)
        except ModelLoadError as exc:
            # Skipped until the alias moves only when a working model keeps serving; with none, the
            # configured load's retries (and later polls) try the version again.
            if self.bundle is not None:
                self._broken_version = version
            log.error(
                "version %s of %s not swapped in, still serving the current model: %s", version, uri, exc
            )

    async def _load_configured(self) -> None:
        """Load MODEL_URI; while no model is served (an admin reload may serve one first), retry with
        backoff."""
        pause = self.retry_first_s
        while self.bundle is None:
            try:
                await self.reload(self.settings.model_uri, self.settings.model_precision)
            except Exception as exc:
                self.status = "no model: load failed"
                log.error("model not loaded (next try in %g s): %s", pause, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.retry_max_s)

    async def reload(self, uri: str, precision: str) -> ModelBundle:
        """Load and warm up the model at `uri`, then swap it in; on failure the current model stays."""
        async with self._lock:
            started = time.perf_counter()
            try:
                bundle = await asyncio.to_thread(
                    model_loader.load, uri, precision, self.settings.threads, self.settings.model_cache_dir
                )
                canary = await self._warm_up(bundle)
            except Exception as exc:
                self.metrics.reloads.labels(outcome="failed").inc()
                error = exc if isinstance(exc, ModelLoadError) else ModelLoadError(f"{uri}: {_describe(exc)}")
                self.load_error = str(error)
                await self._prune_cache()
                raise error from exc
            self.bundle = bundle
            self.load_error = None
            self.batcher.set_canary(*canary)
            await self._prune_cache()
            self.drift.use_model(bundle.version, bundle.reference)
            self.status = "ready"
            self.metrics.reloads.labels(outcome="loaded").inc()
            self.metrics.model.info(
                {
                    "name": bundle.name,
                    "version": bundle.version,
                    "precision": bundle.precision,
                    "uri": bundle.uri,
                }
            )
            log.info(
                "model ready",
                extra={
                    "model": bundle.name,
                    "model_version": bundle.version,
                    "precision": bundle.precision,
                    "seconds": round(time.perf_counter() - started, 3),
                },
            )
            return bundle

    async def _prune_cache(self) -> None:
        """Keep only the served version in MODEL_CACHE_DIR (run after each load: while one runs, the served
        and the loading versions are there)."""
        cache_dir = self.settings.model_cache_dir
        if cache_dir:
            keep = self.bundle.cache_entry if self.bundle is not None else None
            await asyncio.to_thread(model_loader.prune_cache, cache_dir, keep)

    async def _warm_up(self, bundle: ModelBundle) -> tuple[ScoredModel, np.ndarray]:
        """One real prediction (decode included) and one full batch; fails on a wrong output. Returns the
        batcher's model and the warm-up image: the canary the batcher runs after a failure."""
        image = (await self._decode(warmup_image(), bundle)).tensor
        scored = ScoredModel(bundle)
        for size in sorted({1, self.settings.batch_max_size}):
            batch = np.repeat(image[None], size, axis=0)
            out = await self.batcher.run_in_thread(scored.predict, batch)
            out = out[:, : len(bundle.labels)] if scored.threshold is not None else out
            if out.shape != (size, len(bundle.labels)) or not np.allclose(out.sum(axis=1), 1, atol=1e-3):
                raise ModelLoadError(
                    f"warm-up prediction failed: got shape {out.shape} summing to {out.sum(axis=1)[:1]}, "
                    f"expected ({size}, {len(bundle.labels)}) probabilities"
                )
        return scored, image

    def current(self) -> ModelBundle:
        """The model being served, or 503 model_not_ready."""
        if self.bundle is None:
            raise ApiError(503, "model_not_ready", self.status, headers={"Retry-After": "5"})
        return self.bundle

    def _inference_error(self, exc: Exception) -> ApiError:
        """The answer for a request whose inference failed (short, public: details are in the log)."""
        if isinstance(exc, QueueFull):
            error = ApiError(503, "overloaded", str(exc), headers={"Retry-After": "1"})
        elif isinstance(exc, InferenceTimeout):
            error = ApiError(504, "inference_timeout", f"the model did not answer in time: {exc}")
        elif isinstance(exc, InferenceUnavailable):
            error = ApiError(503, "inference_unavailable", str(exc), headers={"Retry-After": "5"})
        else:
            message = "the model failed on this request; retry"
            error = ApiError(503, "inference_failed", message, headers={"Retry-After": "1"})
        self.metrics.rejected.labels(code=error.code).inc()
        return error

    async def preprocess(self, source: ImageSource, bundle: ModelBundle) -> Decoded:
        """Decode and preprocess off the event loop with the shared module; bad images become ApiErrors."""
        try:
            return await self._decode(source, bundle)
        except ImageDecodeError as exc:
            error = decode_error(exc)
        except budget.OverBudget as exc:
            error = ApiError(413, "image_too_large", f"the image is too large to decode: {exc}")
        except (MemoryError, Image.DecompressionBombError) as exc:
            error = ApiError(413, "image_too_large", f"the image is too large to decode: {exc}")
        except Exception as exc:
            error = ApiError(422, "corrupt_image", f"the image cannot be decoded ({type(exc).__name__})")
        self.metrics.rejected.labels(code=error.code).inc()
        raise error

    async def predict(self, source: ImageSource) -> Prediction:
        """Class probabilities of one uploaded image (its bytes, or the upload's file)."""
        bundle = self.current()
        decoded = await self.preprocess(source, bundle)
        scored = self.scored(bundle)
        try:
            row, verdict = scored.split(await self.batcher.predict(scored, decoded.tensor))
        except (QueueFull, InferenceFailed, InferenceTimeout, InferenceUnavailable) as exc:
            raise self._inference_error(exc) from exc
        finally:
            self.metrics.queue.set(self.batcher.waiting)
        probabilities = {label: round(float(p), 6) for label, p in zip(bundle.labels, row, strict=True)}
        index = int(np.argmax(row))
        prediction = Prediction(bundle.labels[index], probabilities, float(row[index]), bundle, verdict)
        self.metrics.observe_prediction(prediction.label, prediction.confidence)
        if verdict is not None:
            self.metrics.observe_ood(verdict.flag)
        self.drift.observe(bundle.version, decoded.picture, decoded.original_size, prediction.confidence)
        return prediction
