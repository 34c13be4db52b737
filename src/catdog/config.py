"""The one place that reads params.yaml and derives every path of the pipeline."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from catdog import onnx_model
from catdog.errors import ConfigError

CLASSES: tuple[str, ...] = ("cat", "dog")
RAW_CLASS_DIRS: dict[str, str] = {"cat": "Cat", "dog": "Dog"}
SPLITS: tuple[str, ...] = ("train", "val", "test")
PARAMS_FILE = "params.yaml"
DATA_SOURCE_ENV = "DATA_SOURCE"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DownloadParams(_Section):
    attempts: int = Field(default=4, ge=1)
    backoff_seconds: float = Field(default=2.0, ge=0)


class DataParams(_Section):
    source: str
    sha256: str | None = None
    max_per_class: int | None = Field(default=None, gt=0)
    download: DownloadParams = DownloadParams()


class ValidateParams(_Section):
    min_side: int = Field(default=32, gt=0)
    max_pixels: int = Field(default=50_000_000, gt=0)
    near_duplicate_distance: int = Field(default=4, ge=0, le=64)
    max_unusable_fraction: float = Field(default=0.05, ge=0, le=1)
    max_class_imbalance: float = Field(default=1.5, ge=1)


class SplitParams(_Section):
    train: float = Field(gt=0, lt=1)
    val: float = Field(gt=0, lt=1)
    test: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitParams:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError("split fractions must sum to 1")
        return self


class PrepareParams(_Section):
    image_size: int = Field(default=224, ge=32, le=1024)
    resize: Literal["center_crop", "letterbox"] = "center_crop"
    jpeg_quality: int = Field(default=95, ge=50, le=100)
    split: SplitParams = SplitParams(train=0.8, val=0.1, test=0.1)
    workers: int = Field(default=2, ge=1)


class AugmentParams(_Section):
    hflip: float = Field(default=0.5, ge=0, le=1)
    random_resized_crop_scale: tuple[float, float] = (0.7, 1.0)
    color_jitter: float = Field(default=0.2, ge=0, le=1)
    rotate_limit: float = Field(default=10, ge=0, le=180)

    @model_validator(mode="after")
    def _scale_range(self) -> AugmentParams:
        low, high = self.random_resized_crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError("random_resized_crop_scale must be [min, max] with 0 < min <= max <= 1")
        return self


class FeatureCacheParams(_Section):
    enabled: bool = True
    views: int = Field(default=2, ge=1, le=16)


class TrainParams(_Section):
    model: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    image_size: int | None = Field(default=None, ge=32, le=1024)
    batch_size: int = Field(default=32, ge=1)
    num_workers: int = Field(default=0, ge=0)
    epochs_frozen: int = Field(default=8, ge=0)
    epochs_unfrozen: int = Field(default=1, ge=0)
    lr_head: float = Field(default=3e-3, gt=0)
    lr_backbone: float = Field(default=3e-5, gt=0)
    weight_decay: float = Field(default=1e-2, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1)
    early_stopping_patience: int | None = Field(default=3, ge=1)
    freeze_batchnorm: bool = True
    augment: AugmentParams = AugmentParams()
    feature_cache: FeatureCacheParams = FeatureCacheParams()
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    channels_last: bool = True
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | Literal["auto"] = "auto"
    strategy: str = "auto"
    threads: int | None = Field(default=None, ge=1)
    limit_images: int | None = Field(default=None, ge=1)
    resume: bool = False
    progress_bar: bool = True

    @model_validator(mode="after")
    def _some_epochs(self) -> TrainParams:
        if self.epochs_frozen + self.epochs_unfrozen == 0:
            raise ValueError("epochs_frozen + epochs_unfrozen must be at least 1")
        return self


class EvaluateParams(_Section):
    batch_size: int = Field(default=64, ge=1)
    min_accuracy: float = Field(default=0.6, ge=0, le=1)
    min_f1: float = Field(default=0.6, ge=0, le=1)
    max_log_loss: float = Field(default=0.69, gt=0)
    behaviour_images: int | None = Field(default=500, ge=1)
    crop_fraction: float = Field(default=0.9, gt=0.5, le=1)
    worst_examples: int = Field(default=16, ge=0)


class LinearProbeParams(_Section):
    enabled: bool = True
    backbone: str = "tf_efficientnet_lite0"
    C: list[float] = Field(default=[0.03, 0.1, 0.3, 1.0, 3.0], min_length=1)
    batch_size: int = Field(default=32, ge=1)


class SimpleCnnParams(_Section):
    enabled: bool = True
    epochs: int = Field(default=5, ge=1)
    image_size: int = Field(default=128, ge=32)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=3e-3, gt=0)


class BaselinesParams(_Section):
    linear_probe: LinearProbeParams = LinearProbeParams()
    simple_cnn: SimpleCnnParams = SimpleCnnParams()


class TrackingParams(_Section):
    experiment: str = "catdog"


class QuantizationParams(_Section):
    enabled: bool = True
    calibration_images: int = Field(default=200, ge=1)
    per_channel: bool = True
    max_accuracy_drop: float = Field(default=0.2, ge=0)


class OodParams(_Section):
    """The out-of-distribution score's threshold calibration (export.ood)."""

    enabled: bool = True
    pet_quantile: float = Field(default=0.03, ge=0, le=0.5)
    min_threshold: float = Field(default=0.1, ge=0, le=1)
    max_threshold: float = Field(default=0.5, ge=0, le=1)


