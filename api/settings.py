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
        default="", description="Where MLflow models are downloaded; empty = a temp dir."
    )
    max_upload_mb: float = Field(default=10.0, gt=0, description="Largest accepted image file (MB).")
    max_image_pixels: int = Field(
        default=40_000_000, gt=0, description="Images with more pixels are refused before decoding."
    )
    max_batch_files: int = Field(default=32, ge=1, description="Most files in one /predict/batch request.")
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

    @model_validator(mode="after")
    def _drift_window_fits(self) -> Settings:
        if self.drift_min_images > self.drift_window:
            raise ValueError(
                f"DRIFT_MIN_IMAGES ({self.drift_min_images}) is over DRIFT_WINDOW ({self.drift_window})"
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
