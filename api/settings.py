"""The service's settings: 12-factor, read from environment variables in this one place."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr
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
