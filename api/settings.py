"""The service's settings: 12-factor, read from environment variables in this one place."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Precision = Literal["auto", "fp32", "int8"]
MB = 1024 * 1024


class Settings(BaseSettings):
    """Every knob of the prediction service; each field is the upper-case environment variable of its name."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", protected_namespaces=())

    model_uri: str = Field(
        default="models/model.onnx",
        description="An exported .onnx file, a folder holding model.onnx, or an MLflow model URI "
        "(models:/catdog@champion, models:/catdog/3, runs:/<run id>/model).",
    )
    model_precision: Precision = Field(
        default="auto",
        description="fp32, int8 (the statically quantized model; refused unless the export approved it) or "
        "auto (int8 when present and approved, else fp32).",
    )
    model_poll_seconds: float = Field(
        default=30.0,
        ge=0,
        description="For models:/name@alias URIs: how often to check whether the alias moved (0 = never).",
    )
    model_cache_dir: str = Field(
        default="",
        description="Where MLflow models are downloaded, one folder per registry version or runs:/ URI "
        "(only the served one is kept; mutable URIs such as s3:// or https:// are fetched fresh each load); "
        "empty = a temporary folder removed once the model is loaded.",
    )
    model_dir_allowed: str = Field(
        default="",
        description="The folder POST /admin/reload may load model files from (by path); empty = the folder "
        "of MODEL_URI when it is a path (its folder for a .onnx file), none when it is a URI.",
    )
    max_upload_mb: float = Field(default=10.0, gt=0, description="Largest accepted image file (MB).")
    max_image_pixels: int = Field(
        default=40_000_000, gt=0, description="Images with more pixels are refused before decoding."
    )
    max_batch_files: int = Field(default=32, ge=1, description="Most files in one /predict/batch request.")
    max_batch_mb: float = Field(
        default=40.0,
        gt=0,
        description="Largest /predict/batch body (MB), all files together; each file also stays under "
        "MAX_UPLOAD_MB.",
    )
    memory_limit_mb: int = Field(
        default=0,
        ge=0,
        description="The memory this process is given (MB); 0 = the container's cgroup limit, else 1024 "
        "(the Kubernetes pod's limit). The decode budget is a share of it.",
    )
    decode_memory_fraction: float = Field(
        default=0.4,
        gt=0,
        le=0.9,
        description="Share of MEMORY_LIMIT_MB that image decodes may hold together, by their estimated peak "
        "(a 40-megapixel RGBA PNG needs ~350 MB, a phone JPEG ~10 MB). A decode needing more than the whole "
        "share is refused with 413 image_too_large; others wait their turn. The rest of the 1 GiB pod: "
        "~200 MB for the model and runtime, uploads in flight, headroom.",
    )
    max_in_flight: int = Field(
        default=64,
        ge=1,
        description="Most requests handled at once (probes and /metrics excepted); beyond it 503 "
        "overloaded with Retry-After, before the body is read.",
    )
    body_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A request body must arrive within this many seconds (slow clients get 408).",
    )
    batch_max_size: int = Field(
        default=4,
        ge=1,
        description="Most images the model runs in one batch (small on CPU: bigger batches barely add "
        "throughput but grow onnxruntime's memory arena and the bursts of answers; benchmarks/README.md).",
    )
    batch_max_wait_ms: float = Field(
        default=2.0, ge=0, description="How long a batch waits for more requests once one has arrived."
    )
    max_queue: int = Field(
        default=512, ge=1, description="Images waiting for the model before 503 overloaded."
    )
    inference_threads: int = Field(
        default=0, ge=0, description="onnxruntime intra-op threads; 0 = all cores."
    )
    inference_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="The longest a prediction may wait for the model (queue and model call): past it 504 "
        "inference_timeout; a model call running longer is given up as hung and its thread abandoned.",
    )
    inference_max_hung_threads: int = Field(
        default=2,
        ge=0,
        description="Abandoned hung model calls that may still be running before GET /health answers 503 "
        "(the pod is restarted).",
    )
    inference_probe_seconds: float = Field(
        default=1.0,
        gt=0,
        description="After a failed model call, how often the warm-up image is run until one succeeds "
        "(GET /ready answers 503 meanwhile).",
    )
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, description="uvicorn worker processes (python -m api).")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    cors_origins: str = Field(
        default="", description="Comma-separated origins allowed by CORS; empty = none."
    )
    admin_api_key: SecretStr | None = Field(
        default=None, description="Key for POST /admin/reload (header X-API-Key); unset = admin disabled."
    )
    drift_window: int = Field(
        default=500,
        ge=10,
        description="Most recent predicted images the drift monitor compares with the reference.",
    )
    drift_min_images: int = Field(
        default=200,
        ge=1,
        description="Images the drift window needs before it judges drift (held-out real photos, 10 bins: "
        "windows of 100 images reached PSI 0.32, a false alarm; windows of 200 at most 0.12).",
    )
    drift_psi_threshold: float = Field(
        default=0.2,
        gt=0,
        description="PSI over which a property has drifted (0.1 moderate, 0.2 significant).",
    )
    drift_bins: int = Field(
        default=10,
        ge=2,
        le=20,
        description="Most bins PSI compares: the reference's equal-mass histogram merged into at most this "
        "many, with at least 75 reference values each (with k bins, PSI of an undrifted window of n images "
        "is about (k-1)/n).",
    )
    monitoring_expose_window: bool = Field(
        default=False,
        description="Serve the drift window's per-image properties (never pixels, names or request ids) at "
        "GET /monitoring/window, admin key required, for `python -m catdog drift-report`; off = 404.",
    )
    feedback_db: str = Field(
        default="data/feedback.db",
        description="SQLite file keeping every prediction by request id for POST /feedback; empty = none.",
    )
    accuracy_window: int = Field(
        default=500, ge=1, description="Most recent labelled predictions the live accuracy is computed over."
    )
    feedback_retention_days: float = Field(
        default=30.0,
        ge=0,
        description="Predictions that got no feedback are deleted after this many days (0 = kept forever).",
    )
    feedback_max_rows: int = Field(
        default=1_000_000,
        ge=1,
        description="Most predictions the feedback database keeps; past it the oldest unlabelled ones are "
        "pruned first, then the oldest labelled ones outside the live accuracy window.",
    )
    feedback_max_mb: float = Field(
        default=160.0,
        ge=1,
        description="Most MiB the feedback database file may take (SQLite max_page_count); pruned from 95 %. "
        "Its WAL adds up to about 8 MiB: keep both under the volume (deploy/README.md).",
    )
    feedback_api_key: SecretStr | None = Field(
        default=None,
        description="When set, POST /feedback needs it in the X-Feedback-Key header: only trusted labellers "
        "then move the live accuracy. Unset = whoever got a prediction may label it.",
    )
    feedback_rate_per_client: int = Field(
        default=60,
        ge=0,
        description="Feedback requests a minute one client address may send (bursts of as many); 0 = no "
        "limit. Requests with the FEEDBACK_API_KEY are not limited per client.",
    )
    feedback_rate_global: int = Field(
        default=600,
        ge=0,
        description="Feedback requests a minute one process accepts from all clients together; 0 = no limit.",
    )

    @model_validator(mode="after")
    def _drift_window_fits(self) -> Settings:
        if self.drift_min_images > self.drift_window:
            raise ValueError(
                f"DRIFT_MIN_IMAGES ({self.drift_min_images}) is over DRIFT_WINDOW ({self.drift_window})"
            )
        return self

    @model_validator(mode="after")
    def _feedback_rows_hold_the_window(self) -> Settings:
        if self.feedback_max_rows < self.accuracy_window:
            raise ValueError(
                f"FEEDBACK_MAX_ROWS ({self.feedback_max_rows}) is under ACCURACY_WINDOW "
                f"({self.accuracy_window})"
            )
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def threads(self) -> int:
        """onnxruntime intra-op threads: the setting, else the cores this process may use."""
        if self.inference_threads:
            return self.inference_threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