class ExportParams(_Section):
    opset: int = Field(default=18, ge=18)
    parity_tolerance: float = Field(default=1e-4, ge=0)
    parity_images: int = Field(default=64, ge=1)
    latency_runs: int = Field(default=30, ge=5)
    throughput_batch_size: int = Field(default=32, ge=1)
    batch_size: int = Field(default=32, ge=1)
    reference_images: int | None = Field(default=None, ge=1)
    quantization: QuantizationParams = QuantizationParams()
    ood: OodParams = OodParams()


class ChecksParams(_Section):
    """`catdog checks`: deepchecks suites on per-image properties; only these conditions fail the stage."""

    workers: int = Field(default=2, ge=1)
    min_samples: int = Field(default=10, ge=1)
    max_feature_drift: float = Field(default=0.2, ge=0, le=1)
    max_label_drift: float = Field(default=0.1, ge=0, le=1)
    max_duplicates: float = Field(default=0.01, ge=0, le=1)
    max_duplicates_across_splits: float = Field(default=0.0, ge=0, le=1)
    min_class_recall: float = Field(default=0.6, ge=0, le=1)
    min_class_f1: float = Field(default=0.6, ge=0, le=1)
    max_brier_score: float = Field(default=0.25, ge=0, le=1)


class GateParams(_Section):
    """The promotion gates a challenger must pass to become champion (all are checked and recorded)."""

    min_accuracy: float = Field(default=0.97, ge=0, le=1)
    min_f1: float = Field(default=0.97, ge=0, le=1)
    max_log_loss: float = Field(default=0.15, gt=0)
    max_accuracy_drop: float = Field(default=0.005, ge=0)
    max_log_loss_increase: float = Field(default=0.02, ge=0)
    max_latency_ms_p95: float = Field(default=50.0, gt=0)
    latency_runs: int = Field(default=50, ge=5)
    smoke_images_per_class: int = Field(default=4, ge=1)
    smoke_min_confidence: float = Field(default=0.9, ge=0.5, le=1)
    smoke_timeout_seconds: float = Field(default=120.0, gt=0)


