"""Request and response bodies, with the examples shown in the OpenAPI schema and Swagger UI."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.errors import ErrorDetail

PROBABILITIES = {"cat": 0.0132, "dog": 0.9868}
IN_DISTRIBUTION = {"score": 0.8731, "threshold": 0.2622, "flag": True}
TINY_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


class ModelRef(BaseModel):
    name: str = Field(examples=["tf_efficientnet_lite0"])
    version: str = Field(
        description="Registry version for a registered MLflow model, else the first 12 hex digits of the "
        "model file's SHA-256.",
        examples=["3"],
    )


class InDistributionOut(BaseModel):
    """Whether the picture looks like a cat or a dog at all (the model answers cat or dog for anything)."""

    model_config = ConfigDict(json_schema_extra={"examples": [IN_DISTRIBUTION]})

    score: float = Field(
        description="The model's pet score in [0, 1]: the ImageNet cat+dog probability mass of the "
        "pretrained "
        "ImageNet classifier on the model's own features (definition in the model's `ood` metadata).",
        examples=[0.8731],
    )
    threshold: float = Field(
        description="Calibrated at export on validation pets (export.ood in params.yaml).", examples=[0.2622]
    )
    flag: bool = Field(
        description="true = looks like a cat or a dog (score >= threshold); false = out of distribution: "
        "the label is probably meaningless."
    )


IN_DISTRIBUTION_FIELD = Field(
    default=None,
    description="The out-of-distribution check; null when the served model has no pet score "
    "(e.g. simple_cnn).",
)
PREDICTION_ID = r"^[0-9a-f]{32}$"
PREDICTION_ID_FIELD = Field(
    pattern=PREDICTION_ID,
    description="Minted by the server for this prediction (32 hex digits: the time in milliseconds, then 80 "
    "random bits): send it with POST /feedback.",
    examples=["9c2b7e4f01d84a3b8e6f5a2c1d0e9b7a"],
)


class PredictionOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "label": "dog",
                    "probabilities": PROBABILITIES,
                    "model": {"name": "tf_efficientnet_lite0", "version": "3"},
                    "in_distribution": IN_DISTRIBUTION,
                    "prediction_id": "9c2b7e4f01d84a3b8e6f5a2c1d0e9b7a",
                    "request_id": "5f0c6b1e2d4a4c8e9a7b3c1d2e3f4a5b",
                    "latency_ms": 14.2,
                },
                {
                    "label": "cat",
                    "probabilities": {"cat": 0.9412, "dog": 0.0588},
                    "model": {"name": "tf_efficientnet_lite0", "version": "3"},
                    "in_distribution": {"score": 0.0213, "threshold": 0.2622, "flag": False},
                    "prediction_id": "3e8a1f6c5b2d4e7f9a0b1c2d3e4f5a6b",
                    "request_id": "0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a",
                    "latency_ms": 13.8,
                },
            ]
        }
    )

    label: str = Field(description="The most probable class.", examples=["dog"])
    probabilities: dict[str, float] = Field(description="P(class) for every class; they sum to 1.")
    model: ModelRef
    in_distribution: InDistributionOut | None = IN_DISTRIBUTION_FIELD
    prediction_id: str = PREDICTION_ID_FIELD
    request_id: str = Field(
        description="A correlation id only (the client's X-Request-ID when safe): also in the X-Request-ID "
        "response header and the logs. Feedback takes the prediction_id."
    )
    latency_ms: float = Field(description="Time spent in the service for this request.")


class BatchPrediction(BaseModel):
    filename: str | None = Field(default=None, description="The uploaded file's name, as sent.")
    prediction_id: str = PREDICTION_ID_FIELD
    label: str = Field(examples=["cat"])
    probabilities: dict[str, float]
    model: ModelRef
    in_distribution: InDistributionOut | None = IN_DISTRIBUTION_FIELD


class BatchError(BaseModel):
    filename: str | None = Field(default=None, description="The uploaded file's name, as sent.")
    error: ErrorDetail


class BatchOut(BaseModel):
    results: list[BatchPrediction | BatchError] = Field(
        description="One entry per uploaded file, in order: a prediction or that file's own error."
    )
    request_id: str
    latency_ms: float


class Base64In(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"image": TINY_PNG, "filename": "pixel.png"}]})

    image: str = Field(
        description="The image file's bytes, base64-encoded (a data: URL prefix is accepted).", min_length=1
    )
    filename: str | None = Field(default=None, max_length=255)


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    detail: str | None = Field(
        default=None,
        description="Why the process should be restarted (503 only), in a few words.",
        examples=["too many hung inference threads"],
    )


class Readiness(BaseModel):
    status: str = Field(examples=["ready"])
    ready: bool
    model: ModelRef | None = None
    detail: str = Field(
        description="`ready`, or why not in a few words (no paths or hosts; admins: GET /admin/status).",
        examples=["ready", "no model: load failed", "inference failed"],
    )


class ModelOut(BaseModel):
    name: str
    version: str
    precision: str = Field(examples=["fp32"])
    uri: str = Field(
        description="MODEL_URI (or the URI of the last reload).", examples=["models:/catdog@champion"]
    )
    labels: list[str] = Field(examples=[["cat", "dog"]])
    preprocessing: dict[str, Any] = Field(
        description="The recipe in the model's metadata, applied to every image."
    )
    metrics: dict[str, Any] = Field(description="Test metrics and quantization figures recorded at export.")
    lineage: dict[str, Any] = Field(description="Data version and git commit of the training run.")
    registry: dict[str, Any] | None = Field(default=None, description="Registered name, version and aliases.")
    loaded_at: float = Field(description="Unix time the model was loaded.")
    card: str | None = Field(default=None, description="The model card (Markdown).")


class ReloadIn(BaseModel):
    model_uri: str | None = Field(default=None, description="Defaults to MODEL_URI.", max_length=2048)
    precision: str | None = Field(
        default=None, pattern="^(auto|fp32|int8)$", description="Defaults to MODEL_PRECISION."
    )


class InferenceState(BaseModel):
    ready: bool = Field(description="No model call failed since the last one that worked.")
    alive: bool = Field(description="false: only a restart helps (GET /health answers 503).")
    problem: str | None = Field(description="Why not ready, in a few words.")
    unrecoverable: str | None = Field(description="Why not alive.")
    last_error: str | None = Field(description="The last failure in full (kept after recovery).")
    waiting: int = Field(description="Images queued for the model.")
    abandoned_threads: int = Field(description="Hung model calls given up on that are still running.")
    probe_failures: int = Field(description="Failed canary calls in a row since the last failure.")
    deadline_s: float = Field(description="INFERENCE_TIMEOUT_SECONDS.")
    failed_batches: int
    timeouts: int
    loop_restarts: int
    recoveries: int


class AdminStatus(BaseModel):
    ready: bool
    alive: bool
    status: str = Field(description="The public reason GET /ready gives.")
    model: ModelRef | None
    uri: str | None = Field(description="The served model's URI.")
    load_error: str | None = Field(
        description="Why the last load or reload failed, in full; null after a success."
    )
    inference: InferenceState


class ReloadOut(BaseModel):
    status: str = Field(examples=["reloaded"])
    previous: ModelRef | None
    model: ModelRef
    seconds: float


class FeedbackIn(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"prediction_id": "9c2b7e4f01d84a3b8e6f5a2c1d0e9b7a", "true_label": "cat"}]
        }
    )

    prediction_id: str = Field(
        pattern=PREDICTION_ID,
        description="The prediction_id the prediction's answer carried (each /predict/batch result has its "
        "own); not the request id.",
    )
    true_label: str = Field(
        min_length=1, max_length=64, description="What the image really shows: one of the model's labels."
    )


class FeedbackOut(BaseModel):
    prediction_id: str
    request_id: str = Field(description="The request id of the request that made the prediction.")
    status: Literal["recorded", "unchanged"] = Field(
        description="`unchanged` when the same true label had already been recorded (the first label wins)."
    )
    predicted_label: str = Field(examples=["dog"])
    true_label: str = Field(examples=["cat"])
    correct: bool
    model: ModelRef = Field(description="The model that made the prediction.")
    live_accuracy: float | None = Field(description="Accuracy over the live accuracy window, this included.")
    labelled: int = Field(description="Labelled predictions in the live accuracy window.")


class Summary(BaseModel):
    mean: float | None
    median: float | None


class PropertyDrift(BaseModel):
    score: float | None = Field(
        description="PSI against the reference; null while collecting or without one."
    )
    threshold: float
    drifted: bool
    status: Literal["ok", "drift", "collecting", "no_reference"]
    bins: int | None = Field(description="Bins PSI compares for this reference (null without one).")
    reference: Summary | None = Field(
        description="The reference distribution (training images, or the "
        "model's confidence on the validation split)."
    )
    live: Summary | None = Field(description="The images in the window.")


class DriftReport(BaseModel):
    model_version: str | None = Field(description="The served model the window is judged against.")
    status: Literal["ok", "drift", "collecting", "no_reference", "no_model"]
    drifted: bool = Field(description="Whether any property (or the confidence) has drifted.")
    drifted_properties: list[str]
    window: int = Field(description="DRIFT_WINDOW: the most recent images compared.")
    images: int = Field(description="Images in the window now.")
    min_images: int = Field(description="DRIFT_MIN_IMAGES: images needed before drift is judged.")
    threshold: float = Field(description="DRIFT_PSI_THRESHOLD.")
    properties: dict[str, PropertyDrift] = Field(
        description="brightness, contrast, sharpness, colourfulness, width, height, aspect_ratio, confidence."
    )


class ClassRecall(BaseModel):
    labelled: int = Field(description="Labelled predictions of this true class in the window.")
    recall: float


class ModelAccuracy(BaseModel):
    labelled: int
    accuracy: float


class FeedbackSource(BaseModel):
    client: str = Field(description="The client address the labels came from.", examples=["203.0.113.7"])
    labelled: int = Field(description="Labels in the window from this address.")
    accuracy: float = Field(description="Accuracy of the predictions this address labelled.")


class FeedbackSources(BaseModel):
    clients: int = Field(description="Distinct client addresses that sent the window's labels.")
    top: list[FeedbackSource] = Field(description="The (up to) five addresses that sent the most.")


class PerformanceReport(BaseModel):
    window: int = Field(description="ACCURACY_WINDOW: the most recent labelled predictions counted.")
    labelled: int = Field(description="Labelled predictions in the window.")
    correct: int
    accuracy: float | None = Field(description="null before any feedback.")
    per_class: dict[str, ClassRecall] = Field(description="Recall per true class, in the window.")
    by_model: dict[str, ModelAccuracy] = Field(description="Accuracy per model version, in the window.")
    labelled_total: int = Field(description="Labelled predictions in the database.")
    sources: FeedbackSources = Field(
        description="Who sent the window's labels: check it before acting on a drop (docs/runbook.md)."
    )