class RegistryParams(_Section):
    model_name: str = Field(default="catdog", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    audit_experiment: str = "catdog-registry-audit"
    gates: GateParams = GateParams()


class StageRunParams(_Section):
    retries: int | None = Field(default=None, ge=0)
    timeout_minutes: float | None = Field(default=None, gt=0)


class AlertParams(_Section):
    on_success: bool = True
    timeout_seconds: float = Field(default=10.0, gt=0)


class ScheduleParams(_Section):
    retrain_cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    data_check_minutes: float = Field(default=60.0, gt=0)


class OrchestrationParams(_Section):
    retries: int = Field(default=2, ge=0)
    retry_delay_seconds: list[float] = Field(default=[10.0, 60.0, 300.0], min_length=1)
    retry_jitter_factor: float = Field(default=0.2, ge=0)
    timeout_minutes: float = Field(default=60.0, gt=0)
    stages: dict[str, StageRunParams] = {}
    alerts: AlertParams = AlertParams()
    schedule: ScheduleParams = ScheduleParams()

    def retries_of(self, stage: str) -> int:
        """Retries of one stage's task: its own setting, else the default."""
        own = self.stages.get(stage)
        return self.retries if own is None or own.retries is None else own.retries

    def timeout_seconds_of(self, stage: str) -> float:
        """Wall-clock limit of one stage's task in seconds: its own setting, else the default."""
        own = self.stages.get(stage)
        minutes = self.timeout_minutes if own is None or own.timeout_minutes is None else own.timeout_minutes
        return minutes * 60.0


class Params(BaseModel):
    """The whole of params.yaml, validated. Later stages add their own sections."""

    model_config = ConfigDict(extra="allow", frozen=True)

    seed: int = 42
    data: DataParams
    validate_: ValidateParams = Field(default=ValidateParams(), alias="validate")
    prepare: PrepareParams = PrepareParams()
    train: TrainParams = TrainParams()
    baselines: BaselinesParams = BaselinesParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()
    export: ExportParams = ExportParams()
    registry: RegistryParams = RegistryParams()
    orchestration: OrchestrationParams = OrchestrationParams()
    checks: ChecksParams = ChecksParams()


@dataclass(frozen=True)
class Paths:
    """Every file and folder of the pipeline, derived from the project root."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / PARAMS_FILE

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def source_info(self) -> Path:
        return self.data / "source.json"

    @property
    def checksums(self) -> Path:
        return self.data / "checksums.json"

    @property
    def downloads(self) -> Path:
        return self.data / "downloads"

    @property
    def raw(self) -> Path:
        return self.data / "raw"

    @property
    def raw_images(self) -> Path:
        return self.raw / "PetImages"

    @property
    def processed(self) -> Path:
        return self.data / "processed"

    @property
    def split_manifest(self) -> Path:
        return self.processed / "manifest.csv"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def registry_info(self) -> Path:
        """The version the register stage created (name, version, model URI, run)."""
        return self.models / "registry.json"

    @property
    def promotion_report(self) -> Path:
        return self.reports / "promotion.json"

    @property
    def validation_report(self) -> Path:
        return self.reports / "validation.json"

    @property
    def validation_summary(self) -> Path:
        return self.reports / "validation.md"

    @property
    def validation_images(self) -> Path:
        return self.reports / "validation_images.csv"

    @property
    def validation_metrics(self) -> Path:
        return self.metrics / "validation.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def prepare_metrics(self) -> Path:
        return self.metrics / "prepare.json"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def model_checkpoint(self) -> Path:
        return self.models / "model.ckpt"

    @property
    def train_checkpoints(self) -> Path:
        return self.models / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.train_checkpoints / "last.ckpt"

    @property
    def train_metrics(self) -> Path:
        return self.metrics / "train.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def train_history(self) -> Path:
        return self.plots / "train_history.csv"

    @property
    def feature_cache(self) -> Path:
        return self.data / "features"

    @property
    def baselines_metrics(self) -> Path:
        return self.metrics / "baselines.json"

    @property
    def evaluate_metrics(self) -> Path:
        return self.metrics / "evaluate.json"

    @property
    def evaluate_plots(self) -> Path:
        return self.plots / "evaluate"

    @property
    def evaluate_reports(self) -> Path:
        return self.reports / "evaluate"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlruns"

    @property
    def run_info(self) -> Path:
        return self.models / "mlflow_run.json"

    @property
    def dvc_lock(self) -> Path:
        return self.root / "dvc.lock"

    @property
    def onnx_model(self) -> Path:
        return self.models / onnx_model.FP32_FILE

    @property
    def int8_model(self) -> Path:
        return self.models / onnx_model.INT8_FILE

    @property
    def model_card(self) -> Path:
        return self.models / onnx_model.CARD_FILE

    @property
    def labels(self) -> Path:
        return self.models / "labels.json"

    @property
    def reference_stats(self) -> Path:
        return self.models / onnx_model.REFERENCE_FILE

    @property
    def export_metrics(self) -> Path:
        return self.metrics / "export.json"

    @property
    def checks_reports(self) -> Path:
        """The deepchecks HTML reports and summary.json (large: DVC outs, never in git)."""
        return self.reports / "checks"

    @property
    def checks_summary(self) -> Path:
        return self.checks_reports / "summary.json"

    @property
    def checks_metrics(self) -> Path:
        return self.metrics / "checks.json"


def find_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) holding params.yaml."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PARAMS_FILE).is_file():
            return folder
    raise ConfigError(f"no {PARAMS_FILE} found in {here} or any parent folder; run from the project root")


def load_params(path: Path | None = None) -> Params:
    """Read and validate params.yaml; every problem is reported with the file's name."""
    path = path or find_root() / PARAMS_FILE
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"{path}: {problems}") from exc


class Project:
    """The project root with its parameters and paths, as every stage sees them."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or find_root()).resolve()
        self.paths = Paths(self.root)

    @cached_property
    def params(self) -> Params:
        return load_params(self.paths.params)

    def data_source(self) -> str:
        """The data source in force: $DATA_SOURCE when set, else params.yaml's data.source."""
        return os.environ.get(DATA_SOURCE_ENV, "").strip() or self.params.data.source
